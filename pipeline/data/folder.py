"""The ``folder`` layout (``data.dataset: folder``): RGB + 3D data of your own sensor.

Layout::

    <root>/<category>/
        intrinsics.json                  {"fx": .., "fy": .., "cx": .., "cy": .., "depth_scale": ..}
                                         (needed only by depth images)
        train/good/                      the normal samples the shots are drawn from
        validation/good/                 optional: held-out normal samples (thresholds)
        test/<class>/                    good/ = normal; any other name = defective
            rgb/<stem>.png               8-bit RGB
            xyz/<stem>.tiff              H x W x 3 float32, metres, (0, 0, 0) = no point; or
            depth/<stem>.png             16-bit depth: z = value * depth_scale metres, 0 = none
            gt/<stem>.png                optional defect mask (non-zero = defect)

A depth image becomes an organised point cloud through the pinhole model:
x = (u - cx) z / fx, y = (v - cy) z / fy, with (u, v) the pixel's column and row. Labels come
from the class folder's name, so image-level metrics need no mask; a defective test sample
without a mask makes the pixel metrics undefined (``evaluate`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import read_json
from pipeline.data.mvtec import (
    GOOD,
    SPLITS,
    ambiguous,
    by_stem,
    category_dir,
    clean_xyz,
    load_image,
)
from pipeline.errors import InputError

INTRINSICS = "intrinsics.json"
INTRINSIC_KEYS = ("fx", "fy", "cx", "cy", "depth_scale")


@dataclass(frozen=True)
class Intrinsics:
    fx: float
    fy: float
    cx: float
    cy: float
    depth_scale: float  # metres per depth unit


def read_intrinsics(path: Path) -> Intrinsics:
    """The camera of a category's depth images; every error names the file and the key."""
    table = read_json(path, f"camera intrinsics not found (depth images need "
                            f"{', '.join(INTRINSIC_KEYS)})")
    values = {}
    for key in INTRINSIC_KEYS:
        value = table.get(key) if isinstance(table, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not np.isfinite(value):
            raise InputError(f"{path}: {key!r} must be a number (got {value!r})")
        if key in ("fx", "fy", "depth_scale") and value <= 0:
            raise InputError(f"{path}: {key!r} must be positive (got {value!r})")
        values[key] = float(value)
    return Intrinsics(**values)


def depth_to_xyz(depth: np.ndarray, camera: Intrinsics) -> np.ndarray:
    """An organised point cloud (H, W, 3) float32 from a depth image; 0 depth = no point."""
    z = depth.astype(np.float64) * camera.depth_scale
    v, u = np.mgrid[0:depth.shape[0], 0:depth.shape[1]].astype(np.float64)
    xyz = np.stack([(u - camera.cx) * z / camera.fx, (v - camera.cy) * z / camera.fy, z], -1)
    return xyz.astype(np.float32)


def xyz_to_depth(xyz: np.ndarray, depth_scale: float) -> np.ndarray:
    """The 16-bit depth image of an organised point cloud (z / depth_scale, rounded)."""
    units = np.rint(np.asarray(xyz[..., 2], dtype=np.float64) / depth_scale)
    if units.max(initial=0) > np.iinfo(np.uint16).max or units.min(initial=0) < 0:
        raise ValueError(f"depth outside the 16-bit range at depth_scale {depth_scale}")
    return units.astype(np.uint16)


def read_depth_xyz(depth_path: Path, intrinsics_path: Path) -> np.ndarray:
    """The point cloud of a 16-bit depth PNG with the category's intrinsics."""
    depth = np.asarray(load_image(depth_path, "depth image"))
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.integer):
        raise InputError(f"{depth_path}: expected a single-channel 16-bit depth image, got "
                         f"shape {depth.shape} {depth.dtype}")
    return clean_xyz(depth_to_xyz(depth, read_intrinsics(intrinsics_path)), depth_path)


def _files(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    out = {}
    for stem, paths in by_stem(folder).items():
        paths = [p for p in paths if p.suffix.lower() in suffixes]
        if len(paths) > 1:
            raise ambiguous(paths, what)
        if paths:
            out[stem] = paths[0]
    return out


def _class_samples(cat: Path, tdir: Path, split: str) -> list[dict]:
    rgbs = _files(tdir / "rgb", (".png",), "rgb image")
    xyzs = _files(tdir / "xyz", (".tiff", ".tif"), "xyz point cloud")
    depths = _files(tdir / "depth", (".png",), "depth image")
    gts = _files(tdir / "gt", (".png",), "ground-truth mask") if split == "test" else {}
    out = []
    for stem in sorted(set(rgbs) | set(xyzs) | set(depths)):
        if stem not in rgbs:
            raise InputError(f"{tdir / 'rgb' / (stem + '.png')}: rgb image not found")
        if stem in xyzs and stem in depths:
            raise ambiguous([xyzs[stem], depths[stem]], "geometry")
        if stem not in xyzs and stem not in depths:
            raise InputError(f"{tdir / 'xyz' / (stem + '.tiff')}: no point cloud (or "
                             f"{tdir / 'depth' / (stem + '.png')}) for {rgbs[stem]}")
        geometry = ({"xyz": xyzs[stem]} if stem in xyzs
                    else {"depth": depths[stem], "depth_info": cat / INTRINSICS})
        out.append({"id": f"{tdir.name}/{stem}", "label": 0 if tdir.name == GOOD else 1,
                    "defect_type": tdir.name, "rgb": rgbs[stem], "gt": gts.get(stem),
                    **geometry})
    return out


def list_folder(root: str | Path, category: str, split: str) -> list[dict]:
    """Sample descriptions of one split, sorted by id (``<class>/<stem>``)."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    cat = category_dir(root, category)
    split_dir = cat / split
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: split folder not found (data.dataset: folder)")
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if split != "test":
        classes = [p for p in classes if p.name == GOOD]
    out = [sample for tdir in classes for sample in _class_samples(cat, tdir, split)]
    if not out:
        raise InputError(f"{split_dir}: no samples (expected <class>/rgb/ with xyz/ or depth/; "
                         "data.dataset: folder)")
    return out
