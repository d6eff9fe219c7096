"""``cmds-ad distribute``: the DVC stage instances that are not up to date, as Dask tasks.

DVC gives the graph (its index: stage instances, their upstream instances, their status).
Every instance to run becomes one Dask task whose inputs are the tasks of its upstream
instances. A task clones the repository at the current commit into the worker's scratch
space and runs ``scheduler.worker`` there: pull the upstream outputs from the shared
DVC remote, ``dvc repro --pull --single-item``, push the outputs, then the run cache. At the
end the local lock files get the instances' entries and ``dvc pull`` checks the outputs out,
so ``dvc status`` is clean as after a local ``dvc repro``.

A task that raises (the stage failed) is not retried; a worker that dies is, by the Dask
scheduler (``distributed.scheduler.allowed-failures``), on another worker; so is one whose
runner was terminated (SIGTERM: a SLURM job cancelled or preempted).

Where the workers run: ``scheduler.settings`` (``distribute.yaml`` and the command
line); SLURM jobs: ``scheduler.slurm``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.cluster import cluster_has_gpus, dashboard_up, check_cluster, start_cluster
from scheduler.plan import Plan, check_clean, local_record, plan, resolve_remote
from scheduler.settings import ClusterOptions
from scheduler.task import EVENT_TOPIC, SHELL_ENV, InstanceFailed, safe_name, run_instance

RUNS_DIR = ".dvc/tmp/distribute"  # run records and SLURM job logs (DVC keeps tmp/ out of git)


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
    # 1. Check and plan, before any work
    check_cluster(options)
    the_plan = plan(root, targets)
    check_clean(root, the_plan.output_paths)
    remote_name, remote_config = resolve_remote(root, remote)
    outcome = Outcome(the_plan, {}, {}, [])
    if not the_plan.to_run:
        console.print("Every stage instance is up to date: nothing to run.")
        return outcome
    # 2. Up-to-date upstream outputs to the remote, for the workers; the cluster
    run_dir = root / RUNS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    records = push_local_parents(root, the_plan, remote_name)
    client, cluster, jobs = start_cluster(options, run_dir)
    try:
        outcome.dashboard = client.dashboard_link if dashboard_up(client) else None
        console.print(f"Dask scheduler {client.scheduler.address}; dashboard: "
                      f"{outcome.dashboard or 'not available (install bokeh>=3.1)'}")
        console.print(f"{len(the_plan.to_run)} stage instances to run at commit "
                      f"{the_plan.commit[:10]}, remote {remote_name!r}")
        common = {"git_url": git_url or str(root), "commit": the_plan.commit,
                  "remote": remote_name, "remote_config": remote_config,
                  "scratch": options.scratch, "shell_env": SHELL_ENV}
        gpus = cluster_has_gpus(client, options)
        # 3. Each instance once its upstream is done, until all finished or failed
        _Scheduler(client, outcome, records, common, gpus).run(console, jobs)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        # 4. The finished instances into this workspace, and the run record; also after an
        # interruption: what finished is kept, and a next run skips it
        sync_workspace(root, the_plan, outcome.results, remote_name)
        outcome.wall_s = time.perf_counter() - start
        write_run_record(run_dir / "run.json", outcome, options, jobs)
    # 5. What ran, what failed, what did not run
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
            key=f"{safe_name(addr)}-{uuid.uuid4().hex[:8]}",
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


def sync_workspace(root: Path, the_plan: Plan, results: dict[str, dict], remote: str) -> None:
    """The finished instances' lock entries and uncached files here, their outputs pulled."""
    from dvc.repo import Repo

    from scheduler.worker import merge_lock_entries, write_files

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
