"""Throw-away projects for the end-to-end tests and benchmarks: a ``git clone`` of this
repository, as a user gets it.

``make_project`` clones this repository (HEAD), lays the working tree's uncommitted changes
over it (modified tracked files and untracked files git does not ignore, so a developer's edits
are what is tested) and commits them, sets the parameters of the run (``params.yaml``, written
as ``dvc exp run -S`` writes it) and commits them, and makes the demo data the way the README
says: ``dvc repro`` of the ``demo_data`` stage. The clone keeps the repository's own
``.gitignore``, ``.dvcignore`` and DVC files, so data and results stay out of git exactly as
for a user. ``copy_project`` copies a finished project (``cp -a``) for a test that changes it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# run state, not source: a developer's own dvc.lock (from `make demo` in the checkout) would
# describe outputs the clone does not have
NOT_OVERLAID = ("dvc.lock",)
# The reduced demo of the end-to-end tests and benchmarks: k = 1 and the smallest budgets that
# still train something.
REDUCED_DEMO = {
    "fewshot.shots": [1],
    "augment.steps": 2,
    "augment.n_per_shot": 1,
    "augment.inference_steps": 5,
    "estimate_normals.steps": 1,
    "estimate_normals.ensemble": 1,
    "fit_mapper.steps": {1: 15},
}
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "cmds-ad test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "cmds-ad test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def project_env() -> dict[str, str]:
    """Environment for dvc/git subprocesses: this interpreter's scripts on PATH, offline."""
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)  # one value per test: the warm server compares the rest
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CMDS_AD_QUIET="1", **GIT_IDENTITY)
    env["PYTHONPATH"] = str(REPO)
    return env


def sh(args: Sequence[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args), cwd=cwd, env=project_env(), capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({result.returncode}) in {cwd}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def deep_update(base: dict, overrides: Mapping[str, Any]) -> dict:
    """Apply dotted-key overrides, e.g. {"score.lambda_1": 0.5}."""
    for dotted, value in overrides.items():
        node = base
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return base


def write_params(project: Path, overrides: Mapping[str, Any]) -> None:
    """Set dotted keys in the project's params.yaml through DVC's own YAML writer (the one
    ``dvc exp run -S`` uses), so the rest of the file keeps its bytes and comments."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(project / "params.yaml") as params:
        deep_update(params, overrides)


def _worktree_files(repo: Path) -> tuple[list[str], list[str]]:
    """(files to copy, tracked files deleted) of the working tree against HEAD: changed files,
    staged or not, and untracked files that git does not ignore."""
    def listing(*args: str) -> list[str]:
        out = subprocess.run(["git", *args, "-z"], cwd=repo, check=True,
                             capture_output=True).stdout.decode()
        return [p for p in out.split("\0") if p and Path(p).name not in NOT_OVERLAID]

    # against HEAD, not the index: `git add`ed changes count (ls-files --modified misses them)
    deleted = set(listing("diff", "--name-only", "--no-renames", "--diff-filter=D", "HEAD"))
    changed = listing("diff", "--name-only", "--no-renames", "HEAD") + \
        listing("ls-files", "--others", "--exclude-standard")
    return sorted(set(changed) - deleted), sorted(deleted)


def clone_repository(dest: Path, source: Path = REPO) -> Path:
    """``git clone`` of ``source`` at ``dest``, its uncommitted work committed on top."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sh(["git", "clone", "-q", str(source), str(dest)], dest.parent)
    copy, deleted = _worktree_files(source)
    for rel in copy:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target)
    for rel in deleted:
        (dest / rel).unlink(missing_ok=True)
    if copy or deleted:
        sh(["git", "add", "-A"], dest)
        sh(["git", "commit", "-q", "--allow-empty", "-m", "uncommitted work of the checkout"],
           dest)
    return dest


def make_project(
    dest: Path,
    overrides: Mapping[str, Any] | None = None,
    categories: Sequence[str] = ("disc",),
    n_train: int = 10,
    n_test: int = 24,
    make_data: bool = True,
) -> Path:
    """A clone of this repository at ``dest`` with ``data.categories`` (and the demo data's)
    set to ``categories`` and the demo sized ``n_train``/``n_test``, then ``overrides``
    (dotted keys), committed; with ``make_data`` the demo data is made by its stage
    (``dvc repro upstream/dvc.yaml:demo_data``) and its dvc.lock entry committed."""
    clone_repository(dest)
    write_params(dest, {
        "data.categories": list(categories), "demo_data.categories": list(categories),
        "demo_data.n_train": n_train, "demo_data.n_test": n_test, **(overrides or {}),
    })
    sh(["git", "commit", "-q", "-am", "test configuration"], dest)
    if make_data:
        sh(["dvc", "repro", "upstream/dvc.yaml:demo_data"], dest)
        sh(["git", "add", "-A"], dest)
        sh(["git", "commit", "-q", "-m", "demo data"], dest)
    return dest


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a project (``cp -a``: times and modes kept, DVC cache included) that a test
    may change without touching ``src``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(src), str(dest)], check=True)
    return dest


def stages_run(output: str) -> set[str]:
    """Names of the stage instances a `dvc repro` output says it ran."""
    ran = set()
    for line in output.splitlines():
        if line.startswith("Running stage '"):
            ran.add(line.split("'")[1])
    return ran


def stage_command(cmdline: Sequence[str]) -> str | None:
    """The arguments of the `cmds-ad` command a process runs ("score disc -k 1"), read from
    its argv (a shell's `-c` string included), or None. Matched by the basename of a word, so
    a checkout whose path contains "cmds-ad" does not make its python or dvc processes match."""
    words = [word for arg in cmdline for word in arg.split()]
    for i, word in enumerate(words[:-1]):
        if Path(word).name == "cmds-ad":
            return " ".join(words[i + 1 :])
    return None
