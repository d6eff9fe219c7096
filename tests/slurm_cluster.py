"""A real one-node SLURM for the tests: munged, slurmctld and slurmd from Debian's `slurm-wlm`,
with a generated `slurm.conf` in a temporary folder, on free ports.

No cgroups (`proctrack/linuxproc`, `task/none`), no accounting database (so no `sacct`: ask
`squeue` and `scontrol show job`), and two fake GPUs: character devices made with `mknod`
behind `Gres=gpu:2`, so a job that asks for `--gres=gpu:N` gets `CUDA_VISIBLE_DEVICES` with no
GPU behind it. The node offers this machine's cores and a conservative part of its memory.

    cluster = start(folder)        # a few seconds; SLURM_CONF points the client commands at it
    ... sbatch / squeue / cmds-ad distribute --cluster slurm ...
    cluster.stop()                 # cancels the jobs, stops the daemons by process id
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
PACKAGE = "slurm-wlm"  # slurmctld, slurmd, the client commands and munge
PARTITION = "debug"
MAX_TIME = "01:00:00"  # the partition's MaxTime: a longer walltime is refused
FAKE_GPUS = 2
# marks the daemons and what they start (slurmstepd), to find anything left behind
MARKER = "CMDS_AD_TEST_SLURM"


def missing_commands() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]


def ensure_installed() -> str | None:
    """None when SLURM is here; installs Debian's slurm-wlm (as root, with apt-get) where it is
    not. Otherwise the reason the SLURM tests cannot run."""
    if not missing_commands():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"SLURM is not installed ({', '.join(missing_commands())} missing) and cannot "
                f"be: installing {PACKAGE} needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
               "-o", "DPkg::Lock::Timeout=300", PACKAGE]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0 or missing_commands():
        return f"apt-get install {PACKAGE} failed: {(done.stdout + done.stderr)[-2000:]}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_resources() -> tuple[int, int]:
    """This machine's cores and a conservative memory in MB: a quarter of what is available
    now, at most 16 GB (the machine is shared; SLURM does not enforce it without cgroups)."""
    cpus = len(os.sched_getaffinity(0))
    memory_mb = min(psutil.virtual_memory().available // 4, 16 * 1024**3) // 1024**2
    return cpus, int(memory_mb)


def slurm_conf(folder: Path, munge_socket: Path, node: str, ports: tuple[int, int], cpus: int,
               memory_mb: int) -> str:
    lines = [
        "ClusterName=cmdsadtest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        # without it a job takes all the node's memory and the next one waits
        f"DefMemPerCPU={memory_mb // cpus}",
        "MpiDefault=none",
        "ReturnToService=2",
        "KillWait=5",
        "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job`
        "GresTypes=gpu",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} "
        f"Gres=gpu:{FAKE_GPUS} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime={MAX_TIME} State=UP",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class OneNodeSlurm:
    folder: Path
    conf: Path
    munge: Path  # munged's folder (key, socket, log), removed by stop()
    node: str
    cpus: int
    memory_mb: int
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """What the client commands need: where slurm.conf is (it names munged's socket)."""
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(list(args), env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def jobs(self) -> list[dict[str, str]]:
        """The jobs in `squeue`: id, name, state, gres, reason."""
        out = self.command("squeue", "-h", "-o", "%i|%j|%T|%b|%r")
        keys = ("id", "name", "state", "gres", "reason")
        return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` of one job (also finished ones, for MinJobAge) as a dict."""
        out = self.command("scontrol", "-o", "show", "job", job_id)
        return dict(word.split("=", 1) for word in out.split() if "=" in word)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.command("sinfo", "-h", "-o", "%T", check=False).strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the SLURM node did not become idle (state {state!r}); "
                           f"see {self.folder}/slurmd.log and slurmctld.log")

    def cancel_all(self, timeout: float = 60) -> None:
        ids = [job["id"] for job in self.jobs()]
        if ids:
            self.command("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.5)

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this cluster still running: the daemons and their slurmstepd (by the
        marker in their environment), and job processes (by this SLURM_CONF)."""
        found = []
        for proc in psutil.process_iter():
            if proc.pid == os.getpid():
                continue
            try:
                env = proc.environ()
            except (psutil.Error, OSError):
                continue
            if env.get(MARKER) == str(self.folder) or (
                    "SLURM_JOB_ID" in env and env.get("SLURM_CONF") == str(self.conf)):
                found.append(proc)
        return found

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons by process id, kill anything left of them."""
        try:
            if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
                self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self.daemons.get(name)
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(5)
            for proc in self.leftovers():
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
            shutil.rmtree(self.munge, ignore_errors=True)


def munge_folder() -> Path:
    """munged's folder: every folder above its socket must be open to all (0755), which
    pytest's temporary folders (0700) are not; so a folder of its own in the system's."""
    folder = Path(tempfile.mkdtemp(prefix="cmds-ad-munge-"))
    folder.chmod(0o755)
    (folder / "socket").mkdir(mode=0o755)
    return folder


def _start_munged(folder: Path, env: dict) -> subprocess.Popen:
    socket_dir = folder / "socket"
    key = folder / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    with (folder / "munged.err").open("w") as err:
        proc = subprocess.Popen(
            ["munged", "-F", f"--socket={socket_dir / 'munge.socket'}", f"--key-file={key}",
             f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
             f"--seed-file={folder / 'munged.seed'}"],
            env=env, stdout=subprocess.DEVNULL, stderr=err)
    _wait_for(lambda: (socket_dir / "munge.socket").exists(), proc, "munged",
              folder / "munged.err")
    return proc


def _wait_for(ready, proc: subprocess.Popen, name: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-2000:] if log.is_file() else "(no log)"
            raise RuntimeError(f"{name} did not start (exit {proc.poll()}): {text}")
        time.sleep(0.05)


def _fake_gpus(folder: Path) -> Path:
    """gres.conf naming two character devices: slurmd only checks that the files exist."""
    dev = folder / "dev"
    dev.mkdir()
    for i in range(FAKE_GPUS):
        os.mknod(dev / f"nvidia{i}", 0o666 | 0o020000, os.makedev(195, i))  # S_IFCHR
    return dev


def start(folder: Path) -> OneNodeSlurm:
    """munged, slurmctld and slurmd with their files in ``folder`` (munged's in a folder of
    the system's temporary one); the node idle and ready for jobs."""
    folder.mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    cpus, memory_mb = node_resources()
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    munge = munge_folder()
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, munge / "socket" / "munge.socket", node,
                               (_free_port(), _free_port()), cpus, memory_mb))
    dev = _fake_gpus(folder)
    (folder / "gres.conf").write_text(f"Name=gpu File={dev}/nvidia[0-{FAKE_GPUS - 1}]\n")
    cluster = OneNodeSlurm(folder, conf, munge, node, cpus, memory_mb)
    env = {**os.environ, "SLURM_CONF": str(conf), MARKER: str(folder)}
    try:
        cluster.daemons["munged"] = _start_munged(munge, env)
        for name, args in (("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)]),
                           ("slurmd", ["slurmd", "-D", "-f", str(conf), "-N", node])):
            cluster.daemons[name] = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.STDOUT)
        cluster.wait_idle()
    except BaseException:
        cluster.stop()
        raise
    return cluster
