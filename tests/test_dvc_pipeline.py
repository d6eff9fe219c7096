"""The DVC promises, on a reduced demo (one category, k = 1, few steps) in a scratch repo:
reproduce, re-score cheaply, share through a remote, survive a killed stage."""

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
from stages.scratch_project import (
    REDUCED_DEMO,
    make_project,
    project_env,
    sh,
    stages_run,
    write_params,
)

pytestmark = pytest.mark.slow

KEY = "disc-1-0"
# the model stages live in upstream/dvc.yaml; DVC names them by that file from the root
UPSTREAM = "upstream/dvc.yaml:"
# re-runs (cheaply, writing the same bytes) after every edit of params.yaml, whatever changed
VALIDATE = "validate_params"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("dvc") / "project", REDUCED_DEMO,
                        n_train=3, n_test=6)
    out = sh(["dvc", "repro"], root).stdout
    assert stages_run(out) >= {f"{UPSTREAM}prepare@disc", f"score@{KEY}", "report"}, out
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", "first run"], root)
    return root


def _changed_stages(project: Path) -> set[str]:
    status = json.loads(sh(["dvc", "status", "--json"], project).stdout or "{}")
    return set(status) - {VALIDATE}


def test_full_run_produces_metrics_and_noop_runs_nothing(project):
    metrics = json.loads((project / "results/evaluate/disc/k1-s0/metrics.json").read_text())
    assert 0.0 <= metrics["i_auroc"] <= 1.0
    assert (project / "results/summary/summary.md").read_text().count("|") > 4
    assert _changed_stages(project) == set()
    assert stages_run(sh(["dvc", "repro"], project).stdout) == set()


def test_fusion_weight_change_reruns_only_score_and_evaluate(project):
    upstream_lock = (project / "upstream/dvc.lock").read_bytes()
    write_params(project, {"score.lambda_1": 0.3})
    assert _changed_stages(project) == {f"score@{KEY}", f"evaluate@{KEY}"}
    ran = stages_run(sh(["dvc", "repro"], project).stdout) - {VALIDATE}
    assert {f"score@{KEY}", f"evaluate@{KEY}"} <= ran <= {f"score@{KEY}", f"evaluate@{KEY}", "report"}
    # the point of the two-file split: re-scoring rewrites only the small root dvc.lock
    assert (project / "upstream/dvc.lock").read_bytes() == upstream_lock
    assert "fit_mapper" not in (project / "dvc.lock").read_text()


def test_mapper_change_reruns_fit_mapper_and_downstream_only(project):
    write_params(project, {"fit_mapper.lr": 3e-4})
    assert _changed_stages(project) == {f"{UPSTREAM}fit_mapper@{KEY}"}
    ran = stages_run(sh(["dvc", "repro"], project).stdout) - {VALIDATE}
    assert f"{UPSTREAM}fit_mapper@{KEY}" in ran
    assert ran <= {f"{UPSTREAM}fit_mapper@{KEY}", f"{UPSTREAM}infer@{KEY}", f"score@{KEY}",
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


def test_share_through_remote(project, tmp_path):
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "-d", "team", str(remote)], project)
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-q", "-m", "remote"], project)
    sh(["dvc", "push", "--run-cache"], project)

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    sh(["dvc", "pull"], clone)
    assert _changed_stages(clone) == set()
    assert stages_run(sh(["dvc", "repro"], clone).stdout) == set()

    # A second clone asks for one stage instance: everything it needs comes from the remote
    # (outputs or the run cache), nothing is recomputed.
    second = tmp_path / "second"
    sh(["git", "clone", "-q", str(project), str(second)], tmp_path)
    out = sh(["dvc", "repro", "--pull", f"score@{KEY}"], second).stdout
    assert stages_run(out) == set(), out
    assert (second / "artifacts/scores/disc/k1-s0.zarr/zarr.json").is_file()


def test_bad_dataset_path_stops_first_stage(project, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(project, bad, ignore=shutil.ignore_patterns("artifacts", "results", ".cache"))
    write_params(bad, {"data.root": str(tmp_path / "no_such_dataset")})
    result = sh(["dvc", "repro", f"{UPSTREAM}prepare@disc"], bad, check=False)
    assert result.returncode != 0
    assert "no_such_dataset" in result.stdout + result.stderr
    assert not (bad / "artifacts/prepare/disc").exists()


def test_lambda_sweep_runs_experiments_and_restores_params(project):
    params_before = (project / "params.yaml").read_text()
    sh(["cmds-ad", "sweep-lambda", "--values", "0,0.5"], project)
    rows = (project / "results/sensitivity/sensitivity.csv").read_text().splitlines()
    # every AUPRO evaluate reports: exact and the published 99-threshold one
    assert rows[0] == ("lambda,k,i_auroc,p_auroc,aupro@0.3,aupro@0.3_thr99,"
                       "aupro@0.01,aupro@0.01_thr99")
    assert [r.split(",")[:2] for r in rows[1:]] == [["0.0", "1"], ["0.5", "1"]]
    assert all(0 <= float(v) <= 1 for r in rows[1:] for v in r.split(",")[2:])
    assert (project / "results/sensitivity/sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert (project / "params.yaml").read_text() == params_before
    experiments = sh(["dvc", "exp", "list", "--name-only"], project).stdout.split()
    assert len(experiments) == 2
