# make demo: install, run the whole pipeline with DVC on the CPU (its first stage, demo_data, writes
# the embedded demo dataset to data/demo).
# make test: install, run the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install demo test bench clean-results

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CUDA build that lies on this machine's disk (see README)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	# open3d (the normals tests' reference) loads libusb-1.0, which slim Debian images lack
	$(BIN)/python -c 'import open3d' 2>/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && apt-get install -y -qq libusb-1.0-0 >/dev/null; } \
	  || echo 'open3d needs libusb-1.0 (apt-get install libusb-1.0-0); the Open3D reference tests will skip'
	touch $(STAMP)

install: $(STAMP)

demo: install
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "make demo needs a git checkout (DVC tracks runs with git)"; exit 1; }
	time dvc repro
	@cat results/summary/summary.md

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/features.py
	$(BIN)/python benchmarks/scoring.py
	$(BIN)/python benchmarks/diffusion.py
	$(BIN)/python benchmarks/dvc_pipeline.py

clean-results:
	rm -rf artifacts results
