"""Readers for MVTec 3D-AD and Eyecandies layouts, on generated and hand-made files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from pipeline.data import list_samples, load_sample, read_rgb
from pipeline.data.demo import write_demo_dataset, write_demo_eyecandies
from pipeline.data.eyecandies import FOCAL_LENGTH
from pipeline.errors import InputError


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, categories=["disc", "slab"], n_train=3, n_test=4, n_validation=1)
    return root


def test_mvtec_listing_ids_labels_and_paths(demo):
    train = list_samples("mvtec3d", demo, "disc", "train")
    assert [r.id for r in train] == ["good/000", "good/001", "good/002"]
    assert all(r.label == 0 and r.gt is None for r in train)
    test = list_samples("mvtec3d", demo, "disc", "test")
    ids = [r.id for r in test]
    assert ids == sorted(ids) and len(ids) == 4
    by_type = {r.defect_type: r for r in test}
    assert set(by_type) == {"good", "bump", "stain", "contamination"}
    assert by_type["good"].label == 0 and by_type["bump"].label == 1
    assert by_type["bump"].xyz.suffix == ".tiff" and by_type["bump"].gt.name == "000.png"
    assert len(list_samples("mvtec3d", demo, "disc", "validation")) == 1


def test_mvtec_gt_is_class_coded_and_binarised(demo):
    ref = next(r for r in list_samples("mvtec3d", demo, "disc", "test") if r.defect_type == "stain")
    raw_png = np.asarray(Image.open(ref.gt))
    assert set(np.unique(raw_png)) == {0, 254}  # a class code, not 0/255
    sample = load_sample(ref)
    assert sample.gt.dtype == bool
    np.testing.assert_array_equal(sample.gt, raw_png > 0)
    assert sample.rgb.dtype == np.uint8 and sample.rgb.shape == (320, 320, 3)
    assert sample.xyz.dtype == np.float32 and sample.xyz.shape == (320, 320, 3)


def test_good_test_gt_all_zero_or_missing(demo):
    good_disc = next(r for r in list_samples("mvtec3d", demo, "disc", "test") if r.label == 0)
    assert good_disc.gt is not None and good_disc.gt.is_file()  # all-zero mask present
    assert not load_sample(good_disc).gt.any()
    good_slab = next(r for r in list_samples("mvtec3d", demo, "slab", "test") if r.label == 0)
    assert good_slab.gt is None  # folder missing, as in some MVTec categories
    sample = load_sample(good_slab)
    assert sample.gt.shape == (360, 280) and not sample.gt.any()


def test_non_square_images_keep_their_shape(demo):
    ref = list_samples("mvtec3d", demo, "slab", "train")[0]
    sample = load_sample(ref)
    assert sample.rgb.shape == (360, 280, 3) and sample.xyz.shape == (360, 280, 3)
    np.testing.assert_array_equal(read_rgb(ref.rgb), sample.rgb)


def test_sparse_nan_is_missing_point_but_all_nan_is_an_error(tmp_path, demo):
    ref = list_samples("mvtec3d", demo, "disc", "train")[0]
    xyz = tifffile.imread(ref.xyz)
    holed = xyz.copy()
    holed[10:12, 10:20] = np.nan
    path = tmp_path / "holed.tiff"
    tifffile.imwrite(path, holed, photometric="rgb")
    from pipeline.data.mvtec import read_xyz

    got = read_xyz(path)
    assert np.isfinite(got).all()
    assert not got[10:12, 10:20].any()
    np.testing.assert_array_equal(got[20:], xyz[20:])
    tifffile.imwrite(path, np.full_like(xyz, np.nan), photometric="rgb")
    with pytest.raises(InputError, match="holed.tiff.*no valid point"):
        read_xyz(path)


def test_rgb_reader_rejects_16_bit_and_accepts_grey(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)).save(grey)
    rgb = read_rgb(grey)
    assert rgb.shape == (3, 4, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((3, 4), 1000, dtype=np.uint16)).save(deep)
    with pytest.raises(InputError, match="deep.png"):
        read_rgb(deep)


def _write_eyecandies_sample(data: Path, stem: str, depth16: np.ndarray, lo: float, hi: float,
                             mask: np.ndarray | None) -> None:
    data.mkdir(parents=True, exist_ok=True)
    h, w = depth16.shape
    for j in range(6):
        Image.fromarray(np.full((h, w, 3), 40 * j, dtype=np.uint8)).save(data / f"{stem}_image_{j}.png")
    Image.fromarray(depth16).save(data / f"{stem}_depth.png")
    (data / f"{stem}_info_depth.yaml").write_text(
        yaml.safe_dump({"normalization": {"min": lo, "max": hi}})
    )
    if mask is not None:
        Image.fromarray(mask).save(data / f"{stem}_mask.png")


def test_eyecandies_depth_to_metric_xyz(tmp_path):
    h, w = 6, 8
    depth16 = (np.arange(h * w, dtype=np.uint16).reshape(h, w) * 1000).astype(np.uint16)
    lo, hi = 0.4, 0.9
    _write_eyecandies_sample(tmp_path / "GummyBear" / "train" / "data", "000", depth16, lo, hi, None)
    (ref,) = list_samples("eyecandies", tmp_path, "GummyBear", "train")
    assert ref.id == "good/000" and ref.rgb.name == "000_image_4.png"
    sample = load_sample(ref)
    assert (sample.rgb == 160).all()  # image_4, not another lighting
    z = depth16 / 65535.0 * (hi - lo) + lo
    np.testing.assert_allclose(sample.xyz[..., 2], z, rtol=1e-6)
    u, v = 7, 5  # principal point at the image centre (w / 2, h / 2)
    np.testing.assert_allclose(sample.xyz[v, u, 0], (u - w / 2) * z[v, u] / FOCAL_LENGTH, rtol=1e-5)
    np.testing.assert_allclose(sample.xyz[v, u, 1], (v - h / 2) * z[v, u] / FOCAL_LENGTH, rtol=1e-5)
    assert sample.xyz[h // 2, w // 2, 0] == 0 and sample.xyz[h // 2, w // 2, 1] == 0


def test_eyecandies_test_public_labels_from_masks(tmp_path):
    data = tmp_path / "Lollipop" / "test_public" / "data"
    depth = np.full((4, 5), 30000, dtype=np.uint16)
    bad = np.zeros((4, 5), np.uint8)
    bad[1, 2] = 255
    _write_eyecandies_sample(data, "00", depth, 0.5, 0.6, np.zeros((4, 5), np.uint8))
    _write_eyecandies_sample(data, "01", depth, 0.5, 0.6, bad)
    refs = list_samples("eyecandies", tmp_path, "Lollipop", "test")
    assert [(r.id, r.label) for r in refs] == [("bad/01", 1), ("good/00", 0)]
    assert load_sample(refs[0]).gt.sum() == 1
    (data / "00_info_depth.yaml").write_text("normalization: [1, 2]\n")
    with pytest.raises(InputError, match="00_info_depth.yaml"):
        load_sample(refs[1])


def test_eyecandies_generated_layout_round_trip(tmp_path):
    write_demo_eyecandies(tmp_path, n_train=2, n_validation=1, n_test=2, size=64)
    data = tmp_path / "GummyBear" / "train" / "data"
    names = {p.name for p in data.iterdir() if p.name.startswith("000_")}
    expected = {f"000_image_{j}.png" for j in range(6)} | {
        "000_depth.png", "000_info_depth.yaml", "000_normals.png", "000_pose.txt"
    }
    assert names == expected
    assert Image.open(data / "000_depth.png").mode.startswith("I;16")
    train = list_samples("eyecandies", tmp_path, "GummyBear", "train")
    assert len(train) == 2
    test = list_samples("eyecandies", tmp_path, "GummyBear", "test")
    assert sorted(r.label for r in test) == [0, 1]
    assert len(list_samples("eyecandies", tmp_path, "GummyBear", "validation")) == 1
    sample = load_sample(train[0])
    z = sample.xyz[..., 2]
    assert sample.xyz.shape == (64, 64, 3) and 0.3 < z.min() and z.max() < 0.5


@pytest.mark.parametrize(
    ("dataset", "make", "match"),
    [
        ("mvtec3d", lambda root: None, "dataset root not found"),
        ("mvtec3d", lambda root: (root / "disc").mkdir(parents=True), "train.*split folder not found"),
        ("mvtec3d", lambda root: (root / "other").mkdir(parents=True), "unknown category 'disc'"),
        ("eyecandies", lambda root: (root / "disc" / "train").mkdir(parents=True),
         "not in the Eyecandies layout"),
    ],
)
def test_layout_errors(tmp_path, dataset, make, match):
    root = tmp_path / "root"
    make(root)
    with pytest.raises(InputError, match=match):
        list_samples(dataset, root, "disc", "train")


@pytest.mark.parametrize(("folder", "first", "second", "ambiguous"), [
    ("xyz", "000.tif", "000.tiff", True),  # which cloud is the sample's? (one is another's)
    ("rgb", "000.PNG", "000.png", True),
    ("gt", "000.png", "000.png.bak", False),  # another stem: not a file of the sample
])
def test_two_files_of_one_sample_are_an_error_naming_both(demo, tmp_path, folder, first, second,
                                                          ambiguous):
    import shutil

    root = tmp_path / "demo"
    shutil.copytree(demo / "disc", root / "disc")
    sample = root / "disc/test/bump" / folder
    source = next(sample.iterdir())
    for name in (first, second):
        if not (sample / name).exists():
            shutil.copy(source, sample / name)
    if not ambiguous:
        assert len(list_samples("mvtec3d", root, "disc", "test")) == 4
        return
    with pytest.raises(InputError) as err:
        list_samples("mvtec3d", root, "disc", "test")
    assert f"{sample / first} and {second}: two" in str(err.value)


def test_eyecandies_item_with_two_extensions_is_an_error_naming_both(tmp_path):
    write_demo_eyecandies(tmp_path, n_train=2, n_validation=1, n_test=2, size=32)
    data = tmp_path / "GummyBear" / "train" / "data"
    (data / "001_depth.tiff").write_bytes((data / "001_depth.png").read_bytes())
    with pytest.raises(InputError, match=rf"{data / '001_depth.png'} and 001_depth.tiff: two "
                                         "depth image files"):
        list_samples("eyecandies", tmp_path, "GummyBear", "train")
    (data / "001_depth.tiff").unlink()
    (data / "000_normals.exr").write_bytes(b"")  # an item that is not read: not ambiguous
    assert len(list_samples("eyecandies", tmp_path, "GummyBear", "train")) == 2
