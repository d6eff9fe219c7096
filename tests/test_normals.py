"""Real normals from organised xyz against analytic normals and the k-d tree definition."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from pipeline.normals import BACKGROUND, decode_normals, encode_normals, estimate_normals

F = 300.0  # px; at 0.4 m about 1.3 mm per pixel
SIZE = 96


def rays(size: int = SIZE) -> np.ndarray:
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    return np.stack([(u - size / 2) / F, (v - size / 2) / F, np.ones_like(u)], axis=-1)


def render_sphere(centre=(0.004, -0.003, 0.40), radius=0.03):
    """Organised xyz of a sphere seen by the pinhole camera, and its outward normals."""
    r = rays()
    c = np.asarray(centre)
    # |t r - c|^2 = R^2: nearest root in t
    a = np.einsum("hwc,hwc->hw", r, r)
    b = -2 * r @ c
    disc = b * b - 4 * a * (c @ c - radius**2)
    hit = disc > 0
    t = np.where(hit, (-b - np.sqrt(np.where(hit, disc, 0))) / (2 * a), 0)
    xyz = r * t[..., None]
    xyz[~hit] = 0
    outward = (xyz - c) / radius
    return xyz.astype(np.float32), outward, hit


def render_plane(normal=(0.3, -0.2, -1.0), distance=0.4):
    r = rays()
    n = np.asarray(normal, float)
    n /= np.linalg.norm(n)
    p0 = np.array([0.0, 0.0, distance])
    t = (n @ p0) / (r @ n)
    xyz = r * t[..., None]
    return xyz.astype(np.float32), np.broadcast_to(n, xyz.shape)


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.einsum("...c,...c->...", a, b) / (
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    )
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def expected_convention(outward: np.ndarray) -> np.ndarray:
    """Published convention: orient towards the camera (outward here), then negate."""
    return -outward


def test_sphere_normals_match_analytic_away_from_silhouette():
    xyz, outward, hit = render_sphere()
    est = estimate_normals(xyz)
    inner = ndimage.binary_erosion(hit, iterations=4)
    err = angle_deg(est[inner], expected_convention(outward[inner]))
    assert inner.sum() > 500
    assert err.mean() < 2.0, err.mean()
    np.testing.assert_allclose(np.linalg.norm(est[hit], axis=-1), 1.0, atol=1e-5)
    assert (est[~hit] == BACKGROUND).all()


def test_tilted_plane_normals_and_sign_convention():
    xyz, n = render_plane()
    est = estimate_normals(xyz)
    inner = np.zeros(xyz.shape[:2], bool)
    inner[3:-3, 3:-3] = True
    # the plane normal (0.3, -0.2, -1) faces the camera; after the negation it points away
    err = angle_deg(est[inner], expected_convention(n[inner]))
    assert err.mean() < 2.0 and err.max() < 2.0
    assert (np.einsum("hwc,hwc->hw", est, xyz) >= 0).all()  # n . p >= 0 everywhere


def test_missing_points_are_not_used_as_neighbours():
    xyz, n = render_plane()
    holed = xyz.copy()
    rng = np.random.default_rng(0)
    holed[rng.uniform(size=xyz.shape[:2]) < 0.2] = 0
    est = estimate_normals(holed)
    valid = np.any(holed != 0, axis=-1)
    inner = valid.copy()
    inner[:3], inner[-3:], inner[:, :3], inner[:, -3:] = False, False, False, False
    assert angle_deg(est[inner], -n[inner]).max() < 2.0
    assert (est[~valid] == BACKGROUND).all()


def kdtree_normals(xyz: np.ndarray, radius: float = 0.01, max_nn: int = 30) -> np.ndarray:
    """The published definition: PCA of up to 30 neighbours within 1 cm, same orientation."""
    valid = np.any(xyz != 0, axis=-1)
    pts = xyz[valid].astype(np.float64)
    tree = cKDTree(pts)
    dist, idx = tree.query(pts, k=max_nn, distance_upper_bound=radius)
    out = np.zeros_like(pts)
    for i in range(len(pts)):
        nb = pts[idx[i][np.isfinite(dist[i])]]
        cov = np.cov((nb - nb.mean(axis=0)).T)
        n = np.linalg.eigh(cov)[1][:, 0]
        out[i] = n if n @ pts[i] >= 0 else -n
    full = np.zeros(xyz.shape, np.float64)
    full[..., 2] = 1
    full[valid] = out
    return full


def test_agrees_with_kdtree_neighbourhood_definition_on_smooth_surfaces():
    for xyz, hit in (render_sphere()[::2], (render_plane()[0], None)):
        if hit is None:
            hit = np.ones(xyz.shape[:2], bool)
        ours = estimate_normals(xyz)
        ref = kdtree_normals(xyz)
        inner = ndimage.binary_erosion(hit, iterations=4)
        assert angle_deg(ours[inner], ref[inner]).mean() < 1.0


def test_encoding_round_trip_and_range():
    xyz, _, _ = render_sphere()
    est = estimate_normals(xyz)
    enc = encode_normals(est)
    assert enc.min() >= 0 and enc.max() <= 1
    np.testing.assert_allclose(enc[0, 0], (0.5, 0.5, 1.0))  # background (0, 0, 1)
    np.testing.assert_allclose(decode_normals(enc), est, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The published estimator on full-resolution scans, against Open3D (the published library).

import pytest  # noqa: E402

from pipeline.data.demo import Camera, render_sample  # noqa: E402
from pipeline.data.preprocess import PreprocessConfig, clean_for_normals  # noqa: E402
from pipeline.normals import (  # noqa: E402
    PAD_ENCODED,
    estimate_normals_published,
    normal_image_published,
    resize_cubic_opencv,
)

PUBLISHED = PreprocessConfig(ransac_threshold=0.004, ransac_sample=50, ransac_iterations=1000)


def noisy_scan(h: int, w: int, focal: float, seed: int = 0) -> np.ndarray:
    """A demo scene (tilted support plane, object, 2% dropouts) plus 0.05 mm depth noise."""
    sample = render_sample("dome", Camera(h, w, focal), np.random.default_rng(seed), "bump")
    xyz = sample.xyz.astype(np.float64)
    valid = np.any(xyz != 0, axis=-1)
    noise = 1.0 + np.random.default_rng(seed + 1).normal(0, 5e-5, valid.shape) / xyz[..., 2].clip(0.1)
    xyz[valid] *= noise[valid, None]  # along the viewing ray
    return xyz.astype(np.float32)


def open3d_normals(xyz: np.ndarray, radius: float = 0.01, max_nn: int = 30) -> np.ndarray:
    o3d = pytest.importorskip("open3d")
    valid = np.any(xyz != 0, axis=-1)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[valid].astype(np.float64)))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=radius, max_nn=max_nn))
    pcd.orient_normals_towards_camera_location(np.zeros(3))
    out = np.zeros(xyz.shape, dtype=np.float64)
    out[valid] = -np.asarray(pcd.normals)  # then negated, as published
    return out


def test_published_normals_agree_with_open3d_away_from_edges():
    xyz = clean_for_normals(noisy_scan(300, 400, 1800.0), PUBLISHED, 0.005)
    ours = estimate_normals_published(xyz, 0.01, 30)
    ref = open3d_normals(xyz)
    valid = np.any(xyz != 0, axis=-1)
    inner = ndimage.binary_erosion(valid, iterations=6)
    err = angle_deg(ours[inner], ref[inner])
    print(f"open3d agreement on {inner.sum()} points: mean {err.mean():.4f}, "
          f"p99 {np.percentile(err, 99):.4f}, max {err.max():.4f} degrees")
    assert inner.sum() > 5000
    assert err.max() < 2.0, err.max()
    # the same orientation everywhere, edges included
    assert (np.einsum("hwc,hwc->hw", ours, xyz) >= 0).all()
    assert (ours[~valid] == BACKGROUND).all()


def test_published_normals_of_an_isolated_point_are_open3d_default():
    xyz = np.zeros((40, 40, 3), np.float32)
    xyz[20, 20] = (0.01, 0.02, 0.4)
    xyz[5, 5] = (0.05, 0.03, 0.4)
    ours = estimate_normals_published(xyz)
    ref = open3d_normals(xyz)
    np.testing.assert_allclose(ours[20, 20], ref[20, 20], atol=1e-6)
    np.testing.assert_allclose(ours[20, 20], (0, 0, 1), atol=1e-6)


def test_cleaning_matches_open3d_segment_plane_and_dbscan():
    o3d = pytest.importorskip("open3d")
    raw = noisy_scan(150, 200, 450.0, seed=3)
    ours = np.any(clean_for_normals(raw, PUBLISHED, 0.005) != 0, axis=-1)
    # The published steps with Open3D: border plane, removal within 0.005, largest DBSCAN label.
    o3d.utility.random.seed(0)
    valid = np.all(raw != 0, axis=-1)
    ring = np.zeros(valid.shape, bool)
    ring[:10], ring[-10:], ring[:, :10], ring[:, -10:] = True, True, True, True
    border = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(raw[ring & valid].astype(np.float64)))
    plane, _ = border.segment_plane(distance_threshold=0.004, ransac_n=50, num_iterations=1000)
    hom = np.concatenate([raw.reshape(-1, 3), np.ones((raw[..., 0].size, 1))], axis=1)
    left = valid & (np.abs(hom @ np.asarray(plane)).reshape(valid.shape) >= 0.005)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(raw[left].astype(np.float64)))
    labels = np.asarray(pcd.cluster_dbscan(eps=0.006, min_points=30))
    ids, sizes = np.unique(labels, return_counts=True)
    theirs = np.zeros(valid.shape, bool)
    theirs[left] = labels == ids[np.argmax(sizes)]
    iou = (ours & theirs).sum() / (ours | theirs).sum()
    print(f"kept points: ours {ours.sum()}, open3d {theirs.sum()}, IoU {iou:.4f}")
    assert theirs.sum() > 1000
    assert iou > 0.95, iou  # measured 0.961 (RANSAC draws differ; grid graph vs DBSCAN)


def test_published_normal_image_pads_with_the_published_colour_and_resizes_cubic():
    normals = np.zeros((60, 80, 3), np.float32)
    normals[:] = BACKGROUND
    img = normal_image_published(normals, 32)
    assert img.shape == (32, 32, 3)
    # background encodes to (127, 127, 255), the same as the pad: a uniform image stays uniform
    np.testing.assert_array_equal(img * 255, np.broadcast_to(PAD_ENCODED, img.shape))
    # OpenCV's cubic kernel (a = -0.75) at a 2x upscale of a step: overshoot of a = -0.75
    step = np.zeros((4, 4, 1), np.uint8)
    step[:, 2:] = 200
    up = resize_cubic_opencv(step, 8)[0, :, 0].astype(int)
    # taps at fraction 0.25 / 0.75: weights (-0.10546875, 0.87890625, 0.26171875, -0.03515625)
    assert up[3] == round(200 * (0.26171875 - 0.03515625))  # 45
    assert up[4] == round(200 * (0.87890625 - 0.10546875))  # 155 (mirror fraction 0.75)
    assert up[5] == round(200 * (1 + 0.10546875))  # 221: the cubic's overshoot, not clipped at 200


def test_closed_form_smallest_eigenvector_matches_eigh():
    from pipeline.normals import smallest_eigenvector

    rng = np.random.default_rng(3)
    # Covariances of flat, elongated and isotropic point sets, at the scale of a real scan
    # (mm offsets) and exactly degenerate ones (repeated eigenvalues take the eigh path).
    pts = rng.normal(size=(4000, 30, 3)) * rng.uniform(0, 1, size=(4000, 1, 3)) * 1e-3
    rot = np.linalg.qr(rng.normal(size=(4000, 3, 3)))[0]
    pts = pts @ rot
    dev = pts - pts.mean(axis=1, keepdims=True)
    cov = np.einsum("nka,nkb->nab", dev, dev) / 30
    cov[:10] = np.eye(3) * 2e-6
    cov[10:20] = np.diag([1e-6, 1e-6, 3e-6])
    cov[20] = 0.0
    ours = smallest_eigenvector(cov)
    vals, vecs = np.linalg.eigh(cov)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-9)
    # An eigenvector of the smallest eigenvalue: A v = lambda_min v (up to the matrix scale).
    residual = np.linalg.norm(np.einsum("nab,nb->na", cov, ours) - vals[:, :1] * ours, axis=1)
    scale = np.abs(cov).reshape(len(cov), -1).max(axis=1) + 1e-30
    assert (residual / scale).max() < 1e-6
    # Where the smallest eigenvalue is simple, the same line as eigh's.
    simple = (vals[:, 1] - vals[:, 0]) > 1e-3 * scale
    assert simple.sum() > 3900
    cos = np.abs(np.einsum("nc,nc->n", ours[simple], vecs[simple, :, 0]))
    assert cos.min() > 1 - 1e-9
