"""``cmds-ad distribute``: the DVC stage instances that are not up to date, as Dask tasks.

DVC gives the graph (its index: stage instances, their upstream instances, their status).
Every instance to run becomes one Dask task whose inputs are the tasks of its upstream
instances. A task clones the repository at the current commit into the worker's scratch
space and runs ``stages.distribute_worker`` there: pull the upstream outputs from the shared
DVC remote, ``dvc repro --pull --single-item``, push the outputs, then the run cache. At the
end the local lock files get the instances' entries and ``dvc pull`` checks the outputs out,
so ``dvc status`` is clean as after a local ``dvc repro``.

A task that raises (the stage failed) is not retried; a worker that dies is, by the Dask
scheduler (``distributed.scheduler.allowed-failures``), on another worker; so is one whose
runner was terminated (SIGTERM: a SLURM job cancelled or preempted).

Where the workers run: ``stages.distribute_settings`` (``distribute.yaml`` and the command
line); SLURM jobs: ``stages.distribute_slurm``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stages.distribute_settings import SETTINGS_FILE, ClusterOptions, DistributeError

# stage names (before "@") whose commands run a model: one GPU each where the cluster has GPUs
MODEL_STAGES = frozenset({
    "augment", "estimate_normals", "estimate_normals_generated", "extract_features",
    "extract_features_generated", "fit_mapper", "infer",
})
EVENT_TOPIC = "cmds-ad-distribute"
LOG_TAIL_LINES = 25
# Dask's nanny sets these in its workers (distributed.nanny.pre-spawn-environ); a stage
# instance gets the values of the shell that started `cmds-ad distribute` instead, as under
# `dvc repro`: torch's CPU kernels give other bits with another thread count, and with
# glibc's trim threshold fixed at 64 KiB every larger tensor is a fresh mmap (the reduced
# demo's fit_mapper: 10x the page faults, 46 s instead of 35 s)
NANNY_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                  "MALLOC_TRIM_THRESHOLD_")
# read at import: a LocalCluster's nanny sets them in this process too
SHELL_ENV = {var: os.environ.get(var) for var in NANNY_ENV_VARS}
# a runner killed by one of these was stopped from outside (a SLURM job cancelled, preempted
# or out of time; Ctrl-C): its instance goes back to the scheduler, it did not fail
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
RUNS_DIR = ".dvc/tmp/distribute"  # run records and SLURM job logs (DVC keeps tmp/ out of git)


class InstanceFailed(Exception):
    """A stage instance's process failed on a worker: the run fails, with no retry."""

    def __init__(self, addr: str, worker: str, log_tail: str) -> None:
        super().__init__(addr, worker, log_tail)
        self.addr, self.worker, self.log_tail = addr, worker, log_tail

    def __str__(self) -> str:
        return f"{self.addr} failed on {self.worker}"


@dataclass(frozen=True)
class Instance:
    addr: str                 # DVC address, e.g. upstream/dvc.yaml:fit_mapper@disc-1-0
    name: str                 # its key in the lock file, e.g. fit_mapper@disc-1-0
    lockfile: str             # its lock file, relative to the repository root
    pipeline: bool            # False for a .dvc file (a data source: pulled, never run)
    parents: tuple[str, ...]  # addresses of the instances that produce its dependencies
    uncached: tuple[str, ...] # its `cache: false` outputs (metrics, plots), relative paths
    model: bool               # runs a model: asks for a GPU where there are GPUs

    @property
    def stage(self) -> str:
        return self.name.split("@", 1)[0]


@dataclass
class Plan:
    root: Path
    commit: str
    instances: dict[str, Instance]
    to_run: list[str]            # in dependency order
    output_paths: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- planning

def _git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise DistributeError(f"git {' '.join(args)} failed in {root}: {result.stderr.strip()}")
    return result.stdout


def _rel(root: Path, path: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def plan(root: Path, targets: Sequence[str] = ()) -> Plan:
    """The instances of ``targets`` (default: all) with their upstream, and those to run:
    what ``dvc status`` reports changed plus everything downstream of it."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    root = root.resolve()
    commit = _git(root, "rev-parse", "HEAD").strip()
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        if targets:
            selected = set()
            for target in targets:
                try:
                    stages = repo.stage.collect(target, with_deps=True)
                except Exception as err:  # noqa: BLE001 - DVC's own message names the target
                    raise DistributeError(f"unknown target {target!r}: {err}") from None
                selected.update(stages)
        else:
            selected = set(graph.nodes)
        # the upstream of the selection is needed too (dvc repro would run it)
        for stage in list(selected):
            selected.update(nx.descendants(graph, stage))
        sub = graph.subgraph(selected)
        instances: dict[str, Instance] = {}
        outputs: list[str] = []
        for stage in sub.nodes:
            pipeline = isinstance(stage, PipelineStage)
            lockfile = (Path(stage.dvcfile.relpath).parent / "dvc.lock").as_posix() if pipeline else ""
            instances[stage.addressing] = Instance(
                addr=stage.addressing,
                name=stage.name if pipeline else stage.addressing,
                lockfile=lockfile,
                pipeline=pipeline,
                parents=tuple(sorted(p.addressing for p in sub.successors(stage))),
                uncached=tuple(sorted(_rel(root, o.fs_path) for o in stage.outs if not o.use_cache)),
                model=pipeline and stage.name.split("@", 1)[0] in MODEL_STAGES,
            )
            outputs += [_rel(root, o.fs_path) for o in stage.outs]
        status = repo.status(targets=[s.addressing for s in sub.nodes]) if sub.nodes else {}
        changed = {s for s in sub.nodes if s.addressing in status and isinstance(s, PipelineStage)}
        to_run = set(changed)
        for stage in changed:
            to_run.update(nx.ancestors(sub, stage))  # ancestors = downstream here
        order = [s.addressing for s in nx.topological_sort(sub.reverse()) if s in to_run]
        # data sources (.dvc files) that are not up to date cannot be run by anyone
        missing = [s.addressing for s in sub.nodes
                   if s.addressing in status and not isinstance(s, PipelineStage)]
        if missing:
            raise DistributeError(
                f"{', '.join(missing)}: data not in the workspace; `dvc pull` or `dvc add` first"
            )
    return Plan(root, commit, instances, order, sorted(set(outputs)))


def check_clean(root: Path, output_paths: Sequence[str]) -> None:
    """Workers run the commit: refuse uncommitted changes other than DVC's own files."""
    lines = _git(root, "status", "--porcelain", "--untracked-files=all").splitlines()
    dirty = []
    for line in lines:
        path = line[3:].split(" -> ")[-1].strip('"')
        name = Path(path).name
        # DVC's own files, and the settings no worker reads
        if name in ("dvc.lock", ".gitignore") or path.startswith(".dvc/") or \
                path == SETTINGS_FILE:
            continue
        if any(path == out or path.startswith(out.rstrip("/") + "/") for out in output_paths):
            continue
        dirty.append(path)
    if dirty:
        shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
        raise DistributeError(
            f"uncommitted changes ({shown}): the workers run commit {_git(root, 'rev-parse', '--short', 'HEAD').strip()}, "
            "not your working copy; commit (or stash) them first"
        )


def resolve_remote(root: Path, name: str | None) -> tuple[str, dict]:
    """The remote's name and its configuration, with a local path made absolute."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remotes = repo.config["remote"]
        name = name or repo.config["core"].get("remote")
        if not name:
            raise DistributeError(
                "no DVC remote configured: workers exchange results through one; "
                "`dvc remote add -d NAME URL` (a path or URL every worker can reach) "
                "or pass --remote NAME"
            )
        if name not in remotes:
            raise DistributeError(
                f"DVC remote {name!r} is not configured (known: {', '.join(remotes) or 'none'})"
            )
        config = {k: v for k, v in dict(remotes[name]).items() if v is not None}
    url = str(config["url"])
    if "://" not in url and not os.path.isabs(url):
        config["url"] = str((root / ".dvc" / url).resolve())
    return name, {k: (str(v) if not isinstance(v, (bool, int, float)) else v)
                  for k, v in config.items()}


def local_record(root: Path, inst: Instance) -> dict:
    """What an up-to-date local instance gives its downstream tasks (as a task would)."""
    from stages.distribute_worker import read_files, read_lock

    record = {"addr": inst.addr, "pull": True}
    if inst.pipeline:
        entry = read_lock(root / inst.lockfile)["stages"].get(inst.name)
        record["lock"] = {"lockfile": inst.lockfile, "name": inst.name,
                          "entry": yaml.safe_dump(entry, sort_keys=False)}
        record["uncached"] = read_files(root, list(inst.uncached))
    return record


# ------------------------------------------------------------------------------ worker task

def _safe(addr: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", addr)[-80:]


def where_this_runs(worker) -> dict:
    """The worker, its host, SLURM job and GPUs: recorded with each instance's result."""
    return {"worker": worker.address, "worker_name": str(worker.name),
            "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def run_instance(spec: dict, *parents: dict) -> dict:
    """Dask task: one stage instance in a fresh clone on this worker."""
    from distributed import Reschedule, get_worker

    worker = get_worker()
    addr = spec["addr"]
    worker.log_event(EVENT_TOPIC, {"addr": addr, "event": "start", "worker": worker.address})
    scratch = Path(spec.get("scratch") or worker.local_directory) / "cmds-ad"
    scratch.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=_safe(addr) + "-", dir=scratch))
    clone = workdir / "repo"
    log = workdir / "log.txt"
    try:
        start = time.perf_counter()
        for args in (["clone", "-q", "--no-checkout", spec["git_url"], str(clone)],
                     ["-C", str(clone), "checkout", "-q", spec["commit"]]):
            done = subprocess.run(["git", *args], capture_output=True, text=True)
            if done.returncode != 0:
                raise InstanceFailed(addr, worker.address, (done.stdout + done.stderr)[-4000:])
        clone_s = time.perf_counter() - start
        task_spec = {
            **spec, "clone": str(clone), "result": str(workdir / "result.json"),
            "parents": [p for p in parents if p],
            "cache_dir": str(scratch / "dvc-cache"),  # shared by this worker's instances
        }
        (workdir / "spec.json").write_text(json.dumps(task_spec))
        env = dict(os.environ)
        for var, value in spec["shell_env"].items():
            if value is None:
                env.pop(var, None)
            else:
                env[var] = value
        with open(log, "w") as out:
            # cwd outside the clone: the runner imports this installation, the stage the clone's
            proc = subprocess.run(
                [sys.executable, "-m", "stages.distribute_worker", str(workdir / "spec.json")],
                cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        if -proc.returncode in STOP_SIGNALS:
            raise Reschedule()  # stopped from outside, as its worker will be
        if proc.returncode != 0:
            lines = log.read_text(errors="replace").splitlines()
            raise InstanceFailed(addr, worker.address, "\n".join(lines[-LOG_TAIL_LINES:]))
        result = json.loads((workdir / "result.json").read_text())
        result.update(where_this_runs(worker), clone_s=clone_s,
                      total_s=time.perf_counter() - start)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------ the cluster

def check_cluster(options: ClusterOptions) -> None:
    """Fail within seconds, before any work: no answer at an address; on SLURM no sbatch, or
    jobs that SLURM would refuse or never start."""
    if options.cluster == "slurm":
        from stages.distribute_slurm import check_slurm

        check_slurm(options)
    if options.cluster.startswith("tcp://"):
        host, _, port = options.cluster.removeprefix("tcp://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)),
                                     timeout=options.connect_timeout).close()
        except (OSError, ValueError) as err:
            raise DistributeError(
                f"no Dask scheduler answers at {options.cluster} "
                f"(within {options.connect_timeout:g} s): {err}"
            ) from None


def start_cluster(options: ClusterOptions, run_dir: Path):
    """A Dask client for ``options.cluster``, the cluster object to close (if ours) and, on
    SLURM, the :class:`SlurmJobs` that watches the jobs (their logs go to ``run_dir``)."""
    from distributed import Client

    if options.cluster == "local":
        from distributed import LocalCluster

        resources = {"GPU": options.worker_gpus} if options.worker_gpus else None
        # one thread per worker process: a stage instance is a process of its own and uses
        # the cores itself; the dashboard on a free port
        cluster = LocalCluster(n_workers=options.jobs, threads_per_worker=1, processes=True,
                               dashboard_address=":0", resources=resources,
                               silence_logs=logging.CRITICAL)  # failures are reported below
        return Client(cluster), cluster, None
    if options.cluster == "slurm":
        from stages.distribute_slurm import SlurmJobs, start_slurm_cluster

        cluster = start_slurm_cluster(options, run_dir / "slurm")
        client = Client(cluster)
        return client, cluster, SlurmJobs(cluster, client, run_dir / "slurm")
    try:
        client = Client(options.cluster, timeout=f"{options.connect_timeout}s")
    except (OSError, TimeoutError) as err:
        raise DistributeError(
            f"no Dask scheduler answers at {options.cluster} "
            f"(within {options.connect_timeout:g} s): {err}"
        ) from None
    return client, None, None


def _cluster_has_gpus(client, options: ClusterOptions) -> bool:
    if options.cluster in ("local", "slurm"):
        return options.worker_gpus > 0
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)


# ---------------------------------------------------------------------------------- the run

@dataclass
class Outcome:
    plan: Plan
    results: dict[str, dict]                 # addr -> what its task returned
    failures: dict[str, InstanceFailed | str]  # addr -> why
    skipped: list[str]                       # not run: an upstream instance failed
    dashboard: str | None = None
    wall_s: float = 0.0
    starts: Counter = field(default_factory=Counter)  # addr -> attempts started

    @property
    def ok(self) -> bool:
        return not self.failures and not self.skipped


class _Progress:
    """Counts of instances queued / running / done / failed per stage, as a rich table."""

    STATES = ("queued", "running", "done", "failed")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.state = {addr: "queued" for addr in plan.to_run}
        self.lock = threading.Lock()

    def set(self, addr: str, state: str) -> None:
        with self.lock:
            if addr in self.state and self.state[addr] not in ("done", "failed"):
                self.state[addr] = state

    def table(self, caption: str | None = None):
        from rich.table import Table

        stages: dict[str, Counter] = {}
        with self.lock:
            for addr, state in self.state.items():
                stages.setdefault(self.plan.instances[addr].stage, Counter())[state] += 1
        table = Table(title="cmds-ad distribute", title_justify="left", caption=caption,
                      caption_justify="left")
        table.add_column("stage")
        for state in self.STATES:
            table.add_column(state, justify="right")
        total: Counter = Counter()
        for stage, counts in stages.items():
            total.update(counts)
            table.add_row(stage, *(str(counts[s]) for s in self.STATES))
        table.add_row("[b]all[/b]", *(f"[b]{total[s]}[/b]" for s in self.STATES))
        return table


def distribute(root: Path, options: ClusterOptions, targets: Sequence[str] = (),
               remote: str | None = None, git_url: str | None = None, console=None) -> Outcome:
    """Run the out-of-date instances of ``targets`` on the cluster; sync the workspace."""
    # DVC resolves stage addresses against the working directory
    root = Path(root).resolve()
    before = os.getcwd()
    os.chdir(root)
    try:
        return _distribute(root, options, targets, remote, git_url, console)
    finally:
        os.chdir(before)


def _distribute(root: Path, options: ClusterOptions, targets: Sequence[str],
                remote: str | None, git_url: str | None, console) -> Outcome:
    from rich.console import Console

    console = console or Console(stderr=True)
    start = time.perf_counter()
    check_cluster(options)
    the_plan = plan(root, targets)
    check_clean(root, the_plan.output_paths)
    remote_name, remote_config = resolve_remote(root, remote)
    outcome = Outcome(the_plan, {}, {}, [])
    if not the_plan.to_run:
        console.print("Every stage instance is up to date: nothing to run.")
        return outcome
    run_dir = root / RUNS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    records = push_local_parents(root, the_plan, remote_name)
    client, cluster, jobs = start_cluster(options, run_dir)
    try:
        outcome.dashboard = client.dashboard_link if _dashboard_up(client) else None
        console.print(f"Dask scheduler {client.scheduler.address}; dashboard: "
                      f"{outcome.dashboard or 'not available (install bokeh>=3.1)'}")
        console.print(f"{len(the_plan.to_run)} stage instances to run at commit "
                      f"{the_plan.commit[:10]}, remote {remote_name!r}")
        common = {"git_url": git_url or str(root), "commit": the_plan.commit,
                  "remote": remote_name, "remote_config": remote_config,
                  "scratch": options.scratch, "shell_env": SHELL_ENV}
        gpus = _cluster_has_gpus(client, options)
        _Scheduler(client, outcome, records, common, gpus).run(console, jobs)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        # also after an interruption: what finished is kept, and a next run skips it
        sync_workspace(root, the_plan, outcome.results, remote_name)
        outcome.wall_s = time.perf_counter() - start
        write_run_record(run_dir / "run.json", outcome, options, jobs)
    console.print()
    report(outcome, console)
    console.print(f"Run record: {(run_dir / 'run.json').relative_to(root)}")
    return outcome


def push_local_parents(root: Path, the_plan: Plan, remote: str) -> dict[str, dict]:
    """Upstream instances that are up to date here: their outputs go to the remote for the
    workers, and their records (lock entries, uncached files) travel with the tasks."""
    local_parents = sorted({p for a in the_plan.to_run for p in the_plan.instances[a].parents}
                           - set(the_plan.to_run))
    if local_parents:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            repo.push(targets=local_parents, remote=remote)
    return {p: local_record(root, the_plan.instances[p]) for p in local_parents}


class _Scheduler:
    """Submits each instance once its upstream instances are done, with their results as
    plain arguments, and follows the futures. (Results kept as futures on the workers would
    die with a worker, and Dask would re-run finished instances to recreate them.)"""

    def __init__(self, client, outcome: Outcome, records: dict[str, dict], common: dict,
                 gpus: bool) -> None:
        from distributed import as_completed

        self.client, self.outcome, self.records = client, outcome, records
        self.common, self.gpus = common, gpus
        self.plan = outcome.plan
        to_run = set(self.plan.to_run)
        self.waiting = {a: set(self.plan.instances[a].parents) & to_run for a in self.plan.to_run}
        self.children: dict[str, list[str]] = {a: [] for a in self.plan.to_run}
        for addr, parents in self.waiting.items():
            for parent in parents:
                self.children[parent].append(addr)
        self.running = as_completed()
        self.by_key: dict[str, str] = {}
        self.progress = _Progress(self.plan)

    def on_event(self, event) -> None:
        _, msg = event
        if msg.get("event") == "start":
            self.outcome.starts[msg["addr"]] += 1
            self.progress.set(msg["addr"], "running")

    def submit(self, addr: str) -> None:
        inst = self.plan.instances[addr]
        spec = {**self.common, "addr": addr, "name": inst.name, "lockfile": inst.lockfile,
                "uncached": list(inst.uncached)}
        future = self.client.submit(
            run_instance, spec, *(self.records[p] for p in inst.parents),
            key=f"{_safe(addr)}-{uuid.uuid4().hex[:8]}",
            resources={"GPU": 1} if self.gpus and inst.model else None, pure=False, retries=0,
        )
        self.by_key[future.key] = addr
        self.running.add(future)

    def finished(self, addr: str, result: dict, say) -> None:
        self.outcome.results[addr] = result
        self.records[addr] = {"addr": addr, "lock": result["lock"],
                              "uncached": result["uncached"], "pull": True}
        self.progress.set(addr, "done")
        how = "computed" if result["computed"] else "restored from the remote"
        say(f"done  {addr}  on {where(result)}  {result['total_s']:.1f} s ({how})")
        for child in self.children[addr]:
            self.waiting[child].discard(addr)
            if not self.waiting[child]:
                self.submit(child)

    def failed(self, addr: str, err: BaseException, say) -> None:
        self.outcome.failures[addr] = err if isinstance(err, InstanceFailed) else (
            f"{type(err).__name__}: {err}")
        self.progress.set(addr, "failed")
        say(f"[red]failed {addr}[/red]")
        blocked, todo = set(), list(self.children[addr])
        while todo:
            child = todo.pop()
            if child not in blocked:
                blocked.add(child)
                todo.extend(self.children[child])
                self.progress.set(child, "failed")
        self.outcome.skipped.extend(sorted(blocked - set(self.outcome.skipped)))

    def run(self, console, jobs=None) -> None:
        """Until every instance finished or failed; ``jobs`` (SLURM) is polled meanwhile."""
        from rich.live import Live

        self.client.subscribe_topic(EVENT_TOPIC, self.on_event)
        for addr in self.plan.to_run:
            if not self.waiting[addr]:
                self.submit(addr)
        caption = jobs.summary if jobs is not None else lambda: None
        with Live(self.progress.table(caption()), console=console, refresh_per_second=2,
                  transient=False) as live:
            while not self.running.is_empty():
                if jobs is not None:
                    jobs.poll(live.console.print)
                batch = self.running.next_batch(block=False) if self.running.has_ready() else []
                for future in batch:
                    addr = self.by_key[future.key]
                    if future.status == "finished":
                        self.finished(addr, future.result(), live.console.print)
                    else:
                        self.failed(addr, future.exception(), live.console.print)
                    future.release()
                if not batch:
                    time.sleep(0.2)
                live.update(self.progress.table(caption()))
        self.client.unsubscribe_topic(EVENT_TOPIC)


def where(result: dict) -> str:
    """Where an instance ran, for its "done" line: the SLURM job and GPUs, or the worker."""
    if result.get("slurm_job"):
        gpus = result.get("cuda_visible_devices")
        return (f"SLURM job {result['slurm_job']} (worker {result['worker_name']}"
                + (f", CUDA_VISIBLE_DEVICES={gpus}" if gpus else "") + ")")
    return result["worker"]


RECORD_KEYS = ("worker", "worker_name", "host", "slurm_job", "cuda_visible_devices", "computed",
               "clone_s", "pull_s", "repro_s", "push_s", "total_s")


def write_run_record(path: Path, outcome: Outcome, options: ClusterOptions, jobs) -> None:
    """run.json: the settings, and per instance where it ran, how often it started, its
    timings; per SLURM job its worker. For a look after the run (and the tests)."""
    record = {
        "commit": outcome.plan.commit, "settings": options.model_dump(mode="json"),
        "wall_s": outcome.wall_s, "ok": outcome.ok,
        "instances": {addr: {**{k: r.get(k) for k in RECORD_KEYS},
                             "starts": outcome.starts.get(addr, 0)}
                      for addr, r in outcome.results.items()},
        "failures": {addr: str(err) for addr, err in outcome.failures.items()},
        "skipped": outcome.skipped, "slurm_jobs": jobs.record() if jobs is not None else [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def _dashboard_up(client) -> bool:
    try:
        return "dashboard" in client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - only decides whether to print a link
        return False


def sync_workspace(root: Path, the_plan: Plan, results: dict[str, dict], remote: str) -> None:
    """The finished instances' lock entries and uncached files here, their outputs pulled."""
    from dvc.repo import Repo

    from stages.distribute_worker import merge_lock_entries, write_files

    if not results:
        return
    merge_lock_entries(root, [r["lock"] for r in results.values()])
    for result in results.values():
        write_files(root, result["uncached"])
    with Repo(str(root)) as repo:
        repo.pull(targets=sorted(results), remote=remote, force=True)


def report(outcome: Outcome, console) -> None:
    plan_ = outcome.plan
    computed = sum(r["computed"] for r in outcome.results.values())
    console.print(
        f"{len(outcome.results)} of {len(plan_.to_run)} instances done "
        f"({computed} computed, {len(outcome.results) - computed} restored from the remote), "
        f"{len(outcome.failures)} failed, {len(outcome.skipped)} not run; "
        f"{outcome.wall_s:.1f} s"
    )
    for addr, n in sorted(outcome.starts.items()):
        if n > 1:
            console.print(f"{addr}: started {n} times (Dask rescheduled it after its worker died)")
    for addr, err in outcome.failures.items():
        if isinstance(err, InstanceFailed):
            console.print(f"[red]FAILED[/red] {addr} on worker {err.worker}; last lines of its log:")
            console.print(err.log_tail, markup=False, highlight=False)
        else:
            console.print(f"[red]FAILED[/red] {addr}: {err}", markup=False)
    if outcome.skipped:
        console.print(f"Not run (upstream failed): {', '.join(sorted(outcome.skipped))}")
    if not outcome.ok:
        console.print("Fix the cause and run `cmds-ad distribute` again: only the instances "
                      "that are still missing will run.")
