"""A throw-away git + DVC copy of this project with its own (small) demo data.

Used by the pipeline tests and ``benchmarks/dvc_pipeline.py`` to exercise ``dvc repro`` end to
end without touching the working copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = (
    "dvc.yaml", "upstream/dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore",
    "checkpoints/README.md",  # fit_mapper's dependency (fit_mapper.checkpoints)
)
PROJECT_DIRS = ("pipeline", "stages")
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


def project_env() -> dict[str, str]:
    """Environment for dvc/git subprocesses: this interpreter's scripts on PATH, offline."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CMDS_AD_QUIET="1",
        GIT_AUTHOR_NAME="cmds-ad test", GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="cmds-ad test", GIT_COMMITTER_EMAIL="test@example.invalid",
    )
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
    path = project / "params.yaml"
    params = deep_update(yaml.safe_load(path.read_text()), overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(
    dest: Path,
    overrides: Mapping[str, Any] | None = None,
    categories: Sequence[str] = ("disc",),
    n_train: int = 10,
    n_test: int = 24,
    track_data_in_git: bool = True,
) -> Path:
    """Create a git + DVC project at ``dest`` with demo data for ``categories``."""
    from pipeline.data.demo import write_demo_dataset

    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".gitignore").write_text("__pycache__/\n/.cache/\n/artifacts/\n")
    write_params(dest, {"data.categories": list(categories), **(overrides or {})})
    write_demo_dataset(dest / "data" / "demo", seed=0, categories=list(categories),
                       n_train=n_train, n_test=n_test)
    sh(["git", "init", "-q", "-b", "main"], dest)
    sh(["git", "config", "user.name", "cmds-ad test"], dest)
    sh(["git", "config", "user.email", "test@example.invalid"], dest)
    sh(["dvc", "init", "-q"], dest)
    sh(["git", "add", "-A"] if track_data_in_git else ["git", "add", "-A", ":!data"], dest)
    sh(["git", "commit", "-q", "-m", "scratch project"], dest)
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
