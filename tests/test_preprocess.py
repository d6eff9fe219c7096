"""Preprocessing steps 1-4 on small synthetic organised clouds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import DBSCAN

from pipeline.data import list_samples, load_sample
from pipeline.data.demo import write_demo_dataset
from pipeline.data.preprocess import (
    PreprocessConfig,
    fit_plane_ransac,
    foreground,
    largest_cluster,
    pad_square,
    preprocess,
    remove_plane,
    resize_nearest,
    resize_rgb,
    valid_mask,
)

F = 270.0  # focal length (px): about 1.5 mm per pixel at 0.4 m


def scene(h: int = 80, w: int = 100, seed: int = 0):
    """A tilted support plane with a raised 20x20 box, a 12x12 patch, a 5x5 blob and specks."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    ray_x, ray_y = (u - w / 2) / F, (v - h / 2) / F
    # plane n . X = d with a tilt, solved for depth along each ray
    n = np.array([0.15, -0.1, -1.0])
    n /= np.linalg.norm(n)
    d = n @ np.array([0.0, 0.0, 0.4])
    z = d / (n[0] * ray_x + n[1] * ray_y + n[2])
    raised = np.zeros((h, w))
    box = np.zeros((h, w), bool)
    box[30:50, 40:60] = True
    raised[box] = 0.02
    raised[10:22, 75:87] = 0.015  # a second, smaller object
    raised[62:67, 15:20] = 0.02  # a small blob, below DBSCAN's 30 points
    specks = rng.uniform(size=(h, w)) < 0.01
    specks &= raised == 0
    raised[specks] = 0.03
    z = z - raised
    xyz = np.stack([ray_x * z, ray_y * z, z], axis=-1).astype(np.float32)
    holes = rng.uniform(size=(h, w)) < 0.01
    holes[box] = False
    xyz[holes] = 0
    return xyz, box


def test_ransac_plane_removes_support_and_keeps_objects():
    xyz, box = scene()
    out = remove_plane(xyz, border=10, distance=0.005, iterations=100, seed=0)
    left = valid_mask(out)
    assert left[box].all()
    assert left.sum() < 2 * box.sum()  # the plane (most pixels) is gone
    # every removed point was within 5 mm of the support plane, every kept one is not
    plane = fit_plane_ransac(xyz[:10].reshape(-1, 3), 0.001, 50, np.random.default_rng(1))
    normal, offset = plane
    dist = np.abs(xyz.astype(np.float64) @ normal + offset)
    valid = valid_mask(xyz)
    assert (dist[valid & ~left] < 0.005).all() and (dist[left] >= 0.005).all()
    again = remove_plane(xyz, border=10, distance=0.005, iterations=100, seed=0)
    np.testing.assert_array_equal(out, again)


def test_ransac_tolerates_outliers_in_the_border():
    xyz, _ = scene()
    noisy = xyz.copy()
    noisy[:3, :] += np.float32(0.05)  # a band of outliers in the border ring
    out = remove_plane(noisy, border=10, distance=0.005, iterations=200, seed=3)
    clean = remove_plane(xyz, border=10, distance=0.005, iterations=200, seed=3)
    np.testing.assert_array_equal(valid_mask(out)[3:], valid_mask(clean)[3:])
    assert valid_mask(out)[:3].all() or valid_mask(out)[:3].sum() > 0.9 * 3 * 100


def test_largest_cluster_keeps_only_the_biggest_object():
    xyz, box = scene()
    planeless = remove_plane(xyz, 10, 0.005, 100, 0)
    kept = valid_mask(largest_cluster(planeless, eps=0.006, min_points=30))
    np.testing.assert_array_equal(kept, box)
    # when even the largest component is below min_points, nothing is kept
    assert not largest_cluster(planeless, eps=0.006, min_points=1000).any()


def _dbscan_largest(xyz: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    valid = valid_mask(xyz)
    labels = DBSCAN(eps=eps, min_samples=min_points).fit_predict(xyz[valid].astype(np.float64))
    out = np.zeros(valid.shape, bool)
    if (labels >= 0).any():
        best = np.bincount(labels[labels >= 0]).argmax()
        out[valid] = labels == best
    return out


def test_grid_clustering_agrees_with_sklearn_dbscan_on_synthetic_cloud():
    xyz, _ = scene(seed=4)
    planeless = remove_plane(xyz, 10, 0.005, 100, 0)
    ours = valid_mask(largest_cluster(planeless, 0.006, 30))
    theirs = _dbscan_largest(planeless, 0.006, 30)
    assert theirs.sum() > 300
    np.testing.assert_array_equal(ours, theirs)


def test_grid_clustering_agrees_with_sklearn_dbscan_on_demo_sample(tmp_path):
    write_demo_dataset(tmp_path, categories=["dome"], n_train=1, n_test=0, n_validation=0)
    raw = load_sample(list_samples("mvtec3d", tmp_path, "dome", "train")[0])
    planeless = remove_plane(raw.xyz, 10, 0.005, 200, 0)
    ours = valid_mask(largest_cluster(planeless, 0.006, 30))
    theirs = _dbscan_largest(planeless, 0.006, 30)
    assert theirs.sum() > 1000
    np.testing.assert_array_equal(ours, theirs)


def test_pad_square_centres_and_fills():
    a = np.arange(6 * 4, dtype=np.float32).reshape(6, 4) + 1
    p = pad_square(a, 0)
    assert p.shape == (6, 6)
    np.testing.assert_array_equal(p[:, 1:5], a)
    assert not p[:, 0].any() and not p[:, 5].any()
    rgb = np.full((3, 5, 3), 200, np.uint8)
    q = pad_square(rgb, 0)
    assert q.shape == (5, 5, 3) and (q[1:4] == 200).all() and not q[0].any() and not q[4].any()


def test_resize_nearest_samples_pixel_centres():
    a = np.arange(16).reshape(4, 4)
    np.testing.assert_array_equal(resize_nearest(a, 2), [[5, 7], [13, 15]])
    up = resize_nearest(a, 8)
    np.testing.assert_array_equal(up[::2, ::2], a)
    np.testing.assert_array_equal(up[1::2, 1::2], a)


def test_foreground_is_points_dilated_by_one_pixel():
    xyz = np.zeros((7, 7, 3), np.float32)
    xyz[3, 3] = (0.0, 0.0, 0.4)
    fg = foreground(xyz)
    assert fg.dtype == np.uint8
    expected = np.zeros((7, 7), np.uint8)
    expected[2:5, 2:5] = 1
    np.testing.assert_array_equal(fg, expected)


def test_preprocess_non_square_sample_end_to_end():
    xyz, box = scene()  # 80 x 100
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)
    gt = np.zeros((80, 100), bool)
    gt[35:40, 45:50] = True
    cfg = PreprocessConfig(size=50, ransac_iterations=100)
    out = preprocess(rgb, xyz, gt, cfg)
    assert out.rgb.shape == (50, 50, 3) and out.rgb.dtype == np.uint8
    assert out.xyz.shape == (50, 50, 3) and out.xyz.dtype == np.float32
    assert out.gt.dtype == np.uint8 and set(np.unique(out.gt)) == {0, 1}
    # 100 wide -> padded to 100 x 100 with 10 rows of black on top and bottom -> 50: 5 rows,
    # of which the bicubic kernel (radius 4 source rows here) leaves the first 3 untouched
    assert not out.rgb[:3].any() and not out.rgb[-3:].any() and out.rgb[5:45].all(axis=-1).mean() > 0.9
    points = valid_mask(out.xyz)
    expected = resize_nearest(pad_square(box.astype(np.uint8)), 50).astype(bool)
    np.testing.assert_array_equal(points, expected)
    assert (out.gt <= out.fg).all() and out.fg.sum() > points.sum()
    np.testing.assert_array_equal(out.fg, foreground(out.xyz))


@pytest.mark.parametrize("seed", [0, 7])
def test_preprocess_is_deterministic(seed):
    xyz, _ = scene(seed=1)
    rgb = np.zeros((80, 100, 3), np.uint8)
    gt = np.zeros((80, 100), bool)
    cfg = PreprocessConfig(size=40, seed=seed)
    a, b = preprocess(rgb, xyz, gt, cfg), preprocess(rgb, xyz, gt, cfg)
    np.testing.assert_array_equal(a.xyz, b.xyz)
    np.testing.assert_array_equal(a.fg, b.fg)


def test_published_foreground_equals_the_torch_pools():
    import torch

    from pipeline.data.preprocess import foreground_published

    rng = np.random.default_rng(0)
    for h, w in ((300, 400), (512, 512)):
        xyz = np.zeros((h, w, 3), np.float32)
        xyz[50:120, 60:200] = 1.0
        xyz[rng.uniform(size=(h, w)) < 0.002] = 1.0
        s = max(h, w)
        pad = np.zeros((s, s, 3), np.float32)
        pad[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = xyz
        x = torch.from_numpy(pad).permute(2, 0, 1)[None]
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        x = torch.nn.AdaptiveAvgPool2d((224, 224))(torch.nn.AvgPool2d(3, 1)(x))
        ref = (x[0].sum(0) != 0).numpy()
        np.testing.assert_array_equal(foreground_published(xyz, 224).astype(bool), ref)


def test_normals_plane_distance_per_category_and_validation():
    import pytest

    from pipeline.data.preprocess import PreprocessConfig
    from pipeline.errors import ParamsError
    from pipeline.params import parse_params

    data = {"categories": ["dowel", "bagel"], "normals_plane_distance": {"default": 0.005, "dowel": 0.002}}
    p = parse_params({"data": data})
    assert PreprocessConfig.from_params(p.data, "dowel").normals_plane_distance == 0.002
    assert PreprocessConfig.from_params(p.data, "bagel").normals_plane_distance == 0.005
    with pytest.raises(ParamsError, match="normals_plane_distance"):
        parse_params({"data": {"categories": ["dowel"], "normals_plane_distance": {"dowel": 0.002}}})


def _known_image(size: int = 800) -> np.ndarray:
    """Gradients plus sharp stripes and a disc: a resize filter shows in every region."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = ((np.arange(size) // 3) % 2 * 255)[None, :].repeat(size, 0)
    disc = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.1) * 200
    return np.stack([xx * 255, stripes, disc + yy * 55], -1).astype(np.uint8)


def test_bilinear_rgb_resize_is_torchvisions_default_resize():
    """Published RGB resize (OFFICIAL 16): transforms.Resize((224, 224)) of the PIL image."""
    from PIL import Image
    from torchvision import transforms

    image = _known_image()
    published = np.asarray(transforms.Resize((224, 224))(Image.fromarray(image)))
    np.testing.assert_array_equal(resize_rgb(image, 224, "bilinear"), published)
    bicubic = resize_rgb(image, 224, "bicubic")
    assert np.abs(bicubic.astype(int) - published).max() > 10  # bicubic sharpens the stripes

    xyz = np.zeros((800, 800, 3), np.float32)
    xyz[300:500, 300:500] = [0.0, 0.0, 0.5]
    gt = np.zeros((800, 800), bool)
    for kernel, expected in (("bilinear", published), ("bicubic", bicubic)):
        cfg = PreprocessConfig(size=224, clean_xyz=False, rgb_interpolation=kernel)
        np.testing.assert_array_equal(preprocess(image, xyz, gt, cfg).rgb, expected)
