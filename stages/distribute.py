"""``cmds-ad distribute``: the DVC stage instances that are not up to date, as Dask tasks.

DVC gives the graph (its index: stage instances, their upstream instances, their status).
Every instance to run becomes one Dask task whose inputs are the tasks of its upstream
instances. A task clones the repository at the current commit into the worker's scratch
space and runs ``stages.distribute_worker`` there: pull the upstream outputs from the shared
DVC remote, ``dvc repro --pull --single-item``, push the outputs, then the run cache. At the
end the local lock files get the instances' entries and ``dvc pull`` checks the outputs out,
so ``dvc status`` is clean as after a local ``dvc repro``.

A task that raises (the stage failed) is not retried; a worker that dies is, by the Dask
scheduler (``distributed.scheduler.allowed-failures``), on another worker.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
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

from pipeline.errors import CmdsAdError

# stage names (before "@") whose commands run a model: one GPU each where the cluster has GPUs
MODEL_STAGES = frozenset({
    "augment", "estimate_normals", "estimate_normals_generated", "extract_features",
    "extract_features_generated", "fit_mapper", "infer",
})
EVENT_TOPIC = "cmds-ad-distribute"
LOG_TAIL_LINES = 25
# Dask's nanny sets these to 1 in its workers; a stage instance gets the values of the shell
# that started `cmds-ad distribute` instead, as under `dvc repro` (torch's CPU kernels give
# other bits with another thread count)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# read at import: a LocalCluster's nanny sets them in this process too
SHELL_THREAD_ENV = {var: os.environ.get(var) for var in THREAD_VARS}


class DistributeError(CmdsAdError):
    """Bad input to ``cmds-ad distribute`` (dirty tree, no remote, no scheduler, no sbatch)."""


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
        if name in ("dvc.lock", ".gitignore") or path.startswith(".dvc/"):
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


def run_instance(spec: dict, *parents: dict) -> dict:
    """Dask task: one stage instance in a fresh clone on this worker."""
    from distributed import get_worker

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
        for var, value in spec["thread_env"].items():
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
        if proc.returncode != 0:
            lines = log.read_text(errors="replace").splitlines()
            raise InstanceFailed(addr, worker.address, "\n".join(lines[-LOG_TAIL_LINES:]))
        result = json.loads((workdir / "result.json").read_text())
        result.update(worker=worker.address, clone_s=clone_s,
                      total_s=time.perf_counter() - start)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------ the cluster

@dataclass
class ClusterOptions:
    cluster: str = "local"       # local | slurm | tcp://HOST:PORT
    workers: int = 2
    gpus: int = 0                # GPUs per worker (local, slurm); tcp: read from the workers
    cores: int = 4               # slurm: cores per job
    memory: str = "16GB"         # slurm: memory per job
    partition: str | None = None
    walltime: str = "04:00:00"
    scratch: str | None = None   # folder for the workers' clones (default: Dask's own)
    connect_timeout: float = 5.0


def check_cluster(options: ClusterOptions) -> None:
    """Fail within seconds, before any work: no sbatch for slurm, no answer at an address."""
    if options.cluster == "slurm" and shutil.which("sbatch") is None:
        raise DistributeError(
            "--cluster slurm: `sbatch` is not on PATH; run this on a SLURM login node, "
            "or start a scheduler yourself and pass --cluster tcp://HOST:PORT"
        )
    if options.cluster not in ("local", "slurm") and not re.match(
        r"^(tcp|tls|ucx|ws|wss)://", options.cluster
    ):
        raise DistributeError(
            f"--cluster {options.cluster!r}: expected local, slurm or tcp://HOST:PORT"
        )
    if options.cluster.startswith("tcp://"):
        import socket

        host, _, port = options.cluster.removeprefix("tcp://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)),
                                     timeout=options.connect_timeout).close()
        except (OSError, ValueError) as err:
            raise DistributeError(
                f"no Dask scheduler answers at {options.cluster} "
                f"(within {options.connect_timeout:g} s): {err}"
            ) from None


def start_cluster(options: ClusterOptions):
    """A Dask client for ``options.cluster`` (and the cluster object to close, if ours)."""
    from distributed import Client

    if options.cluster == "local":
        from distributed import LocalCluster

        resources = {"GPU": options.gpus} if options.gpus else None
        # one thread per worker process: a stage instance is a process of its own and uses
        # the cores itself; the dashboard on a free port
        cluster = LocalCluster(n_workers=options.workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", resources=resources,
                               silence_logs=logging.CRITICAL)  # failures are reported below
        return Client(cluster), cluster
    if options.cluster == "slurm":
        if shutil.which("sbatch") is None:
            raise DistributeError(
                "--cluster slurm: `sbatch` is not on PATH; run this on a SLURM login node, "
                "or start a scheduler yourself and pass --cluster tcp://HOST:PORT"
            )
        from dask_jobqueue import SLURMCluster

        extra = [f"--gres=gpu:{options.gpus}"] if options.gpus else []
        cluster = SLURMCluster(
            cores=options.cores, processes=1, memory=options.memory, queue=options.partition,
            walltime=options.walltime, job_extra_directives=extra,
            worker_extra_args=["--resources", f"GPU={options.gpus}"] if options.gpus else [],
        )
        cluster.scale(jobs=options.workers)
        return Client(cluster), cluster
    if re.match(r"^(tcp|tls|ucx|ws|wss)://", options.cluster):
        try:
            client = Client(options.cluster, timeout=f"{options.connect_timeout}s")
        except (OSError, TimeoutError) as err:
            raise DistributeError(
                f"no Dask scheduler answers at {options.cluster} "
                f"(within {options.connect_timeout:g} s): {err}"
            ) from None
        return client, None
    raise DistributeError(
        f"--cluster {options.cluster!r}: expected local, slurm or tcp://HOST:PORT"
    )


def _cluster_has_gpus(client, options: ClusterOptions) -> bool:
    if options.cluster in ("local", "slurm"):
        return options.gpus > 0
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

    def table(self):
        from rich.table import Table

        stages: dict[str, Counter] = {}
        with self.lock:
            for addr, state in self.state.items():
                stages.setdefault(self.plan.instances[addr].stage, Counter())[state] += 1
        table = Table(title="cmds-ad distribute", title_justify="left")
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


def _distribute(
    root: Path,
    options: ClusterOptions,
    targets: Sequence[str] = (),
    remote: str | None = None,
    git_url: str | None = None,
    console=None,
) -> Outcome:
    from rich.console import Console
    from rich.live import Live

    console = console or Console(stderr=True)
    start = time.perf_counter()
    root = root.resolve()
    check_cluster(options)
    the_plan = plan(root, targets)
    check_clean(root, the_plan.output_paths)
    remote_name, remote_config = resolve_remote(root, remote)
    outcome = Outcome(the_plan, {}, {}, [])
    if not the_plan.to_run:
        console.print("Every stage instance is up to date: nothing to run.")
        return outcome

    # Upstream instances that are up to date here: their outputs must be on the remote for
    # the workers, and their lock entries travel with the tasks.
    local_parents = sorted({p for a in the_plan.to_run for p in the_plan.instances[a].parents}
                           - set(the_plan.to_run))
    if local_parents:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            repo.push(targets=local_parents, remote=remote_name)
    records = {p: local_record(root, the_plan.instances[p]) for p in local_parents}

    client, cluster = start_cluster(options)
    try:
        outcome.dashboard = client.dashboard_link if _dashboard_up(client) else None
        console.print(f"Dask scheduler {client.scheduler.address}; dashboard: "
                      f"{outcome.dashboard or 'not available (install bokeh>=3.1)'}")
        console.print(f"{len(the_plan.to_run)} stage instances to run at commit "
                      f"{the_plan.commit[:10]}, remote {remote_name!r}")
        gpus = _cluster_has_gpus(client, options)
        progress = _Progress(the_plan)

        def on_event(event) -> None:
            _, msg = event
            if msg.get("event") == "start":
                outcome.starts[msg["addr"]] += 1
                progress.set(msg["addr"], "running")

        client.subscribe_topic(EVENT_TOPIC, on_event)
        common = {"git_url": git_url or str(root), "commit": the_plan.commit,
                  "remote": remote_name, "remote_config": remote_config,
                  "scratch": options.scratch, "thread_env": SHELL_THREAD_ENV}
        # An instance is submitted once its upstream instances are done, with their results
        # as plain arguments. Results kept as futures on the workers would die with a worker,
        # and Dask would re-run finished instances to recreate them.
        waiting = {a: set(the_plan.instances[a].parents) & set(the_plan.to_run)
                   for a in the_plan.to_run}
        children: dict[str, list[str]] = {a: [] for a in the_plan.to_run}
        for addr, parents in waiting.items():
            for parent in parents:
                children[parent].append(addr)
        from distributed import as_completed

        running = as_completed()
        by_key: dict[str, str] = {}

        def submit(addr: str) -> None:
            inst = the_plan.instances[addr]
            spec = {**common, "addr": addr, "name": inst.name, "lockfile": inst.lockfile,
                    "uncached": list(inst.uncached)}
            future = client.submit(
                run_instance, spec, *(records[p] for p in inst.parents),
                key=f"{_safe(addr)}-{uuid.uuid4().hex[:8]}",
                resources={"GPU": 1} if gpus and inst.model else None, pure=False, retries=0,
            )
            by_key[future.key] = addr
            running.add(future)

        for addr in the_plan.to_run:
            if not waiting[addr]:
                submit(addr)
        with Live(progress.table(), console=console, refresh_per_second=2,
                  transient=False) as live:
            for future in running:
                addr = by_key[future.key]
                if future.status == "finished":
                    result = future.result()
                    outcome.results[addr] = result
                    records[addr] = {"addr": addr, "lock": result["lock"],
                                     "uncached": result["uncached"], "pull": True}
                    progress.set(addr, "done")
                    how = "computed" if result["computed"] else "restored from the remote"
                    live.console.print(f"done  {addr}  on {result['worker']}  "
                                       f"{result['total_s']:.1f} s ({how})")
                    for child in children[addr]:
                        waiting[child].discard(addr)
                        if not waiting[child]:
                            submit(child)
                else:
                    err = future.exception()
                    outcome.failures[addr] = err if isinstance(err, InstanceFailed) else (
                        f"{type(err).__name__}: {err}")
                    progress.set(addr, "failed")
                    live.console.print(f"[red]failed {addr}[/red]")
                    blocked, todo = set(), list(children[addr])
                    while todo:
                        child = todo.pop()
                        if child not in blocked:
                            blocked.add(child)
                            todo.extend(children[child])
                            progress.set(child, "failed")
                    outcome.skipped.extend(sorted(blocked - set(outcome.skipped)))
                future.release()
                live.update(progress.table())
        client.unsubscribe_topic(EVENT_TOPIC)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        # also after an interruption: what finished is kept, and a next run skips it
        sync_workspace(root, the_plan, outcome.results, remote_name)
    outcome.wall_s = time.perf_counter() - start
    console.print()
    report(outcome, console)
    return outcome


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
