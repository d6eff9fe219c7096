"""What ``cmds-ad predict --input PATH`` finds (pipeline/predict_input.py), on the demo
generator's MVTec 3D-AD layout; no model runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.data import list_samples, load_sample
from pipeline.data.demo import write_demo_category
from pipeline.errors import InputError
from pipeline.predict_input import check_sizes, find_samples
from pipeline.prediction import to_input_resolution


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("input") / "disc"
    return write_demo_category(root, "disc", n_train=1, n_test=4, n_validation=0)


def test_a_test_folder_gives_the_readers_ids_and_files(category) -> None:
    ours = find_samples(category / "test")
    theirs = list_samples("mvtec3d", category.parent, "disc", "test")
    assert [(r.id, r.label, r.rgb, r.xyz, r.gt) for r in ours] == \
        [(r.id, r.label, r.rgb, r.xyz, r.gt) for r in theirs]


def test_one_group_and_one_file(category) -> None:
    good = find_samples(category / "test" / "good")
    assert [r.id for r in good] == [f"good/{i:03d}" for i in range(len(good))]
    (one,) = find_samples(category / "test" / "good" / "rgb" / "000.png")
    assert one == good[0]


def test_bad_paths_are_one_error_naming_the_path(category, tmp_path) -> None:
    with pytest.raises(InputError, match="nothing: --input not found"):
        find_samples(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no samples found"):
        find_samples(tmp_path / "empty")
    with pytest.raises(InputError, match=r"000.tiff: not an rgb/<stem>.png image"):
        find_samples(category / "test" / "good" / "xyz" / "000.tiff")
    lonely = tmp_path / "lonely" / "rgb"
    lonely.mkdir(parents=True)
    (lonely / "007.png").write_bytes((category / "test/good/rgb/000.png").read_bytes())
    with pytest.raises(InputError, match=r"lonely/xyz/007.tiff: xyz point cloud not found"):
        find_samples(tmp_path / "lonely")


def test_sizes_are_checked_from_the_headers_as_the_reader_checks_them(category, tmp_path) -> None:
    """check_sizes refuses what load_sample refuses, with the same message, and passes the rest
    (a planar TIFF: its header's size, not its array's first axes)."""
    good = category / "test" / "good"
    check_sizes(find_samples(good))
    xyz = tifffile.imread(good / "xyz/000.tiff")
    cases = {"cloud": ("xyz/000.tiff", lambda: tifffile.imwrite(
                 tmp_path / "cloud/xyz/000.tiff", xyz[:-2], photometric="rgb")),
             "mask": ("gt/000.png", lambda: Image.new("L", (xyz.shape[1] + 1, xyz.shape[0])).save(
                 tmp_path / "mask/gt/000.png"))}
    for name, (path, spoil) in cases.items():
        shutil.copytree(good, tmp_path / name)  # with gt/: the demo's good samples have masks
        spoil()
        (ref,) = [r for r in find_samples(tmp_path / name) if r.id == f"{name}/000"]
        with pytest.raises(InputError) as from_reader:
            load_sample(ref)
        with pytest.raises(InputError) as from_headers:
            check_sizes([ref])
        assert str(from_headers.value) == str(from_reader.value)
        assert f"{name}/{path}: " in str(from_headers.value), from_headers.value
    planar = tmp_path / "planar"
    shutil.copytree(good, planar)
    tifffile.imwrite(planar / "xyz/000.tiff", np.moveaxis(xyz, -1, 0), planarconfig="separate",
                     photometric="rgb")
    check_sizes(find_samples(planar))


def test_maps_go_back_to_the_input_resolution() -> None:
    """Undo pad-to-square + resize: a map that marks the square's middle rows marks the same
    rows of a wide input, and the padding is cut off."""
    amap = np.zeros((8, 8), dtype=np.float32)
    amap[2:6] = 1.0  # the rows of a 16 x 8 input padded by 4 above and below in a 16 x 16 square
    back = to_input_resolution(amap, 8, 16)
    assert back.shape == (8, 16) and back.dtype == np.float32
    assert back[1:-1].min() > 0.5 and back.max() <= 1.0
