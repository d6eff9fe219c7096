"""The ``evaluate`` stage on tiny synthetic score and test stores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import StoreWriter, atomic_write_json
from pipeline.errors import InputError, ParamsError
from pipeline.metrics import aupro_key, evaluate
from pipeline.params import Params, parse_params
from pipeline.scoring import STREAM_NAMES, finish_maps
from pipeline.thresholds import binary_metrics
from stages import evaluate as stage
from stages import layout

S, N, CAT = 32, 8, "bagel"
LIMITS = (0.3, 0.1, 0.05, 0.01)
# every AUPRO key of a default run: exact and the published 99-threshold approximation
AUPRO_KEYS = tuple(aupro_key(x, t) for x in LIMITS for t in (None, 99))


def make_params(**evaluate_section) -> Params:
    return parse_params({
        "data": {"categories": [CAT], "size": S},
        "fewshot": {"shots": [1], "seeds": [0]},
        "score": {"batch_size": 3},
        "evaluate": {"heatmaps_per_class": 2, **evaluate_section},
    })


def write_inputs(params: Params, test_ids=None, labels=None, seed: int = 0,
                 **test_attrs) -> dict:
    """prepare/<cat>/test.zarr, streams/ and scores/<cat>/k1-s0.zarr: the 2D streams see the
    defects, the 3D streams see false defects in good images (so the 2D/3D ablations differ)."""
    rng = np.random.default_rng(seed)
    ids = [f"good/{i:03d}" for i in range(N // 2)] + [f"crack/{i:03d}" for i in range(N // 2)]
    true_labels = [0] * (N // 2) + [1] * (N // 2)
    gt = np.zeros((N, S, S), dtype=np.uint8)
    fake = np.zeros((N, S, S), dtype=np.float32)
    for i in range(N):
        y, x = rng.integers(4, S - 10, 2)
        (gt if true_labels[i] else fake)[i, y:y + 5, x:x + 6] = 1
    streams = {
        "psi2d_real": 0.2 * rng.random((N, S, S)) + 0.8 * gt,
        "psi2d_est": 0.2 * rng.random((N, S, S)) + 0.3 * gt,
        "psi3d_real": 0.2 * rng.random((N, S, S)) + 0.8 * fake,
        "psi3d_est": 0.2 * rng.random((N, S, S)),
    }
    streams = {k: v.astype(np.float16) for k, v in streams.items()}
    fg = np.ones((N, S, S), dtype=np.uint8)
    fg[:, :2] = 0
    scored = finish_maps(streams, fg, CAT, params.score)
    rgb = rng.integers(0, 256, (N, S, S, 3), dtype=np.uint8)
    with StoreWriter(layout.prepared(CAT) / "test.zarr",
                     attrs={"ids": test_ids or ids, "labels": labels or true_labels,
                            **test_attrs}) as w:
        w.write("rgb", rgb)
        w.write("gt", gt)
    with StoreWriter(layout.streams(CAT, 1, 0),
                     attrs={"ids": ids, "labels": true_labels, "category": CAT}) as w:
        for name in STREAM_NAMES:
            w.write(name, streams[name])
        w.write("fg", fg)
    with StoreWriter(layout.scores(CAT, 1, 0),
                     attrs={"ids": ids, "labels": true_labels, "category": CAT}) as w:
        w.write("map", scored.map)
        w.write("map_pro", scored.map_pro)
        w.write("map_roc", scored.map_roc)
        w.write("image_score", scored.image_score)
    thresholds = {"image": {"threshold": float(np.median(scored.image_score))},
                  "pixel": {"threshold": float(np.quantile(scored.map_roc, 0.9))}}
    atomic_write_json(layout.thresholds(CAT, 1, 0), thresholds)
    return {"thresholds": thresholds, "gt": gt, "labels": np.array(true_labels), "scored": scored, "ids": ids,
            "streams": streams, "fg": fg}


def test_defects_without_masks_skip_the_pixel_metrics_with_a_note(tmp_path, monkeypatch):
    """data.dataset: folder lets defective samples come without a mask (prepare lists them in
    ``no_gt``): image metrics as usual, pixel metrics null with the reason."""
    monkeypatch.chdir(tmp_path)
    params = make_params()
    data = write_inputs(params, no_gt=["crack/001"])
    stage.run(params, CAT, 1, 0)
    metrics = json.loads((layout.evaluation(CAT, 1, 0) / "metrics.json").read_text())
    sc = data["scored"]
    assert metrics["i_auroc"] == pytest.approx(
        evaluate(sc.map_pro, data["gt"], data["labels"], scores=sc.image_score).metrics["i_auroc"])
    for key in ("p_auroc", *AUPRO_KEYS):
        assert metrics[key] is None
        assert "1 defective test samples have no gt mask (first: crack/001)" in \
            metrics["undefined"][key]
    assert metrics["at_threshold"]["pixel"] is None
    assert metrics["at_threshold"]["image"]["f1"] is not None


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_evaluate_stage_outputs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = make_params()
    data = write_inputs(params)
    stage.run(params, CAT, 1, 0)
    out = layout.evaluation(CAT, 1, 0)

    metrics = json.loads((out / "metrics.json").read_text())
    sc = data["scored"]
    expected = evaluate(sc.map_pro, data["gt"], data["labels"], scores=sc.image_score,
                        roc_maps=sc.map_roc).metrics
    assert metrics["category"] == CAT and metrics["shots"] == 1 and metrics["seed"] == 0
    assert metrics["n_test"] == N
    assert metrics["aupro_thresholds"] == [99]
    for key in ("i_auroc", "p_auroc", *AUPRO_KEYS):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12)
    assert metrics["aupro@0.01"] != metrics["aupro@0.01_thr99"]
    # P-AUROC really comes from map_roc, not map_pro
    from_pro = evaluate(sc.map_pro, data["gt"], data["labels"]).metrics["p_auroc"]
    assert from_pro != pytest.approx(metrics["p_auroc"], abs=1e-9)
    assert "undefined" not in metrics
    # precision/recall/F1 at the thresholds of the thresholds stage, the F1-optimal as reference
    image_t = data["thresholds"]["image"]["threshold"]
    pixel_t = data["thresholds"]["pixel"]["threshold"]
    at = metrics["at_threshold"]
    assert at["image"] == binary_metrics(sc.image_score, data["labels"], image_t)
    assert at["pixel"] == binary_metrics(sc.map_roc, data["gt"], pixel_t)
    assert at["image"]["tp"] + at["image"]["fn"] == N // 2
    reference = metrics["test_reference_f1_optimal"]
    assert reference["image"]["f1"] >= at["image"]["f1"]
    assert binary_metrics(sc.image_score, data["labels"], reference["image"]["threshold"]) \
        == reference["image"]
    assert reference["pixel"]["f1"] >= at["pixel"]["f1"]

    ablations = json.loads((out / "ablations.json").read_text())
    assert set(ablations) == set(stage.ABLATIONS)
    for key in ("i_auroc", "p_auroc", *AUPRO_KEYS):
        # the configured fusion is the product of both streams and modalities
        assert ablations["product"][key] == pytest.approx(metrics[key], abs=1e-6)
    assert ablations["2d_only"]["i_auroc"] == 1.0
    assert ablations["3d_only"]["i_auroc"] < 0.5  # 3D streams only see the fake defects
    assert ablations["2d_only"]["score_update"] == {"modalities": "2d"}
    # every variant equals an independent re-fusion of the streams (incl. the reused one)
    for variant in ("product", "sum", "real_only"):
        v = finish_maps(data["streams"], data["fg"], CAT,
                        params.score.model_copy(update=stage.ABLATIONS[variant]))
        again = evaluate(v.map_pro, data["gt"], data["labels"], scores=v.image_score,
                         roc_maps=v.map_roc).metrics
        for key in ("i_auroc", "p_auroc", *AUPRO_KEYS):
            assert ablations[variant][key] == pytest.approx(again[key], abs=1e-9), variant
    assert ablations["sum"]["i_auroc"] != ablations["product"]["i_auroc"] or \
        ablations["sum"]["aupro@0.01"] != ablations["product"]["aupro@0.01"]

    roc = read_csv(out / "roc.csv")
    assert (float(roc[0]["fpr"]), float(roc[0]["tpr"])) == (0.0, 0.0)
    assert (float(roc[-1]["fpr"]), float(roc[-1]["tpr"])) == (1.0, 1.0)
    pro = read_csv(out / "pro.csv")
    fpr = np.array([float(r["fpr"]) for r in pro])
    pro_v = np.array([float(r["pro"]) for r in pro])
    assert 2 <= len(pro) <= 1001 and fpr[-1] == pytest.approx(0.3) and fpr[0] == 0.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro_v) >= -1e-9)
    # the plotted curve integrates to (nearly) the AUPRO@0.3
    area = np.sum(0.5 * (pro_v[1:] + pro_v[:-1]) * np.diff(fpr)) / 0.3
    assert area == pytest.approx(metrics["aupro@0.3"], abs=0.02)

    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert len(heatmaps) == 4
    assert sum(h.startswith("good_") for h in heatmaps) == 2
    # the highest-scoring good image is always shown
    good = np.flatnonzero(data["labels"] == 0)
    top_good = data["ids"][good[np.argmax(sc.image_score[good])]]
    assert f"{top_good.replace('/', '_')}.png" in heatmaps
    from PIL import Image

    img = np.asarray(Image.open(out / "heatmaps" / heatmaps[0]))
    assert img.shape == (S, S, 3)
    assert Image.open(out / "overview.png").size[0] > 500


def test_evaluate_is_deterministic(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = make_params(heatmaps_per_class=1)
    write_inputs(params)
    out = layout.evaluation(CAT, 1, 0)
    stage.run(params, CAT, 1, 0)
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    stage.run(params, CAT, 1, 0)
    second = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert first.keys() == second.keys() and len(first) == 7  # 5 files + 2 heatmaps
    assert all(first[k] == second[k] for k in first)


def test_more_approximations_in_the_same_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = make_params(aupro_thresholds=[99, 100], limits=[0.3, 0.01])
    data = write_inputs(params)
    stage.run(params, CAT, 1, 0)
    out = layout.evaluation(CAT, 1, 0)
    metrics = json.loads((out / "metrics.json").read_text())
    sc = data["scored"]
    keys = [aupro_key(x, t) for x in (0.3, 0.01) for t in (None, 99, 100)]
    assert metrics["aupro_thresholds"] == [99, 100] and "aupro@0.1" not in metrics
    assert sorted(k for k in metrics if k.startswith("aupro@")) == sorted(keys)
    for t in (None, 99, 100):  # each equals a call that computes only that approximation
        alone = evaluate(sc.map_pro, data["gt"], data["labels"], scores=sc.image_score,
                         limits=[0.3, 0.01], aupro_thresholds=[] if t is None else [t]).metrics
        for x in (0.3, 0.01):
            assert metrics[aupro_key(x, t)] == pytest.approx(alone[aupro_key(x, t)], abs=1e-12)
    ablations = json.loads((out / "ablations.json").read_text())
    assert all(set(keys) <= set(v) for v in ablations.values())


def test_old_aupro_thresholds_values_fail_with_a_migration_message() -> None:
    for old in (None, 99):
        with pytest.raises(ParamsError) as err:
            make_params(aupro_thresholds=old)
        msg = str(err.value)
        assert "evaluate.aupro_thresholds" in msg and "[99]" in msg
        assert "headline_aupro" in msg
    with pytest.raises(ParamsError,
                       match=r"evaluate.headline_aupro: .*needs 100 in evaluate.aupro_thresholds"):
        make_params(headline_aupro="thr100")
    with pytest.raises(ParamsError, match="evaluate.headline_aupro"):
        make_params(headline_aupro="approx")
    assert make_params(aupro_thresholds=[99, 100], headline_aupro="thr100") \
        .evaluate.headline_thresholds() == 100


def test_mismatched_ids_fail_naming_both_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = make_params()
    ids = [f"good/{i:03d}" for i in range(N)]
    write_inputs(params, test_ids=ids)
    with pytest.raises(InputError) as err:
        stage.run(params, CAT, 1, 0)
    msg = str(err.value)
    assert "scores/bagel/k1-s0.zarr" in msg and "prepare/bagel/test.zarr" in msg
    assert "position 4" in msg
    assert not (tmp_path / "results").exists()


def test_label_disagreeing_with_gt_fails_without_output(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = make_params()
    labels = [0] * (N // 2) + [1] * (N // 2)
    labels[5] = 0
    write_inputs(params, labels=labels)
    with pytest.raises(InputError, match=r"image\(s\) \[5\] labelled good"):
        stage.run(params, CAT, 1, 0)
    assert not (tmp_path / "results").exists()


def test_missing_scores_store(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="scores/bagel/k1-s0.zarr"):
        stage.run(make_params(), CAT, 1, 0)


def test_failure_while_writing_leaves_no_partial_output(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = make_params()
    write_inputs(params)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(stage.R, "overview_png", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        stage.run(params, CAT, 1, 0)
    # neither k1-s0 nor a temporary sibling, nor the parent folders the failed run created
    assert not (tmp_path / "results").exists()


def test_stream_store_of_other_test_set_fails(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = make_params()
    data = write_inputs(params)
    with StoreWriter(layout.streams(CAT, 1, 0),
                     attrs={"ids": data["ids"][::-1], "labels": [0] * N, "category": CAT}) as w:
        for name in (*STREAM_NAMES, "fg"):
            w.write(name, np.zeros((N, S, S), np.float16 if name != "fg" else np.uint8))
    with pytest.raises(InputError, match=r"streams/bagel/k1-s0.zarr: sample ids do not match"):
        stage.run(params, CAT, 1, 0)
    assert not (tmp_path / "results").exists()


def test_headline_is_read_by_the_report_alone() -> None:
    """dvc.yaml: evaluate lists every evaluate key but the headline (both AUPROs are in
    metrics.json already), so changing the headline re-runs only the report, which lists it."""
    import yaml

    from pipeline.params import EvaluateParams

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    stages = stages["stages"]
    listed = {k for k in stages["evaluate"]["params"] if isinstance(k, str)}
    assert listed == {f"evaluate.{f}" for f in EvaluateParams.model_fields
                      if f != "headline_aupro"} | {"score"}
    assert {"evaluate.limits", "evaluate.aupro_thresholds", "evaluate.headline_aupro"} <= \
        set(stages["report"]["params"])
