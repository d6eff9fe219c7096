"""Stage ``prepare``: artifact contract, determinism, and every bad-input case."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.artifacts import open_store
from pipeline.data import list_samples, load_sample
from pipeline.data.demo import write_demo_dataset
from pipeline.data.preprocess import PreprocessConfig, preprocess
from pipeline.errors import CmdsAdError, InputError, ParamsError
from pipeline.normals import encode_normals, estimate_normals
from pipeline.params import parse_params
from stages import layout, prepare
from stages.cli import app

CAT = "disc"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "demo"
    write_demo_dataset(root, seed=0, categories=[CAT], n_train=3, n_test=4, n_validation=0)
    return root


@pytest.fixture
def dataset(pristine, tmp_path, monkeypatch) -> Path:
    """A private copy of the tiny dataset; the working directory is tmp_path."""
    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    monkeypatch.chdir(tmp_path)
    return root


def make_params(root: Path, **fewshot):
    raw = {
        "data": {"root": str(root), "categories": [CAT], "size": 64},
        "fewshot": {"shots": [1, 2], "seeds": [0], **fewshot},
    }
    return parse_params(raw)


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_prepare_writes_the_contract(dataset):
    prepare.run(make_params(dataset), CAT)
    out = layout.prepared(CAT)
    assert sorted(p.name for p in out.iterdir()) == ["shots.json", "test.zarr", "train.zarr"]
    shots = json.loads((out / "shots.json").read_text())
    assert shots == {"k1-s0": ["good/000"], "k2-s0": ["good/000", "good/001"]}

    train, test = open_store(out / "train.zarr"), open_store(out / "test.zarr")
    assert train.attrs["ids"] == ["good/000", "good/001"]  # only the union of the shots
    refs = list_samples("mvtec3d", dataset, CAT, "test")
    assert test.attrs["ids"] == [r.id for r in refs]
    assert test.attrs["labels"] == [r.label for r in refs]
    assert test.attrs["defect_types"] == [r.defect_type for r in refs]
    for store in (train, test):
        n = len(store.attrs["ids"])
        assert store.attrs["category"] == CAT and store.attrs["dataset"] == "mvtec3d"
        assert store.attrs["stage"] == "prepare"
        assert store.attrs["params"]["data"]["size"] == 64
        assert "categories" not in store.attrs["params"]["data"]
        expected = {
            "rgb": ((n, 64, 64, 3), np.uint8),
            "xyz": ((n, 64, 64, 3), np.float32),
            "normals": ((n, 64, 64, 3), np.float16),
            "fg": ((n, 64, 64), np.uint8),
            "gt": ((n, 64, 64), np.uint8),
        }
        assert {k: (store[k].shape, store[k].dtype) for k in expected} == expected
    assert train.attrs["params"]["fewshot"]["shots"] == [1, 2]
    assert "fewshot" not in test.attrs["params"]  # test.zarr does not depend on the shots

    # content equals the library applied to the raw sample
    i = test.attrs["ids"].index("bump/000")
    raw = load_sample(refs[i])
    prep = preprocess(raw.rgb, raw.xyz, raw.gt, PreprocessConfig(size=64))
    np.testing.assert_array_equal(test["rgb"][i], prep.rgb)
    np.testing.assert_array_equal(test["xyz"][i], prep.xyz)
    np.testing.assert_array_equal(test["gt"][i], prep.gt)
    np.testing.assert_array_equal(test["fg"][i], prep.fg)
    normals = encode_normals(estimate_normals(prep.xyz)).astype(np.float16)
    np.testing.assert_array_equal(test["normals"][i], normals)
    assert test["gt"][i].sum() > 0 and set(np.unique(test["fg"][:])) == {0, 1}
    bg = test["fg"][i] == 0
    assert (np.asarray(test["normals"][i][bg], np.float32) == [0.5, 0.5, 1.0]).all()


def test_prepare_is_byte_deterministic(dataset, tmp_path, monkeypatch):
    params = make_params(dataset, strategy="random", seeds=[0, 1])
    prepare.run(params, CAT)
    first = digest(layout.prepared(CAT))
    other = tmp_path / "again"
    other.mkdir()
    monkeypatch.chdir(other)
    prepare.run(params, CAT)
    assert digest(layout.prepared(CAT)) == first
    assert len(first) < 40  # sharded: a handful of files per store


def test_shots_do_not_change_test_store(dataset, tmp_path, monkeypatch):
    prepare.run(make_params(dataset), CAT)
    before = digest(layout.prepared(CAT) / "test.zarr")
    prepare.run(make_params(dataset, shots=[1]), CAT)
    assert digest(layout.prepared(CAT) / "test.zarr") == before
    assert json.loads((layout.prepared(CAT) / "shots.json").read_text()) == {"k1-s0": ["good/000"]}


# --- bad input: one message naming the file or key, an exception, and no artifact --------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_xyz(path: Path, array: np.ndarray) -> None:
    tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 and array.shape[-1] == 3 else None)


def _xyz(root: Path, kind: str = "bump") -> Path:
    return root / CAT / "test" / kind / "xyz" / "000.tiff"


def _rgb(root: Path, kind: str = "bump") -> Path:
    return root / CAT / "test" / kind / "rgb" / "000.png"


def _gt(root: Path, kind: str = "bump") -> Path:
    return root / CAT / "test" / kind / "gt" / "000.png"


def _edit_xyz(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = _xyz(root)
        _write_xyz(path, fn(tifffile.imread(path)))

    return damage


def _nan_all(a):
    return np.full_like(a, np.nan)


def _flat(shape: tuple[int, int]) -> np.ndarray:
    """A bare support plane 0.4 m away: nothing is left after plane removal."""
    v, u = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.stack([(u - 160) / 900 * 0.4, (v - 160) / 900 * 0.4, np.full(shape, 0.4)], -1).astype(
        np.float32
    )


def _mismatch(root: Path) -> None:
    rgb = np.asarray(Image.open(_rgb(root)))
    Image.fromarray(rgb[:-8]).save(_rgb(root))


def _empty_train(root: Path) -> None:
    for sub in ("rgb", "xyz"):
        for p in (root / CAT / "train" / "good" / sub).iterdir():
            p.unlink()


CASES: list[tuple[str, Callable[[Path], None], type[CmdsAdError], str]] = [
    ("missing rgb", lambda r: _rgb(r).unlink(), InputError, r"bump/rgb/000\.png: rgb image not found"),
    ("missing xyz", lambda r: _xyz(r).unlink(), InputError, r"bump/xyz/000\.tiff: xyz point cloud not found"),
    ("missing gt", lambda r: _gt(r).unlink(), InputError, r"bump/gt/000\.png: ground-truth mask not found"),
    ("truncated rgb png", lambda r: _truncate(_rgb(r)), InputError, r"bump/rgb/000\.png: cannot read image"),
    ("garbage rgb png", lambda r: _rgb(r).write_bytes(b"not a png"), InputError, r"bump/rgb/000\.png"),
    ("truncated gt png", lambda r: _truncate(_gt(r, "stain")), InputError, r"stain/gt/000\.png: cannot read"),
    ("truncated tiff", lambda r: _truncate(_xyz(r)), InputError, r"bump/xyz/000\.tiff: cannot read TIFF"),
    ("garbage tiff", lambda r: _xyz(r).write_bytes(b"II*\x00garbage"), InputError, r"bump/xyz/000\.tiff: cannot read TIFF"),
    ("xyz 2 channels", _edit_xyz(lambda a: a[..., :2].copy()), InputError, r"000\.tiff: expected an H x W x 3"),
    ("xyz 2-d", _edit_xyz(lambda a: a[..., 2].copy()), InputError, r"000\.tiff: expected an H x W x 3"),
    ("xyz integer dtype", _edit_xyz(lambda a: (a * 1000).astype(np.int32)), InputError, r"000\.tiff: expected float32"),
    ("xyz all nan", _edit_xyz(_nan_all), InputError, r"000\.tiff: point cloud has no valid point"),
    ("xyz all zero", _edit_xyz(np.zeros_like), InputError, r"000\.tiff: point cloud has no valid point"),
    ("xyz only plane", _edit_xyz(lambda a: _flat(a.shape[:2])), InputError, r"000\.tiff: no object points left"),
    ("rgb/xyz size mismatch", _mismatch, InputError, r"000\.tiff: point cloud size 320x320 .* rgb image 000\.png size 320x312"),
    ("empty train split", _empty_train, InputError, r"train: split is empty"),
    ("no test split", lambda r: shutil.rmtree(r / CAT / "test"), InputError, r"disc/test: split folder not found"),
    ("root missing", lambda r: shutil.rmtree(r), InputError, r"dataset root not found \(data.root\)"),
    ("category folder missing", lambda r: (r / CAT).rename(r / "other"), InputError, r"unknown category 'disc'"),
]


@pytest.mark.parametrize(("name", "damage", "error", "match"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(dataset, name, damage, error, match):
    params = make_params(dataset)  # validated before the damage, as the stage sees it
    damage(dataset)
    with pytest.raises(error, match=match) as err:
        prepare.run(params, CAT)
    assert "\n" not in str(err.value)
    assert not layout.prepared(CAT).exists()
    leftovers = list(layout.prepared(CAT).parent.iterdir()) if layout.prepared(CAT).parent.exists() else []
    assert leftovers == []


def _blank(path: Path) -> None:
    Image.fromarray(np.zeros_like(np.asarray(Image.open(path)))).save(path)


def _mark(path: Path) -> None:
    mask = np.asarray(Image.open(path)).copy()
    mask[10:12, 10:12] = 255
    Image.fromarray(mask).save(path)


def test_masks_must_agree_with_labels_before_any_work(dataset):
    params = make_params(dataset)
    _blank(_gt(dataset, "stain"))  # a defect folder's sample whose mask marks nothing
    with pytest.raises(InputError, match=r"stain/gt/000.png: the mask of defective sample "
                                         r"'stain/000' marks no pixel.*accept_empty_defect_masks"):
        prepare.run(params, CAT)
    assert not layout.prepared(CAT).parent.exists()
    accepting = parse_params({**params.model_dump(mode="json"),
                              "data": {**params.data.model_dump(mode="json"),
                                       "accept_empty_defect_masks": True}})
    prepare.run(accepting, CAT)
    test = open_store(layout.prepared(CAT) / "test.zarr")
    assert test.attrs["labels"][test.attrs["ids"].index("stain/000")] == 1
    assert "accept_empty_defect_masks" not in test.attrs["params"]["data"]  # stores unchanged
    _mark(_gt(dataset, "good"))  # the opposite: a good sample with defect pixels
    with pytest.raises(InputError, match=r"good/gt/000.png: the mask of good sample 'good/000' "
                                         r"marks 4 defect pixels"):
        prepare.run(accepting, CAT)


def test_sparse_nan_points_are_missing_not_fatal(dataset):
    path = _xyz(dataset)
    xyz = tifffile.imread(path)
    xyz[100:104, 100:140] = np.nan
    _write_xyz(path, xyz)
    prepare.run(make_params(dataset), CAT)
    test = open_store(layout.prepared(CAT) / "test.zarr")
    assert np.isfinite(np.asarray(test["xyz"][:])).all()


def test_k_larger_than_training_split(dataset):
    with pytest.raises(ParamsError, match=r"fewshot.shots: k=4 .* 'disc' \(3 samples\)"):
        prepare.run(make_params(dataset, shots=[1, 4]), CAT)
    assert not layout.prepared(CAT).exists()


def test_category_not_in_params(dataset):
    with pytest.raises(ParamsError, match="data.categories: category 'slab' is not listed"):
        prepare.run(make_params(dataset), "slab")


def test_unknown_category_rejected_by_params(dataset):
    with pytest.raises(ParamsError, match="data.categories: unknown category 'nosuch'"):
        parse_params({"data": {"root": str(dataset), "categories": ["nosuch"]}})


def test_failure_keeps_a_previous_complete_artifact(dataset):
    params = make_params(dataset)
    prepare.run(params, CAT)
    before = digest(layout.prepared(CAT))
    _truncate(_xyz(dataset, "stain"))
    with pytest.raises(InputError, match="stain/xyz/000.tiff"):
        prepare.run(params, CAT)
    assert digest(layout.prepared(CAT)) == before


def test_cli_reports_one_line_and_exits_non_zero(dataset, tmp_path):
    _truncate(_rgb(dataset, "stain"))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump({"data": {"root": str(dataset), "categories": [CAT], "size": 32},
                        "fewshot": {"shots": [1]}})
    )
    result = CliRunner().invoke(app, ["prepare", CAT, "--params", str(params_file)])
    assert result.exit_code == 1
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "error:" in output and "stain/rgb/000.png" in output
    assert not layout.prepared(CAT).exists()
    ok = CliRunner().invoke(app, ["prepare", CAT, "--params", str(params_file)])
    assert ok.exit_code == 1  # still damaged
    shutil.copy(tmp_path / "data" / CAT / "test" / "bump" / "rgb" / "000.png", _rgb(dataset, "stain"))
    ok = CliRunner().invoke(app, ["prepare", CAT, "--params", str(params_file)])
    assert ok.exit_code == 0, ok.output
    assert (layout.prepared(CAT) / "test.zarr" / "zarr.json").is_file()
