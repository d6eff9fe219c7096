"""The DVC promises, on the reduced demo (one category, k = 1, few steps) in a clone of this
repository: reproduce, re-score cheaply, survive a killed stage. Sharing through a remote and
experiments: tests/test_team.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.artifacts import open_store
from tools.scratch_project import copy_project, project_env, sh, stages_run, write_params

pytestmark = pytest.mark.slow

KEY = "disc-1-0"
# the model stages live in upstream/dvc.yaml; DVC names them by that file from the root
UPSTREAM = "upstream/dvc.yaml:"
# re-runs (cheaply, writing the same bytes) after every edit of params.yaml, whatever changed
VALIDATE = "validate_params"


@pytest.fixture(scope="module")
def project(reduced_demo, tmp_path_factory) -> Path:
    """A copy of the session's reduced demo, which `dvc repro` ran from a fresh clone."""
    return copy_project(reduced_demo, tmp_path_factory.mktemp("dvc") / "cmds-ad")


def _changed_stages(project: Path) -> set[str]:
    status = json.loads(sh(["dvc", "status", "--json"], project).stdout or "{}")
    return set(status) - {VALIDATE}


def test_full_run_produces_metrics_and_noop_runs_nothing(project):
    metrics = json.loads((project / "results/evaluate/disc/k1-s0/metrics.json").read_text())
    assert 0.0 <= metrics["i_auroc"] <= 1.0
    assert (project / "results/summary/summary.md").read_text().count("|") > 4
    summary = json.loads((project / "results/summary.json").read_text())
    assert summary["k1"]["I-AUROC"] == pytest.approx(100 * metrics["i_auroc"], abs=1e-4)
    # every stage instance ran, the demo data's first of all
    lock = (project / "upstream/dvc.lock").read_text() + (project / "dvc.lock").read_text()
    for instance in ("demo_data@disc", "prepare@disc", f"fit_mapper@{KEY}", f"score@{KEY}",
                     "report"):
        assert f"  {instance}:" in lock, instance
    assert json.loads(sh(["dvc", "status", "--json"], project).stdout or "{}") == {}
    assert stages_run(sh(["dvc", "repro"], project).stdout) == set()


def test_fusion_weight_change_reruns_only_score_thresholds_and_evaluate(project):
    upstream_lock = (project / "upstream/dvc.lock").read_bytes()
    write_params(project, {"score.lambda_1": 0.3})
    cheap = {f"score@{KEY}", f"thresholds@{KEY}", f"evaluate@{KEY}"}
    assert _changed_stages(project) == cheap
    ran = stages_run(sh(["dvc", "repro"], project).stdout) - {VALIDATE}
    assert cheap <= ran <= cheap | {"report"}
    # the point of the two-file split: re-scoring rewrites only the small root dvc.lock
    assert (project / "upstream/dvc.lock").read_bytes() == upstream_lock
    assert "fit_mapper" not in (project / "dvc.lock").read_text()


def test_mapper_change_reruns_fit_mapper_and_downstream_only(project):
    write_params(project, {"fit_mapper.lr": 3e-4})
    # validation_streams reads fit_mapper's keys too: leave-one-out thresholds train with them
    assert _changed_stages(project) == {f"{UPSTREAM}fit_mapper@{KEY}",
                                        f"{UPSTREAM}validation_streams@{KEY}"}
    ran = stages_run(sh(["dvc", "repro"], project).stdout) - {VALIDATE}
    assert f"{UPSTREAM}fit_mapper@{KEY}" in ran
    assert ran <= {f"{UPSTREAM}fit_mapper@{KEY}", f"{UPSTREAM}infer@{KEY}", f"score@{KEY}",
                   f"{UPSTREAM}validation_streams@{KEY}", f"thresholds@{KEY}",
                   f"evaluate@{KEY}", "report"}
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-q", "-m", "tuned"], project)


def test_killed_stage_leaves_nothing_dvc_accepts_and_next_repro_completes(project):
    streams_dir = project / "artifacts/streams/disc"
    proc = subprocess.Popen(
        ["dvc", "repro", "-f", "-s", f"{UPSTREAM}infer@{KEY}"], cwd=project, env=project_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 120
    # wait until the stage is writing its store (the temporary sibling exists), then SIGKILL
    while time.time() < deadline and not list(streams_dir.glob(".k1-s0.zarr.tmp-*")):
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (streams_dir / "k1-s0.zarr").exists()
    assert f"{UPSTREAM}infer@{KEY}" in _changed_stages(project)
    # The next repro completes: it re-runs the stage or restores it from DVC's run cache.
    sh(["dvc", "repro"], project)
    assert _changed_stages(project) == set()
    assert open_store(streams_dir / "k1-s0.zarr")["psi2d_real"].shape[0] == 6
    # What the killed writer left is a dot-named temporary sibling: .dvcignore hides it from
    # DVC, and the next run of the stage removes it.


def test_bad_dataset_path_stops_first_stage(project, tmp_path):
    bad = copy_project(project, tmp_path / "bad")
    for outputs in ("artifacts", "results"):
        shutil.rmtree(bad / outputs)
    write_params(bad, {"data.root": str(tmp_path / "no_such_dataset")})
    result = sh(["dvc", "repro", f"{UPSTREAM}prepare@disc"], bad, check=False)
    assert result.returncode != 0
    assert "no_such_dataset" in result.stdout + result.stderr
    assert not (bad / "artifacts/prepare/disc").exists()
