"""The warm server (stages/warm.py, `cmds-ad warm`): a stage command through it behaves as a
fresh process does (exit code, stdout, stderr, signals, outputs), and the client runs the
command itself whenever the server could differ (changed sources, environment, no answer)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e_helpers import output_files
from tools.scratch_project import REDUCED_DEMO, copy_project, make_project, project_env, sh
from stages.project_code import PACKAGES as PROJECT_PACKAGES
from stages.project_code import first_difference
from stages.warm import PACKAGES, SERVE, SERVER_ENV, STAGE_NAMES

USED = "cmds-ad: running in a child of the warm server"
NOT_USED = "cmds-ad: not using the warm server"


def test_stage_names_are_the_cli_stage_commands():
    """The warm client sends exactly the CLI's stage commands, each a stage module."""
    from stages.cli import app

    commands = {c.name for c in app.registered_commands}
    assert STAGE_NAMES <= commands
    assert all((REPO / "stages" / f"{n.replace('-', '_')}.py").is_file() for n in STAGE_NAMES)
    assert "predict" not in STAGE_NAMES and "warm" not in STAGE_NAMES


def test_the_entry_point_imports_only_the_standard_library():
    code = ("import sys, stages.warm; "
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
            "('typer', 'click', 'numpy', 'pipeline', 'pydantic', 'yaml', 'torch', 'rich')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ------------------------------------------------------------------------------ a server

@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """A copy of the project's packages, imported through PYTHONPATH by server and clients,
    so that a test may change a source file."""
    root = tmp_path_factory.mktemp("code")
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A clone with the demo data of `disc` (3 train, 6 test images; written by the command
    of the demo_data stage, no `dvc repro`), not run."""
    root = make_project(tmp_path_factory.mktemp("warm") / "p", REDUCED_DEMO, n_train=3,
                        n_test=6, make_data=False)
    sh(["cmds-ad", "demo-data", "data/demo", "--category", "disc", "--n-train", "3",
        "--n-test", "6", "--seed", "0"], root)
    return root


def _env(code: Path, **extra: str) -> dict[str, str]:
    env = project_env()
    env.pop(SERVER_ENV, None)
    env.pop("CMDS_AD_VERBOSE", None)
    env["PYTHONPATH"] = str(code)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def server(code, tmp_path_factory):
    """A server started as `cmds-ad warm` starts one; yields its socket; stopped after."""
    path = str(tmp_path_factory.mktemp("sock") / "s.sock")
    proc = subprocess.Popen([sys.executable, "-P", "-c", SERVE, path], env=_env(code),
                            start_new_session=True)
    deadline = time.time() + 60
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield path
    proc.terminate()
    proc.wait(30)


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["cmds-ad", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def _warm(code: Path, server: str, **extra: str) -> dict[str, str]:
    return _env(code, **{SERVER_ENV: server, **extra})


def test_a_failing_stage_exits_and_says_the_same_through_the_server(project, code, server):
    for args in (["score", "nope", "-k", "1"], ["validate-params", "--params", "missing.yaml"],
                 ["fit-mapper", "disc", "-k", "7"], ["evaluate", "--bogus-option"]):
        cold = _run(args, project, _env(code))
        warm = _run(args, project, _warm(code, server))
        assert cold.returncode != 0, cold
        assert (warm.returncode, warm.stdout, warm.stderr) == \
            (cold.returncode, cold.stdout, cold.stderr), args
        # and it did go through the server
        said = _run(args, project, _warm(code, server, CMDS_AD_VERBOSE="1")).stderr
        assert said.startswith(USED) and NOT_USED not in said, said


def test_a_stage_through_the_server_writes_what_a_fresh_process_writes(project, code, server,
                                                                       tmp_path):
    warm_project = copy_project(project, tmp_path / "warm")
    for root, env in ((project, _env(code)), (warm_project, _warm(code, server))):
        for args in (["validate-params"], ["prepare", "disc"]):
            result = _run(args, root, env)
            assert result.returncode == 0, result.stderr
    cold, warm = output_files(project), output_files(warm_project)
    assert cold and cold.keys() == warm.keys()
    assert [k for k in cold if cold[k] != warm[k]] == []


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_client_ends_the_child_as_it_ends_a_fresh_process(project, code, server,
                                                                          tmp_path, number):
    """Ctrl-C (SIGINT) and DVC's SIGTERM reach the child, which ends as a fresh process in
    the command does: exit 130 (typer's answer to KeyboardInterrupt), or killed by SIGTERM;
    the client exits or dies the same way."""
    copy = copy_project(project, tmp_path / "p")
    # More test images than the module's project, so that the stage is surely still at work
    # when the signal comes (a quiet machine prepares the 6 of the project in about a second).
    sh(["cmds-ad", "demo-data", "data/demo", "--category", "disc", "--n-train", "3",
        "--n-test", "48", "--seed", "0", "--force"], copy)
    client = subprocess.Popen(["cmds-ad", "prepare", "disc"], cwd=copy,
                              env=_warm(code, server, CMDS_AD_VERBOSE="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = client.stderr.readline()
    assert first.startswith(USED), first
    child = int(first.rsplit("pid ", 1)[1].rstrip(")\n"))
    # into the stage's work: its output folder is claimed once the data are read
    deadline = time.monotonic() + 120
    while not any((copy / "artifacts").glob("prepare/.*tmp*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    client.send_signal(number)
    _, err = client.communicate(timeout=120)
    assert client.returncode == (130 if number == signal.SIGINT else -number), err
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_a_changed_source_file_makes_the_client_run_the_new_code(project, code, server):
    said = _run(["validate-params"], project, _warm(code, server, CMDS_AD_VERBOSE="1"))
    assert said.returncode == 0 and said.stderr.startswith(USED), said.stderr
    module = code / "stages" / "validate_params.py"
    original, stat = module.read_text(), module.stat()
    try:
        module.write_text(original + '\nimport sys\nsys.stderr.write("the changed code ran\\n")\n')
        stale = _run(["validate-params"], project, _warm(code, server, CMDS_AD_VERBOSE="1"))
        assert stale.returncode == 0
        assert "the project's sources changed since the server started" in stale.stderr
        assert "the changed code ran" in stale.stderr and USED not in stale.stderr
    finally:
        module.write_text(original)
    # same bytes, new modification time: still stale
    again = _run(["validate-params"], project, _warm(code, server, CMDS_AD_VERBOSE="1"))
    assert "sources changed" in again.stderr and USED not in again.stderr
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as the server started
    back = _run(["validate-params"], project, _warm(code, server, CMDS_AD_VERBOSE="1"))
    assert back.stderr.startswith(USED), back.stderr


def test_an_environment_that_differs_makes_the_client_run_itself(project, code, server):
    threads = str(int(os.environ.get("OMP_NUM_THREADS", "1")) + 1)  # not the server's
    differs = _run(["validate-params"], project,
                   _warm(code, server, CMDS_AD_VERBOSE="1", OMP_NUM_THREADS=threads))
    assert differs.returncode == 0
    assert "the environment variable OMP_NUM_THREADS differs" in differs.stderr
    assert USED not in differs.stderr
    # what DVC and the shell add to a stage's environment does not count
    dvc_adds = _run(["validate-params"], project,
                    _warm(code, server, CMDS_AD_VERBOSE="1", DVC_ROOT=str(project), SHLVL="7"))
    assert dvc_adds.returncode == 0 and dvc_adds.stderr.startswith(USED), dvc_adds.stderr


def test_a_dead_socket_makes_the_client_run_itself(project, code, tmp_path):
    import socket

    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))  # a socket file that nobody listens on
    for path in (dead, tmp_path / "missing.sock"):
        result = _run(["validate-params"], project,
                      _warm(code, str(path), CMDS_AD_VERBOSE="1"))
        assert result.returncode == 0, result.stderr
        assert f"{NOT_USED}: {path} does not answer" in result.stderr
    quiet = _run(["validate-params"], project, _warm(code, str(dead)))
    assert quiet.returncode == 0 and quiet.stderr == ""  # silent unless verbose


def test_a_dvc_project_with_other_sources_runs_its_own_code(project, code, server, tmp_path):
    """DVC runs a stage (DVC_ROOT set) in a workspace whose sources differ from the installed
    ones, as in a queued experiment's copy of a workspace whose code has changed since: the command
    runs the project's code, in a fresh process and not in the server's child. Where they are
    the same, it runs as before."""
    copy = tmp_path / "copy"
    for package in PROJECT_PACKAGES:
        shutil.copytree(code / package, copy / package)
    shutil.copy(project / "params.yaml", copy / "params.yaml")
    (copy / ".dvc").mkdir()
    env = _warm(code, server, CMDS_AD_VERBOSE="1", DVC_ROOT=str(copy))
    same = _run(["validate-params"], copy, env)
    assert same.returncode == 0 and same.stderr.startswith(USED), same.stderr
    module = copy / "stages" / "validate_params.py"
    module.write_text(module.read_text() + '\nimport sys\nsys.stderr.write("the copy ran\\n")\n')
    assert first_difference(copy, code) == "stages/validate_params.py"
    other = _run(["validate-params"], copy, env)
    assert other.returncode == 0, other.stderr
    assert other.stderr.startswith(f"cmds-ad: running the code of the DVC workspace {copy}: its "
                                   "stages/validate_params.py differs"), other.stderr
    assert "the copy ran" in other.stderr and USED not in other.stderr
    (copy / "stages" / "new.py").write_text("")
    module.write_text((code / "stages" / "validate_params.py").read_text())
    assert first_difference(copy, code) == "stages/new.py"


def test_other_commands_run_in_the_client(project, code, server):
    result = _run(["--help"], project, _warm(code, server, CMDS_AD_VERBOSE="1"))
    assert result.returncode == 0 and "--help is not a stage command" in result.stderr


# ------------------------------------------------------------------------------ cmds-ad warm

def test_warm_exits_with_the_commands_code_and_stops_its_server(project, tmp_path):
    env = project_env()
    env.pop(SERVER_ENV, None)
    shown = subprocess.run(["cmds-ad", "warm", "--", "bash", "-c", f'echo "${SERVER_ENV}"'],
                           cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    socket_path = Path(shown.stdout.strip())
    assert socket_path.name == "server.sock"
    assert not socket_path.parent.exists()  # stopped, its folder removed
    codes = [subprocess.run(["cmds-ad", "warm", "--", *c], cwd=project, env=env,
                            capture_output=True, timeout=300).returncode
             for c in (["bash", "-c", "exit 3"], ["bash", "-c", "kill -TERM $$"],
                       ["no-such-command-here"])]
    assert codes == [3, 128 + signal.SIGTERM, 127]


# ------------------------------------------------------------------------------ end to end
# The whole reduced demo, byte for byte, with and without a server: tests/test_distribute.py
# and tests/test_slurm.py compare runs whose stage processes all start fresh (a worker puts its
# clone first on PYTHONPATH, which the server refuses) with the session's reduced demo, which
# went through the session's server.
