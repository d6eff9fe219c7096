"""Eyecandies reader (DESIGN 1.1).

Layout (one folder per split, all items of a sample side by side)::

    <root>/<Category>/{train,val,test_public}/data/
        NNN_image_0..5.png  NNN_depth.png (16-bit)  NNN_info_depth.yaml  NNN_normals.png
        NNN_pose.txt  [NNN_mask.png in test sets]

As in CFM, M3DM and CMDS-AD we use one lighting condition (``image_4``), convert the 16-bit
depth to metres with the range in ``info_depth.yaml`` (``d / 65535 * (max - min) + min``) and
back-project it with a pinhole camera of focal length 711.11 px whose principal point is the
image centre (``cx = W / 2``, ``cy = H / 2``, pixel ``(u, v)`` at integer coordinates), in the
camera frame (the pose is not applied). The depth is a z-depth along the optical axis.

Our splits map to folders as: train -> ``train``, validation -> ``val``, test ->
``test_public``. Test labels come from the mask: a sample is defective when any mask pixel is
non-zero; ids are ``good/<stem>`` or ``bad/<stem>`` (defect type ``bad``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from pipeline.data.mvtec import ambiguous, by_stem, category_dir, clean_xyz, load_image, read_mask
from pipeline.errors import InputError

FOCAL_LENGTH = 711.11
RGB_ITEM = "image_4"
SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test_public"}
ITEMS = {RGB_ITEM: "rgb image", "depth": "depth image", "info_depth": "depth range",
         "mask": "mask"}  # the files of a sample that are read (and the pose, when asked)


def read_depth_info(path: str | Path) -> tuple[float, float]:
    """The (min, max) metric depth range of ``NNN_info_depth.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: depth range file not found")
    try:
        info = yaml.safe_load(path.read_text())
        lo = float(info["normalization"]["min"])
        hi = float(info["normalization"]["max"])
    except Exception as err:
        raise InputError(
            f"{path}: expected 'normalization: {{min: .., max: ..}}' ({type(err).__name__}: {err})"
        ) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise InputError(f"{path}: invalid depth range min={lo}, max={hi}")
    return lo, hi


def read_depth16(path: str | Path) -> np.ndarray:
    """A 16-bit single-channel depth PNG as ``uint16`` (H, W)."""
    img = load_image(path, "depth image")
    mode = img.mode
    arr = np.asarray(img)
    if arr.ndim != 2 or not mode.startswith("I"):
        raise InputError(f"{path}: expected a 16-bit single-channel depth PNG, got mode {mode!r}")
    if arr.min() < 0 or arr.max() > 65535:
        raise InputError(f"{path}: depth values outside the 16-bit range")
    return arr.astype(np.uint16)


def depth_to_xyz(depth_m: np.ndarray, focal: float = FOCAL_LENGTH) -> np.ndarray:
    """Back-project a metric z-depth map with the pinhole camera of the module docstring."""
    h, w = depth_m.shape
    u = np.arange(w, dtype=np.float64)[None, :] - w / 2.0
    v = np.arange(h, dtype=np.float64)[:, None] - h / 2.0
    z = depth_m.astype(np.float64)
    xyz = np.stack([u * z / focal, v * z / focal, z], axis=-1)
    xyz[z <= 0] = 0.0  # no measurement
    return xyz.astype(np.float32)


def read_pose(path: str | Path) -> np.ndarray:
    """The 4 x 4 matrix of ``NNN_pose.txt`` (a 3 x 4 one gets the row (0, 0, 0, 1))."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: pose file not found (needed by data.eyecandies_xyz: published)")
    try:
        pose = np.loadtxt(path, dtype=np.float64)
    except Exception as err:
        raise InputError(f"{path}: cannot read the pose matrix ({err})") from None
    if pose.shape == (3, 4):
        pose = np.vstack([pose, [0.0, 0.0, 0.0, 1.0]])
    if pose.shape != (4, 4) or not np.isfinite(pose).all():
        raise InputError(f"{path}: expected a 4 x 4 pose matrix, got shape {pose.shape}")
    if abs(np.linalg.det(pose)) < 1e-12:
        raise InputError(f"{path}: the pose matrix is singular")
    return pose


def published_frame(depth_m: np.ndarray, pose: np.ndarray, focal: float = FOCAL_LENGTH
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The published converter's organised cloud (float32, background 0) and the constant
    point it leaves at every background pixel instead (processing/preprocess_eyecandies.py:
    74-86: ``-start`` in the rotated frame, rotated back and shifted: ``start - R^T start``,
    then permuted and scaled like the points; its x is 0). ``data.eyecandies_background``
    chooses which of the two the background gets."""
    h, w = depth_m.shape
    cam = depth_to_xyz(depth_m, focal).astype(np.float64).reshape(-1, 3)
    # inv(K @ pose) @ (u d, v d, d, 1) = inv(pose) @ (camera point, 1)
    hom = np.concatenate([cam, np.ones((len(cam), 1))], axis=1)
    pts = (hom @ np.linalg.inv(pose).T)[:, :3]
    z_ok = depth_m.reshape(-1) > 0
    top, bottom = pts[256 % len(pts)], pts[-256 % len(pts)]
    dz, dy = top[1] - bottom[1], top[2] - bottom[2]
    norm = np.hypot(dz, dy)
    cos, sin = (dy / norm, dz / norm) if norm > 0 else (1.0, 0.0)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    start = np.array([0.0, bottom[1], bottom[2]])
    local = (pts - start) @ rot.T
    background = (local[:, 1] > -0.02) | (local[:, 2] > 1.8) | (np.abs(local[:, 0]) > 1)
    scale = np.array([0.1, -0.1, 0.1])
    out = pts[:, [0, 2, 1]] * scale
    out[background | ~z_ok] = 0.0
    point = ((-start) @ rot + start)[[0, 2, 1]] * scale  # R^T (-start) + start
    return out.reshape(h, w, 3).astype(np.float32), point.astype(np.float32)


def published_xyz(depth_m: np.ndarray, pose: np.ndarray, focal: float = FOCAL_LENGTH) -> np.ndarray:
    """The published converter's organised cloud with the background at 0, float32."""
    return published_frame(depth_m, pose, focal)[0]


def read_eyecandies_xyz(
    depth_path: str | Path,
    info_path: str | Path,
    pose_path: str | Path | None = None,
    frame: str = "camera",
) -> tuple[np.ndarray, np.ndarray | None]:
    """The cloud (background 0) and, in the published frame, the published background point."""
    depth_path = Path(depth_path)
    raw = read_depth16(depth_path)
    lo, hi = read_depth_info(info_path)
    depth_m = raw.astype(np.float64) / 65535.0 * (hi - lo) + lo
    if frame == "published":
        if pose_path is None:
            raise InputError(f"{depth_path}: no pose file (needed by data.eyecandies_xyz: published)")
        xyz, point = published_frame(depth_m, read_pose(pose_path))
        if not xyz.any():
            raise InputError(f"{depth_path}: no point left after the published background thresholds")
        return clean_xyz(xyz, depth_path), point
    return clean_xyz(depth_to_xyz(depth_m), depth_path), None


def _item(data_dir: Path, stem: str, item: str) -> Path:
    suffix = ".yaml" if item == "info_depth" else ".png"
    return data_dir / f"{stem}_{item}{suffix}"


def _unambiguous(files: dict[str, list[Path]], path: Path, what: str) -> Path:
    """``path``, unless another file has its stem (000_depth.png and 000_depth.tiff)."""
    group = files.get(path.stem, [])
    if len(group) > 1 or (group and group[0] != path):
        raise ambiguous(sorted({path, *group}), what)
    return path


def list_eyecandies(root: str | Path, category: str, split: str) -> list[dict]:
    """Sample descriptions of one split, sorted by id; missing files are reported here."""
    if split not in SPLIT_FOLDERS:
        raise InputError(f"unknown split {split!r} (expected one of {', '.join(SPLIT_FOLDERS)})")
    data_dir = category_dir(root, category) / SPLIT_FOLDERS[split] / "data"
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: split folder not found (not in the Eyecandies layout)")
    suffix = f"_{RGB_ITEM}.png"
    stems = {p.name[: -len(suffix)] for p in data_dir.iterdir() if p.name.endswith(suffix)}
    stems |= {p.name[: -len("_depth.png")] for p in data_dir.iterdir() if p.name.endswith("_depth.png")}
    files = by_stem(data_dir)  # an item given twice (two extensions) is an error naming both
    out: list[dict] = []
    for stem in sorted(stems):
        rgb, depth, info, mask = (_unambiguous(files, _item(data_dir, stem, item), what)
                                  for item, what in ITEMS.items())
        pose = _unambiguous(files, data_dir / f"{stem}_pose.txt", "pose")
        for path, what in ((rgb, "rgb image"), (depth, "depth image"), (info, "depth range file")):
            if not path.is_file():
                raise InputError(f"{path}: {what} not found")
        gt = None
        label = 0
        if split == "test":
            gt = mask
            label = int(read_mask(gt).any())
        kind = "bad" if label else "good"
        out.append(
            {
                "id": f"{kind}/{stem}",
                "label": label,
                "defect_type": kind,
                "rgb": rgb,
                "depth": depth,
                "depth_info": info,
                "pose": pose,
                "gt": gt,
            }
        )
    if not out:
        raise InputError(f"{data_dir}: split is empty (no *_{RGB_ITEM}.png samples found)")
    out.sort(key=lambda s: s["id"])
    return out
