"""`cmds-ad distribute --cluster slurm` on a real one-node SLURM (tests/slurm_cluster.py:
munged, slurmctld and slurmd of Debian's slurm-wlm, installed where missing and possible).

One run of the reduced demo (one category, k = 1) with the job settings in distribute.yaml:
one job with a (fake) GPU and one CPU-only job. The job that runs the first model stage is
cancelled with `scancel` while the stage runs. Checked against the session's serial
`dvc repro` of the same configuration (the reduced demo, tests/conftest.py). Then the
refusals, before any work, of what SLURM would not run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from scheduler.plan import MODEL_STAGES
from tools.scratch_project import REDUCED_DEMO, make_project, project_env, sh
from tests import slurm_cluster
from tests.e2e_helpers import commands_run, counting_shim, output_files

pytestmark = pytest.mark.slow

CATEGORY = "disc"
KILL_STAGE = "augment"  # the model stage during which its job is cancelled
RUN_TIMEOUT_S = 2400  # a hang guard: the run takes minutes, more on a loaded machine


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_cluster.ensure_installed()
    if reason:
        pytest.skip(reason)
    cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    try:
        if cluster.cpus < 2:
            pytest.skip("the SLURM tests run two one-core jobs at once: they need 2 cores")
        yield cluster
    finally:
        cluster.stop()
    assert cluster.leftovers() == []


def test_one_node_slurm_runs_gpu_jobs_and_stops_clean(tmp_path):
    """The fixture's cluster: a job with --gres=gpu:1 gets CUDA_VISIBLE_DEVICES; stopping it
    while a job runs leaves no process behind (daemons, slurmstepd, the job's)."""
    reason = slurm_cluster.ensure_installed()
    if reason:
        pytest.skip(reason)
    cluster = slurm_cluster.start(tmp_path / "slurm")
    try:
        out = tmp_path / "job.out"
        cluster.command("sbatch", "--gres=gpu:1", "-o", str(out),
                        "--wrap", "echo gpus=$CUDA_VISIBLE_DEVICES; sleep 300")
        deadline = time.monotonic() + 30
        while "gpus=" not in (out.read_text() if out.is_file() else ""):
            assert time.monotonic() < deadline, cluster.jobs()
            time.sleep(0.1)
        assert out.read_text().split() == ["gpus=0"]
        assert [job["state"] for job in cluster.jobs()] == ["RUNNING"]
        assert cluster.leftovers()  # the daemons, slurmstepd, the job's shell and sleep
        daemons = [proc.pid for proc in cluster.daemons.values()]
    finally:
        cluster.stop()
    assert cluster.leftovers() == []
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in daemons)


@pytest.fixture(scope="module")
def env(tmp_path_factory, slurm) -> tuple[Path, dict[str, str], Path]:
    """A folder, and the environment of `cmds-ad` (and so of the SLURM jobs, which inherit
    it): the project's, SLURM_CONF, and a shim first on PATH that counts stage commands
    (in the file returned third)."""
    base = tmp_path_factory.mktemp("distribute-slurm")
    shim_dir, counts = counting_shim(base, project_env()["PATH"])
    environ = {**project_env(), **slurm.env}
    environ["PATH"] = f"{shim_dir}{os.pathsep}{environ['PATH']}"
    return base, environ, counts


def _new_project(path: Path) -> Path:
    # the configuration of the session's reduced demo (tests/conftest.py), the reference
    return make_project(path, REDUCED_DEMO, categories=(CATEGORY,), n_train=3, n_test=6,
                        make_data=False)


def _settings(slurm) -> str:
    # two one-core jobs fit the node's memory together
    memory_mb = slurm.memory_mb // 3
    return f"""distribute:
  cluster: slurm
  partition: {slurm_cluster.PARTITION}
  walltime: "00:30:00"
  cores: 1
  memory: {memory_mb}MB
  jobs: 1
  gres: gpu:1
  cpu_jobs: 1
"""


class JobWatcher(threading.Thread):
    """While the run lasts: every job `squeue` shows (and the states it was seen in), and
    `scancel` of the job that runs KILL_STAGE, once, half a second into the stage."""

    def __init__(self, slurm) -> None:
        super().__init__(daemon=True)
        self.slurm = slurm
        self.seen: dict[str, dict] = {}
        self.cancelled: dict[str, str] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for job in self.slurm.jobs():
                entry = self.seen.setdefault(job["id"], {**job, "states": set()})
                entry["states"].add(job["state"])
            if not self.cancelled:
                self._cancel_during(KILL_STAGE)
            time.sleep(0.2)

    def _stage_jobs(self) -> list[tuple[str, str]]:
        """(SLURM job id, stage arguments) of the stage commands running in this cluster's
        jobs (the machine may run other tests' stages)."""
        found = []
        for proc in psutil.process_iter():
            try:
                env = proc.environ()
                if env.get("SLURM_CONF") != str(self.slurm.conf) or "SLURM_JOB_ID" not in env:
                    continue
                words = [w for arg in proc.cmdline() for w in arg.split()]
            except (psutil.Error, OSError):
                continue
            for i, word in enumerate(words[:-1]):
                if Path(word).name == "cmds-ad":
                    found.append((env["SLURM_JOB_ID"], " ".join(words[i + 1:])))
        return found

    def _cancel_during(self, stage: str) -> None:
        for job_id, args in self._stage_jobs():
            if args.split()[0] == stage:
                time.sleep(0.5)  # the stage is under way
                self.slurm.command("scancel", job_id)
                self.cancelled.update(job=job_id, args=args)
                return


@pytest.fixture(scope="module")
def slurm_run(env, slurm):
    """`cmds-ad distribute` with distribute.yaml's SLURM settings, a job cancelled midway."""
    base, environ, counts = env
    root = _new_project(base / "slurm")
    sh(["dvc", "remote", "add", "-d", "team", str(base / "remote")], root)
    (root / "distribute.yaml").write_text(_settings(slurm))
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "remote and cluster settings"], root)
    before = commands_run(counts)
    watcher = JobWatcher(slurm)
    watcher.start()
    try:
        run = subprocess.run(["cmds-ad", "distribute"], cwd=root, env=environ,
                             capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    finally:
        watcher.done.set()
        watcher.join(10)
    after_run = slurm.jobs()  # the run cancels its jobs on the way out
    match = re.search(r"Run record: (\S+)", run.stderr)
    record = json.loads((root / match.group(1)).read_text()) if match else {}
    return root, run, watcher, record, commands_run(counts) - before, after_run


def _gpu_jobs(watcher: JobWatcher) -> set[str]:
    return {job_id for job_id, job in watcher.seen.items() if "gpu" in job["gres"]}


def test_results_byte_identical_to_serial_repro(slurm_run, reduced_demo_run):
    # slurm_run first: under xdist the other worker builds the session's reduced demo meanwhile
    root, run, _, _, _, _ = slurm_run
    serial_root, n_instances = reduced_demo_run
    assert run.returncode == 0, run.stderr[-6000:]
    out = " ".join(run.stderr.split())
    assert f"{n_instances} of {n_instances} instances done ({n_instances} computed" in out, out
    reference, ours = output_files(serial_root), output_files(root)
    assert sorted(ours) == sorted(reference)
    assert sum(p.endswith("metrics.json") for p in ours) == 1
    assert [p for p in reference if reference[p] != ours[p]] == []
    assert json.loads(sh(["dvc", "status", "--json"], root).stdout or "{}") == {}


def test_jobs_in_squeue_and_scontrol_none_left(slurm, slurm_run):
    _, run, watcher, record, _, after_run = slurm_run
    assert run.returncode == 0, run.stderr[-6000:]
    names = Counter(job["name"] for job in watcher.seen.values())
    # the GPU job, the CPU job, and the GPU job that replaced the cancelled one
    assert names == Counter({"cmds-ad-gpu": 2, "cmds-ad": 1}), watcher.seen
    assert all("RUNNING" in job["states"] for job in watcher.seen.values()), watcher.seen
    assert {j["job_id"] for j in record["slurm_jobs"]} == set(watcher.seen)
    for job_id in watcher.seen:
        fields = slurm.job(job_id)
        assert fields["Partition"] == slurm_cluster.PARTITION
        assert fields["TimeLimit"] == "00:30:00"
        assert fields["NumCPUs"] == "1"
    assert after_run == []  # the run's jobs ended with it
    out = " ".join(run.stderr.split())
    assert "SLURM jobs: 2 running" in out and "queued" in out and "done" in out


def test_model_stages_ran_only_in_the_gpu_job(slurm_run):
    _, run, watcher, record, _, _ = slurm_run
    assert run.returncode == 0, run.stderr[-6000:]
    gpu_jobs = _gpu_jobs(watcher)
    instances = record["instances"]
    assert len(instances) == 15  # demo_data included
    for addr, where in instances.items():
        stage = addr.split(":")[-1].split("@")[0]
        assert where["slurm_job"] in watcher.seen, (addr, where)
        if stage in MODEL_STAGES:
            assert where["slurm_job"] in gpu_jobs, (addr, where)
            assert where["worker_name"].startswith("gpu-")
            assert where["cuda_visible_devices"] in ("0", "1"), (addr, where)
    model = sum(addr.split(":")[-1].split("@")[0] in MODEL_STAGES for addr in instances)
    assert model == 8
    # the stage code ran on the CPU all the same: the results equal the serial run's
    # (test_results_byte_identical_to_serial_repro)


def test_cancelled_job_rescheduled_nothing_computed_twice(slurm, slurm_run, reduced_demo_run):
    _, run, watcher, record, commands, _ = slurm_run
    _, n_instances = reduced_demo_run
    assert run.returncode == 0, run.stderr[-6000:]
    cancelled = watcher.cancelled
    assert cancelled, "no job was cancelled during a model stage"
    assert slurm.job(cancelled["job"])["JobState"] == "CANCELLED"
    # every stage command ran once, except the one whose job was cancelled: twice
    assert commands[cancelled["args"]] == 2, commands
    assert {c: n for c, n in commands.items() if c != cancelled["args"]} == \
        {c: 1 for c in commands if c != cancelled["args"]}
    assert len(commands) == n_instances
    # the instance finished in the GPU job that replaced the cancelled one
    instance = record["instances"][f"upstream/dvc.yaml:augment@{CATEGORY}-1-0"]
    assert instance["starts"] == 2
    assert instance["slurm_job"] != cancelled["job"]
    assert instance["slurm_job"] in _gpu_jobs(watcher)
    assert instance["worker_name"] == "gpu-1"  # the replacement's worker
    out = " ".join(run.stderr.split())
    assert f"SLURM job {cancelled['job']} (worker gpu-0) ended" in out, out
    assert "worker gpu-1 in a new job replaces it" in out, out


def _cli(args: list[str], root: Path, environ: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["cmds-ad", *args], cwd=root, env=environ, capture_output=True,
                          text=True, timeout=120)


def test_settings_file_edits_rerun_nothing(env, slurm_run):
    _, environ, _ = env
    root, run, _, _, _, _ = slurm_run
    assert run.returncode == 0, run.stderr[-6000:]
    settings = root / "distribute.yaml"
    settings.write_text(settings.read_text().replace("cpu_jobs: 1", "cpu_jobs: 0"))
    assert json.loads(sh(["dvc", "status", "--json"], root).stdout or "{}") == {}
    again = _cli(["distribute"], root, environ)
    assert again.returncode == 0 and "nothing to run" in again.stderr, again.stderr


@pytest.mark.parametrize("args, message", [
    (["--partition", "nosuch"], "partition 'nosuch': SLURM has no such partition "
                                "(partitions: debug)"),
    (["--walltime", "02:00:00"], "walltime 02:00:00 is longer than partition 'debug' allows "
                                 "(MaxTime 01:00:00)"),
    (["--gres", "gpu:4"], "SLURM refuses the worker job"),
    (["--cores", "64"], "SLURM refuses the worker job"),
])
def test_what_slurm_refuses_is_one_error_before_any_work(env, slurm, slurm_run, args, message,
                                                         tmp_path):
    _, environ, counts = env
    root, _, _, _, _, _ = slurm_run
    # a fresh clone: every instance is to run, and the refusal must come before any of it
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    before, jobs_before = commands_run(counts), slurm.command("scontrol", "-o", "show", "job")
    result = _cli(["distribute", *args], clone, environ)
    err = " ".join(result.stderr.split())
    assert result.returncode == 1, result.stderr
    assert err.startswith("error: ") and message in err, err
    assert commands_run(counts) == before
    assert slurm.command("scontrol", "-o", "show", "job") == jobs_before  # no job submitted
    assert not (clone / ".dvc/tmp/distribute").exists()


def test_ctrl_c_ends_the_run_with_a_failure_status_and_no_job_left(env, slurm, slurm_run,
                                                                    tmp_path):
    _, environ, _ = env
    root, run, _, _, _, _ = slurm_run
    assert run.returncode == 0, run.stderr[-6000:]
    clone = tmp_path / "clone"  # everything to run, all of it restored from the remote
    sh(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    # Ctrl-C as in a terminal: a suite started in the background (`make test &`) ignores
    # SIGINT, and a Python started with SIGINT ignored keeps ignoring it
    proc = subprocess.Popen(["cmds-ad", "distribute"], cwd=clone, env=environ,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:  # until the first instance is done
        lines.append(line)
        if line.startswith("done "):
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted: the instances that finished are in your workspace" in rest, rest
    assert slurm.jobs() == []
    assert (clone / "dvc.lock").is_file() or (clone / "upstream/dvc.lock").is_file()
