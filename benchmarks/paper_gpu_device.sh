#!/usr/bin/env bash
# benchmarks/paper_gpu.py on a lent GPU machine, as one command (README, "The paper preset on
# a GPU"). Here, first: `make gpu-wheels` (the packages that machine lacks, into .whl/). There,
# from the repository root, with .whl carried:
#     bash benchmarks/paper_gpu_device.sh [paper_gpu.py options, e.g. --no-options]
# It installs the wheels offline (that machine has no network), prints the GPU and the library
# versions, and runs the benchmark: parts and options start only within BUDGET_S seconds and
# the run is stopped at LIMIT_S, so install + run end within about 8 minutes. paper_gpu.md,
# paper_gpu.json (rewritten after every part), setup.txt and log.txt are left in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/paper_gpu}
BUDGET_S=${BUDGET_S:-300}
LIMIT_S=${LIMIT_S:-420}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}

mkdir -p "$OUT"
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $WHEELS/: run 'make gpu-wheels' where pip reaches PyPI, and carry .whl" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || exit 3
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CMDS_AD_QUIET=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PYTHON" -c "
import importlib.metadata as m
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())
print(*(f'{p}=={m.version(p)}' for p in ('diffusers', 'transformers', 'peft', 'timm',
      'accelerate', 'huggingface-hub', 'zarr', 'pydantic', 'numpy')))
"
} 2>&1 | tee "$OUT/setup.txt"
timeout "$LIMIT_S" "$PYTHON" benchmarks/paper_gpu.py --budget-s "$BUDGET_S" --out "$OUT" "$@" \
    2>&1 | tee "$OUT/log.txt"
