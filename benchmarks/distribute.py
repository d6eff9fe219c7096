"""`cmds-ad distribute` against a serial `dvc repro`, on the reduced demo of the tests (two
categories, k = 1, few steps), in scratch git + DVC projects (the working copy is untouched).

Prints the wall time of both, and per stage instance the distributed run's overhead (clone,
DVC start-up + pull of the inputs, push of outputs and run cache) beside the instance's own
work (`dvc repro --single-item`, the stage command with DVC's hashing and commit).

    python benchmarks/distribute.py [--workers 2] [--categories disc,dome]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from stages.scratch_project import REDUCED_DEMO, make_project, project_env, sh, stages_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--categories", default="disc,dome")
    args = parser.parse_args()
    categories = tuple(args.categories.split(","))
    os.environ.update(project_env())  # the LocalCluster's workers inherit it

    from rich.console import Console

    from stages.distribute import ClusterOptions, distribute

    with tempfile.TemporaryDirectory() as tmp:
        serial = make_project(Path(tmp) / "serial", REDUCED_DEMO, categories=categories,
                              n_train=3, n_test=6, make_data=False)
        start = time.perf_counter()
        n_serial = len(stages_run(sh(["dvc", "repro"], serial).stdout))
        serial_s = time.perf_counter() - start

        project = make_project(Path(tmp) / "dist", REDUCED_DEMO, categories=categories,
                               n_train=3, n_test=6, make_data=False)
        sh(["dvc", "remote", "add", "-d", "team", str(Path(tmp) / "remote")], project)
        sh(["git", "commit", "-q", "-am", "remote"], project)
        start = time.perf_counter()
        outcome = distribute(project, ClusterOptions(cluster="local", workers=args.workers),
                             console=Console(stderr=True, quiet=True))
        dist_s = time.perf_counter() - start
        assert outcome.ok, outcome.failures
        results = list(outcome.results.values())

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in results)

    runner = [r["total_s"] - r["clone_s"] - r["pull_s"] - r["repro_s"] - r["push_s"]
              for r in results]
    overhead = mean("clone_s") + mean("pull_s") + mean("push_s") + statistics.fmean(runner)
    print(f"reduced demo: {', '.join(categories)}, k = 1; {os.cpu_count()} cores")
    print(f"serial dvc repro: {serial_s:.1f} s ({n_serial} instances)")
    print(f"cmds-ad distribute, {args.workers} local workers: {dist_s:.1f} s "
          f"({len(results)} instances; speed-up {serial_s / dist_s:.2f}x)")
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


if __name__ == "__main__":
    main()
