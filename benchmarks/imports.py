"""What importing each stage module costs, and which heavy packages it pulls in.

    python benchmarks/imports.py                  # every stage module, median of 5
    python benchmarks/imports.py --repeats 3 --modules score,evaluate --json FILE
    python benchmarks/imports.py --floor          # also each stage beside its library floor

For every stage module (``stages.<m>`` that a DVC stage runs) and for the ``cmds-ad``
entry point, each repeat is a fresh interpreter:

- ``python -X importtime -c 'import stages.<m>'``: the import's cumulative seconds;
- the heavy third-party packages the import leaves in ``sys.modules`` (torch, matplotlib,
  diffusers, ...): a stage should pull only what its own work needs.

With ``--floor``, a second table sets each stage process's imports beside their floor: the
third-party packages its work needs, imported alone. "stage" imports ``stages.<m>`` and then
what its ``run()`` imports lazily (the diffusers pipeline class, scipy for prepare); "floor"
imports only the libraries; the difference is our own modules plus anything pulled in for
nothing. Both are the seconds of every import after interpreter start (``-X importtime``,
top level).

The load average is printed before and after: the development machine is shared, so compare
figures of one run only (``benchmarks/startup.py`` splits a whole stage instance).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_MODULES = ("validate_params", "demo_data", "prepare", "augment", "estimate_normals",
                 "extract_features", "fit_mapper", "infer", "score", "evaluate", "report")
HEAVY = ("torch", "torchvision", "timm", "diffusers", "transformers", "peft", "safetensors",
         "matplotlib", "sklearn", "scipy", "zarr", "dask", "distributed", "dvc", "rich",
         "pydantic", "PIL", "tifffile")
ENTRY = "stages.cli"  # what `cmds-ad <stage>` imports before the stage module
# what run() imports after the module (model classes, point-cloud cleaning)
LAZY = {"prepare": "import scipy.ndimage, scipy.sparse.csgraph",
        "augment": "import peft; from diffusers import StableDiffusionImg2ImgPipeline",
        "estimate_normals": "from diffusers import MarigoldNormalsPipeline"}
# the third-party packages each stage's work needs: its floor
_PARAMS = "import numpy, yaml, pydantic"
_STORES = _PARAMS + ", zarr"
_FIGURES = "; import matplotlib.figure, matplotlib.backends.backend_agg, PIL.Image"
FLOOR = {
    "validate_params": "import yaml, pydantic",
    "demo_data": _PARAMS + ", PIL.Image, tifffile",
    "prepare": _STORES + ", PIL.Image, tifffile, scipy.ndimage, scipy.sparse.csgraph",
    "augment": _STORES + ", PIL.Image, torch, peft; "
                         "from diffusers import StableDiffusionImg2ImgPipeline",
    "estimate_normals": _STORES + ", PIL.Image, tifffile, torch; "
                                  "from diffusers import MarigoldNormalsPipeline",
    "extract_features": _STORES + ", torch, timm",
    "fit_mapper": _STORES + ", torch, safetensors.torch",
    "infer": _STORES + ", torch, safetensors.torch",
    "score": _STORES + ", scipy.ndimage",
    "evaluate": _STORES + ", scipy.ndimage" + _FIGURES,
    "report": _STORES + ", scipy.ndimage" + _FIGURES,
}


def _importtime(code: str) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of the top-level imports of ``code``."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{code!r} failed:\n{result.stderr[-3000:]}")
    entries = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            _, cumulative, name = line.split("|", 2)
            if name[1:] == name[1:].lstrip():  # top level: one space after the bar
                entries.append((int(cumulative), name.strip()))
    return entries


def import_seconds(module: str) -> float:
    """Cumulative seconds of ``import module`` under ``-X importtime``, fresh interpreter."""
    wanted = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    return sum(us for us, name in _importtime(f"import {module}") if name in wanted) / 1e6


def code_seconds(code: str, startup: set[str]) -> float:
    """Seconds of every import that ``code`` makes after interpreter start."""
    return sum(us for us, name in _importtime(code) if name not in startup) / 1e6


def floor_rows(names: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of each stage's imports (module + lazy) and of its library floor."""
    startup = {name for _, name in _importtime("pass")}
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in names}
    for _ in range(repeats):
        for m in names:
            stage = f"import stages.{m}" + (f"; {LAZY[m]}" if m in LAZY else "")
            samples[m].append((code_seconds(stage, startup), code_seconds(FLOOR[m], startup)))
    return {m: {"stage_s": statistics.median(a for a, _ in s),
                "floor_s": statistics.median(b for _, b in s)} for m, s in samples.items()}


def heavy_packages(module: str) -> list[str]:
    """The packages of HEAVY in ``sys.modules`` after ``import module``."""
    code = (f"import sys, json; import {module}; "
            f"print(json.dumps(sorted(p for p in {HEAVY!r} if p in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modules", default="", help="comma-separated stage modules")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--floor", action="store_true",
                        help="also each stage's imports beside its library floor")
    args = parser.parse_args()
    names = [m for m in args.modules.split(",") if m] or list(STAGE_MODULES)
    modules = [ENTRY] + [f"stages.{m}" for m in names]
    before = load_average()
    samples: dict[str, list[float]] = {m: [] for m in modules}
    for _ in range(args.repeats):  # each repeat imports every module once: load swings spread
        for module in modules:
            samples[module].append(import_seconds(module))
    rows = {m: {"median_s": statistics.median(s), "min_s": min(s), "heavy": heavy_packages(m)}
            for m, s in samples.items()}
    floors = floor_rows(names, args.repeats) if args.floor else {}
    after = load_average()
    print(f"import seconds (-X importtime, median and min of {args.repeats}); load average "
          f"{before} before, {after} after")
    print("| module | median | min | heavy packages imported |\n|---|---|---|---|")
    for module, row in rows.items():
        print(f"| {module} | {row['median_s']:.2f} | {row['min_s']:.2f} | "
              f"{', '.join(row['heavy']) or '-'} |")
    if floors:
        print(f"\nimports of a stage process (module + what run() imports lazily) beside the "
              f"libraries its work needs (floor), seconds, median of {args.repeats}")
        print("| stage | stage | floor | stage / floor |\n|---|---|---|---|")
        for m, row in floors.items():
            print(f"| {m} | {row['stage_s']:.2f} | {row['floor_s']:.2f} | "
                  f"{row['stage_s'] / row['floor_s']:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"load_average": [before, after], "floors": floors,
                                         "repeats": args.repeats, "modules": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
