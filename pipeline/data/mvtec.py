"""MVTec 3D-AD reader (DESIGN 1.1) and the low-level image readers shared by all datasets.

Layout::

    <root>/<category>/{train,validation}/good/{rgb/NNN.png, xyz/NNN.tiff}
    <root>/<category>/test/<defect_type>/{rgb/NNN.png, xyz/NNN.tiff, gt/NNN.png}

``test/good/gt`` may hold all-zero masks or be missing. Ground truth is class-coded (e.g. 253,
254, 255 for different defect classes) and is binarised with ``gt > 0``.

Every reader raises :class:`InputError` with one message that names the file at fault.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageFile

from pipeline.errors import InputError

# A truncated PNG must be an error, never silently padded with black.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SPLITS = ("train", "validation", "test")
GOOD = "good"


def load_image(path: str | Path, what: str) -> Image.Image:
    """Open and fully decode an image file; a missing or damaged file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return img.copy()  # usable after the file is closed
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError for damaged files
        raise InputError(f"{path}: cannot read image ({what}: {err})") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """An 8-bit RGB image as ``uint8`` (H, W, 3); grey or RGBA images are converted to RGB."""
    img = load_image(path, "rgb image")
    if img.mode not in ("RGB", "RGBA", "L", "P", "LA"):
        raise InputError(f"{path}: expected an 8-bit RGB image, got PIL mode {img.mode!r}")
    return np.array(img.convert("RGB"), dtype=np.uint8)


def read_mask(path: str | Path) -> np.ndarray:
    """A class-coded ground-truth PNG binarised with ``> 0`` as ``bool`` (H, W)."""
    arr = np.asarray(load_image(path, "ground-truth mask"))
    if arr.ndim == 3:  # a mask saved as RGB(A): defect wherever any colour channel is set
        arr = arr[..., :3].max(axis=-1)
    if arr.ndim != 2:
        raise InputError(f"{path}: expected a single-channel mask, got shape {arr.shape}")
    return arr > 0


def clean_xyz(xyz: np.ndarray, path: Path) -> np.ndarray:
    """Validate an organised point cloud; non-finite points become (0, 0, 0) = no point.

    Sparse NaN/inf points are treated as missing measurements (as scanners report holes);
    a cloud without a single valid point (all NaN or all zero) is an error.
    """
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise InputError(f"{path}: expected an H x W x 3 point cloud, got shape {xyz.shape}")
    if not np.issubdtype(xyz.dtype, np.floating):
        raise InputError(f"{path}: expected float32 coordinates in metres, got dtype {xyz.dtype}")
    xyz = xyz.astype(np.float32, copy=True)
    finite = np.isfinite(xyz).all(axis=-1)
    xyz[~finite] = 0.0
    if not xyz.any():
        raise InputError(f"{path}: point cloud has no valid point (all zero or NaN)")
    return xyz


def read_xyz(path: str | Path) -> np.ndarray:
    """An organised point cloud TIFF as ``float32`` (H, W, 3), metres, zeros = no point."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: xyz point cloud not found")
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)  # a damaged file is reported once, by us
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xyz = np.asarray(tifffile.imread(path))
    except Exception as err:  # tifffile raises TiffFileError, ValueError, struct errors...
        raise InputError(f"{path}: cannot read TIFF ({err})") from None
    finally:
        log.setLevel(level)
    if xyz.size == 0:
        raise InputError(f"{path}: cannot read TIFF (no image data)")
    return clean_xyz(xyz, path)


def category_dir(root: str | Path, category: str) -> Path:
    """The category folder, with a clear error when the root or the category is missing."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset root not found (data.root)")
    cat = root / category
    if not cat.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise InputError(
            f"{cat}: unknown category {category!r} (folders under {root}: {', '.join(found) or 'none'})"
        )
    return cat


def by_stem(folder: Path) -> dict[str, list[Path]]:
    """The files of ``folder`` grouped by stem (dot files ignored), sorted."""
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if not path.name.startswith(".") and path.is_file():
                found.setdefault(path.stem, []).append(path)
    return found


def ambiguous(paths: list[Path], what: str) -> InputError:
    """Two files of one stem (000.tif and 000.tiff): which one is the sample's is unknown."""
    return InputError(f"{paths[0]} and {paths[1].name}: two {what} files of one sample; keep "
                      "one (remove or rename the other)")


def _stems(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    out = {}
    for stem, paths in by_stem(folder).items():
        if len(paths) > 1:
            raise ambiguous(paths, what)
        if paths[0].suffix.lower() in suffixes:
            out[stem] = paths[0]
    return out


def list_mvtec(root: str | Path, category: str, split: str) -> list[dict]:
    """Sample descriptions of one split, sorted by id (``<defect_type>/<stem>``).

    Each entry is a dict with id, label, defect_type, rgb, xyz, gt (Path or None).
    Missing files are reported here, before any work is done.
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    split_dir = category_dir(root, category) / split
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: split folder not found (not in the MVTec 3D-AD layout)")
    types = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if split != "test" and GOOD not in types:
        raise InputError(f"{split_dir / GOOD}: folder not found (not in the MVTec 3D-AD layout)")
    if split != "test":
        types = [GOOD]
    out: list[dict] = []
    for defect_type in types:
        tdir = split_dir / defect_type
        if not (tdir / "rgb").is_dir():
            raise InputError(f"{tdir / 'rgb'}: folder not found (not in the MVTec 3D-AD layout)")
        if not (tdir / "xyz").is_dir():
            raise InputError(f"{tdir / 'xyz'}: folder not found (not in the MVTec 3D-AD layout)")
        rgbs = _stems(tdir / "rgb", (".png",), "rgb image")
        xyzs = _stems(tdir / "xyz", (".tiff", ".tif"), "xyz point cloud")
        gts = _stems(tdir / "gt", (".png",), "ground-truth mask")
        for stem in sorted(set(rgbs) | set(xyzs)):
            if stem not in rgbs:
                raise InputError(f"{tdir / 'rgb' / (stem + '.png')}: rgb image not found")
            if stem not in xyzs:
                raise InputError(f"{tdir / 'xyz' / (stem + '.tiff')}: xyz point cloud not found")
            good = defect_type == GOOD
            gt = gts.get(stem)
            if split == "test" and not good and gt is None:
                raise InputError(f"{tdir / 'gt' / (stem + '.png')}: ground-truth mask not found")
            out.append(
                {
                    "id": f"{defect_type}/{stem}",
                    "label": 0 if good else 1,
                    "defect_type": defect_type,
                    "rgb": rgbs[stem],
                    "xyz": xyzs[stem],
                    "gt": gt if split == "test" else None,
                }
            )
    if not out:
        raise InputError(f"{split_dir}: split is empty (no rgb/xyz samples found)")
    return out
