"""infer + score: mapper inference, fusion, smoothing, normalisation, the two stages and their
bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from scipy import ndimage
from test_fit_mapper import (
    CAT,
    DEFECT,
    GRID,
    SIZE,
    make_params,
    synth_features,
    write_features,
    write_prepare,
    write_project,
)

from pipeline.artifacts import StoreWriter, open_store
from pipeline.errors import InputError, ModelError, ParamsError
from pipeline.inference import cosine_distance, load_mappers, stream_maps
from pipeline.metrics import auroc
from pipeline.models.mapper import build_mapper
from pipeline.params import ScoreParams
from pipeline.scoring import (
    STREAM_NAMES,
    box_cascade,
    combine_streams,
    finish_maps,
    normalise,
)
from stages import fit_mapper, infer, layout, score

# one intra-op thread (conftest): the mapper training of the shared fixture spends most of its
# time in oversubscribed threads on the shared machine otherwise
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------- map functions
def _layers(rng: np.random.Generator, widths=(8, 16, 32), scales=(1.0, 1.0, 1.0)) -> list:
    return [torch.from_numpy(rng.normal(size=(2, c, 5, 4)) * s).float()
            for c, s in zip(widths, scales)]


def test_layerwise_distance_is_the_mean_per_layer_cosine_distance() -> None:
    rng = np.random.default_rng(0)
    pred, target = _layers(rng), _layers(rng, scales=(40.0, 3.0, 0.5))
    per_layer = [1 - torch.nn.functional.cosine_similarity(p, t, dim=1)
                 for p, t in zip(pred, target)]
    torch.testing.assert_close(cosine_distance(pred, target), sum(per_layer) / 3)
    # Rescaling any predicted layer leaves it unchanged: only directions are compared, as in
    # the training loss, which never fits the norms.
    rescaled = [pred[0] * 50, pred[1] * 0.01, pred[2]]
    torch.testing.assert_close(cosine_distance(rescaled, target), cosine_distance(pred, target))
    # Matching directions at wildly different norms: zero layerwise, large when concatenated.
    same_directions = [t * s for t, s in zip(target, (0.02, 1.0, 60.0))]
    assert cosine_distance(same_directions, target).abs().max() < 1e-5
    assert cosine_distance(same_directions, target, "concatenated").min() > 0.3


def test_concatenated_distance_is_one_cosine_over_raw_layers() -> None:
    rng = np.random.default_rng(1)
    pred, target = _layers(rng), _layers(rng)
    a, b = torch.cat(pred, 1), torch.cat(target, 1)
    expected = 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    torch.testing.assert_close(cosine_distance(pred, target, "concatenated"), expected)
    with pytest.raises(ValueError, match="distance"):
        cosine_distance(pred, target, "euclidean")


def _box_mean_by_shifts(maps: np.ndarray, w: int) -> np.ndarray:
    """Reference box mean with zero padding: the sum of w*w shifted copies of a padded array."""
    r = w // 2
    padded = np.pad(maps, ((0, 0), (r, r), (r, r)))
    h, v = maps.shape[1:]
    total = sum(padded[:, dy:dy + h, dx:dx + v] for dy in range(w) for dx in range(w))
    return total / (w * w)


def test_box_cascade_matches_explicit_shifted_sums() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((2, 23, 19))
    maps[:, :5] = 0
    for sizes in ((3, 5), (5, 7)):
        expected = maps.copy()
        for w, n in zip(sizes, (5, 3)):
            for _ in range(n):
                expected = _box_mean_by_shifts(expected, w)
        np.testing.assert_allclose(box_cascade(maps, sizes), expected, rtol=1e-10, atol=1e-12)


def test_box_cascade_rejects_even_sizes() -> None:
    with pytest.raises(ParamsError, match="score.box_sizes"):
        box_cascade(np.zeros((1, 8, 8)), (4, 5))


def test_normalisations_on_hand_made_maps() -> None:
    maps = np.zeros((3, 2, 2))
    maps[0] = [[0, 2], [4, 0]]
    maps[1] = [[1, 1], [1, 1]]
    out = normalise(maps)  # image 2 is all zero
    assert out.map.dtype == out.map_pro.dtype == out.map_roc.dtype == np.float32
    assert out.image_score.dtype == np.float32 and out.image_score.shape == (3,)
    np.testing.assert_allclose(out.map_pro[0], [[0, 2 / 3], [4 / 3, 0]], rtol=1e-6)
    np.testing.assert_allclose(out.map_roc[0], maps[0] / np.sqrt(1.5), rtol=1e-6)
    assert out.image_score[0] == pytest.approx(4 / np.sqrt(3))
    np.testing.assert_allclose(out.map_pro[1], 1.0)
    assert out.image_score[1] == pytest.approx(1.0)
    assert not out.map_pro[2].any() and not out.map_roc[2].any() and out.image_score[2] == 0
    assert np.isfinite(out.map_pro).all() and np.isfinite(out.map_roc).all()


def _streams(a: float, b: float, c: float, d: float) -> dict[str, np.ndarray]:
    return {n: np.full((1, 2, 2), v) for n, v in zip(STREAM_NAMES, (a, b, c, d))}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, (1 + 0.1 * 2) * (3 + 0.1 * 4)),
        ({"lambda_1": 0.5, "lambda_2": 0.0}, (1 + 0.5 * 2) * 3),
        ({"fusion": "sum"}, 1.2 + 3.4),
        ({"fusion": "max"}, 3.4),
        ({"modalities": "2d"}, 1.2),
        ({"modalities": "3d", "fusion": "sum"}, 3.4),
        ({"streams": "real"}, 1 * 3),
        ({"streams": "estimated"}, 2 * 4),
        ({"streams": "estimated", "modalities": "3d"}, 4),
        ({"streams": "real", "fusion": "max"}, 3),
    ],
)
def test_combine_streams_switches(settings: dict, expected: float) -> None:
    psi = combine_streams(_streams(1, 2, 3, 4), ScoreParams(**settings))
    np.testing.assert_allclose(psi, expected)


def test_finish_maps_masks_before_smoothing() -> None:
    rng = np.random.default_rng(1)
    streams = {n: rng.random((2, 16, 16)).astype(np.float16) for n in STREAM_NAMES}
    fg = np.zeros((2, 16, 16), np.uint8)
    fg[:, 4:12, 4:12] = 1
    params = ScoreParams()
    out = finish_maps(streams, fg, CAT, params)
    # Huge values outside the foreground must not leak in.
    loud = {n: np.where(fg > 0, v, np.float16(1000)) for n, v in streams.items()}
    np.testing.assert_array_equal(finish_maps(loud, fg, CAT, params).map, out.map)
    psi = np.where(fg > 0, combine_streams(streams, params), 0)
    np.testing.assert_allclose(out.map, box_cascade(psi, (3, 5)), rtol=1e-6)
    large = finish_maps(streams, fg, "carrot", params)  # (5, 7) boxes
    np.testing.assert_allclose(large.map, box_cascade(psi, (5, 7)), rtol=1e-6)
    gauss = finish_maps(streams, fg, CAT, ScoreParams(smoothing="gaussian", gaussian_sigma=2))
    expected = ndimage.gaussian_filter(psi, sigma=(0, 2, 2), mode="constant", truncate=4.0)
    np.testing.assert_allclose(gauss.map, expected, rtol=1e-5, atol=1e-7)
    zero = finish_maps(streams, np.zeros_like(fg), CAT, params)
    assert not zero.map.any() and not zero.image_score.any()


# --------------------------------------------------------------------------------- stage
@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A project with trained CAHFM mappers (shared; tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("fitted")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        write_project(root, n_test=6)
        fit_mapper.run(make_params(steps=80), CAT, 2, 0)
    return root


@pytest.fixture
def project(fitted: Path, tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "p"
    shutil.copytree(fitted, root)
    monkeypatch.chdir(root)
    return root


def _infer_and_score(**score_settings) -> tuple:
    params = make_params(score=score_settings) if score_settings else make_params()
    infer.run(params, CAT, 2, 0)
    score.run(params, CAT, 2, 0)
    return open_store(layout.streams(CAT, 2, 0)), open_store(layout.scores(CAT, 2, 0))


def test_stream_and_score_stores_contents_and_defects(project: Path) -> None:
    st, s = _infer_and_score()
    ids = [f"{'crack' if i % 2 else 'good'}/{i:03d}" for i in range(6)]
    for store, stage in ((st, "infer"), (s, "score")):
        assert store.attrs["ids"] == ids and store.attrs["labels"] == [0, 1] * 3
        assert store.attrs["category"] == CAT and store.attrs["stage"] == stage
    assert s.attrs["params"]["fusion"] == "product"
    assert st.attrs["architecture"] == "cahfm" and "fusion" not in st.attrs["params"]
    for name in STREAM_NAMES:
        assert st[name].dtype == np.float32 and st[name].shape == (6, SIZE, SIZE)
    assert st["fg"].dtype == np.uint8
    for name in ("map", "map_pro", "map_roc"):
        assert s[name].dtype == np.float32 and s[name].shape == (6, SIZE, SIZE)
    assert s["image_score"].dtype == np.float32 and s["image_score"].shape == (6,)
    # The stored map is finish_maps of the stored streams: evaluate can re-fuse.
    streams = {n: st[n][:] for n in STREAM_NAMES}
    again = finish_maps(streams, st["fg"][:], CAT, make_params().score)
    np.testing.assert_array_equal(again.map, s["map"][:])
    np.testing.assert_array_equal(again.image_score, s["image_score"][:])

    # Anomaly: inside the synthetic defect the normals no longer follow the RGB.
    scale = SIZE // GRID
    inside = np.zeros((SIZE, SIZE), bool)
    inside[DEFECT[0].start * scale:DEFECT[0].stop * scale,
           DEFECT[1].start * scale:DEFECT[1].stop * scale] = True
    core = np.zeros_like(inside)  # away from the blurred boundary
    core[(DEFECT[0].start + 1) * scale:(DEFECT[0].stop - 1) * scale,
         (DEFECT[1].start + 1) * scale:(DEFECT[1].stop - 1) * scale] = True
    margin = np.zeros_like(inside)  # the defect plus two grid cells around it
    margin[:(DEFECT[0].stop + 2) * scale, :(DEFECT[1].stop + 2) * scale] = True
    outside = (st["fg"][0] > 0) & ~margin
    assert outside.sum() > 200 and core.sum() >= 16
    for i in (1, 3, 5):
        for name in ("psi2d_real", "psi3d_real", "psi3d_est"):
            raw = st[name][i].astype(np.float32)
            assert raw[core].mean() > 1.5 * raw[outside].mean(), (name, i)
        m = s["map"][i]
        assert m[core].mean() > 3 * m[outside].mean(), i
    scores_ = s["image_score"][:]
    assert scores_[[1, 3, 5]].min() > scores_[[0, 2, 4]].max()


def _direct_maps() -> dict[str, np.ndarray]:
    """The four stream maps computed in float32 straight from the mappers and the features."""
    config, mappers = load_mappers(layout.mappers(CAT, 2, 0))
    feats = open_store(layout.features(CAT) / "test.zarr")
    features = {m: [torch.from_numpy(np.asarray(feats[f"{m}_{l}"][:], np.float32))
                    for l in range(3)] for m in ("rgb", "real", "est")}
    with torch.inference_mode():
        maps = stream_maps(mappers, features, config["resolution"], SIZE, "layerwise")
    return {name: m.numpy() for name, m in maps.items()}


def test_stored_float32_maps_give_the_metrics_of_the_float32_computation(project: Path) -> None:
    """infer.map_dtype float32 (default, published): the stored maps are the float32 maps
    bit for bit, so fusion and the metrics are those of the float32 computation; float16
    rounds them and ties pixels the metrics then cannot order."""
    direct = _direct_maps()
    st, s = _infer_and_score()
    for name in STREAM_NAMES:
        assert st[name].dtype == np.float32
        np.testing.assert_array_equal(st[name][:], direct[name])
    fg = st["fg"][:]
    exact = finish_maps(direct, fg, CAT, make_params().score)
    np.testing.assert_array_equal(s["map"][:], exact.map)
    labels = np.array([0, 1] * 3)
    assert auroc(s["image_score"][:], labels) == auroc(exact.image_score, labels)

    infer.run(make_params(infer={"map_dtype": "float16"}), CAT, 2, 0)
    half = open_store(layout.streams(CAT, 2, 0))
    assert half.attrs["params"]["map_dtype"] == "float16"
    for name in STREAM_NAMES:
        assert half[name].dtype == np.float16
        np.testing.assert_array_equal(half[name][:], direct[name].astype(np.float16))
    inside = fg > 0
    values = direct["psi3d_real"][inside]
    assert len(np.unique(values.astype(np.float16))) < len(np.unique(values)) // 2


def _files(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_stores_are_byte_identical(project: Path) -> None:
    _infer_and_score()
    first = _files(layout.streams(CAT, 2, 0)), _files(layout.scores(CAT, 2, 0))
    _infer_and_score()
    assert (_files(layout.streams(CAT, 2, 0)), _files(layout.scores(CAT, 2, 0))) == first
    _infer_and_score(fusion="sum")
    assert _files(layout.streams(CAT, 2, 0)) == first[0]
    assert _files(layout.scores(CAT, 2, 0)) != first[1]
    infer.run(make_params(infer={"distance": "concatenated"}), CAT, 2, 0)
    assert _files(layout.streams(CAT, 2, 0)) != first[0]
    assert open_store(layout.streams(CAT, 2, 0)).attrs["params"]["distance"] == "concatenated"


def test_score_does_not_import_torch(project: Path) -> None:
    """Re-scoring must stay cheap: the score stage runs on numpy and scipy alone."""
    infer.run(make_params(), CAT, 2, 0)
    code = ("import sys; from pipeline.params import load_params; from stages import score; "
            f"score.run(load_params('params.yaml'), {CAT!r}, 2, 0); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    (project / "params.yaml").write_text(yaml.safe_dump(make_params().model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CMDS_AD_QUIET": "1"}
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=project, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert layout.scores(CAT, 2, 0).is_dir()


def _expect(error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        infer.run(make_params(), CAT, 2, 0)
    assert not layout.streams(CAT, 2, 0).exists()
    assert not list(layout.streams(CAT, 2, 0).parent.glob(".*"))  # no temp left


def _rewrite_test_features(**kw) -> None:
    feats = synth_features(6, np.random.default_rng(5), channels=kw.pop("channels", (8, 8, 8)),
                           grid=kw.pop("grid", GRID))
    ids = kw.pop("ids", [f"{'crack' if i % 2 else 'good'}/{i:03d}" for i in range(6)])
    write_features(layout.features(CAT) / "test.zarr", ids, feats, **kw)


def test_test_features_of_other_backbone(project: Path) -> None:
    _rewrite_test_features(backbone="vit_base_patch8_224.dino")
    _expect(InputError, r"features/bagel/test.zarr: feature backbone 'vit_base_patch8_224.dino' "
                        r"does not match 'toy' .*mappers/bagel/k2-s0/config.json")


def test_test_features_of_other_grid(project: Path) -> None:
    _rewrite_test_features(grid=4)
    _expect(InputError, r"test.zarr: feature grid \[4, 4\] does not match \[8, 8\] .*config.json")


def test_test_features_of_other_widths(project: Path) -> None:
    _rewrite_test_features(channels=(8, 8, 16))
    _expect(InputError, r"test.zarr: feature channels \[8, 8, 16\] does not match \[8, 8, 8\] "
                        r".*config.json")


def test_test_features_of_other_layers(project: Path) -> None:
    _rewrite_test_features(layers=(1, 2, 3))
    _expect(InputError, r"test.zarr: feature layers \[1, 2, 3\] does not match \[0, 1, 2\] "
                        r".*config.json")


def test_test_ids_differ_from_prepare(project: Path) -> None:
    _rewrite_test_features(ids=[f"good/{i:03d}" for i in range(6)])
    _expect(InputError, r"features/bagel/test.zarr: sample ids do not match "
                        r"artifacts/prepare/bagel/test.zarr "
                        r".*position 1: 'good/001' vs 'crack/001'")


def test_missing_test_foreground(project: Path) -> None:
    ids = [f"{'crack' if i % 2 else 'good'}/{i:03d}" for i in range(6)]
    write_prepare(layout.prepared(CAT) / "test.zarr", ids, [0, 1] * 3, with_fg=False)
    _expect(InputError, r"prepare/bagel/test.zarr: no foreground mask array 'fg'.*features/bagel/"
                        r"test.zarr")


def test_checkpoint_of_other_architecture(project: Path) -> None:
    cfg_path = layout.mappers(CAT, 2, 0) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architecture"] = "mlp"
    cfg_path.write_text(json.dumps(cfg))
    _expect(ModelError, r"real_2d_to_3d.safetensors: weights do not fit the 'mlp' mapper .*"
                        r"config.json \(the weights look like 'cahfm'")


def test_checkpoint_of_other_shape(project: Path) -> None:
    ckpt = layout.mappers(CAT, 2, 0) / "est_3d_to_2d.safetensors"
    state = build_mapper("cahfm", [8, 8, 8], [16, 16, 16]).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    assert set(load_file(str(ckpt))) == set(state)
    _expect(ModelError, r"est_3d_to_2d.safetensors: weights do not fit the 'cahfm' mapper "
                        r"\[8, 8, 8\] -> \[8, 8, 8\] described in .*config.json.*size mismatch")


def test_even_box_size_fails_before_reading(project: Path) -> None:
    with pytest.raises(ParamsError, match=r"score.box_sizes: box sizes must be odd"):
        score.run(make_params(score={"box_sizes": [4, 5]}), CAT, 2, 0)
    assert not layout.scores(CAT, 2, 0).exists()
    with pytest.raises(ParamsError, match=r"score.box_sizes_large: .*\[5, 6\]"):
        score.run(make_params(score={"box_sizes_large": [5, 6]}), "carrot", 2, 0)


def test_missing_mappers(project: Path) -> None:
    shutil.rmtree(layout.mappers(CAT, 2, 0))
    _expect(InputError, r"mappers/bagel/k2-s0/config.json: mapper config not found")


def test_score_without_streams(project: Path) -> None:
    with pytest.raises(InputError, match=r"streams/bagel/k2-s0.zarr: artifact store not found"):
        score.run(make_params(), CAT, 2, 0)
    assert not layout.scores(CAT, 2, 0).exists()


def test_score_with_incomplete_streams(project: Path) -> None:
    infer.run(make_params(), CAT, 2, 0)
    path = layout.streams(CAT, 2, 0)
    st = open_store(path)
    kept = {name: st[name][:] for name in ("psi2d_real", "psi2d_est", "psi3d_real", "fg")}
    attrs = dict(st.attrs)
    shutil.rmtree(path)
    with StoreWriter(path, attrs=attrs) as w:
        for name, values in kept.items():
            w.write(name, values)
    with pytest.raises(InputError, match=r"streams/bagel/k2-s0.zarr: no array 'psi3d_est' "
                                         r"\(re-run the infer stage\)"):
        score.run(make_params(), CAT, 2, 0)
    assert not layout.scores(CAT, 2, 0).exists()
