"""`cmds-ad distribute` on a LocalCluster of 2 worker processes and a local-path DVC remote,
on the reduced demo (k = 1), against the session's serial `dvc repro` of the same
configuration (tests/conftest.py). After `prepare` the branches (normals, features, augment)
run side by side, so both workers get work. The reference went through the session's warm
server and every distributed stage process starts fresh (the worker puts its clone first on
PYTHONPATH, which the server refuses), so the byte identity is also the warm server's
end-to-end check.

Slow by nature, so the runs are module fixtures that the tests share: one distributed run in
which a worker is killed during a model stage, and the bad-input checks that fail before
anything runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tools.scratch_project import (
    REDUCED_DEMO,
    make_project,
    project_env,
    sh,
    stage_command,
)
from tests.e2e_helpers import commands_run, counting_shim, output_files

pytestmark = pytest.mark.slow

CATEGORY = "disc"  # the session's reduced demo, the serial reference
KILL_STAGE = "fit-mapper"  # the model stage during which a worker process is killed
CLEAN_ENV: dict[str, str] = {}  # the environment for `cmds-ad` subprocesses


def _new_project(path: Path, remote: Path) -> Path:
    # the demo data is the first stage's output, made by the distributed run
    root = make_project(path, REDUCED_DEMO, categories=(CATEGORY,), n_train=3, n_test=6,
                        make_data=False)
    sh(["dvc", "remote", "add", "-d", "team", str(remote)], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "remote"], root)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The project's environment, and a `cmds-ad` shim first on PATH that counts every stage
    command any process runs (the count is independent of distribute's own bookkeeping)."""
    base = tmp_path_factory.mktemp("distribute")
    shim_dir, counts = counting_shim(base, project_env()["PATH"])
    saved = dict(os.environ)
    os.environ.update(project_env())
    os.environ["PATH"] = f"{shim_dir}{os.pathsep}{os.environ['PATH']}"
    # before any LocalCluster: its nanny sets OMP_NUM_THREADS=1 in this process as well
    CLEAN_ENV.update(os.environ)
    yield base, counts
    os.environ.clear()
    os.environ.update(saved)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`cmds-ad ...` with this module's environment (the counting shim first on PATH)."""
    return subprocess.run(["cmds-ad", *args], cwd=cwd, env=dict(CLEAN_ENV),
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def distributed(env):
    """One distributed run on a LocalCluster of 2 worker processes; the worker running the
    first fit-mapper command is SIGKILLed while that command runs."""
    import psutil
    from distributed import Client, LocalCluster

    from scheduler.run import ClusterOptions, distribute

    base, counts = env
    root = _new_project(base / "distributed", base / "remote")
    before = commands_run(counts)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    client = Client(cluster)
    killed: dict = {}
    stop = threading.Event()

    def kill_during_model_stage() -> None:
        pids = client.run(os.getpid)
        while not stop.is_set():
            for address, pid in pids.items():
                try:
                    children = psutil.Process(pid).children(recursive=True)
                    stage_args = [stage_command(c.cmdline()) or "" for c in children]
                    running = [a for a in stage_args if a.split()[:1] == [KILL_STAGE]]
                except psutil.Error:
                    continue
                if running:
                    time.sleep(0.5)  # the stage is under way
                    os.kill(pid, signal.SIGKILL)
                    killed.update(address=address, args=running[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_during_model_stage, daemon=True)
    killer.start()
    try:
        outcome = distribute(root, ClusterOptions(cluster=cluster.scheduler_address),
                             remote="team")
    finally:
        stop.set()
        killer.join(5)
        client.close()
        cluster.close()
    commands = commands_run(counts) - before
    return root, outcome, killed, commands


def test_results_byte_identical_to_serial_repro(reduced_demo_run, distributed):
    root, outcome, _, _ = distributed
    serial_root, n_instances = reduced_demo_run
    assert outcome.ok, (outcome.failures, outcome.skipped)
    assert len(outcome.results) == n_instances
    reference, ours = output_files(serial_root), output_files(root)
    assert sorted(ours) == sorted(reference)
    assert sum(p.endswith("metrics.json") for p in ours) == 1
    assert sum(p.endswith("zarr.json") for p in ours) > 10
    assert [p for p in reference if reference[p] != ours[p]] == []
    # the workspace is up to date, as after a local dvc repro
    assert json.loads(sh(["dvc", "status", "--json"], root).stdout or "{}") == {}
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], root).stdout)
    assert metrics  # DVC sees the metrics files


def test_no_instance_computed_twice_and_the_killed_one_was_rescheduled(reduced_demo_run, distributed):
    root, outcome, killed, commands = distributed
    _, n_instances = reduced_demo_run
    assert killed, "no worker was killed during a model stage"
    # every stage command ran once, except the one whose worker was killed: twice
    killed_args = killed["args"]
    assert commands[killed_args] == 2, commands
    assert {c: n for c, n in commands.items() if c != killed_args} == \
        {c: 1 for c in commands if c != killed_args}
    assert len(commands) == n_instances
    assert all(r["computed"] for r in outcome.results.values())
    # the rescheduled attempt finished on the worker that survived or on the restarted one
    category = killed_args.split()[1]
    assert outcome.starts[f"upstream/dvc.yaml:fit_mapper@{category}-1-0"] == 2


def test_second_run_computes_nothing_and_remote_is_complete(reduced_demo_run, distributed, env, tmp_path):
    root, _, _, _ = distributed
    _, n = reduced_demo_run
    _, counts = env
    before = commands_run(counts)
    # A fresh clone at the same commit knows nothing: every instance is scheduled, and every
    # one comes from the remote's run cache (the killed attempt left nothing half-pushed).
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    result = _cli(["distribute", "--cluster", "local", "--workers", "2"], clone)
    assert result.returncode == 0, result.stderr
    assert f"{n} of {n} instances done (0 computed, {n} restored from the remote)" in \
        " ".join(result.stderr.split()), result.stderr
    assert commands_run(counts) == before
    assert json.loads(sh(["dvc", "status", "--json"], clone).stdout or "{}") == {}
    assert output_files(clone) == output_files(root)
    # and in the distributed workspace itself nothing is left to do
    again = _cli(["distribute"], root)
    assert "nothing to run" in again.stderr


def test_failing_instance_reported_once_with_its_log(distributed, env):
    root, _, _, _ = distributed
    _, counts = env
    before = commands_run(counts)
    sh(["git", "add", "-A"], root)  # the lock files of the distributed run
    sh(["git", "commit", "-q", "-m", "distributed run"], root)
    # a teammate records damaged demo data (its stage's output) and pushes it
    shutil.rmtree(root / f"data/demo/{CATEGORY}/test")
    sh(["dvc", "commit", "-f", f"upstream/dvc.yaml:demo_data@{CATEGORY}"], root)
    sh(["git", "commit", "-q", "-am", "break the demo data"], root)
    sh(["dvc", "push"], root)
    try:
        result = _cli(["distribute", "--workers", "2"], root)
        out = " ".join(result.stderr.split())
        assert result.returncode == 1
        assert f"FAILED upstream/dvc.yaml:prepare@{CATEGORY} on worker tcp://" in out, out
        assert "last lines of its log" in out and f"data/demo/{CATEGORY}" in out, out
        assert "Not run (upstream failed)" in out
        # no retry loop: the failing command ran once
        assert (commands_run(counts) - before) == Counter({f"prepare {CATEGORY}": 1})
    finally:
        sh(["git", "revert", "--no-edit", "HEAD"], root)
        sh(["dvc", "checkout", "-q"], root)


def test_bad_input_is_refused_before_anything_runs(distributed, tmp_path):
    root, _, _, _ = distributed
    # uncommitted code
    module = root / "pipeline/scoring.py"
    text = module.read_text()
    module.write_text(text + "\n# edited\n")
    try:
        result = _cli(["distribute"], root)
        assert result.returncode == 1
        assert "uncommitted changes (pipeline/scoring.py)" in " ".join(result.stderr.split())
    finally:
        module.write_text(text)
    # a scheduler that does not answer: an error within seconds
    start = time.perf_counter()
    result = _cli(["distribute", "--cluster", "tcp://127.0.0.1:9"], root)
    assert result.returncode == 1 and "no Dask scheduler answers at tcp://127.0.0.1:9" in \
        result.stderr, result.stderr
    assert time.perf_counter() - start < 30
    # SLURM without sbatch
    if shutil.which("sbatch") is None:
        result = _cli(["distribute", "--cluster", "slurm"], root)
        assert result.returncode == 1 and "sbatch" in result.stderr
    # no DVC remote
    bare = tmp_path / "bare"
    sh(["git", "clone", "-q", str(root), str(bare)], tmp_path)
    sh(["dvc", "remote", "remove", "team"], bare)
    sh(["git", "commit", "-q", "-am", "no remote"], bare)
    result = _cli(["distribute"], bare)
    assert result.returncode == 1 and "no DVC remote configured" in result.stderr
