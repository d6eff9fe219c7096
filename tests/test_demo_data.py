"""The demo dataset generator: layout, content, defect kinds and determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.data.demo import (
    CATEGORIES,
    DEFECT_CODES,
    Camera,
    defect_plan,
    render_sample,
    write_demo_dataset,
    write_demo_eyecandies,
)
from pipeline.data.preprocess import PreprocessConfig, clean_points, valid_mask
from pipeline.outputs import MARKER


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, seed=0, categories=["disc", "slab"], n_train=3, n_test=4)
    return root


def test_mvtec_layout_and_file_formats(tiny):
    disc = tiny / "disc"
    assert sorted(p.name for p in (disc / "train" / "good" / "rgb").iterdir()) == [
        "000.png", "001.png", "002.png"
    ]
    assert (disc / "validation" / "good" / "xyz" / "000.tiff").is_file()
    assert sorted(p.name for p in (disc / "test").iterdir()) == [
        "bump", "contamination", "good", "stain"
    ]
    for kind in ("bump", "stain", "contamination"):
        for sub, ext in (("rgb", "png"), ("xyz", "tiff"), ("gt", "png")):
            assert (disc / "test" / kind / sub / f"000.{ext}").is_file()
    rgb = Image.open(disc / "train" / "good" / "rgb" / "000.png")
    assert rgb.mode == "RGB" and rgb.size == (320, 320)
    xyz = tifffile.imread(disc / "train" / "good" / "xyz" / "000.tiff")
    assert xyz.dtype == np.float32 and xyz.shape == (320, 320, 3)
    z = xyz[..., 2][valid_mask(xyz)]
    assert 0.3 < z.min() and z.max() < 0.5  # metres, camera 0.3-0.5 m away
    assert 0 < (~valid_mask(xyz)).sum() < 0.01 * xyz[..., 0].size  # a few missing points


def test_slab_is_non_square_and_has_no_good_gt_folder(tiny):
    rgb = np.asarray(Image.open(tiny / "slab" / "test" / "bump" / "rgb" / "000.png"))
    xyz = tifffile.imread(tiny / "slab" / "test" / "bump" / "xyz" / "000.tiff")
    assert rgb.shape == (360, 280, 3) and xyz.shape == (360, 280, 3)
    assert not (tiny / "slab" / "test" / "good" / "gt").exists()
    good_gt = np.asarray(Image.open(tiny / "disc" / "test" / "good" / "gt" / "000.png"))
    assert good_gt.shape == (320, 320) and not good_gt.any()


def test_gt_is_class_coded_per_defect_type(tiny):
    for kind in ("bump", "stain", "contamination"):
        gt = np.asarray(Image.open(tiny / "disc" / "test" / kind / "gt" / "000.png"))
        assert set(np.unique(gt)) == {0, DEFECT_CODES[kind]}
        assert 30 < (gt > 0).sum() < 0.05 * gt.size


def test_xyz_is_a_pinhole_rendering_registered_to_pixels(tiny):
    spec = CATEGORIES["slab"]
    h, w = spec["shape"]
    xyz = tifffile.imread(tiny / "slab" / "train" / "good" / "xyz" / "001.tiff").astype(np.float64)
    v, u = np.nonzero(valid_mask(xyz))
    p = xyz[v, u]
    np.testing.assert_allclose(p[:, 0] / p[:, 2] * spec["focal"] + w / 2, u, atol=1e-3)
    np.testing.assert_allclose(p[:, 1] / p[:, 2] * spec["focal"] + h / 2, v, atol=1e-3)


def test_objects_sit_on_a_removable_support_plane_and_vary(tiny):
    cfg = PreprocessConfig()
    masks = []
    for i in range(3):
        xyz = tifffile.imread(tiny / "disc" / "train" / "good" / "xyz" / f"{i:03d}.tiff")
        obj = valid_mask(clean_points(xyz, cfg))
        assert 0.03 < obj.mean() < 0.5  # the plane is gone, one object remains
        assert not obj[:10].any() and not obj[:, :10].any()
        masks.append(obj)
    assert len({int(m.sum()) for m in masks}) == 3  # sizes/poses differ between samples
    rgbs = [np.asarray(Image.open(tiny / "disc" / "train" / "good" / "rgb" / f"{i:03d}.png"))
            for i in range(2)]
    colours = [rgb[m].mean(axis=0) for rgb, m in zip(rgbs, masks[:2])]
    assert np.abs(colours[0] - colours[1]).max() > 3  # texture/colour varies


@pytest.mark.parametrize(
    ("kind", "changes_xyz", "changes_colour"),
    [("bump", True, False), ("dent", True, False), ("stain", False, True),
     ("contamination", True, True)],
)
def test_defect_kinds_change_geometry_and_or_colour(kind, changes_xyz, changes_colour):
    camera = Camera(160, 160, 450.0)
    clean = render_sample("disc", camera, np.random.default_rng(5), None, dropout=0.0)
    bad = render_sample("disc", camera, np.random.default_rng(5), kind, dropout=0.0)
    assert not clean.gt.any() and bad.gt.sum() > 10
    dz = np.abs(bad.xyz[..., 2] - clean.xyz[..., 2])
    assert (dz.max() > 0.001) == changes_xyz
    assert (dz[~bad.gt] < 0.0005).all()  # geometry changes (almost) only inside the gt
    # the defect is visible in the rgb image: by shading (geometry) and/or albedo (colour)
    diff = np.abs(bad.rgb.astype(int) - clean.rgb.astype(int)).max(axis=-1)
    assert diff[bad.gt].mean() > 8
    assert (diff[~bad.gt] == 0).mean() > 0.95 and diff[~bad.gt].mean() < 1
    dalbedo = np.abs(bad.albedo - clean.albedo).max(axis=-1)[bad.gt].mean()
    assert (dalbedo > 0.1) == changes_colour, dalbedo
    if not changes_colour:
        assert dalbedo < 0.03


def test_test_split_is_about_a_third_good_with_all_kinds():
    plan = defect_plan(24)
    assert plan.count("good") == 8
    assert {k: plan.count(k) for k in DEFECT_CODES} == {k: 4 for k in DEFECT_CODES}
    assert set(defect_plan(4)) == {"good", "bump", "stain", "contamination"}


def test_generator_is_byte_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 1), (b, 1), (c, 2)):
        write_demo_dataset(root, seed=seed, categories=["dome"], n_train=2, n_test=2,
                           n_validation=0)
    da, db, dc = tree_digest(a), tree_digest(b), tree_digest(c)
    assert len(da) == 2 * 2 + 2 * 3  # train rgb+xyz; test rgb+xyz+gt (good gt all zero)
    assert da == db
    assert set(da) == set(dc) and all(da[k] != dc[k] for k in da if "good/gt" not in k)


def test_eyecandies_generator_is_deterministic(tmp_path):
    for name in ("a", "b"):
        write_demo_eyecandies(tmp_path / name, seed=3, n_train=1, n_validation=0, n_test=2, size=48)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    masks = sorted((tmp_path / "a").rglob("*_mask.png"))
    assert [m.name for m in masks] == ["00_mask.png", "01_mask.png"]
    assert not np.asarray(Image.open(masks[0])).any() and np.asarray(Image.open(masks[1])).any()


def test_a_category_does_not_depend_on_the_others(tmp_path):
    # the demo_data stage writes one category per instance
    write_demo_dataset(tmp_path / "all", seed=0, categories=["disc", "slab"], n_train=2, n_test=3)
    write_demo_dataset(tmp_path / "one", seed=0, categories=["slab"], n_train=2, n_test=3)
    assert tree_digest(tmp_path / "all/slab") == tree_digest(tmp_path / "one/slab")


def test_demo_data_command_writes_categories_atomically(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    out = tmp_path / "data/demo"
    args = ["demo-data", str(out), "--category", "dome", "--n-train", "2", "--n-test", "3"]
    assert CliRunner().invoke(app, args).exit_code == 0
    write_demo_dataset(tmp_path / "ref", seed=0, categories=["dome"], n_train=2, n_test=3)
    (tmp_path / "ref/dome" / MARKER).write_text("written by cmds-ad demo-data\n")
    assert tree_digest(out / "dome") == tree_digest(tmp_path / "ref/dome")  # data + marker
    assert sorted(p.name for p in out.iterdir()) == ["dome"]  # no temporary left
    # a second run replaces its own folder whole
    (out / "dome/stray.txt").write_text("x")
    assert CliRunner().invoke(app, args).exit_code == 0
    assert tree_digest(out / "dome") == tree_digest(tmp_path / "ref/dome")
    bad = CliRunner().invoke(app, ["demo-data", str(out), "--category", "disk"])
    assert bad.exit_code == 1 and "unknown demo category 'disk'" in bad.output


def test_params_know_the_demo_categories():
    from typing import get_args

    from pipeline.params import DemoCategory

    assert set(get_args(DemoCategory)) == set(CATEGORIES)
