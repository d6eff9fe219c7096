"""Team sharing and experiments the DVC way, on the reduced demo in a clone of this repository
(its own .gitignore, .dvcignore and DVC files; the data made by the demo_data stage):

- a teammate's `dvc pull` gives a clean `dvc status`, the metrics, and a `dvc repro` that runs
  nothing; `dvc repro --pull` on a fresh clone runs nothing and exits 0;
- `dvc exp run -S` keeps every experiment's metrics for `dvc exp show`, `exp diff`, `metrics
  diff` and `plots diff`; `dvc exp apply` leaves metrics that match the params; an -S edit
  changes only its own line of params.yaml;
- queued experiments (`cmds-ad sweep`, DVC's queue) all run, and a failed one fails the command.

Each fixture works on a copy of the session's reduced demo (tests/conftest.py)."""

from __future__ import annotations

import csv
import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.scratch_project import copy_project, sh, stages_run

pytestmark = pytest.mark.slow

METRICS = "results/evaluate/disc/k1-s0/metrics.json"
SUMMARY = "results/summary.json"
LOSS = "results/loss/disc/k1-s0.csv"
ROC = "results/evaluate/disc/k1-s0/roc.csv"
RESCORE = {"validate_params", "score@disc-1-0", "thresholds@disc-1-0", "evaluate@disc-1-0", "report"}


def status(root: Path) -> dict:
    return json.loads(sh(["dvc", "status", "--json"], root).stdout or "{}")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def experiments(root: Path) -> dict[str, dict]:
    """``dvc exp show --json``: per experiment name its ``lambda_1``, summary metrics and
    per-category metrics (None where DVC could not load them), and the error of a failed one."""
    found = {}
    for baseline in json.loads(sh(["dvc", "exp", "show", "--json"], root).stdout):
        for exp in baseline.get("experiments") or ():
            for rev in exp["revs"]:
                data = rev.get("data") or {}
                metrics = data.get("metrics") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                found[rev["name"]] = {
                    "lambda_1": params.get("score", {}).get("lambda_1"),
                    "fusion": params.get("score", {}).get("fusion"),
                    "summary": metrics.get(SUMMARY, {}).get("data"),
                    "metrics": metrics.get(METRICS, {}).get("data"),
                    "error": rev.get("error"),
                }
    return found


# ------------------------------------------------------------------------------ sharing

@pytest.fixture(scope="module")
def shared(reduced_demo, tmp_path_factory) -> Path:
    """The reduced demo with a local-path DVC remote (committed), pushed with its run cache."""
    base = tmp_path_factory.mktemp("team")
    root = copy_project(reduced_demo, base / "cmds-ad")
    sh(["dvc", "remote", "add", "-d", "team", str(base / "remote")], root)
    sh(["git", "commit", "-q", "-am", "team remote"], root)
    sh(["dvc", "push", "--run-cache"], root)
    return root


def test_copied_project_is_up_to_date(reduced_demo, tmp_path):
    copy = copy_project(reduced_demo, tmp_path / "copy")
    assert status(copy) == {}
    assert sh(["git", "status", "--porcelain"], copy).stdout == ""


def test_bytecode_beside_the_code_changes_no_stage(reduced_demo, tmp_path):
    """A user's stage processes import the project's own code, and Python writes __pycache__
    beside it (here they import this repository's, so the test writes it): a code folder that
    stages depend on (pipeline/data) must hash the same with it as in a teammate's fresh clone
    without it, or their `dvc repro` reruns prepare and everything after it."""
    copy = copy_project(reduced_demo, tmp_path / "copy")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(copy / "pipeline")], check=True)
    assert list((copy / "pipeline/data/__pycache__").glob("*.pyc"))
    assert status(copy) == {}


def test_git_holds_code_params_and_locks_not_data_or_results(reduced_demo):
    tracked = sh(["git", "ls-files"], reduced_demo).stdout.split()
    assert {"params.yaml", "dvc.lock", "upstream/dvc.lock"} <= set(tracked)
    assert [p for p in tracked if p.startswith(("data/demo", "results", "artifacts"))] == []
    assert (reduced_demo / "data/demo/disc/test").is_dir()


def test_teammate_pull_gives_clean_status_metrics_and_nothing_to_run(shared, tmp_path):
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(shared), str(clone)], tmp_path)
    assert not (clone / METRICS).exists() and not (clone / "data/demo").exists()
    sh(["dvc", "pull"], clone)
    assert status(clone) == {}
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], clone).stdout)[""]["data"]
    assert shown[SUMMARY]["data"] == read_json(shared / SUMMARY)
    assert shown[METRICS]["data"]["aupro@0.3"] == read_json(shared / METRICS)["aupro@0.3"]
    for path in (METRICS, LOSS, ROC):
        assert (clone / path).read_bytes() == (shared / path).read_bytes(), path
    assert stages_run(sh(["dvc", "repro"], clone).stdout) == set()


def test_repro_pull_on_a_fresh_clone_runs_nothing(shared, tmp_path):
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(shared), str(clone)], tmp_path)
    result = sh(["dvc", "repro", "--pull"], clone, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert stages_run(output) == set(), output
    assert read_json(clone / SUMMARY) == read_json(shared / SUMMARY)
    assert status(clone) == {}


# ------------------------------------------------------------------------------ experiments

@pytest.fixture(scope="module")
def lab(reduced_demo, tmp_path_factory) -> Path:
    return copy_project(reduced_demo, tmp_path_factory.mktemp("experiments") / "cmds-ad")


@pytest.fixture(scope="module")
def two_experiments(lab) -> dict[float, str]:
    """`dvc exp run -S score.lambda_1=v` for v = 0 and 1: the experiment name per value."""
    committed = (lab / "params.yaml").read_text()
    names = {}
    for value in (0.0, 1.0):
        out = sh(["dvc", "exp", "run", "-S", f"score.lambda_1={value}"], lab).stdout
        assert stages_run(out) == RESCORE, out  # the upstream stages come from the cache
        names[value] = re.search(r"Ran experiment\(s\): (\S+)", out).group(1)
        # the experiment is applied to the workspace: params.yaml differs in that line only
        changed = [line for line in difflib.ndiff(committed.splitlines(),
                                                   (lab / "params.yaml").read_text().splitlines())
                   if line[:1] in "+-"]
        assert changed == ["-   lambda_1: 0.1", f"+   lambda_1: {value}"], changed
    sh(["git", "checkout", "-q", "--", "."], lab)
    sh(["dvc", "checkout", "-q"], lab)
    return names


def test_an_experiment_in_a_temporary_workspace_runs_that_workspaces_code(reduced_demo,
                                                                          tmp_path):
    """A temporary or queued experiment runs in DVC's copy of the workspace, and DVC records
    that copy's code. Where it is not the installed code (here: the project commits a changed
    stage, and the installed code is this repository's), the stage runs the copy's."""
    copy = copy_project(reduced_demo, tmp_path / "copy")
    module = copy / "stages/validate_params.py"
    module.write_text(module.read_text() + '\nimport sys\nsys.stderr.write("the copy ran\\n")\n')
    sh(["git", "commit", "-q", "-am", "a changed stage"], copy)
    result = sh(["dvc", "exp", "run", "--temp"], copy)
    out = result.stdout + result.stderr
    assert "the copy ran" in out, out
    running = re.search(r"running the code of the DVC workspace (\S+): its "
                        r"stages/validate_params.py differs", out)
    assert running and Path(running.group(1)).parent.parent == copy / ".dvc/tmp/exps", out


def test_exp_show_has_every_experiments_metrics_and_its_baselines(lab, two_experiments):
    shown = experiments(lab)
    zero, one = (shown[two_experiments[v]] for v in (0.0, 1.0))
    assert (zero["lambda_1"], one["lambda_1"]) == (0.0, 1.0)
    for exp in (zero, one):
        assert exp["summary"]["k1"]["AUPRO@30%"] is not None
        assert exp["metrics"]["aupro@0.3"] is not None
    assert zero["summary"] != one["summary"]  # lambda weighs the estimated stream
    assert zero["metrics"]["p_auroc"] != one["metrics"]["p_auroc"]
    baseline = json.loads(sh(["dvc", "exp", "show", "--json"], lab).stdout)[1]
    assert baseline["data"]["metrics"][SUMMARY]["data"] == read_json(lab / SUMMARY)


def test_exp_show_gives_the_papers_table_in_a_few_columns(lab, two_experiments):
    out = sh(["dvc", "exp", "show", "--only-changed", "--csv",
              "--drop", r"(?!Experiment|k[0-9]|score\.)"], lab).stdout
    header = next(csv.reader(out.splitlines()))
    assert header[0] == "Experiment"
    assert "k1.AUPRO@30%" in header and "score.lambda_1" in header
    assert len(header) <= 13, header  # Experiment, 10 summary columns at most, lambda_1


def test_exp_diff_metrics_diff_and_plots_diff_compare_two_revisions(lab, two_experiments):
    a, b = two_experiments[0.0], two_experiments[1.0]
    diff = json.loads(sh(["dvc", "exp", "diff", a, b, "--json"], lab).stdout)
    assert diff["metrics"][SUMMARY]
    metrics = json.loads(sh(["dvc", "metrics", "diff", "HEAD", a, "--json"], lab).stdout)
    assert {SUMMARY, METRICS} <= set(metrics)
    plots = json.loads(sh(["dvc", "plots", "diff", "HEAD", a, "--json"], lab).stdout)["data"]
    for path in (ROC, LOSS):
        assert [sorted(p["revisions"]) for p in plots[path]] == [sorted(["HEAD", a])], path


def test_each_loss_curve_is_one_plot_with_a_line_per_mapper(lab):
    plots = json.loads(sh(["dvc", "plots", "show", "--json"], lab).stdout)["data"]
    assert len(plots[LOSS]) == 1  # was two: the top-level definition and a plots output
    spec = json.dumps(plots[LOSS][0])
    for mapper in ("real_2d_to_3d", "real_3d_to_2d", "est_2d_to_3d", "est_3d_to_2d"):
        assert mapper in spec


def test_exp_apply_leaves_metrics_that_match_the_params(lab, two_experiments):
    name = two_experiments[0.0]
    try:
        sh(["dvc", "exp", "apply", name], lab)
        assert "  lambda_1: 0.0\n" in (lab / "params.yaml").read_text()
        assert read_json(lab / SUMMARY) == experiments(lab)[name]["summary"]
        assert status(lab) == {}
    finally:
        sh(["git", "checkout", "-q", "--", "."], lab)
        sh(["dvc", "checkout", "-q"], lab)
    assert status(lab) == {}


# ------------------------------------------------------------------------------ queue

def test_queued_grid_of_three_all_succeed(lab):
    before = set(experiments(lab))
    result = sh(["cmds-ad", "sweep", "-S", "score.lambda_1=0.05,0.15,0.2", "--jobs", "2"], lab,
                check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    new = {name: e for name, e in experiments(lab).items() if name not in before}
    assert sorted(e["lambda_1"] for e in new.values()) == [0.05, 0.15, 0.2]
    assert all(e["error"] is None and e["summary"]["k1"]["I-AUROC"] is not None
               for e in new.values()), new
    assert sh(["git", "status", "--porcelain"], lab).stdout == ""  # the workspace untouched


def test_a_failed_queued_run_makes_the_sweep_exit_non_zero(lab):
    before = set(experiments(lab))
    result = sh(["cmds-ad", "sweep", "-S", "score.fusion=sum,mean"], lab, check=False)
    assert result.returncode == 1, result.stdout[-3000:]
    message = re.search(r"error: 1 of 2 experiments failed: (\S+) ", result.stderr)
    assert message, result.stderr
    new = {name: e for name, e in experiments(lab).items() if name not in before}
    assert new[message.group(1)]["error"] is not None
    assert [e["fusion"] for e in new.values() if e["error"] is None] == ["sum"]
    sh(["dvc", "queue", "remove", "--failed"], lab)


def test_sweep_lambda_draws_the_sensitivity_plot_from_experiments(lab):
    params = (lab / "params.yaml").read_bytes()
    sh(["cmds-ad", "sweep-lambda", "--values", "0,0.5"], lab)
    rows = list(csv.reader((lab / "results/sensitivity/sensitivity.csv").read_text().splitlines()))
    # every column of the summary: AUROCs, the headline (exact) AUPRO, the thr99 one
    assert rows[0][:5] == ["lambda", "k", "I-AUROC", "P-AUROC", "AUPRO@30%"]
    assert "AUPRO@1% thr99" in rows[0]
    assert [r[:2] for r in rows[1:]] == [["0.0", "1"], ["0.5", "1"]]
    assert all(0 <= float(v) <= 100 for r in rows[1:] for v in r[2:])
    assert (lab / "results/sensitivity/sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert (lab / "params.yaml").read_bytes() == params
