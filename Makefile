# make demo: install, run the whole pipeline with DVC on the CPU beside a warm server (cmds-ad warm:
# stage processes fork from a process that has imported torch & co.; its first stage, demo_data, writes
# the embedded demo dataset to data/demo).
# make test: install, run the whole test suite (CI runs it).
# make test-fast: install, run the unit tests only (no `dvc repro`, no end-to-end run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
# Bytecode: pip installs without it (--no-compile) and Python writes each module's .pyc the first
# time a process imports it, as it does by default. Most of the venv is never imported: this is
# about 30 s less than compiling all of it at install. Where PYTHONDONTWRITEBYTECODE is set (some
# CI images), every process would compile torch & co. again, so this Makefile's commands unset it.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test test-fast bench gpu-wheels clean-results

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CUDA build that lies on this machine's disk (see README)
	$(BIN)/python -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --no-compile -e '.[test]'
	# open3d (the normals tests' reference) loads libusb-1.0, which slim Debian images lack
	$(BIN)/python -c 'import open3d' 2>/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && apt-get install -y -qq libusb-1.0-0 >/dev/null; } \
	  || echo 'open3d needs libusb-1.0 (apt-get install libusb-1.0-0); the Open3D reference tests will skip'
	touch $(STAMP)

install: $(STAMP)

demo: install
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "make demo needs a git checkout (DVC tracks runs with git)"; exit 1; }
	time cmds-ad warm -- dvc repro
	@cat results/summary/summary.md

# two pytest-xdist workers, a test file on one worker, the longest files first (tests/conftest.py):
# the end-to-end runs fill both cores; TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= 2
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the edit-test loop: every test not marked slow (pyproject.toml: the slow marker), on two
# pytest-xdist workers
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" -n 2

bench: install
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/features.py
	$(BIN)/python benchmarks/scoring.py
	$(BIN)/python benchmarks/diffusion.py
	$(BIN)/python benchmarks/dvc_pipeline.py

# The wheels a lent GPU machine lacks (no network there), at this .venv's versions, for its
# Python 3.12 on x86-64; benchmarks/paper_gpu_device.sh installs them offline. The device tool
# carries at most 64 MiB: the working tree plus .whl/, checked here.
GPU_PACKAGES := diffusers zarr numcodecs donfig google-crc32c pydantic pydantic-core \
	annotated-types typing-inspection typing-extensions
MIB := 1048576
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d .whl \
	  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
	  $$($(BIN)/python -c 'import importlib.metadata as m, sys; \
	    print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' $(GPU_PACKAGES))
	@tree=$$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1); \
	  whl=$$(du -cb .whl/*.whl | tail -1 | cut -f1); total=$$((tree + whl)); \
	  echo "working tree $$((tree / $(MIB))) MiB + .whl $$((whl / $(MIB))) MiB = $$((total / $(MIB))) MiB (the device tool carries 64)"; \
	  test $$total -le $$((64 * $(MIB))) || { echo "too large to carry: over 64 MiB"; exit 1; }

clean-results:
	rm -rf artifacts results
