"""What importing each stage module costs, and which heavy packages it pulls in.

    python benchmarks/imports.py                  # every stage module, median of 5
    python benchmarks/imports.py --repeats 3 --modules score,evaluate --json FILE

For every stage module (``stages.<m>`` that a DVC stage runs) and for the ``cmds-ad``
entry point, each repeat is a fresh interpreter:

- ``python -X importtime -c 'import stages.<m>'``: the import's cumulative seconds;
- the heavy third-party packages the import leaves in ``sys.modules`` (torch, matplotlib,
  diffusers, ...): a stage should pull only what its own work needs.

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


def import_seconds(module: str) -> float:
    """Cumulative seconds of ``import module`` under ``-X importtime``, fresh interpreter."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"import {module} failed:\n{result.stderr[-3000:]}")
    total = 0.0
    wanted = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            _, cumulative, name = line.split("|", 2)
            if name[1:] == name[1:].lstrip() and name.strip() in wanted:  # top level only
                total += int(cumulative) / 1e6
    return total


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
    after = load_average()
    print(f"import seconds (-X importtime, median and min of {args.repeats}); load average "
          f"{before} before, {after} after")
    print("| module | median | min | heavy packages imported |\n|---|---|---|---|")
    for module, row in rows.items():
        print(f"| {module} | {row['median_s']:.2f} | {row['min_s']:.2f} | "
              f"{', '.join(row['heavy']) or '-'} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"load_average": [before, after],
                                         "repeats": args.repeats, "modules": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
