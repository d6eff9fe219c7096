"""Folders named on the command line, stage instances and resource errors (pipeline/outputs.py,
stages/cli.py): nothing a command did not write is replaced, every failure is one line."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.errors import OutputError
from pipeline.outputs import MARKER, check_out_folder
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project folder (the working directory) with the demo params and a user file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    return tmp_path


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output  # stdout and stderr


@pytest.mark.parametrize(("out", "fragment"), [
    (".", "it is the current folder"),
    ("..", "it holds the current folder"),
    ("data/demo/..", "it holds the data root"),
    ("data", "it holds the data root"),
    ("data/demo", "it is the data root"),
    ("mine", "holds files that `cmds-ad import-official` did not write (notes.txt)"),
    ("params.yaml", "exists and is not a folder"),
])
def test_out_folder_refusals(project, out, fragment):
    with pytest.raises(OutputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        check_out_folder(Path(out), "import-official", False,
                         [("the data root", Path("data/demo"))])
    assert (project / "mine" / "notes.txt").read_text() == "the user's"


def test_out_folder_force_replaces_only_what_it_may(project):
    check_out_folder(Path("mine"), "demo-models", True)  # --force: the user asked
    with pytest.raises(OutputError, match="current folder"):
        check_out_folder(Path("."), "demo-models", True)  # never, --force or not
    (project / "empty").mkdir()
    check_out_folder(Path("empty"), "demo-models", False)
    (project / "ours").mkdir()
    (project / "ours" / MARKER).write_text("written by cmds-ad demo-models\n")
    (project / "ours" / "training.json").write_text("{}")
    check_out_folder(Path("ours"), "demo-models", False)
    with pytest.raises(OutputError, match="did not write"):  # another command's folder
        check_out_folder(Path("ours"), "demo-data", False)


def test_import_official_never_replaces_a_users_folder_or_the_project(project):
    code, output = invoke("import-official", "release", "-c", "bagel", "-k", "1", "-o", "mine")
    assert code == 1 and "mine: the folder holds files" in output and "--force" in output
    code, output = invoke("import-official", "release", "-c", "bagel", "-k", "1", "-o", ".")
    assert code == 1 and "it is the current folder" in output and "Traceback" not in output
    code, output = invoke("import-official", "release", "-c", "../bagel", "-k", "1", "-o", "new")
    assert code == 1 and "--category: '../bagel' is not a plain name" in output
    assert sorted(p.name for p in project.iterdir()) == ["mine", "params.yaml"]
    assert (project / "mine" / "notes.txt").read_text() == "the user's"


def test_demo_data_writes_its_own_folders_again_and_nothing_else(project):
    small = ["--category", "disc", "--n-train", "1", "--n-test", "2"]
    (project / "mine" / "disc").mkdir(parents=True)
    (project / "mine" / "disc" / "notes.txt").write_text("the user's")
    code, output = invoke("demo-data", "mine", *small)
    assert code == 1 and "mine/disc: the folder holds files" in output and "(notes.txt)" in output
    assert invoke("demo-data", "data/demo", *small) == (0, "")
    assert sorted(p.name for p in (project / "data/demo/disc").iterdir()) == [
        MARKER, "test", "train", "validation"]
    assert invoke("demo-data", "data/demo", *small)[0] == 0  # its own output: replaced
    code, output = invoke("demo-data", "new", *small, "--eyecandies", "data")
    assert code == 1 and "the folder of the data root" in output
    assert not (project / "new").exists()  # checked before anything was written
    assert invoke("demo-data", "mine", *small, "--force")[0] == 0
    assert not (project / "mine" / "disc" / "notes.txt").exists()
    assert sorted(p.name for p in project.iterdir()) == ["data", "mine", "params.yaml"]


@pytest.mark.parametrize(("args", "fragment"), [
    (["prepare", "../../data/demo/disc"], "category '../../data/demo/disc' is not a plain name"),
    (["prepare", "/tmp/x"], "category '/tmp/x' is not a plain name"),
    (["score", "disk", "-k", "1"], "data.categories: category 'disk' is not listed"),
    (["score", "disc", "-k", "3"], "fewshot.shots: --shots 3 is not listed"),
    (["score", "disc", "-k", "1", "-s", "7"], "fewshot.seeds: --seed 7 is not listed"),
])
def test_stage_instance_outside_the_params_is_refused(project, args, fragment):
    code, output = invoke(*args)
    assert code == 1 and fragment in output and output.count("\n") == 1, output
    assert sorted(p.name for p in project.iterdir()) == ["mine", "params.yaml"]


@pytest.mark.parametrize(("error", "fragment"), [
    (MemoryError("Unable to allocate 74.5 GiB for an array with shape (100000, 100000) and "
                 "data type float64"), "out of memory (Unable to allocate 74.5 GiB"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                  "80000000000 bytes."), "out of memory (DefaultCPUAllocator"),
    (OSError(errno.ENOSPC, "No space left on device", "artifacts/x"),
     "out of disk space (No space left on device: artifacts/x)"),
])
def test_resource_errors_are_one_line_naming_the_stage(project, monkeypatch, error, fragment):
    import stages.score

    def run(*args, **kwargs):
        raise error

    monkeypatch.setattr(stages.score, "run", run)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["fewshot"]["shots"] = [1]
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    code, output = invoke("score", "disc", "-k", "1")
    assert code == 1 and output.startswith("error: score disc k=1 seed=0: ") and fragment in output
    assert output.count("\n") == 1 and "Traceback" not in output


def test_other_errors_are_not_disguised(project, monkeypatch):
    import stages.score

    def run(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(stages.score, "run", run)
    result = CliRunner().invoke(app, ["validate-params"])
    assert result.exit_code == 0
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["fewshot"]["shots"] = [1]
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["score", "disc", "-k", "1"])
    assert isinstance(result.exception, PermissionError)  # a bug: the traceback is useful
