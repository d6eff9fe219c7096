"""What the published Marigold path costs on the demo: ``estimate_normals`` on the real images
of one demo category, with the demo's ``estimate_normals`` values as they are (the 224
prepare crop, float output) and with the published input and output
(``input: original``, ``output: uint8``; the demo's steps, ensemble and resolution kept).

    .venv/bin/python benchmarks/marigold_input.py [--category slab] [--repeats 3]

Writes the demo category and its prepare stores in a temporary folder (untimed), then runs
``stages.estimate_normals.run`` in this process, one untimed warm-up (model build/load) and
``--repeats`` timed runs per mode; prints the best and median wall time and the model's share.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CMDS_AD_QUIET", "1")

# benchmarks/ holds a pipeline.py of its own: keep it from shadowing the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import yaml  # noqa: E402

from pipeline.data.demo import write_demo_dataset  # noqa: E402
from pipeline.params import parse_params  # noqa: E402

MODES = {
    "demo (prepared, float)": {},
    "published input/output (original, uint8)": {"input": "original", "output": "uint8"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="slab")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from stages import estimate_normals, prepare

    raw = yaml.safe_load((_HERE.parent / "params.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        write_demo_dataset(Path(tmp) / "data", categories=[args.category])
        raw["data"].update(root=str(Path(tmp) / "data"), categories=[args.category])
        raw["models"]["cache_dir"] = str(Path(tmp) / "models")
        prepare.run(parse_params(raw), args.category)
        print(f"torch threads: {torch.get_num_threads()}; category {args.category}; "
              f"estimate_normals {raw['estimate_normals']}")
        for label, change in MODES.items():
            params = parse_params({**raw, "estimate_normals": {**raw["estimate_normals"], **change}})
            estimate_normals.run(params, args.category)  # warm-up: builds/loads the model
            runs = [estimate_normals.run(params, args.category) for _ in range(args.repeats)]
            totals = [r["total_s"] for r in runs]
            model = statistics.median(r["model_s"] / r["total_s"] for r in runs)
            print(f"{label}: {int(runs[0]['images'])} images, best {min(totals):.3f} s, "
                  f"median {statistics.median(totals):.3f} s, model share {model:.0%}")


if __name__ == "__main__":
    main()
