"""``cmds-ad predict`` and ``cmds-ad export`` on the reduced demo (a clone of this repository
reproduced with `dvc repro`): prediction equals the pipeline's stored scores, the bundle round
trip gives the same outputs, the thresholds stage re-runs alone on a rule change, and bad
input is refused with one message and nothing in --out."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.artifacts import open_store
from pipeline.data import list_samples
from pipeline.params import load_params
from pipeline.prediction import Predictor, to_input_resolution
from stages import layout
from tools.scratch_project import copy_project, sh, stages_run, write_params

pytestmark = pytest.mark.slow

KEY = "disc-1-0"
MODEL = "disc/k1-s0"
TEST = "data/demo/disc/test"


@pytest.fixture(scope="module")
def project(reduced_demo, tmp_path_factory) -> Path:
    return copy_project(reduced_demo, tmp_path_factory.mktemp("predict") / "cmds-ad")


@pytest.fixture(scope="module")
def predicted(project) -> Path:
    """`cmds-ad predict --model` on the demo's test folder."""
    sh(["cmds-ad", "predict", "--model", MODEL, "--input", TEST, "--out", "preds"], project)
    return project / "preds"


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv") as f:
        return list(csv.DictReader(f))


def test_library_prediction_equals_the_stored_scores(project, monkeypatch) -> None:
    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    refs = list_samples("mvtec3d", "data/demo", "disc", "test")
    predictor = Predictor.load(params, "disc", layout.mappers("disc", 1, 0))
    results = list(predictor.predict(refs))
    stored = open_store(layout.scores("disc", 1, 0))
    assert [r.ref.id for r in results] == stored.attrs["ids"]
    for name in ("map", "map_pro", "map_roc"):
        ours = np.stack([getattr(r.scored, name) for r in results])
        np.testing.assert_allclose(ours, np.asarray(stored[name][:]), rtol=1e-6, atol=1e-7,
                                   err_msg=name)
    np.testing.assert_allclose([r.image_score for r in results],
                               np.asarray(stored["image_score"][:]), rtol=1e-6)
    assert all(predictor.seconds[step] > 0 for step in ("normals", "features", "mappers"))


def test_predict_writes_maps_masks_overlays_and_the_table(project, predicted) -> None:
    stored = open_store(project / layout.scores("disc", 1, 0))
    thresholds = json.loads((project / layout.thresholds("disc", 1, 0)).read_text())
    image_t, pixel_t = thresholds["image"]["threshold"], thresholds["pixel"]["threshold"]
    rows = read_rows(predicted)
    assert [r["sample"] for r in rows] == stored.attrs["ids"]
    scores = np.asarray(stored["image_score"][:])
    for i, row in enumerate(rows):
        assert float(row["image_score"]) == pytest.approx(float(scores[i]), rel=1e-5)
        assert int(row["label"]) == int(scores[i] > image_t)
        assert float(row["pixel_threshold"]) == pytest.approx(pixel_t, rel=1e-5)
        name = row["sample"].replace("/", "_")
        rgb = np.asarray(Image.open(project / TEST / row["sample"].split("/")[0] / "rgb"
                                    / f"{row['sample'].split('/')[1]}.png"))
        amap = tifffile.imread(predicted / "maps" / f"{name}.tiff")
        assert amap.dtype == np.float32 and amap.shape == rgb.shape[:2]
        expected = to_input_resolution(np.asarray(stored["map_roc"][i]), *rgb.shape[:2])
        np.testing.assert_allclose(amap, expected, rtol=1e-5, atol=1e-6)
        mask = np.asarray(Image.open(predicted / "masks" / f"{name}.png"))
        assert np.array_equal(mask > 0, amap > pixel_t)
        assert int(row["anomalous_pixels"]) == int((amap > pixel_t).sum())
        overlay = np.asarray(Image.open(predicted / "overlays" / f"{name}.png"))
        assert overlay.shape == rgb.shape
    assert {int(r["label"]) for r in rows} <= {0, 1}


def test_export_and_predict_from_the_bundle_give_the_same_outputs(project, predicted) -> None:
    sh(["cmds-ad", "export", "disc", "--shots", "1", "--seed", "0", "--out", "bundle"], project)
    bundle = project / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"config.json", "mappers/config.json",
                                      "mappers/real_2d_to_3d.safetensors"}
    config = json.loads((bundle / "config.json").read_text())
    assert config["params"]["score"]["lambda_1"] == 0.1 and config["model_files"]["normals"]["files"]
    # on "another machine": a folder outside the project, the bundle moved there
    elsewhere = project.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(bundle, elsewhere / "bundle")
    shutil.copytree(project / ".cache", elsewhere / ".cache")  # the same model files
    sh(["cmds-ad", "predict", "--bundle", "bundle", "--input", str(project / TEST),
        "--out", "out"], elsewhere)
    ours, theirs = read_rows(predicted), read_rows(elsewhere / "out")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ours] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in theirs]
    for path in sorted((predicted / "maps").iterdir()):
        assert np.array_equal(tifffile.imread(path), tifffile.imread(elsewhere / "out/maps" / path.name))


def _refused(project: Path, args: list[str], message: str, out: str = "refused") -> None:
    result = sh(["cmds-ad", *args, "--out", out], project, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert not (project / out).exists()
    assert not list(project.glob(f".{out}*"))  # no temporary left either


def test_bundle_refusals_name_the_file(project) -> None:
    bundle = project / "bundle"
    if not bundle.is_dir():
        sh(["cmds-ad", "export", "disc", "--shots", "1", "--out", "bundle"], project)
    args = ["predict", "--input", TEST, "--bundle"]
    altered = project / "altered"
    shutil.copytree(bundle, altered)
    with open(altered / "mappers/est_3d_to_2d.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    _refused(project, [*args, "altered"], "altered/mappers/est_3d_to_2d.safetensors: altered")
    missing = project / "missing"
    shutil.copytree(bundle, missing)
    (missing / "mappers/real_3d_to_2d.safetensors").unlink()
    _refused(project, [*args, "missing"], "missing/mappers/real_3d_to_2d.safetensors: missing")
    old = project / "old"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["version"] = "0.0.1"
    (old / "manifest.json").write_text(json.dumps(manifest))
    _refused(project, [*args, "old"], "old/manifest.json: bundle of cmds-ad 0.0.1")
    _refused(project, [*args, "nowhere"], "nowhere: bundle folder not found")


def _sample(folder: Path, rgb: np.ndarray, xyz: np.ndarray, stem: str = "000") -> None:
    (folder / "rgb").mkdir(parents=True, exist_ok=True)
    (folder / "xyz").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / "rgb" / f"{stem}.png")
    tifffile.imwrite(folder / "xyz" / f"{stem}.tiff", xyz, photometric="rgb")


def test_bad_input_is_refused_with_nothing_in_out(project) -> None:
    source = project / TEST / "good"
    rgb = np.asarray(Image.open(source / "rgb/000.png"))
    xyz = tifffile.imread(source / "xyz/000.tiff")
    bad = project / "bad"
    _sample(bad / "sizes", rgb[:-2], xyz)
    _sample(bad / "zeros", rgb, np.zeros_like(xyz))
    (bad / "empty").mkdir()
    model = ["predict", "--model", MODEL, "--input"]
    _refused(project, [*model, "bad/sizes"], "bad/sizes/xyz/000.tiff: point cloud size")
    _refused(project, [*model, "bad/zeros"], "bad/zeros/xyz/000.tiff: point cloud has no valid")
    _refused(project, [*model, "bad/empty"], "bad/empty: no samples found")
    _refused(project, [*model, "bad/nothing"], "bad/nothing: --input not found")
    _refused(project, ["predict", "--model", "disc/k9-s0", "--input", TEST],
             "artifacts/mappers/disc/k9-s0: no trained model disc/k9-s0")
    _refused(project, ["predict", "--model", "disc", "--input", TEST],
             "--model: 'disc' is not CATEGORY/kK-sS")
    # a model without thresholds (no validation data, none given by hand): the file is named
    thresholds = project / layout.thresholds("disc", 1, 0)
    thresholds.rename(thresholds.with_name("aside.json"))
    try:
        _refused(project, [*model, TEST],
                 f"{layout.thresholds('disc', 1, 0)}: thresholds not found")
    finally:
        thresholds.with_name("aside.json").rename(thresholds)


def test_one_sample_path_predicts_that_sample(project, predicted) -> None:
    sh(["cmds-ad", "predict", "--model", MODEL, "--input", f"{TEST}/good/rgb/000.png",
        "--out", "one"], project)
    (row,) = read_rows(project / "one")
    first = next(r for r in read_rows(predicted) if r["sample"] == "good/000")
    assert row["sample"] == "good/000" and row["image_score"] == first["image_score"]


def test_threshold_rule_change_reruns_only_thresholds_and_downstream(project) -> None:
    before = json.loads((project / layout.thresholds("disc", 1, 0)).read_text())
    write_params(project, {"thresholds.rule": "max_margin", "thresholds.margin": 0.2})
    ran = stages_run(sh(["dvc", "repro"], project).stdout) - {"validate_params"}
    assert f"thresholds@{KEY}" in ran
    assert ran <= {f"thresholds@{KEY}", f"evaluate@{KEY}", "report"}
    after = json.loads((project / layout.thresholds("disc", 1, 0)).read_text())
    assert after["image"]["source"] == "max_margin"
    assert after["image"]["threshold"] == pytest.approx(1.2 * before["image"]["normal_max"])
    metrics = json.loads((project / layout.evaluation("disc", 1, 0) / "metrics.json").read_text())
    assert metrics["at_threshold"]["image"]["threshold"] == after["image"]["threshold"]
    assert "test_reference_f1_optimal" in metrics
