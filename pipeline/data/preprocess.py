"""Per-sample preprocessing (DESIGN 1.1, steps 1-4).

1. Support-plane removal: RANSAC plane on the valid points of a ``plane_border``-pixel border,
   seeded; every point closer than ``plane_distance`` to it becomes (0, 0, 0).
2. Largest connected cluster. The published code runs DBSCAN (eps 0.006 m, min 30 points) on
   the unorganised cloud. On the organised grid we build the graph that links each valid pixel
   to its 8 grid neighbours whose 3D distance is <= eps and keep its largest connected
   component (if it has at least ``min_points`` points). This is the same cluster as DBSCAN's
   whenever the object is a grid-connected surface sampled more densely than eps (tested
   against sklearn), and runs in milliseconds instead of seconds.
3. Pad to a square, centred (xyz and gt with zeros, rgb with black = 0), then resize to
   ``size``: rgb with PIL's bicubic or bilinear filter (``rgb_interpolation``; bilinear is
   torchvision's default ``Resize`` of a PIL image, the published one), xyz and gt nearest
   (pixel-centre sampling).
4. Foreground: pixels with a non-zero point after 1-3, dilated by one pixel (3 x 3)
   (``foreground: dilated``), or as published (``foreground: published``): the cleaned
   full-resolution xyz padded and resized bilinearly to ``size``, a 3 x 3 average pool (no
   padding) and an adaptive average pool back to ``size``; foreground = non-zero.

Real normals (``normals``): ``grid`` = the windowed PCA on the ``size`` xyz; ``published`` =
the published script: its own plane removal (distance per category,
``normals_plane_distance``) and clustering of the raw full-resolution xyz, the metric
neighbourhood on the full grid, uint8 encoding, (127, 127, 255) pad, OpenCV-cubic resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

# scipy is imported where the point-cloud cleaning needs it: the diffusion stages import this
# module only for pad_square and pay no scipy start-up (benchmarks/imports.py)

if TYPE_CHECKING:
    from pipeline.params import DataParams

RGB_PAD_VALUE = 0  # black: the padded band has no point, so it is background anyway


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 224
    plane_border: int = 10
    plane_distance: float = 0.005
    ransac_iterations: int = 200
    cluster_eps: float = 0.006
    cluster_min_points: int = 30
    seed: int = 0
    ransac_threshold: float | None = None  # None: plane_distance
    ransac_sample: int = 3
    clean_xyz: bool = True
    foreground: str = "dilated"
    rgb_interpolation: str = "bicubic"
    normals: str = "grid"
    normals_radius: float = 0.01
    normals_max_neighbours: int = 30
    normals_plane_distance: float = 0.005  # resolved for the category
    eyecandies_background: str = "zero"

    @classmethod
    def from_params(cls, data: DataParams, category: str | None = None) -> PreprocessConfig:
        distances = data.normals_plane_distance
        return cls(
            size=data.size,
            plane_border=data.plane_border,
            plane_distance=data.plane_distance,
            ransac_iterations=data.ransac_iterations,
            cluster_eps=data.cluster_eps,
            cluster_min_points=data.cluster_min_points,
            seed=data.seed,
            ransac_threshold=data.ransac_threshold,
            ransac_sample=data.ransac_sample,
            clean_xyz=data.clean_xyz,
            foreground=data.foreground,
            rgb_interpolation=data.rgb_interpolation,
            normals=data.normals,
            normals_radius=data.normals_radius,
            normals_max_neighbours=data.normals_max_neighbours,
            normals_plane_distance=distances.get(category or "", distances["default"]),
            eyecandies_background=data.eyecandies_background,
        )


@dataclass
class Prepared:
    rgb: np.ndarray  # (S, S, 3) uint8
    xyz: np.ndarray  # (S, S, 3) float32, zeros = background
    gt: np.ndarray  # (S, S) uint8 0/1
    fg: np.ndarray  # (S, S) uint8 0/1
    xyz_full: np.ndarray | None = None  # (H, W, 3) the cleaned cloud at the input resolution


def valid_mask(xyz: np.ndarray) -> np.ndarray:
    return np.any(xyz != 0, axis=-1)


def fit_plane_ransac(
    points: np.ndarray,
    threshold: float,
    iterations: int,
    rng: np.random.Generator,
    sample: int = 3,
) -> tuple[np.ndarray, float] | None:
    """RANSAC plane ``n . p + d = 0`` (unit n) through (N, 3) points; None if under ``sample``.

    A hypothesis is the plane through 3 random points, or for ``sample`` > 3 the least-squares
    plane of that many (Open3D's ``segment_plane(ransac_n=...)``). The best hypothesis (most
    inliers within ``threshold``) is refined by a least-squares fit to its inliers.
    """
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    if n < max(3, sample):
        return None
    idx = rng.integers(0, n, size=(iterations, sample))
    if sample == 3:
        a, b, c = pts[idx[:, 0]], pts[idx[:, 1]], pts[idx[:, 2]]
        normals = np.cross(b - a, c - a)
        norms = np.linalg.norm(normals, axis=1)
        ok = norms > 1e-12
        if not ok.any():
            return None
        normals = normals[ok] / norms[ok, None]
        offsets = -np.einsum("ij,ij->i", normals, a[ok])
    else:
        from pipeline.normals import smallest_eigenvector

        group = pts[idx]  # (iterations, sample, 3)
        centre = group.mean(axis=1)
        dev = group - centre[:, None, :]
        normals = smallest_eigenvector(np.einsum("isa,isb->iab", dev, dev))
        offsets = -np.einsum("ij,ij->i", normals, centre)
    # Count inliers hypothesis by hypothesis in blocks so memory stays small.
    best, best_count = 0, -1
    for start in range(0, len(normals), 32):
        dist = np.abs(pts @ normals[start : start + 32].T + offsets[start : start + 32])
        counts = (dist < threshold).sum(axis=0)
        j = int(np.argmax(counts))
        if counts[j] > best_count:
            best, best_count = start + j, int(counts[j])
    normal, offset = normals[best], offsets[best]
    inliers = pts[np.abs(pts @ normal + offset) < threshold]
    if len(inliers) >= 3:
        centre = inliers.mean(axis=0)
        _, _, vt = np.linalg.svd(inliers - centre, full_matrices=False)
        refined = vt[-1]
        # Keep the refinement only if it explains the data at least as well.
        if (np.abs((pts - centre) @ refined) < threshold).sum() >= best_count:
            normal, offset = refined, -float(refined @ centre)
    return normal, float(offset)


def remove_plane(
    xyz: np.ndarray,
    border: int,
    distance: float,
    iterations: int,
    seed: int,
    fit_threshold: float | None = None,
    sample: int = 3,
) -> np.ndarray:
    """Zero every point closer than ``distance`` to the RANSAC plane of the image border.

    The plane is fitted with inliers within ``fit_threshold`` (default ``distance``).
    """
    h, w = xyz.shape[:2]
    ring = np.zeros((h, w), dtype=bool)
    b = min(border, h // 2, w // 2)
    ring[:b], ring[-b:], ring[:, :b], ring[:, -b:] = True, True, True, True
    valid = valid_mask(xyz)
    plane = fit_plane_ransac(
        xyz[ring & valid],
        distance if fit_threshold is None else fit_threshold,
        iterations,
        np.random.default_rng(seed),
        sample,
    )
    if plane is None:  # no border to fit: nothing to remove
        return xyz
    normal, offset = plane
    dist = np.abs(xyz.astype(np.float64) @ normal + offset)
    out = xyz.copy()
    out[valid & (dist < distance)] = 0.0
    return out


def grid_components(xyz: np.ndarray, eps: float) -> tuple[np.ndarray, int]:
    """Label map (-1 = no point) of the 8-neighbour grid graph with 3D edges <= eps."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    h, w = xyz.shape[:2]
    valid = valid_mask(xyz)
    index = np.full((h, w), -1, dtype=np.int64)
    index[valid] = np.arange(int(valid.sum()))
    rows, cols = [], []
    # Right, down, down-right and down-left cover all 8 neighbours of an undirected graph.
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ys0, ys1 = slice(0, h - dy), slice(dy, h)
        xs0 = slice(max(0, -dx), w - max(0, dx))
        xs1 = slice(max(0, dx), w - max(0, -dx))
        p, q = xyz[ys0, xs0], xyz[ys1, xs1]
        link = valid[ys0, xs0] & valid[ys1, xs1]
        link &= np.sum((p - q).astype(np.float64) ** 2, axis=-1) <= eps * eps
        rows.append(index[ys0, xs0][link])
        cols.append(index[ys1, xs1][link])
    n = int(valid.sum())
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    out = np.full((h, w), -1, dtype=np.int64)
    out[valid] = labels
    return out, int(count)


def largest_cluster(xyz: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    """Keep only the largest connected cluster (>= min_points points); zero the rest."""
    labels, count = grid_components(xyz, eps)
    out = np.zeros_like(xyz)
    if count == 0:
        return out
    sizes = np.bincount(labels[labels >= 0], minlength=count)
    best = int(np.argmax(sizes))  # ties: the lowest label, i.e. first in raster order
    if sizes[best] < min_points:
        return out
    keep = labels == best
    out[keep] = xyz[keep]
    return out


def pad_square(arr: np.ndarray, value: float = 0) -> np.ndarray:
    """Pad (H, W, ...) to a centred square of side max(H, W)."""
    h, w = arr.shape[:2]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    pad = [(top, s - h - top), (left, s - w - left)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad, mode="constant", constant_values=value)


def resize_nearest(arr: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a square (S, S, ...) array by pixel-centre sampling."""
    s = arr.shape[0]
    src = np.minimum(((np.arange(size) + 0.5) * s / size).astype(np.int64), s - 1)
    return arr[src][:, src]


_RGB_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def resize_rgb(rgb: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize a square uint8 image with PIL's antialiasing filter (no-op at the same size).

    ``bilinear`` is what torchvision's ``Resize`` (default interpolation) does to a PIL image,
    the published code's RGB resize (OFFICIAL 16).
    """
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.array(Image.fromarray(rgb).resize((size, size), _RGB_FILTERS[interpolation]),
                    dtype=np.uint8)


def foreground(xyz: np.ndarray) -> np.ndarray:
    """Pixels with a point, dilated by one pixel (3 x 3), as uint8 0/1."""
    from scipy import ndimage

    return ndimage.binary_dilation(valid_mask(xyz), structure=np.ones((3, 3), bool)).astype(np.uint8)


def foreground_published(xyz_full: np.ndarray, size: int) -> np.ndarray:
    """The published foreground (uint8 0/1) from the cleaned full-resolution xyz.

    Padded with zeros to a square, resized bilinearly (half-pixel centres, no antialias, as
    torch's ``interpolate(align_corners=False)``), then ``AvgPool2d(3, stride=1)`` and
    ``AdaptiveAvgPool2d(size)``: a pixel is foreground when any point reaches it through the
    three averages (about a one-pixel dilation, shifted by half a pixel).
    """
    from scipy import ndimage

    valid = pad_square(valid_mask(xyz_full).astype(np.float64), 0.0)
    s = valid.shape[0]
    src = np.maximum((np.arange(size) + 0.5) * (s / size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), s - 1)
    i1 = np.minimum(i0 + 1, s - 1)
    l1 = src - i0
    interp = np.zeros((size, s))
    np.add.at(interp, (np.arange(size), i0), 1.0 - l1)
    np.add.at(interp, (np.arange(size), i1), l1)
    small = (interp @ valid @ interp.T) > 0
    pooled = ndimage.maximum_filter(small, size=3, mode="constant")[1:-1, 1:-1]  # valid 3x3
    p = pooled.shape[0]
    starts = (np.arange(size) * p) // size
    ends = -((-(np.arange(size) + 1) * p) // size)  # ceil
    # adaptive pooling bins [floor(i p / size), ceil((i + 1) p / size)) overlap when growing
    rows = np.stack([pooled[a:b].any(axis=0) for a, b in zip(starts, ends)])
    out = np.stack([rows[:, a:b].any(axis=1) for a, b in zip(starts, ends)], axis=1)
    return out.astype(np.uint8)


def clean_points(xyz: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Steps 1-2 at the input resolution (nothing when ``clean_xyz`` is off)."""
    if not cfg.clean_xyz:
        return xyz
    return clean_for_normals(xyz, cfg, cfg.plane_distance)


def clean_for_normals(xyz: np.ndarray, cfg: PreprocessConfig, distance: float) -> np.ndarray:
    """Plane removal within ``distance`` and the largest cluster, at the input resolution."""
    xyz = remove_plane(
        xyz,
        cfg.plane_border,
        distance,
        cfg.ransac_iterations,
        cfg.seed,
        cfg.ransac_threshold,
        cfg.ransac_sample,
    )
    return largest_cluster(xyz, cfg.cluster_eps, cfg.cluster_min_points)


def published_background(xyz: np.ndarray, point: np.ndarray | None, cfg: PreprocessConfig
                         ) -> np.ndarray | None:
    """The pixels that hold the published Eyecandies background point (``data.
    eyecandies_background: published``), None when the background stays 0."""
    if point is None or cfg.eyecandies_background != "published":
        return None
    return ~valid_mask(xyz)


def background_normal(point: np.ndarray) -> np.ndarray:
    """The published real normal of a pixel at the background point. Its neighbours are the
    other background pixels, all at that same point: Open3D's normal of a zero covariance is
    (0, 0, 1) (checked with Open3D 0.20's tensor ``estimate_normals``), oriented towards the
    camera at the origin, then negated: (0, 0, 1) when the point's z > 0, else (0, 0, -1).
    The script's zero test (pc2sn_o3d_gpu_mvtec3dad.py:165-166) misses the point, so the
    normal stays instead of the clean (0, 0, 1)."""
    return np.array([0.0, 0.0, 1.0 if point[2] > 0 else -1.0], dtype=np.float32)


def real_normals(raw_xyz: np.ndarray, prep: Prepared, cfg: PreprocessConfig,
                 background: np.ndarray | None = None) -> np.ndarray:
    """Encoded real normals (S, S, 3) float32 in [0, 1] as ``cfg.normals`` says.

    ``background``: the published Eyecandies background point (``RawSample.background``)."""
    from pipeline.normals import (
        encode_normals,
        estimate_normals,
        estimate_normals_published,
        normal_image_published,
    )

    if cfg.normals == "grid":
        return encode_normals(estimate_normals(prep.xyz))
    # The published real-normal script cleans the raw cloud again, with its own distance.
    at_point = published_background(raw_xyz, background, cfg)
    if cfg.clean_xyz and cfg.normals_plane_distance == cfg.plane_distance \
            and prep.xyz_full is not None and at_point is None:
        cleaned = prep.xyz_full  # the same cleaning: reuse it
    else:
        cleaned = clean_for_normals(raw_xyz, cfg, cfg.normals_plane_distance)
    normals = estimate_normals_published(cleaned, cfg.normals_radius, cfg.normals_max_neighbours)
    # The published cleaning skips the background point (its x is 0: the all-non-zero tests),
    # so cleaning the cloud with background 0 is the same; only its own normal differs.
    if at_point is not None:
        normals[at_point] = background_normal(background)
    return normal_image_published(normals, cfg.size)


def preprocess(rgb: np.ndarray, xyz: np.ndarray, gt: np.ndarray, cfg: PreprocessConfig,
               background: np.ndarray | None = None) -> Prepared:
    """Steps 1-4 for one sample; the result may have no foreground (the caller decides).

    ``background``: the published Eyecandies background point (``RawSample.background``);
    with ``eyecandies_background: published`` it fills the background pixels, as the
    published xyz files hold it, before the xyz is resized and the foreground found."""
    at_point = published_background(xyz, background, cfg)
    xyz = clean_points(xyz, cfg)
    if at_point is not None:
        xyz = np.where(at_point[..., None], background, xyz).astype(np.float32)
    rgb_s = resize_rgb(pad_square(rgb, RGB_PAD_VALUE), cfg.size, cfg.rgb_interpolation)
    xyz_s = resize_nearest(pad_square(xyz, 0.0), cfg.size).astype(np.float32)
    gt_s = resize_nearest(pad_square(gt.astype(np.uint8), 0), cfg.size)
    fg = foreground_published(xyz, cfg.size) if cfg.foreground == "published" else foreground(xyz_s)
    return Prepared(
        rgb=rgb_s,
        xyz=np.ascontiguousarray(xyz_s),
        gt=(gt_s > 0).astype(np.uint8),
        fg=fg,
        xyz_full=xyz,
    )
