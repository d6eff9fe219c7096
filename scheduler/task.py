"""The Dask task of ``cmds-ad distribute``: one stage instance in a fresh clone on a worker,
run by ``scheduler.worker`` in a process of its own."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


class InstanceFailed(Exception):
    """A stage instance's process failed on a worker: the run fails, with no retry."""

    def __init__(self, addr: str, worker: str, log_tail: str) -> None:
        super().__init__(addr, worker, log_tail)
        self.addr, self.worker, self.log_tail = addr, worker, log_tail

    def __str__(self) -> str:
        return f"{self.addr} failed on {self.worker}"



def safe_name(addr: str) -> str:
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
    workdir = Path(tempfile.mkdtemp(prefix=safe_name(addr) + "-", dir=scratch))
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
                [sys.executable, "-m", "scheduler.worker", str(workdir / "spec.json")],
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
