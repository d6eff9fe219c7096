"""The ``folder`` dataset layout (pipeline/data/folder.py): depth + intrinsics or xyz TIFFs,
gt optional, written by the demo generator with ``layout="folder"``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import open_store
from pipeline.data import list_samples, load_sample
from pipeline.data.demo import FOLDER_DEPTH_SCALE, write_demo_category
from pipeline.data.folder import Intrinsics, depth_to_xyz, read_intrinsics, xyz_to_depth
from pipeline.errors import InputError
from pipeline.params import parse_params
from pipeline.predict_input import find_samples
from stages import layout
from stages import prepare as prepare_stage

N_TRAIN, N_TEST = 2, 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """The demo category ``disc`` in both layouts, from the same seed."""
    root = tmp_path_factory.mktemp("folder-data")
    write_demo_category(root / "mvtec" / "disc", "disc", n_train=N_TRAIN, n_test=N_TEST,
                        n_validation=1)
    write_demo_category(root / "folder" / "disc", "disc", n_train=N_TRAIN, n_test=N_TEST,
                        n_validation=1, layout="folder")
    return root / "mvtec", root / "folder"


def test_depth_round_trip_is_the_pinhole_model() -> None:
    camera = Intrinsics(fx=500.0, fy=400.0, cx=3.0, cy=2.0, depth_scale=1e-3)
    depth = np.array([[0, 1000], [2000, 500]], dtype=np.uint16)
    xyz = depth_to_xyz(depth, camera)
    assert xyz[0, 0].tolist() == [0.0, 0.0, 0.0]  # no depth, no point
    np.testing.assert_allclose(xyz[1, 0], [(0 - 3) * 2.0 / 500, (1 - 2) * 2.0 / 400, 2.0])
    assert np.array_equal(xyz_to_depth(xyz, 1e-3), depth)


def test_folder_layout_reads_like_the_mvtec_layout(demo) -> None:
    mvtec, folder = demo
    for split in ("train", "validation", "test"):
        ours = list_samples("folder", folder, "disc", split)
        theirs = list_samples("mvtec3d", mvtec, "disc", split)
        assert [(r.id, r.label) for r in ours] == [(r.id, r.label) for r in theirs]
        assert all(r.depth is not None and r.xyz is None for r in ours)
    for ours, theirs in zip(list_samples("folder", folder, "disc", "test"),
                            list_samples("mvtec3d", mvtec, "disc", "test")):
        a, b = load_sample(ours), load_sample(theirs)
        assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.gt, b.gt)
        assert np.array_equal(a.xyz[..., 2] > 0, b.xyz[..., 2] > 0)
        # the depth image quantises z to half a unit; x and y scale with z
        np.testing.assert_allclose(a.xyz, b.xyz, atol=FOLDER_DEPTH_SCALE)


def test_xyz_tiffs_and_missing_masks_are_accepted(demo, tmp_path) -> None:
    mvtec, _ = demo
    root = tmp_path / "data"
    shutil.copytree(mvtec / "disc", root / "disc")
    for gt in (root / "disc" / "test").glob("*/gt"):
        if gt.parent.name != "good":
            shutil.rmtree(gt)
    refs = list_samples("folder", root, "disc", "test")
    assert all(r.xyz is not None for r in refs)
    assert [r.gt is None for r in refs if r.label == 1] == [True] * sum(r.label for r in refs)


def test_prepare_records_the_defects_without_masks(demo, tmp_path, monkeypatch) -> None:
    _, folder = demo
    root = tmp_path / "data"
    shutil.copytree(folder / "disc", root / "disc")
    defective = sorted(p for p in (root / "disc/test").iterdir() if p.name != "good")
    shutil.rmtree(defective[0] / "gt")
    monkeypatch.chdir(tmp_path)
    params = parse_params({"data": {"dataset": "folder", "root": "data", "categories": ["disc"]},
                           "fewshot": {"shots": [1], "seeds": [0]}})
    prepare_stage.run(params, "disc")
    test = open_store(layout.prepared("disc") / "test.zarr")
    missing = [i for i in test.attrs["ids"] if i.startswith(defective[0].name + "/")]
    assert test.attrs["no_gt"] == missing and missing
    assert test.attrs["dataset"] == "folder"


def test_bad_intrinsics_and_layouts_name_the_file(demo, tmp_path) -> None:
    _, folder = demo
    path = tmp_path / "intrinsics.json"
    path.write_text(json.dumps({"fx": 1.0, "fy": 1.0, "cx": 0, "cy": 0}))
    with pytest.raises(InputError, match=r"intrinsics.json: 'depth_scale' must be a number"):
        read_intrinsics(path)
    path.write_text(json.dumps({"fx": -1.0, "fy": 1.0, "cx": 0, "cy": 0, "depth_scale": 1}))
    with pytest.raises(InputError, match=r"intrinsics.json: 'fx' must be positive"):
        read_intrinsics(path)
    root = tmp_path / "data"
    shutil.copytree(folder / "disc", root / "disc")
    (root / "disc" / "intrinsics.json").unlink()
    ref = list_samples("folder", root, "disc", "train")[0]
    with pytest.raises(InputError, match=r"disc/intrinsics.json: camera intrinsics not found"):
        load_sample(ref)
    (root / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(InputError, match=r"empty/train: no samples"):
        list_samples("folder", root, "empty", "train")


def test_predict_input_finds_depth_samples_and_their_camera(demo) -> None:
    _, folder = demo
    refs = find_samples(folder / "disc" / "test")
    assert refs and all(r.depth_info == folder / "disc" / "intrinsics.json" for r in refs)
    assert load_sample(refs[0]).xyz.any()
