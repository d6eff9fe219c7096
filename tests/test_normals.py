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
