"""Stage ``validate_params``: check the whole parameter file before any other stage runs.

DVC re-runs a stage only when something it watches changed, so a misspelled key or a new
section that no stage watches would otherwise pass unnoticed ("Data and pipelines are up to
date"). This stage depends on the file itself, so any edit re-runs it; ``prepare`` depends on
its output, so an invalid file stops ``dvc repro`` before any work. The output is the same
bytes for every valid file, so nothing downstream re-runs because of it.

Writes ``artifacts/params.valid``.
"""

from __future__ import annotations

from pipeline.artifacts import atomic_write_text
from pipeline.params import Params
from stages import layout

VALID = "params.yaml is valid\n"  # constant: the check's result, not the parameters


def run(params: Params) -> None:
    # cmds-ad has validated the file before calling this (load_params); record the result
    atomic_write_text(layout.params_check(), VALID)
