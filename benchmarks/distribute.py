"""`cmds-ad distribute` against a serial `dvc repro`, on the reduced demo of the tests (k = 1,
few steps), in scratch git + DVC projects (the working copy is untouched).

Prints the wall time of both, and per stage instance the distributed run's overhead (clone,
DVC start-up + pull of the inputs, push of outputs and run cache) beside the instance's own
work (`dvc repro --single-item`, the stage command with DVC's hashing and commit). With
`--cluster slurm` also the per-job overhead: from the cluster's start to each job submitted,
running (`squeue`) and its Dask worker connected, beside a local cluster's worker start.

    python benchmarks/distribute.py [--workers 2] [--categories disc,dome]
    python benchmarks/distribute.py --cluster slurm --start-slurm --categories disc

`--start-slurm` starts the tests' one-node SLURM (tests/slurm_cluster.py: installs Debian's
slurm-wlm where missing, as root); without it `--cluster slurm` uses the SLURM that `sbatch`
reaches, with `--partition`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from tools.scratch_project import REDUCED_DEMO, make_project, project_env, sh, stages_run

REPO = Path(__file__).resolve().parents[1]
STARTUP_REPEATS = 3


@contextmanager
def one_node_slurm(folder: Path):
    """The tests' one-node SLURM, its client commands pointed at it."""
    sys.path.insert(0, str(REPO))
    from tests import slurm_cluster

    reason = slurm_cluster.ensure_installed()
    if reason:
        raise SystemExit(reason)
    cluster = slurm_cluster.start(folder)
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        cluster.stop()


def cluster_options(cluster: str, workers: int, partition: str | None = None,
                    memory_mb: int | None = None):
    from scheduler.settings import ClusterOptions

    if cluster == "local":
        return ClusterOptions(cluster="local", jobs=workers)
    # one core per job: the same share of the machine as a local worker process
    return ClusterOptions(cluster="slurm", jobs=workers, cores=1,
                          memory=f"{memory_mb}MB" if memory_mb else "4GB",
                          partition=partition, walltime="01:00:00")


def worker_startup(options, folder: Path) -> list[dict[str, float]]:
    """Per worker, seconds from the cluster's start: job submitted, job running, worker
    connected (local workers: connected only)."""
    from scheduler.cluster import start_cluster
    from scheduler.slurm import squeue_states

    t0 = time.perf_counter()
    client, cluster, _ = start_cluster(options, folder)
    marks: dict[str, dict[str, float]] = {}
    try:
        while sum("connected" in m for m in marks.values()) < options.jobs:
            now = time.perf_counter() - t0
            states = squeue_states() if options.cluster == "slurm" else {}
            for name, job in list(cluster.workers.items()):
                job_id = str(getattr(job, "job_id", None) or "")
                mark = marks.setdefault(str(name), {})
                if job_id:
                    mark.setdefault("submitted", now)
                    if (states or {}).get(job_id, ("",))[0] == "RUNNING":
                        mark.setdefault("running", now)
            for worker in client.scheduler_info(n_workers=-1)["workers"].values():
                marks.setdefault(str(worker["name"]), {}).setdefault("connected", now)
            time.sleep(0.05)
    finally:
        client.close()
        cluster.close()
    return list(marks.values())


def print_startup(options, folder: Path) -> None:
    samples = [m for i in range(STARTUP_REPEATS)
               for m in worker_startup(options, folder / f"startup-{i}")]

    def mean(key: str, start: str | None = None) -> float:
        return statistics.fmean(m[key] - (m[start] if start else 0) for m in samples)

    if options.cluster == "slurm":
        print(f"per job ({len(samples)} jobs, {STARTUP_REPEATS} starts of {options.jobs}), mean "
              f"s from the cluster's start: submitted {mean('submitted'):.2f}, running "
              f"{mean('running'):.2f}, worker connected {mean('connected'):.2f} (job start "
              f"{mean('running', 'submitted'):.2f} s, worker start in the job "
              f"{mean('connected', 'running'):.2f} s)")
    else:
        print(f"per local worker ({len(samples)} workers, {STARTUP_REPEATS} starts of "
              f"{options.jobs}), mean s from the cluster's start to connected: "
              f"{mean('connected'):.2f}")


def run_demo(options, categories, folder: Path) -> tuple[float, int, float, list[dict]]:
    """Serial `dvc repro` and `cmds-ad distribute`: (serial s, instances, distributed s,
    the distributed instances' results)."""
    from rich.console import Console

    from scheduler.run import distribute

    serial = make_project(folder / "serial", REDUCED_DEMO, categories=categories,
                          n_train=3, n_test=6, make_data=False)
    start = time.perf_counter()
    n_serial = len(stages_run(sh(["dvc", "repro"], serial).stdout))
    serial_s = time.perf_counter() - start

    project = make_project(folder / "dist", REDUCED_DEMO, categories=categories,
                           n_train=3, n_test=6, make_data=False)
    sh(["dvc", "remote", "add", "-d", "team", str(folder / "remote")], project)
    sh(["git", "commit", "-q", "-am", "remote"], project)
    start = time.perf_counter()
    outcome = distribute(project, options, console=Console(stderr=True, quiet=True))
    dist_s = time.perf_counter() - start
    assert outcome.ok, outcome.failures
    return serial_s, n_serial, dist_s, list(outcome.results.values())


def print_overheads(results: list[dict], serial_s: float, n_serial: int) -> None:
    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in results)

    runner = [r["total_s"] - r["clone_s"] - r["pull_s"] - r["repro_s"] - r["push_s"]
              for r in results]
    overhead = mean("clone_s") + mean("pull_s") + mean("push_s") + statistics.fmean(runner)
    print(f"per instance, mean: clone {mean('clone_s'):.2f} s, runner start-up "
          f"{statistics.fmean(runner):.2f} s, DVC open + pull of inputs {mean('pull_s'):.2f} s, "
          f"push of outputs + run cache {mean('push_s'):.2f} s = overhead {overhead:.2f} s; "
          f"the instance's own dvc repro --single-item {mean('repro_s'):.2f} s "
          f"(serial: {serial_s / n_serial:.2f} s per instance)")
    by_stage: dict[str, list[float]] = {}
    for r in results:
        by_stage.setdefault(r["addr"].split(":")[-1].split("@")[0], []).append(r["repro_s"])
    print("own work per stage (mean s): " + ", ".join(
        f"{name} {statistics.fmean(v):.1f}" for name, v in by_stage.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="local workers / SLURM jobs")
    parser.add_argument("--categories", default="disc,dome")
    parser.add_argument("--cluster", choices=("local", "slurm"), default="local")
    parser.add_argument("--start-slurm", action="store_true",
                        help="start the tests' one-node SLURM for the run")
    parser.add_argument("--partition", default=None)
    args = parser.parse_args()
    categories = tuple(args.categories.split(","))
    os.environ.update(project_env())  # the workers inherit it

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        slurm = one_node_slurm(folder / "slurm") if args.start_slurm else nullcontext()
        with slurm as cluster:
            memory_mb = cluster.memory_mb // (args.workers + 1) if cluster else None
            options = cluster_options(args.cluster, args.workers, args.partition, memory_mb)
            print(f"reduced demo: {', '.join(categories)}, k = 1; {os.cpu_count()} cores; "
                  f"load average {os.getloadavg()[0]:.2f} at the start")
            print_startup(options, folder)
            if args.cluster == "slurm":
                print_startup(cluster_options("local", args.workers), folder)
            serial_s, n_serial, dist_s, results = run_demo(options, categories, folder)
        print(f"serial dvc repro: {serial_s:.1f} s ({n_serial} instances)")
        where = (f"{args.workers} local workers" if args.cluster == "local"
                 else f"{args.workers} SLURM jobs of 1 core")
        print(f"cmds-ad distribute, {where}: {dist_s:.1f} s ({len(results)} instances; "
              f"speed-up {serial_s / dist_s:.2f}x)")
        print_overheads(results, serial_s, n_serial)
        print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
