"""Thresholds from normal data (pipeline/thresholds.py) and the ``thresholds`` stage on tiny
synthetic validation streams."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import StoreWriter
from pipeline.errors import InputError, ParamsError
from pipeline.params import ThresholdsParams, parse_params
from pipeline.scoring import STREAM_NAMES, finish_maps
from pipeline.thresholds import (
    NormalScores,
    binary_metrics,
    f1_optimal,
    fit_thresholds,
    read_thresholds,
    rule_threshold,
)
from stages import layout
from stages import thresholds as stage

S, CAT = 16, "bagel"


def test_rules_on_known_values() -> None:
    values = np.arange(1, 101, dtype=np.float64)  # 1..100
    assert rule_threshold(values, "quantile", 0.5, 0.0) == pytest.approx(50.5)
    assert rule_threshold(values, "quantile", 1.0, 0.0) == 100.0
    assert rule_threshold(values, "max_margin", 0.99, 0.1) == pytest.approx(110.0)
    with pytest.raises(InputError, match="no normal scores"):
        rule_threshold(np.zeros(0), "quantile", 0.99, 0.0)


def test_manual_values_override_the_rule_and_need_no_data() -> None:
    params = ThresholdsParams(image=2.5, pixel=0.75)
    fitted = fit_thresholds(None, params)
    assert fitted["image"]["threshold"] == 2.5 and fitted["image"]["source"] == "manual"
    assert fitted["pixel"]["threshold"] == 0.75 and fitted["pixel"]["n_normal"] == 0
    scores = NormalScores(np.array([1.0, 2.0]), np.array([0.1, 0.2, 0.4]), ["good/000", "good/001"])
    half = fit_thresholds(scores, ThresholdsParams(rule="max_margin", margin=0.5, pixel=0.9))
    assert half["image"]["threshold"] == pytest.approx(3.0)
    assert half["image"]["source"] == "max_margin" and half["image"]["normal_max"] == 2.0
    assert half["pixel"]["threshold"] == 0.9


def test_binary_metrics_count_strictly_above() -> None:
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.2])
    labels = np.array([0, 1, 0, 1, 1])
    m = binary_metrics(scores, labels, 0.5)  # only 0.9 is above
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 2)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.5)
    nothing = binary_metrics(scores, labels, 1.0)
    assert nothing["precision"] is None and nothing["f1"] == 0.0


def test_f1_optimal_matches_a_brute_force_search() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(labels.astype(float), 1.0), 1)  # ties on purpose
    best = f1_optimal(scores, labels)
    candidates = np.r_[np.unique(scores), scores.min() - 1] - 1e-9
    brute = max(binary_metrics(scores, labels, t)["f1"] for t in candidates)
    assert best["f1"] == pytest.approx(brute)
    assert binary_metrics(scores, labels, best["threshold"])["f1"] == pytest.approx(best["f1"])


def write_validation(root: Path, params, labels: list[int], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = len(labels)
    streams = {name: (0.2 * rng.random((n, S, S))).astype(np.float16) for name in STREAM_NAMES}
    fg = np.ones((n, S, S), dtype=np.uint8)
    fg[:, :3] = 0
    ids = [f"good/{i:03d}" for i in range(n)]
    with StoreWriter(root / layout.validation_streams(CAT, 1, 0),
                     attrs={"ids": ids, "labels": labels, "category": CAT}) as w:
        for name in STREAM_NAMES:
            w.write(name, streams[name])
        w.write("fg", fg)
    return {"streams": streams, "fg": fg, "ids": ids}


def make_params(**thresholds):
    return parse_params({"data": {"categories": [CAT], "size": S},
                         "fewshot": {"shots": [1], "seeds": [0]},
                         "thresholds": thresholds})


def test_stage_fits_the_rule_on_the_scored_validation_maps(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = make_params(rule="quantile", quantile=0.5, pixel_quantile=0.9)
    data = write_validation(tmp_path, params, [0, 0, 0, 0])
    stage.run(params, CAT, 1, 0)
    written = json.loads(layout.thresholds(CAT, 1, 0).read_text())
    scored = finish_maps(data["streams"], data["fg"], CAT, params.score)
    assert written["image"]["threshold"] == pytest.approx(np.quantile(scored.image_score, 0.5))
    pixels = scored.map_roc[data["fg"] > 0]
    assert written["pixel"]["threshold"] == pytest.approx(np.quantile(pixels, 0.9), rel=1e-6)
    assert written["validation_ids"] == data["ids"] and written["pixel_map"] == "map_roc"
    assert read_thresholds(layout.thresholds(CAT, 1, 0)) == (
        written["image"]["threshold"], written["pixel"]["threshold"])


def test_a_rule_without_validation_data_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_validation(tmp_path, make_params(), [])
    with pytest.raises(ParamsError, match=r"thresholds.rule: 'quantile' needs the scores"):
        stage.run(make_params(), CAT, 1, 0)
    assert not layout.thresholds(CAT, 1, 0).exists()
    stage.run(make_params(image=1.0, pixel=2.0), CAT, 1, 0)  # manual: no data needed
    assert read_thresholds(layout.thresholds(CAT, 1, 0)) == (1.0, 2.0)


def test_the_command_without_validation_data_fails_in_one_line(tmp_path) -> None:
    """`cmds-ad thresholds` on a model whose data have no validation split (an empty store):
    one line naming the parameter and the ways out, exit 1, no thresholds file."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.failures import assert_one_line

    write_validation(tmp_path, make_params(), [])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        make_params().model_dump(mode="json")))
    cmd = [str(Path(sys.executable).parent / "cmds-ad"), "thresholds", CAT, "-k", "1", "-s", "0"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_one_line(result, "thresholds.rule: 'quantile' needs the scores of normal validation",
                    "thresholds.normal_samples: leave_one_out", "thresholds.image")
    assert result.returncode == 1
    assert not (tmp_path / layout.thresholds(CAT, 1, 0)).exists()
    assert not list((tmp_path / layout.thresholds(CAT, 1, 0)).parent.glob(".*tmp*"))


def test_read_thresholds_names_the_file(tmp_path) -> None:
    missing = tmp_path / "none.json"
    with pytest.raises(InputError, match="none.json: thresholds not found"):
        read_thresholds(missing)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"image": {"threshold": 1.0}}))
    with pytest.raises(InputError, match="broken.json: not a thresholds file"):
        read_thresholds(broken)


def test_thresholds_stage_does_not_import_torch() -> None:
    """A rule or score change re-runs this stage: it must stay numpy-cheap."""
    import subprocess
    import sys

    code = "import sys, stages.thresholds; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
