"""score: fusion, smoothing, normalisation, the stage, and its bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from scipy import ndimage

from pipeline.artifacts import open_store
from pipeline.errors import InputError, ModelError, ParamsError
from pipeline.models.mapper import build_mapper
from pipeline.params import ScoreParams
from pipeline.scoring import (
    STREAM_NAMES,
    box_cascade,
    combine_streams,
    finish_maps,
    normalise,
)
from stages import fit_mapper, layout, score
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


# ------------------------------------------------------------------------- map functions
def test_box_cascade_matches_scipy_uniform_filter() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((2, 23, 23))
    maps[:, :5] = 0
    expected = maps.copy()
    for w, n in ((3, 5), (5, 3)):
        for _ in range(n):
            expected = ndimage.uniform_filter(expected, size=(1, w, w), mode="constant", cval=0.0)
    np.testing.assert_allclose(box_cascade(maps, (3, 5)), expected, rtol=1e-10, atol=1e-12)
    other = maps.copy()
    for w, n in ((5, 5), (7, 3)):
        for _ in range(n):
            other = ndimage.uniform_filter(other, size=(1, w, w), mode="constant", cval=0.0)
    np.testing.assert_allclose(box_cascade(maps, (5, 7)), other, rtol=1e-10, atol=1e-12)


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


def test_score_store_contents_and_defects(project: Path) -> None:
    score.run(make_params(), CAT, 2, 0)
    s = open_store(layout.scores(CAT, 2, 0))
    ids = [f"{'crack' if i % 2 else 'good'}/{i:03d}" for i in range(6)]
    assert s.attrs["ids"] == ids and s.attrs["labels"] == [0, 1] * 3
    assert s.attrs["category"] == CAT and s.attrs["stage"] == "score"
    assert s.attrs["params"]["fusion"] == "product"
    for name in STREAM_NAMES:
        assert s[name].dtype == np.float16 and s[name].shape == (6, SIZE, SIZE)
    assert s["fg"].dtype == np.uint8
    for name in ("map", "map_pro", "map_roc"):
        assert s[name].dtype == np.float32 and s[name].shape == (6, SIZE, SIZE)
    assert s["image_score"].dtype == np.float32 and s["image_score"].shape == (6,)
    # The stored map is finish_maps of the stored (float16) streams: evaluate can re-fuse.
    streams = {n: s[n][:] for n in STREAM_NAMES}
    again = finish_maps(streams, s["fg"][:], CAT, make_params().score)
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
    outside = (s["fg"][0] > 0) & ~margin
    assert outside.sum() > 200 and core.sum() >= 16
    for i in (1, 3, 5):
        for name in ("psi2d_real", "psi3d_real", "psi3d_est"):
            raw = s[name][i].astype(np.float32)
            assert raw[core].mean() > 1.5 * raw[outside].mean(), (name, i)
        m = s["map"][i]
        assert m[core].mean() > 3 * m[outside].mean(), i
    scores_ = s["image_score"][:]
    assert scores_[[1, 3, 5]].min() > scores_[[0, 2, 4]].max()


def test_score_is_byte_identical(project: Path) -> None:
    score.run(make_params(), CAT, 2, 0)
    path = layout.scores(CAT, 2, 0)
    first = {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    score.run(make_params(), CAT, 2, 0)
    second = {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    assert first == second
    score.run(make_params(score={"fusion": "sum"}), CAT, 2, 0)
    third = {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    assert third != first


def _expect(error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        score.run(make_params(), CAT, 2, 0)
    assert not layout.scores(CAT, 2, 0).exists()
    assert not list(layout.scores(CAT, 2, 0).parent.glob(".*"))  # no temp left


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


def test_even_box_size_fails_before_inference(project: Path) -> None:
    with pytest.raises(ParamsError, match=r"score.box_sizes: box sizes must be odd"):
        score.run(make_params(score={"box_sizes": [4, 5]}), CAT, 2, 0)
    assert not layout.scores(CAT, 2, 0).exists()
    with pytest.raises(ParamsError, match=r"score.box_sizes_large: .*\[5, 6\]"):
        score.run(make_params(score={"box_sizes_large": [5, 6]}), "carrot", 2, 0)


def test_missing_mappers(project: Path) -> None:
    shutil.rmtree(layout.mappers(CAT, 2, 0))
    _expect(InputError, r"mappers/bagel/k2-s0/config.json: mapper config not found")
