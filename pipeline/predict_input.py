"""The samples named by ``cmds-ad predict --input PATH``: RGB + xyz TIFF (as MVTec 3D-AD) or
RGB + 16-bit depth with ``intrinsics.json`` (the ``folder`` layout, pipeline/data/folder.py).

PATH is one of

- an RGB image ``<group>/rgb/<stem>.png`` whose point cloud is ``<group>/xyz/<stem>.tiff``
  (or ``.tif``; or ``<group>/depth/<stem>.png``, the camera in ``intrinsics.json`` in the
  group or up to two folders above) and whose optional ground truth is
  ``<group>/gt/<stem>.png``: one sample;
- a folder ``<group>`` holding ``rgb/`` and ``xyz/`` or ``depth/`` (and optionally ``gt/``):
  its samples;
- a folder of such folders (an MVTec 3D-AD ``test`` or ``validation`` folder): all of them.

A sample's id is ``<group>/<stem>``, as the dataset readers name it (``crack/003``); the
estimated normals are seeded from it, so a sample scored here and in the pipeline under the
same id gets the same map. A sample is labelled defective (1) unless its group is ``good``.
"""

from __future__ import annotations

from pathlib import Path

import tifffile
from PIL import Image

from pipeline.data import SampleRef, check_size
from pipeline.data.folder import INTRINSICS
from pipeline.data.mvtec import GOOD, ambiguous, by_stem
from pipeline.errors import InputError

RGB_SUFFIXES = (".png",)
XYZ_SUFFIXES = (".tiff", ".tif")
LAYOUT = ("expected an rgb/<stem>.png file with xyz/<stem>.tiff beside rgb/, a folder holding "
          "rgb/ and xyz/, or a folder of such folders")


def _one(folder: Path, stem: str, suffixes: tuple[str, ...], what: str) -> Path | None:
    paths = [p for p in by_stem(folder).get(stem, []) if p.suffix.lower() in suffixes]
    if len(paths) > 1:
        raise ambiguous(paths, what)
    return paths[0] if paths else None


def _intrinsics(group: Path) -> Path:
    """The ``intrinsics.json`` of a group: in it or a folder above, up to the category's."""
    for folder in (group, group.parent, group.parent.parent):
        if (folder / INTRINSICS).is_file():
            return folder / INTRINSICS
    return group.parent.parent / INTRINSICS  # reported as missing when the depth is read


def _sample(group: Path, stem: str, rgb: Path) -> SampleRef:
    xyz = _one(group / "xyz", stem, XYZ_SUFFIXES, "xyz point cloud")
    depth = _one(group / "depth", stem, (".png",), "depth image")
    if xyz is None and depth is None:
        raise InputError(f"{group / 'xyz' / (stem + '.tiff')}: xyz point cloud not found (the "
                         f"point cloud of {rgb}; or a depth image in {group / 'depth'})")
    if xyz is not None and depth is not None:
        raise ambiguous([xyz, depth], "geometry")
    geometry = {"xyz": xyz} if xyz is not None else {
        "depth": depth, "depth_info": _intrinsics(group)}
    gt = _one(group / "gt", stem, (".png",), "ground-truth mask")
    label = 0 if group.name == GOOD else 1
    return SampleRef(dataset="mvtec3d" if xyz is not None else "folder", category="",
                     split="predict", id=f"{group.name}/{stem}", label=label,
                     defect_type=group.name, rgb=rgb, gt=gt, **geometry)


def _group(group: Path) -> list[SampleRef]:
    refs = []
    for stem, paths in sorted(by_stem(group / "rgb").items()):
        images = [p for p in paths if p.suffix.lower() in RGB_SUFFIXES]
        if len(images) > 1:
            raise ambiguous(images, "rgb image")
        if images:
            refs.append(_sample(group, stem, images[0]))
    return refs


def find_samples(path: Path) -> list[SampleRef]:
    """The samples under ``path`` (see the module docstring), sorted by id; at least one."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: --input not found")
    if path.is_file():
        if path.parent.name != "rgb" or path.suffix.lower() not in RGB_SUFFIXES:
            raise InputError(f"{path}: not an rgb/<stem>.png image ({LAYOUT})")
        return [_sample(path.parent.parent, path.stem, path)]
    if (path / "rgb").is_dir():
        refs = _group(path)
    else:
        groups = sorted(p for p in path.iterdir() if (p / "rgb").is_dir())
        refs = [ref for group in groups for ref in _group(group)]
    if not refs:
        raise InputError(f"{path}: no samples found ({LAYOUT})")
    return refs


def _header_size(path: Path) -> tuple[int, int] | None:
    """(H, W) from a TIFF's or PNG's header, without decoding the pixels; None where the header
    cannot be read (reading the sample names that fault)."""
    try:
        if path.suffix.lower() in XYZ_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                return page.imagelength, page.imagewidth
        with Image.open(path) as image:
            return image.height, image.width
    except Exception:  # noqa: BLE001 - a damaged file is named when its sample is read
        return None


def check_sizes(refs: list[SampleRef]) -> None:
    """Every sample's point cloud (or depth image) and mask have its RGB image's size. Reads
    the files' headers only, so a mismatch in a large folder is named before any model loads
    and not when prediction reaches that sample."""
    for ref in refs:
        rgb_size = _header_size(ref.rgb)
        for path, what in ((ref.geometry_path, "point cloud"), (ref.gt, "mask")):
            size = _header_size(path) if path is not None and rgb_size is not None else None
            if size is not None:
                check_size(path, what, size, ref.rgb, rgb_size)
