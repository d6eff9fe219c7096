"""Test settings: offline, quiet, deterministic, and shared fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a stray hub call fails in a second, not a minute
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["CMDS_AD_QUIET"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one OpenMP thread for each worker and the
    # stage processes of its projects, instead of two each fighting over the cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
METRIC_FIXTURES = SHARED / "fixtures" / "metrics"


@pytest.fixture(scope="session")
def metric_fixtures() -> Path:
    if not METRIC_FIXTURES.is_dir():
        pytest.skip(f"metric fixtures not found at {METRIC_FIXTURES}")
    return METRIC_FIXTURES


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on the shared 2-core machine oversubscribed
    threads slow model tests ten-fold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextmanager
def warm_server(folder: Path, env: dict[str, str] | None = None):
    """A warm server (stages/warm.py) started with ``env`` (default: the projects'
    environment); yields its socket path, or None with CMDS_AD_TEST_WARM=0 (no server)."""
    from stages.warm import SERVE, SERVER_ENV
    from tools.scratch_project import project_env

    if os.environ.get("CMDS_AD_TEST_WARM", "1") == "0":
        yield None
        return
    env = dict(env or project_env())
    env.pop(SERVER_ENV, None)
    path = folder / "warm.sock"
    proc = subprocess.Popen([sys.executable, "-P", "-c", SERVE, str(path)], env=env,
                            start_new_session=True)
    try:
        while not path.exists() and proc.poll() is None:
            time.sleep(0.05)
        yield str(path) if proc.poll() is None else None
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="session")
def session_server(tmp_path_factory):
    """One warm server for the session's end-to-end runs: from the first test that asks for
    it on, every `cmds-ad` stage command run with the projects' environment goes through it
    (tests/test_warm.py shows that changes no output); CMDS_AD_TEST_WARM=0 runs without."""
    from stages.warm import SERVER_ENV

    with warm_server(tmp_path_factory.mktemp("warm")) as path:
        if path:
            os.environ[SERVER_ENV] = path
        yield path
        os.environ.pop(SERVER_ENV, None)


@pytest.fixture(scope="session")
def reduced_demo(tmp_path_factory, session_server) -> Path:
    """The reduced demo (``disc``, k = 1, REDUCED_DEMO budgets, 3 train and 6 test images) in a
    clone of this repository, reproduced once per session with `dvc repro` and committed
    (dvc.lock files included). Shared: a test module that changes it works on a copy
    (``copy_project``), which DVC sees unchanged."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _reproduce_reduced_demo(tmp_path_factory.mktemp("reduced-demo") / "cmds-ad")
    # under pytest-xdist the workers share one run: the first to ask builds it in the run's
    # common temporary folder, the others wait on the lock and find it done
    common = tmp_path_factory.getbasetemp().parent
    root, done = common / "reduced-demo" / "cmds-ad", common / "reduced-demo.done"
    with FileLock(str(common / "reduced-demo.lock")):
        if not done.exists():
            shutil.rmtree(root.parent, ignore_errors=True)  # a failed worker's half-built run
            _reproduce_reduced_demo(root)
            done.touch()
    return root


@pytest.fixture(scope="session")
def reduced_demo_run(reduced_demo) -> tuple[Path, int]:
    """The reduced demo as the serial reference of the distributed and SLURM runs: its folder
    and its number of stage instances (from its lock files)."""
    from tests.e2e_helpers import lock_instances

    return reduced_demo, len(lock_instances(reduced_demo))


def _reproduce_reduced_demo(root: Path) -> Path:
    from tools.scratch_project import REDUCED_DEMO, make_project, sh

    make_project(root, REDUCED_DEMO, n_train=3, n_test=6, make_data=False)
    sh(["dvc", "repro"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "reduced demo run"], root)
    return root


# The end-to-end modules, longest first (`pytest --durations`, 2026-12-05): under
# `make test` (`-n 2 --dist loadfile`) a file runs on one worker, and starting the long ones
# first keeps the two workers busy to the end.
LONGEST_FIRST = ("test_distribute", "test_slurm", "test_team", "test_predict", "test_hostile",
                 "test_dvc_pipeline", "test_paper_gpu", "test_warm")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
