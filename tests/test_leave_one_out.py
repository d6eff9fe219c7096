"""Leave-one-out thresholds (``thresholds.normal_samples: leave_one_out``) on a tiny synthetic
project (test_fit_mapper's): each shot's stream maps are those ``infer`` stores for it when
``fit_mapper`` trained on the other shots alone, and the thresholds are the rule over their
scores; the refusals name the parameter and the way out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_fit_mapper import CAT, GRID, SIZE, write_features, write_prepare, write_project

from pipeline.artifacts import open_store
from pipeline.errors import ParamsError
from pipeline.params import parse_params
from pipeline.scoring import STREAM_NAMES, finish_maps
from stages import fit_mapper, infer, layout, thresholds, validation_streams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SHOTS = ["good/000", "good/001"]  # write_project's k2-s0 shots; its images come from good/000


def make_params(shots=(2,), **thresholds_section):
    return parse_params({
        "data": {"categories": [CAT], "size": SIZE},
        "fewshot": {"shots": list(shots)},
        "fit_mapper": {"architecture": "mlp", "resolution": GRID, "steps": {k: 6 for k in shots},
                       "lr": 1e-2, "lr_min": 1e-4},
        "infer": {"batch_size": 4},
        "score": {"batch_size": 3},
        "thresholds": {"normal_samples": "leave_one_out", "quantile": 0.5,
                       "pixel_quantile": 0.9, **thresholds_section},
    })


def _store_arrays(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    store = open_store(path)
    return store.ids, {name: np.asarray(store[name][:]) for name in store.names()}


def _trained_without(root: Path, left_out: str) -> dict[str, np.ndarray]:
    """The pipeline's own stages on a project whose model never saw ``left_out``: a k=1 model
    (the k=2 model's training settings) on the other shot and the images generated from it, and
    the left-out shot as the test set that ``infer`` maps."""
    params = make_params(shots=(1, 2), normal_samples="validation")
    write_project(root, test=False)
    kept = [s for s in SHOTS if s != left_out]
    (root / layout.shots_file(CAT)).write_text(json.dumps({"k1-s0": kept}))
    gen_ids, gen = _store_arrays(root / layout.features_generated(CAT, 2, 0))
    keep = [i for i, g in enumerate(gen_ids) if not g.startswith(f"gen/{left_out}/")]
    feats = {m: [gen[f"{m}_{l}"][keep].astype(np.float32) for l in range(3)]
             for m in ("rgb", "est")}
    write_features(root / layout.features_generated(CAT, 1, 0), [gen_ids[i] for i in keep],
                   feats)
    train_ids, train = _store_arrays(root / layout.features(CAT) / "train.zarr")
    row = train_ids.index(left_out)
    write_features(root / layout.features(CAT) / "test.zarr", [left_out],
                   {m: [train[f"{m}_{l}"][row:row + 1].astype(np.float32) for l in range(3)]
                    for m in ("rgb", "real", "est")})
    write_prepare(root / layout.prepared(CAT) / "test.zarr", [left_out], [0])
    fit_mapper.run(params, CAT, 1, 0)
    infer.run(params, CAT, 1, 0)
    return _store_arrays(root / layout.streams(CAT, 1, 0))[1]


def test_leave_one_out_equals_the_stages_trained_without_each_shot(tmp_path, monkeypatch) -> None:
    params = make_params()
    expected = []
    for i, shot in enumerate(SHOTS):
        root = tmp_path / f"without{i}"
        root.mkdir()
        monkeypatch.chdir(root)
        expected.append(_trained_without(root, shot))
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    write_project(project, test=False)
    validation_streams.run(params, CAT, 2, 0)
    thresholds.run(params, CAT, 2, 0)
    ids, loo = _store_arrays(layout.validation_streams(CAT, 2, 0))
    assert ids == SHOTS
    for name in (*STREAM_NAMES, "fg"):
        np.testing.assert_array_equal(loo[name], np.concatenate([e[name] for e in expected]),
                                      err_msg=name)
    # the thresholds: the rule over the shots' scores, scored as `score` scores the test set
    streams = {n: np.concatenate([e[n] for e in expected]) for n in STREAM_NAMES}
    fg = np.concatenate([e["fg"] for e in expected])
    scored = finish_maps(streams, fg, CAT, params.score)
    written = json.loads(layout.thresholds(CAT, 2, 0).read_text())
    assert written["normal_samples"] == "leave_one_out" and written["validation_ids"] == SHOTS
    assert written["image"]["threshold"] == pytest.approx(np.quantile(scored.image_score, 0.5))
    assert written["pixel"]["threshold"] == pytest.approx(
        np.quantile(scored.map_roc[fg > 0], 0.9), rel=1e-6)
    assert written["image"]["n_normal"] == 2


def test_k1_leaves_nothing_to_train_on() -> None:
    with pytest.raises(ParamsError) as err:
        make_params(shots=(1, 2))
    message = str(err.value)
    assert "thresholds.normal_samples: leave_one_out" in message and "k=1" in message
    assert "thresholds.image and thresholds.pixel set by hand" in message
    make_params(shots=(1, 2), image=0.5, pixel=0.5)  # manual thresholds need no normal scores


def test_released_mappers_cannot_be_trained_again() -> None:
    with pytest.raises(ParamsError, match="leave_one_out trains mappers, but "
                                          "fit_mapper.mappers is official"):
        raw = yaml.safe_load((REPO / "presets/paper.yaml").read_text())
        raw["fit_mapper"]["mappers"] = "official"  # the preset has the published feature setup
        raw["thresholds"]["normal_samples"] = "leave_one_out"
        raw["fewshot"]["shots"] = [k for k in raw["fewshot"]["shots"] if k > 1]
        parse_params(raw)


def test_only_the_normal_scores_stage_reads_the_source() -> None:
    """Changing thresholds.normal_samples re-runs validation_streams and what reads its store
    (thresholds, evaluate, report), no model: no other stage lists the key or its section."""
    readers = {}
    for dvc_file in ("upstream/dvc.yaml", "dvc.yaml"):
        for name, stage in yaml.safe_load((REPO / dvc_file).read_text())["stages"].items():
            for param in stage.get("params", []):
                if param in ("thresholds", "thresholds.normal_samples"):
                    readers[name] = param
    assert readers == {"validation_streams": "thresholds.normal_samples",
                       "validation_streams_released": "thresholds.normal_samples",
                       "thresholds": "thresholds"}
