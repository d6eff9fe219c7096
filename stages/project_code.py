"""A stage command runs the code of the DVC workspace it runs in.

DVC runs a stage in its project's folder and records that folder's source files as the stage's
dependencies, but ``cmds-ad`` imports this package from where it is installed: after
``make install`` (editable), the workspace. A queued or temporary experiment runs in a copy
of the workspace made when it was queued (``.dvc/tmp/exps/...``). If the workspace's code
changed since then, its stages would run the new code while DVC records the copy's, and the
run cache would later hand those outputs to the old code. So where a command run by DVC
(``DVC_ROOT`` set) runs in a workspace that holds this package with other sources than the
installed one, the entry point runs it again with the workspace first on ``PYTHONPATH`` (and so
never through a warm server, which has imported the installed code).

Standard library only: the entry point (stages/warm.py) calls it before it imports anything
else. The comparison reads both copies' sources, about 0.6 MB, only where the two folders
differ.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

PACKAGES = ("pipeline", "stages")  # what stage commands import of this project
RERUN_ENV = "CMDS_AD_PROJECT_CODE"  # set on the rerun, so that it happens once at most


def installed_root() -> Path:
    """The folder this package is imported from."""
    return Path(__file__).resolve().parents[1]


def _sources(root: Path) -> dict[str, Path]:
    return {path.relative_to(root).as_posix(): path
            for package in PACKAGES for path in (root / package).rglob("*.py")}


def first_difference(project: Path, installed: Path) -> str | None:
    """The first source file (relative path) that one copy lacks or that differs; None where
    both copies hold the same code."""
    theirs, ours = _sources(project), _sources(installed)
    for rel in sorted(set(theirs) | set(ours)):
        if rel not in theirs or rel not in ours or \
                theirs[rel].read_bytes() != ours[rel].read_bytes():
            return rel
    return None


def workspace(folder: Path) -> Path | None:
    """The DVC workspace a stage runs in: the nearest folder at or above its working folder
    that holds ``.dvc/``. For a temporary or queued experiment that is DVC's copy; DVC_ROOT
    names the user's workspace there."""
    for candidate in (folder, *folder.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return None


def other_project_code(env: Mapping[str, str], cwd: Path) -> tuple[Path, str] | None:
    """The workspace whose code this command must run instead of the installed code, and a
    file that differs; None where there is none (not run by DVC, the same folder, a workspace
    without this package, the same sources, or already rerun)."""
    if not env.get("DVC_ROOT") or env.get(RERUN_ENV):
        return None
    project, installed = workspace(cwd.resolve()), installed_root()
    if project is None or project == installed or \
            not (project / "stages" / "commands.py").is_file():
        return None
    rel = first_difference(project, installed)
    return None if rel is None else (project, rel)


def rerun_with(project: Path, argv: Sequence[str]) -> NoReturn:
    """Replace this process by the same command with ``project`` first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(project), *paths])
    env[RERUN_ENV] = str(project)
    # -P: nothing but PYTHONPATH before the installation (not the working folder)
    code = f"import sys; sys.argv[0] = {argv[0]!r}; from stages.warm import main; sys.exit(main())"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-P", "-c", code, *argv[1:]], env)
