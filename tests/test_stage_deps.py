"""The code deps of every DVC stage: a stage must list each project module its code imports
(directly or through other project modules), except the shared plumbing below. A missing dep
means an edit of that module silently keeps stale cached outputs; a dep that does not exist
means DVC fails. Fast: reads the dvc.yaml files and parses imports, runs no stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DVC_FILES = ("upstream/dvc.yaml", "dvc.yaml")

# Modules that move data around but compute nothing a result depends on (store IO, parameter
# parsing, paths, messages, device choice). Listing them would re-run the whole pipeline on
# any edit; the dvc.yaml headers say so and say what to do after an edit that changes outputs.
PLUMBING = {
    "pipeline/__init__.py",
    "pipeline/artifacts.py",
    "pipeline/background.py",  # helper threads for reading and writing
    "pipeline/device.py",
    "pipeline/errors.py",
    "pipeline/limits.py",
    "pipeline/models/__init__.py",  # a docstring
    "pipeline/outputs.py",
    "pipeline/params.py",
    "pipeline/progress.py",
    "stages/__init__.py",
    "stages/layout.py",
}


def module_file(name: str) -> Path | None:
    """The file of a project module (``pipeline.x`` / ``stages.x``), None for anything else."""
    if name.split(".")[0] not in ("pipeline", "stages"):
        return None
    base = REPO / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Absolute imports of a file, with ``from a import b`` giving both ``a`` and ``a.b``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def code_closure(module: str) -> set[str]:
    """Repository-relative paths of ``module`` and every project module it imports, recursively
    (parent packages included: importing ``a.b`` runs ``a/__init__.py``)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    return {path.relative_to(REPO).as_posix() for path in seen}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage["deps"] if d.startswith(("pipeline", "stages"))]


# (dvc file, stage name, stage definition) for every stage of both files, read once
STAGES = [
    (dvc_file, name, stage)
    for dvc_file in DVC_FILES
    for name, stage in yaml.safe_load((REPO / dvc_file).read_text())["stages"].items()
]
each_stage = pytest.mark.parametrize(("dvc_file", "name", "stage"), STAGES,
                                     ids=[f"{f}:{n}" for f, n, _ in STAGES])


@each_stage
def test_stage_lists_every_module_its_code_imports(dvc_file: str, name: str, stage: dict) -> None:
    # estimate_normals_generated runs stages/estimate_normals.py, fit_mapper_released
    # stages/fit_mapper.py, and so on
    module = f"stages.{name.removesuffix('_generated').removesuffix('_released')}"
    assert module_file(module) is not None, f"{dvc_file}:{name}: no module {module}"
    deps = code_deps(stage)
    missing = sorted(p for p in code_closure(module) - PLUMBING if not covered(p, deps))
    assert not missing, f"{dvc_file}:{name} imports {missing} but does not list them as deps"


@each_stage
def test_stage_code_deps_exist(dvc_file: str, name: str, stage: dict) -> None:
    deps = code_deps(stage)
    assert deps, f"{dvc_file}:{name} lists no code"
    absent = [d for d in deps if not (REPO / d).exists()]
    assert not absent, f"{dvc_file}:{name} lists deps that do not exist: {absent}"
    listed_plumbing = sorted(set(deps) & PLUMBING)
    assert not listed_plumbing, f"{dvc_file}:{name} lists plumbing {listed_plumbing}"


def test_closure_follows_imports_through_project_modules() -> None:
    # stages.score imports pipeline.scoring; both must be in its closure, torch must not
    closure = code_closure("stages.score")
    assert {"stages/score.py", "pipeline/scoring.py", "stages/__init__.py"} <= closure
    assert all(p.startswith(("pipeline/", "stages/")) for p in closure)


def test_infer_writes_the_streams_score_reads() -> None:
    # infer names its maps itself (so it need not depend on the scoring code); score reads them
    from pipeline.inference import STREAM_SPECS
    from pipeline.scoring import STREAM_NAMES

    assert tuple(STREAM_SPECS) == STREAM_NAMES
