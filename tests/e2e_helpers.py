"""Helpers of the end-to-end tests of `cmds-ad distribute`.

Counting the stage commands that run, independently of the code under test: a `cmds-ad`
shim, first on PATH, appends its arguments to a file and runs the real `cmds-ad`. Every
process that inherits that PATH (DVC, Dask workers, SLURM jobs) goes through it."""

from __future__ import annotations

import shutil
import stat
from collections import Counter
from pathlib import Path

import yaml


def counting_shim(folder: Path, path: str) -> tuple[Path, Path]:
    """(a folder to put first on PATH, the file that lists the commands run); ``path``: the
    PATH on which the real `cmds-ad` is found."""
    shim_dir = folder / "shim"
    shim_dir.mkdir()
    counts = folder / "commands.txt"
    real = shutil.which("cmds-ad", path=path)
    assert real is not None, f"cmds-ad is not on {path}"
    shim = shim_dir / "cmds-ad"
    shim.write_text(f'#!/bin/sh\necho "$*" >> "{counts}"\nexec "{real}" "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return shim_dir, counts


def commands_run(counts: Path) -> Counter:
    """Stage commands run so far (the shim also sees `cmds-ad distribute` itself)."""
    lines = counts.read_text().splitlines() if counts.is_file() else []
    return Counter(line for line in lines if not line.startswith("distribute"))


def output_files(root: Path) -> dict[str, bytes]:
    """Every file under artifacts/ and results/ (every store, every metrics.json)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for top in ("artifacts", "results")
        for p in sorted((root / top).rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def lock_instances(root: Path) -> set[str]:
    """The stage instances a finished run recorded in its lock files (``report``,
    ``upstream/dvc.yaml:prepare@disc``): every instance of the pipeline."""
    found = set()
    for lockfile, prefix in (("dvc.lock", ""), ("upstream/dvc.lock", "upstream/dvc.yaml:")):
        stages = yaml.safe_load((root / lockfile).read_text())["stages"]
        found.update(prefix + name for name in stages)
    return found
