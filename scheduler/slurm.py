"""``cmds-ad distribute --cluster slurm``: the workers as SLURM jobs (dask-jobqueue).

Each job runs one Dask worker that runs one stage instance at a time on the job's cores. A job
with GPUs in its ``gres`` offers them as the worker's Dask ``GPU`` resource, and the model
stages ask for one, so they run only there; ``cpu_jobs`` are jobs without the gres for the
other stages. Before any job is submitted, SLURM is asked whether it would run them: the
partition must exist and be up, the walltime within its MaxTime, and ``sbatch --test-only``
must accept the job script. While the run lasts, a job that ends (cancelled, preempted, out
of time) is replaced by a new one; its running instance is rescheduled by Dask.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from scheduler.settings import ClusterOptions, DistributeError, walltime_seconds

COMMAND_TIMEOUT_S = 60
NO_LIMIT = ("UNLIMITED", "INFINITE", "NONE")


def _slurm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(args), input=stdin, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DistributeError(f"`{' '.join(args)}` got no answer within "
                              f"{COMMAND_TIMEOUT_S} s: is the SLURM controller up?") from None


def jobqueue_slurm():
    """``dask_jobqueue.slurm``, imported without the SIGINT handler dask-jobqueue 0.9 installs
    at import (``sys.exit()``: Ctrl-C would end the run with exit status 0, as a success)."""
    before = signal.getsignal(signal.SIGINT)
    import dask_jobqueue.slurm

    if threading.current_thread() is threading.main_thread() and before is not None:
        signal.signal(signal.SIGINT, before)
    return dask_jobqueue.slurm


def job_kwargs(options: ClusterOptions, log_dir: Path, with_gres: bool) -> dict:
    """dask-jobqueue's arguments for one kind of job: ``jobs`` (with the gres) or
    ``cpu_jobs`` (without it, in ``cpu_partition``)."""
    gres = options.slurm_gres if with_gres else None
    gpus = options.worker_gpus if with_gres else 0
    partition = options.partition if with_gres else (options.cpu_partition or options.partition)
    return {
        # one Dask thread: one instance at a time, using the job's cores (as a local worker)
        "cores": 1, "processes": 1, "job_cpu": options.cores, "memory": options.memory,
        "queue": partition, "account": options.account, "walltime": options.walltime,
        "job_name": "cmds-ad-gpu" if gpus else "cmds-ad",
        "job_extra_directives": ([f"--gres={gres}"] if gres else []) + list(options.sbatch),
        "worker_extra_args": ["--resources", f"GPU={gpus}"] if gpus else [],
        "log_directory": str(log_dir),
    }


def job_kinds(options: ClusterOptions) -> list[tuple[str, bool, int]]:
    """(worker name prefix, with the gres, how many) of each kind of job the run asks for."""
    main = "gpu" if options.worker_gpus else "job"
    kinds = [(main, True, options.jobs)]
    if options.cpu_jobs:
        kinds.append(("cpu", False, options.cpu_jobs))
    return kinds


# ------------------------------------------------------------------- checks before any work

def partitions() -> dict[str, dict[str, str]]:
    """``scontrol show partition``: each partition's fields."""
    done = _slurm("scontrol", "-o", "show", "partition")
    if done.returncode != 0:
        raise DistributeError(f"--cluster slurm: `scontrol show partition` failed: "
                              f"{done.stderr.strip()} (is the SLURM controller reachable?)")
    found = {}
    for line in done.stdout.splitlines():
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if "PartitionName" in fields:
            found[fields["PartitionName"]] = fields
    return found


def check_partition(name: str | None, walltime: str, key: str) -> str:
    """The partition the jobs go to (``name`` or the default one), refused with one message
    where it does not exist, is not up, or its MaxTime is shorter than ``walltime``."""
    known = partitions()
    if name is None:
        defaults = [p for p, fields in known.items() if fields.get("Default") == "YES"]
        if not defaults:
            raise DistributeError(f"SLURM has no default partition: set {key} "
                                  f"(partitions: {', '.join(known) or 'none'})")
        name = defaults[0]
    if name not in known:
        raise DistributeError(f"{key} {name!r}: SLURM has no such partition "
                              f"(partitions: {', '.join(known) or 'none'})")
    fields = known[name]
    if fields.get("State", "UP") != "UP":
        raise DistributeError(f"{key} {name!r} is {fields['State']}: its jobs would not start")
    max_time = fields.get("MaxTime", "UNLIMITED")
    if max_time not in NO_LIMIT and walltime_seconds(walltime) > walltime_seconds(max_time):
        raise DistributeError(
            f"walltime {walltime} is longer than partition {name!r} allows (MaxTime "
            f"{max_time}): SLURM would keep the jobs pending; ask for at most {max_time}")
    return name


def test_job(kwargs: dict) -> None:
    """``sbatch --test-only`` of the job script the workers get: SLURM's own verdict on the
    account, cores, memory, gres and extra lines."""
    kwargs = {**kwargs, "log_directory": None}  # creates no folder
    script = jobqueue_slurm().SLURMJob(scheduler="tcp://scheduler:8786", name="check", **kwargs).job_script()
    done = _slurm("sbatch", "--test-only", stdin=script)
    if done.returncode != 0:
        why = " ".join(done.stderr.replace("sbatch: error:", "").split())
        lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
        raise DistributeError(f"SLURM refuses the worker job ({why}); its #SBATCH lines:\n"
                              + "\n".join(lines))


def check_slurm(options: ClusterOptions) -> None:
    """Refuse, within seconds and before any work, what SLURM would not run."""
    if shutil.which("sbatch") is None:
        raise DistributeError(
            "--cluster slurm: `sbatch` is not on PATH; run this on a SLURM login node, "
            "or start a scheduler yourself and pass --cluster tcp://HOST:PORT"
        )
    for _, with_gres, _ in job_kinds(options):
        key = "partition" if with_gres or not options.cpu_partition else "cpu_partition"
        kwargs = job_kwargs(options, Path("."), with_gres)
        kwargs["queue"] = check_partition(kwargs["queue"], options.walltime, key)
        test_job(kwargs)


# ------------------------------------------------------------------------------ the cluster

def _job_class():
    from distributed.core import Status

    class Job(jobqueue_slurm().SLURMJob):
        """dask-jobqueue 0.9 cancels the job on close but leaves its status running, which
        distributed's SpecCluster.close asserts against while the job object is alive."""

        async def close(self) -> None:
            await super().close()
            self.status = Status.closed

    return Job


def start_slurm_cluster(options: ClusterOptions, log_dir: Path):
    """A SLURMCluster with one worker spec per job (the kinds of :func:`job_kinds`); the jobs
    are submitted now."""
    job = _job_class()
    cluster = jobqueue_slurm().SLURMCluster(**job_kwargs(options, log_dir, True), job_cls=job,
                           silence_logs=logging.CRITICAL,
                           scheduler_options={"dashboard_address": ":0"})
    common = cluster.new_spec["options"]  # what dask-jobqueue adds (interface, security, ...)
    for prefix, with_gres, count in job_kinds(options):
        for i in range(count):
            cluster.worker_spec[f"{prefix}-{i}"] = {
                "cls": job, "options": {**common, **job_kwargs(options, log_dir, with_gres)}}
    cluster.scale(len(cluster.worker_spec))  # submits the jobs of the specs
    return cluster


def squeue_states() -> dict[str, tuple[str, str]] | None:
    """job id -> (state, reason) of this user's jobs; None when squeue does not answer."""
    try:
        done = subprocess.run(["squeue", "--me", "-h", "-o", "%i|%T|%r"], capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    states = {}
    for line in done.stdout.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        states[job_id] = (state, reason)
    return states


def _log_tail(log_dir: Path, job_id: str, lines: int = 15) -> str:
    logs = sorted(log_dir.glob(f"*-{job_id}.err")) + sorted(log_dir.glob(f"*-{job_id}.out"))
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.is_file()).strip()
    return "\n".join(text.splitlines()[-lines:]) if text else "(its log is empty)"


class SlurmJobs:
    """The run's jobs, polled: what ``squeue`` says of them; a job that ended after its worker
    connected is replaced by a new one; one that ended before is a job that cannot start
    (its log tells why), and the run stops."""

    POLL_S = 2.0

    def __init__(self, cluster, client, log_dir: Path) -> None:
        self.cluster, self.client, self.log_dir = cluster, client, log_dir
        self.names: dict[str, str] = {}      # job id -> worker name, every job of the run
        self.connected: set[str] = set()     # job ids whose worker connected
        self.ended: set[str] = set()
        self.states: dict[str, tuple[str, str]] = {}
        self.last = 0.0

    def current(self) -> dict[str, str]:
        """worker name -> its job id, for the jobs submitted so far."""
        return {name: str(job.job_id) for name, job in list(self.cluster.workers.items())
                if getattr(job, "job_id", None)}

    def poll(self, say) -> None:
        """Every POLL_S seconds: note new, connected and ended jobs; replace lost ones."""
        if time.monotonic() - self.last < self.POLL_S:
            return
        self.last = time.monotonic()
        if set(self.cluster.worker_spec) - set(self.cluster.workers):
            # dask dropped a lost worker's job while squeue did not answer: a new one
            self.cluster.scale(len(self.cluster.worker_spec))
        states = squeue_states()
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        connected = {w.get("name") for w in workers}
        for name, job_id in self.current().items():
            if job_id not in self.names:
                self.names[job_id] = name
                say(f"SLURM job {job_id} submitted (worker {name})")
            if name in connected:
                self.connected.add(job_id)
            elif states is not None and job_id not in states and job_id not in self.ended:
                self._ended(job_id, name, say)
        if states is not None:
            self.states = states

    def _ended(self, job_id: str, name: str, say) -> None:
        self.ended.add(job_id)
        if job_id not in self.connected:
            raise DistributeError(
                f"SLURM job {job_id} (worker {name}) ended before its Dask worker connected; "
                f"the last lines of its log in {self.log_dir}:\n{_log_tail(self.log_dir, job_id)}")
        successor = self._replace(name)
        say(f"SLURM job {job_id} (worker {name}) ended: its running instance goes back to the "
            f"queue, and worker {successor} in a new job replaces it")

    def _replace(self, name: str) -> str:
        """A new job for the spec of worker ``name``, now (under a new name: dask's own
        replacement of a lost worker waits distributed.deploy.lost-worker-timeout)."""
        prefix = name.rsplit("-", 1)[0]
        taken = {int(n.rsplit("-", 1)[1]) for n in self.cluster.worker_spec
                 if n.rsplit("-", 1)[0] == prefix}
        successor = f"{prefix}-{max(taken) + 1}"
        self.cluster.worker_spec[successor] = self.cluster.worker_spec.pop(name)
        self.cluster.scale(len(self.cluster.worker_spec))
        return successor

    def summary(self) -> str:
        """e.g. "SLURM jobs: 1 running, 1 pending (Resources)"."""
        counts: Counter = Counter()
        for job_id in self.current().values():
            state, reason = self.states.get(job_id, ("submitted", ""))
            label = state.lower()
            if state == "PENDING" and reason and reason != "None":
                label += f" ({reason})"
            counts[label] += 1
        return "SLURM jobs: " + ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))

    def record(self) -> list[dict]:
        """Every job of the run, for the run record."""
        return [{"job_id": job_id, "worker": name, "connected": job_id in self.connected,
                 "ended_during_run": job_id in self.ended}
                for job_id, name in self.names.items()]
