"""benchmarks/startup.py's measuring pieces: the CMDS_AD_TIMINGS hook of stages/cli.py and the
reading of ``python -X importtime``. (The benchmark itself needs a finished project: minutes.)"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("startup", REPO / "benchmarks" / "startup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["startup"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


st = _module()
CMDS_AD = str(Path(sys.executable).parent / "cmds-ad")


def _validate(folder: Path, timings: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CMDS_AD_TIMINGS", None)
    if timings:
        env["CMDS_AD_TIMINGS"] = "1"
    return subprocess.run([CMDS_AD, "validate-params"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)


def test_timings_hook_reports_phases_and_changes_nothing_else(tmp_path: Path) -> None:
    plain, timed = tmp_path / "plain", tmp_path / "timed"
    for folder in (plain, timed):
        folder.mkdir()
        shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    without = _validate(plain, timings=False)
    with_hook = _validate(timed, timings=True)
    assert without.returncode == with_hook.returncode == 0, with_hook.stderr
    assert st.TIMINGS_PREFIX not in without.stdout + without.stderr
    record = st.hook_record(with_hook.stderr, "validate-params")
    assert record["stage"] == "validate_params" and record["load_s"] == 0.0
    for key in ("params_s", "import_s", "run_s"):
        assert 0 <= record[key] < 60, record
    # the process's age covers the phases the process reports
    assert record["process_s"] >= record["params_s"] + record["import_s"] + record["run_s"]
    out = Path("artifacts") / "params.valid"
    assert (timed / out).read_bytes() == (plain / out).read_bytes()
    assert with_hook.stdout == without.stdout


def test_hook_record_takes_the_stage_line_among_dvc_output() -> None:
    line = st.TIMINGS_PREFIX + json.dumps({"stage": "score", "run_s": 1.5})
    output = f"Running stage 'score@disc-1-0':\n> cmds-ad score disc\n{line}\nUpdating lock file\n"
    assert st.hook_record(output, "dvc repro")["run_s"] == 1.5


IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   encodings
import time:      1000 |       1000 |       numpy.core
import time:      2000 |       3000 |     numpy
import time:       500 |       3500 |   pipeline.artifacts
import time:      4000 |       4000 |     torch
import time:       300 |       4300 |   pipeline.training
import time:       200 |        200 |     numpy.linalg
import time:       100 |        300 |   pipeline.scoring
import time:        50 |       8150 | stages.fit_mapper
import time:        10 |         10 | stages
"""


def test_importtime_is_read_with_its_nesting() -> None:
    entries = st.parse_importtime(IMPORTTIME)
    assert entries[1] == (3, 0.001, 0.001, "numpy.core")
    assert entries[-2] == (0, 0.00005, 0.00815, "stages.fit_mapper")
    top = dict(st.top_importers(entries, "stages.fit_mapper"))
    # numpy counted once where first imported (numpy.core inside it is not added again), and
    # again where imported outside numpy (numpy.linalg under pipeline.scoring)
    assert top["numpy"] == 0.003 + 0.0002
    assert top["torch"] == 0.004 and top["pipeline.training"] == 0.0043
    assert "stages.fit_mapper" not in top and "stages" not in top
    assert list(top)[0] == "pipeline.training"
