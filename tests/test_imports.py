"""A stage pulls in only what its own work needs: every DVC stage instance is a fresh Python
process, so each heavy package imported for nothing is paid again per instance
(benchmarks/imports.py measures the seconds). Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# packages no stage module may import at module level: the diffusion libraries load with the
# models (inside run()), the rest belong to other commands (distribute, sweeps, tests)
NEVER = ("diffusers", "transformers", "peft", "accelerate", "sklearn", "dask", "distributed",
         "dvc", "open3d")
NUMPY_STAGE = ("torch", "torchvision", "timm", "safetensors")
# stage module -> packages it must not pull in, beyond NEVER
FORBIDDEN = {
    "validate_params": NUMPY_STAGE + ("matplotlib", "scipy", "PIL", "zarr"),
    "demo_data": NUMPY_STAGE + ("matplotlib", "scipy", "zarr"),
    "prepare": NUMPY_STAGE + ("matplotlib",),
    "score": NUMPY_STAGE + ("matplotlib", "PIL"),
    "evaluate": NUMPY_STAGE,
    "report": NUMPY_STAGE,
    "augment": ("timm", "matplotlib", "scipy"),
    "estimate_normals": ("timm", "matplotlib", "scipy"),
    "extract_features": ("matplotlib", "scipy"),
    "fit_mapper": ("timm", "torchvision", "matplotlib", "scipy"),
    "infer": ("timm", "torchvision", "matplotlib", "scipy"),
}
# what the stage's work does need: seen imported, so the probe is shown to see imports
NEEDED = {"score": ("numpy", "scipy"), "evaluate": ("matplotlib",), "report": ("matplotlib",),
          "infer": ("torch",), "extract_features": ("timm", "torch")}
WATCHED = sorted({p for packages in FORBIDDEN.values() for p in packages} | set(NEVER)
                 | {"rich", "numpy", "pydantic", "yaml", "zarr"})


def imported_after(code: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; the WATCHED packages and our modules it left in
    ``sys.modules``."""
    probe = (f"{code}\nimport json, sys\nprint(json.dumps({{'packages': sorted(p for p in "
             f"{WATCHED!r} if p in sys.modules), 'ours': sorted(m for m in sys.modules if "
             f"m.split('.')[0] in ('pipeline', 'stages'))}}))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True,
                            text=True, timeout=300, env={**os.environ, **(env or {}),
                                                         "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stage_imports() -> dict[str, set[str]]:
    """The WATCHED packages each stage module leaves imported (two interpreters at a time)."""
    with ThreadPoolExecutor(2) as pool:
        found = pool.map(lambda m: imported_after(f"import stages.{m}"), FORBIDDEN)
        return {m: set(f["packages"]) for m, f in zip(FORBIDDEN, found)}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_stage_module_imports_no_heavy_package_it_does_not_use(stage_imports, module) -> None:
    pulled = stage_imports[module]
    assert pulled & set(NEVER + FORBIDDEN[module]) == set(), f"stages.{module} imports them"
    assert set(NEEDED.get(module, ())) <= pulled, pulled  # the probe sees what is imported
    # progress bars load rich on first use; the tests (CMDS_AD_QUIET) never draw one
    assert "rich" not in pulled


def test_predict_checks_its_arguments_before_torch_is_imported() -> None:
    """`cmds-ad predict` reads the model's name, thresholds, bundle and input folder before the
    prediction path (torch, the models) is imported: a refusal takes a second."""
    found = imported_after("import stages.predict, pipeline.bundle")
    assert set(found["packages"]) & set(NEVER + NUMPY_STAGE) == set(), found
    assert "pipeline.prediction" not in found["ours"], found


def test_cli_entry_point_imports_no_stage_and_no_library() -> None:
    found = imported_after("import stages.cli")
    assert found["packages"] == [], found
    assert set(found["ours"]) <= {"stages", "stages.cli", "stages.commands", "pipeline",
                                 "pipeline.errors"}, found


def test_a_stage_command_imports_only_its_own_stage(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    code = ("from typer.testing import CliRunner\nfrom stages.cli import app\n"
            "result = CliRunner().invoke(app, ['validate-params'])\n"
            "assert result.exit_code == 0, result.output")
    found = imported_after(code, cwd=tmp_path)
    stage_modules = {m for m in found["ours"] if m.startswith("stages.")}
    assert stage_modules <= {"stages.cli", "stages.commands", "stages.validate_params",
                             "stages.layout"}, found
    assert not set(found["packages"]) & {"torch", "matplotlib", "scipy", "timm"}, found
    assert (tmp_path / "artifacts" / "params.valid").is_file()
