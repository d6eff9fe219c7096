"""tools/scratch_project.py: the end-to-end tests' projects are clones of the repository with
the working tree's uncommitted work on top (fast: a tiny source repository)."""

from __future__ import annotations

import difflib
from pathlib import Path

from tools.scratch_project import REPO, clone_repository, sh, stage_command, write_params


def _source(root: Path) -> Path:
    root.mkdir()
    sh(["git", "init", "-q", "-b", "main"], root)
    (root / ".gitignore").write_text("/ignored/\n")
    for name, text in {"kept.py": "a = 1\n", "edited.py": "b = 1\n", "gone.py": "c = 1\n",
                       "sub/deep.txt": "d\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "first"], root)
    # uncommitted work: an edit, a new file, a deletion; an ignored file and a run's lock
    (root / "edited.py").write_text("b = 2\n")
    (root / "sub/new.py").write_text("e = 1\n")
    (root / "gone.py").unlink()
    (root / "ignored").mkdir()
    (root / "ignored/big.bin").write_bytes(b"\0" * 10)
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    return root


def test_clone_carries_uncommitted_work_but_not_ignored_files_or_locks(tmp_path):
    source = _source(tmp_path / "source")
    clone = clone_repository(tmp_path / "clone", source)
    assert (clone / "edited.py").read_text() == "b = 2\n"
    assert (clone / "sub/new.py").read_text() == "e = 1\n"
    assert (clone / "kept.py").read_text() == "a = 1\n"
    assert not (clone / "gone.py").exists()
    assert not (clone / "ignored").exists() and not (clone / "dvc.lock").exists()
    # committed: the clone is a clean checkout, as a user's
    assert sh(["git", "status", "--porcelain"], clone).stdout == ""
    assert sh(["git", "log", "--format=%s", "-1"], clone).stdout.strip() == \
        "uncommitted work of the checkout"


def test_clone_carries_staged_work(tmp_path):
    """`git add`ed changes (a merge in progress, a staged edit or deletion) are uncommitted
    work too: the clone has them."""
    source = _source(tmp_path / "source")
    sh(["git", "add", "-A"], source)
    clone = clone_repository(tmp_path / "clone", source)
    assert (clone / "edited.py").read_text() == "b = 2\n"
    assert (clone / "sub/new.py").read_text() == "e = 1\n"
    assert not (clone / "gone.py").exists() and not (clone / "dvc.lock").exists()


def test_clone_of_a_clean_tree_is_its_head(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    sh(["git", "init", "-q", "-b", "main"], source)
    (source / "a.txt").write_text("a\n")
    sh(["git", "add", "-A"], source)
    sh(["git", "commit", "-q", "-m", "only"], source)
    clone = clone_repository(tmp_path / "clone", source)
    head = sh(["git", "rev-parse", "HEAD"], source).stdout
    assert sh(["git", "rev-parse", "HEAD"], clone).stdout == head


def test_write_params_changes_only_the_given_lines(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    write_params(tmp_path, {"score.lambda_1": 0.5, "data.categories": ["disc"]})
    before = (REPO / "params.yaml").read_text().splitlines()
    after = (tmp_path / "params.yaml").read_text().splitlines()
    changed = [line for line in difflib.ndiff(before, after) if line[:1] in "+-"]
    assert changed == ["-   - dome", "-   - slab", "-   lambda_1: 0.1", "+   lambda_1: 0.5"]


def test_stage_processes_are_told_by_the_command_word_not_the_checkout_path():
    # a checkout named like the project (`git clone ... && cd cmds-ad`) holds the venv
    venv = "/home/me/cmds-ad/.venv/bin"
    assert stage_command([f"{venv}/python", f"{venv}/dvc", "repro", "-s", "score@disc-1-0"]) \
        is None
    assert stage_command([f"{venv}/python", "-m", "pytest", "-q"]) is None
    assert stage_command(["/bin/sh", "-c", "cmds-ad score disc -k 1"]) == "score disc -k 1"
    assert stage_command([f"{venv}/python", f"{venv}/cmds-ad", "fit-mapper", "disc"]) == \
        "fit-mapper disc"
