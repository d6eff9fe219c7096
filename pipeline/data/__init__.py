"""Dataset readers behind one API (DESIGN 1.1).

>>> refs = list_samples("mvtec3d", "data/demo", "disc", "test")   # cheap: paths and labels
>>> raw = load_sample(refs[0])                                     # reads one sample's files

Splits are named ``train``, ``validation`` and ``test`` for every dataset (Eyecandies'
``val`` and ``test_public`` folders are mapped). Sample ids are ``<defect_type>/<stem>``
(``good/000``, ``crack/003``), unique within a split and sorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.eyecandies import list_eyecandies, read_eyecandies_xyz
from pipeline.data.folder import list_folder, read_depth_xyz
from pipeline.data.mvtec import list_mvtec, read_mask, read_rgb, read_xyz
from pipeline.errors import InputError

DATASETS = ("mvtec3d", "eyecandies", "folder")

__all__ = ["DATASETS", "RawSample", "SampleRef", "check_masks", "check_size", "list_samples",
           "load_sample", "read_rgb"]


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's files are; no pixel data."""

    dataset: str
    category: str
    split: str
    id: str
    label: int  # 0 good, 1 defective
    defect_type: str
    rgb: Path
    xyz: Path | None = None  # MVTec 3D-AD point cloud TIFF
    depth: Path | None = None  # Eyecandies / folder 16-bit depth PNG
    depth_info: Path | None = None  # Eyecandies depth range YAML / folder intrinsics JSON
    pose: Path | None = None  # Eyecandies pose (data.eyecandies_xyz: published)
    gt: Path | None = None  # None: no mask file (all good)

    @property
    def geometry_path(self) -> Path:
        """The file the point cloud comes from (for error messages)."""
        return self.xyz if self.xyz is not None else self.depth  # type: ignore[return-value]


@dataclass
class RawSample:
    """One sample as read: rgb uint8 (H, W, 3), xyz float32 (H, W, 3), gt bool (H, W)."""

    rgb: np.ndarray
    xyz: np.ndarray
    gt: np.ndarray
    # Eyecandies in the published frame: the constant point the published converter leaves at
    # the background pixels (those at 0 in ``xyz``); data.eyecandies_background decides its use
    background: np.ndarray | None = None


def list_samples(dataset: str, root: str | Path, category: str, split: str) -> list[SampleRef]:
    """All samples of a split, sorted by id; raises InputError for a missing/empty layout."""
    if dataset == "mvtec3d":
        entries = list_mvtec(root, category, split)
    elif dataset == "eyecandies":
        entries = list_eyecandies(root, category, split)
    elif dataset == "folder":
        entries = list_folder(root, category, split)
    else:
        raise InputError(f"data.dataset: unknown dataset {dataset!r} (expected one of {DATASETS})")
    return [SampleRef(dataset=dataset, category=category, split=split, **e) for e in entries]


def check_masks(refs: list[SampleRef], accept_empty_defects: bool = False) -> None:
    """Labels and masks agree: a good sample's mask (where there is one) marks no pixel, a
    defective sample's marks some (``accept_empty_defects``: a dataset with defective samples
    whose defect is not drawn). Reads only the masks, before any work."""
    for ref in refs:
        if ref.gt is None or not ref.gt.exists():
            continue  # a defective sample without a mask is refused when listed
        marked = int(read_mask(ref.gt).sum())
        if ref.label == 0 and marked:
            raise InputError(f"{ref.gt}: the mask of good sample {ref.id!r} marks {marked} "
                             "defect pixels; clear the mask or move the sample to its defect "
                             "folder")
        if ref.label == 1 and not marked and not accept_empty_defects:
            raise InputError(f"{ref.gt}: the mask of defective sample {ref.id!r} marks no "
                             "pixel; fix the mask, move the sample to good/, or set "
                             "data.accept_empty_defect_masks: true if the dataset really has "
                             "such samples")


def check_size(path: Path, what: str, size: tuple[int, ...], rgb: Path,
               rgb_size: tuple[int, ...]) -> None:
    """A sample's ``what`` at ``path`` has the size of its RGB image (sizes are (H, W))."""
    if tuple(size) != tuple(rgb_size):
        raise InputError(f"{path}: {what} size {size[1]}x{size[0]} (WxH) does not match rgb "
                         f"image {rgb.name} size {rgb_size[1]}x{rgb_size[0]}")


def load_sample(ref: SampleRef, eyecandies_xyz: str = "camera") -> RawSample:
    """Read and validate one sample; every error names the file at fault.

    ``eyecandies_xyz`` (``data.eyecandies_xyz``): ``camera`` or ``published`` frame of an
    Eyecandies cloud (see :mod:`pipeline.data.eyecandies`); MVTec clouds ignore it.
    """
    rgb = read_rgb(ref.rgb)
    background = None
    if ref.xyz is not None:
        xyz = read_xyz(ref.xyz)
    elif ref.dataset == "folder" and ref.depth is not None and ref.depth_info is not None:
        xyz = read_depth_xyz(ref.depth, ref.depth_info)
    elif ref.depth is not None and ref.depth_info is not None:
        xyz, background = read_eyecandies_xyz(ref.depth, ref.depth_info, ref.pose, eyecandies_xyz)
    else:
        raise InputError(f"{ref.rgb}: sample {ref.id!r} has no geometry file")
    check_size(ref.geometry_path, "point cloud", xyz.shape[:2], ref.rgb, rgb.shape[:2])
    if ref.gt is not None and ref.gt.exists():
        gt = read_mask(ref.gt)
        check_size(ref.gt, "mask", gt.shape, ref.rgb, rgb.shape[:2])
    elif ref.gt is not None:
        raise InputError(f"{ref.gt}: ground-truth mask not found")
    else:
        gt = np.zeros(rgb.shape[:2], dtype=bool)
    return RawSample(rgb=rgb, xyz=xyz, gt=gt, background=background)
