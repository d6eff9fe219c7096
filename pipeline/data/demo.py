"""The embedded demo dataset (DESIGN 2.4): synthetic objects in the MVTec 3D-AD layout.

Each sample is a ray-cast scene: a pinhole camera at the origin looking down +z, a support
plane 0.36-0.44 m away tilted by up to 12 degrees, and an object given as a height field over
the plane (``disc``: a puck with rounded rim, ``dome``: an elliptic cap, ``slab``: a rounded
rectangular tablet in a non-square 360 x 280 image). Size, pose, plane tilt, colour and texture
pattern (stripes, dots, rings, plain) vary per sample. Shading is Lambertian under an oblique
light plus ambient light, so relief is visible in the rgb image.

Defects (test split), with their ground-truth class codes:

=============  ============================  ====
type           kind                          code
=============  ============================  ====
bump           geometric only (xyz, shading)  252
dent           geometric only (xyz, shading)  253
stain          colour only                    254
contamination  geometric and colour           255
=============  ============================  ====

About a third of each test set is good. ``test/good/gt`` holds all-zero masks for ``disc`` and
``dome`` and is missing for ``slab`` (both occur in MVTec 3D-AD). The xyz TIFFs are float32
H x W x 3 in metres, registered pixel-for-pixel to the rgb images, with a few random missing
points (0, 0, 0) as a scanner would leave. Everything derives from the seed: the same seed
gives byte-identical files.

``write_demo_eyecandies`` renders one category in the Eyecandies layout (six lighting
conditions, 16-bit depth with its range YAML, normals, pose and test masks) with the published
camera (focal 711.11 px, principal point at the image centre).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import yaml
from PIL import Image

from pipeline.data.eyecandies import FOCAL_LENGTH
from pipeline.data.folder import INTRINSICS, xyz_to_depth

CATEGORIES: dict[str, dict] = {
    # image (height, width) and focal length in pixels
    "disc": {"shape": (320, 320), "focal": 900.0},
    "dome": {"shape": (256, 256), "focal": 720.0},
    "slab": {"shape": (360, 280), "focal": 900.0},
}
DEFECT_CODES = {"bump": 252, "dent": 253, "stain": 254, "contamination": 255}
# Order in which defect types are dealt out, so even tiny test sets hold all three kinds.
DEFECT_ORDER = ("bump", "stain", "contamination", "dent")
GOOD_GT_MISSING = ("slab",)
DEMO_TRAIN_IMAGES = 10  # per category: the demo's sizes (benchmarks mirror them)
DEMO_TEST_IMAGES = 24
DROPOUT = 0.002  # fraction of pixels without a measured point

HeightFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    parts = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(parts)


@dataclass
class Camera:
    height: int
    width: int
    focal: float

    def rays(self) -> np.ndarray:
        """Ray directions with unit z (so the ray parameter is the z-depth)."""
        u = (np.arange(self.width) - self.width / 2.0) / self.focal
        v = (np.arange(self.height) - self.height / 2.0) / self.focal
        rays = np.empty((self.height, self.width, 3))
        rays[..., 0] = u[None, :]
        rays[..., 1] = v[:, None]
        rays[..., 2] = 1.0
        return rays


@dataclass
class Plane:
    normal: np.ndarray  # unit, pointing from the plane towards the camera
    origin: np.ndarray  # where the optical axis meets the plane
    e1: np.ndarray  # in-plane axes (e1 ~ image right, e2 ~ image down)
    e2: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, max_tilt_deg: float = 12.0) -> Plane:
        distance = rng.uniform(0.36, 0.44)
        tilt = np.radians(rng.uniform(0.0, max_tilt_deg))
        azimuth = rng.uniform(0.0, 2.0 * np.pi)
        normal = np.array(
            [np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), -np.cos(tilt)]
        )
        e1 = np.array([1.0, 0.0, 0.0]) - normal[0] * normal
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(e1, normal)
        return cls(normal, np.array([0.0, 0.0, distance]), e1, e2)


@dataclass
class Render:
    xyz: np.ndarray  # (H, W, 3) float64 points on the rays
    a: np.ndarray  # in-plane coordinates (metres) of each point
    b: np.ndarray
    height: np.ndarray  # height above the plane
    normals: np.ndarray  # unit, facing the camera


def ray_cast(camera: Camera, plane: Plane, height_fn: HeightFn, iterations: int = 5) -> Render:
    """Intersect every pixel ray with the height field ``plane + height_fn(a, b) * normal``.

    Fixed-point iteration on the z-depth, started at the bare plane; the final points lie
    exactly on their rays, so xyz is a true pinhole rendering registered to the rgb pixels.
    """
    rays = camera.rays()
    rx, ry = rays[..., 0], rays[..., 1]  # rays[..., 2] == 1
    o, n, e1, e2 = plane.origin, plane.normal, plane.e1, plane.e2

    def dot(vec, depth):  # (depth * ray - origin) . vec, component by component (fast)
        return (depth * rx - o[0]) * vec[0] + (depth * ry - o[1]) * vec[1] + (depth - o[2]) * vec[2]

    ray_dot_n = rx * n[0] + ry * n[1] + n[2]  # < 0: rays travel against the plane normal
    k = float(n @ o)
    depth = k / ray_dot_n
    for _ in range(iterations):
        depth = (height_fn(dot(e1, depth), dot(e2, depth)) + k) / ray_dot_n
    xyz = rays * depth[..., None]
    a, b = dot(e1, depth), dot(e2, depth)
    du = np.gradient(xyz, axis=1)
    dv = np.gradient(xyz, axis=0)
    normals = np.cross(du, dv)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True) + 1e-18
    facing = np.einsum("hwc,hwc->hw", normals, xyz) > 0
    normals[facing] *= -1.0  # towards the camera
    return Render(xyz=xyz, a=a, b=b, height=dot(n, depth), normals=normals)


def shade(normals: np.ndarray, light: Sequence[float], ambient: float = 0.3) -> np.ndarray:
    """Lambertian shading; ``light`` points from the surface towards the light."""
    direction = np.asarray(light, dtype=np.float64)
    direction = direction / np.linalg.norm(direction)
    return ambient + (1.0 - ambient) * np.clip(normals @ direction, 0.0, 1.0)


KEY_LIGHT = (-0.5, -0.6, -1.0)  # upper left, camera side

# ---------------------------------------------------------------------------------------------
# Objects: a height field (metres above the plane) and a footprint to place defects in.


@dataclass
class ObjectModel:
    height: HeightFn
    place: Callable[[np.random.Generator], tuple[float, float]]  # a point well inside
    base_colour: np.ndarray


def _rotate(a: np.ndarray, b: np.ndarray, cx: float, cy: float, angle: float):
    c, s = np.cos(angle), np.sin(angle)
    x, y = a - cx, b - cy
    return c * x + s * y, -s * x + c * y


def _inside(rng: np.random.Generator, cx, cy, angle, rx, ry, frac=0.55) -> tuple[float, float]:
    r = frac * np.sqrt(rng.uniform(0.0, 1.0))
    phi = rng.uniform(0.0, 2.0 * np.pi)
    x, y = r * rx * np.cos(phi), r * ry * np.sin(phi)
    c, s = np.cos(angle), np.sin(angle)
    return cx + c * x - s * y, cy + s * x + c * y


PALETTES = {
    "disc": [(0.80, 0.62, 0.36), (0.72, 0.52, 0.30), (0.85, 0.70, 0.45)],
    "dome": [(0.78, 0.35, 0.28), (0.84, 0.50, 0.30), (0.70, 0.40, 0.40)],
    "slab": [(0.35, 0.55, 0.70), (0.45, 0.62, 0.50), (0.55, 0.55, 0.65)],
    "GummyBear": [(0.85, 0.20, 0.15), (0.90, 0.60, 0.10), (0.30, 0.70, 0.25)],
}


def _base_colour(rng: np.random.Generator, kind: str) -> np.ndarray:
    palette = PALETTES[kind]
    colour = np.array(palette[int(rng.integers(len(palette)))])
    return np.clip(colour + rng.normal(0.0, 0.04, 3), 0.05, 0.95)


def make_object(kind: str, rng: np.random.Generator) -> ObjectModel:
    cx, cy = rng.uniform(-0.008, 0.008, 2)
    angle = rng.uniform(-np.pi, np.pi)
    colour = _base_colour(rng, kind)
    if kind == "disc":
        radius, top, rim = rng.uniform(0.028, 0.04), rng.uniform(0.008, 0.012), 0.003

        def height(a, b):
            rho = np.hypot(a - cx, b - cy)
            crown = 0.0015 * np.clip(1.0 - (rho / radius) ** 2, 0.0, 1.0)
            return (top + crown) * _smoothstep((radius - rho) / rim)

        return ObjectModel(height, lambda r: _inside(r, cx, cy, 0.0, radius, radius), colour)
    if kind in ("dome", "GummyBear"):
        rx, ry = rng.uniform(0.026, 0.04), rng.uniform(0.022, 0.034)
        top = rng.uniform(0.015, 0.024)

        def height(a, b):
            x, y = _rotate(a, b, cx, cy, angle)
            return top * np.clip(1.0 - (x / rx) ** 2 - (y / ry) ** 2, 0.0, None)

        return ObjectModel(height, lambda r: _inside(r, cx, cy, angle, rx, ry), colour)
    if kind == "slab":
        hx, hy = rng.uniform(0.024, 0.032), rng.uniform(0.045, 0.055)
        top, rim = rng.uniform(0.007, 0.010), 0.003
        tilt = rng.uniform(-0.17, 0.17)  # keeps the long side roughly vertical
        wave, phase = rng.uniform(0.0002, 0.0006), rng.uniform(0, 2 * np.pi)

        def height(a, b):
            x, y = _rotate(a, b, cx, cy, tilt)
            inset = np.minimum(hx - np.abs(x), hy - np.abs(y))
            ripple = wave * np.sin(2 * np.pi * y / 0.02 + phase)
            return (top + ripple) * _smoothstep(inset / rim)

        return ObjectModel(height, lambda r: _inside(r, cx, cy, tilt, hx, hy), colour)
    raise ValueError(f"unknown demo object {kind!r}")


def _texture(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per-sample albedo pattern on the object (coordinates in metres)."""
    pattern = ("stripes", "dots", "rings", "plain")[int(rng.integers(4))]
    freq = rng.uniform(60.0, 150.0)  # cycles per metre: periods of 7-17 mm
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    amount = rng.uniform(0.15, 0.35)
    accent = np.clip(base * rng.uniform(0.4, 0.7) + rng.uniform(0.0, 0.2, 3), 0, 1)
    if pattern == "stripes":
        p = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (a * np.cos(theta) + b * np.sin(theta)) + phase)
    elif pattern == "dots":
        p = np.clip(np.sin(2 * np.pi * freq * a + phase) * np.sin(2 * np.pi * freq * b), 0, 1) ** 2
    elif pattern == "rings":
        p = 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.hypot(a, b) + phase)
    else:
        p = np.zeros_like(a)
    p = (amount * p)[..., None]
    return base * (1.0 - p) + accent * p


def _support_albedo(rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    grey = rng.uniform(0.3, 0.45)
    weave = 0.03 * np.sin(2 * np.pi * 400.0 * a) * np.sin(2 * np.pi * 400.0 * b)
    return np.repeat((grey + weave)[..., None], 3, axis=-1) * np.array([1.0, 1.0, 1.05])


# ---------------------------------------------------------------------------------------------
# Defects: a height change and/or a colour change in a small blob on the object.


@dataclass
class Defect:
    kind: str
    centre: tuple[float, float]
    sigma: float  # spatial scale, metres
    amplitude: float  # height change, metres (0 for colour only)
    colour: np.ndarray | None
    elongation: float
    angle: float
    wobble: float

    def blob(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        x, y = _rotate(a, b, self.centre[0], self.centre[1], self.angle)
        return (x / (self.sigma * self.elongation)) ** 2 + (y / self.sigma) ** 2

    def dheight(self, a, b):
        if self.amplitude == 0.0:
            return np.zeros_like(a)
        return self.amplitude * np.exp(-0.5 * self.blob(a, b))

    def colour_mask(self, a, b):
        x, y = _rotate(a, b, self.centre[0], self.centre[1], self.angle)
        ripple = 1.0 + 0.25 * np.sin(3 * np.arctan2(y, x) + self.wobble)
        return self.blob(a, b) < (2.2**2) * ripple


def make_defect(kind: str, rng: np.random.Generator, obj: ObjectModel) -> Defect:
    centre = obj.place(rng)
    sigma = rng.uniform(0.0025, 0.004)
    amplitude = 0.0
    if kind == "bump":
        amplitude = rng.uniform(0.0015, 0.0025)
    elif kind == "dent":
        amplitude = -rng.uniform(0.0015, 0.0025)
    elif kind == "contamination":
        amplitude = rng.uniform(0.001, 0.002)
    colour = None
    if kind in ("stain", "contamination"):
        colours = [(0.25, 0.15, 0.08), (0.10, 0.10, 0.10), (0.55, 0.75, 0.20), (0.95, 0.92, 0.85)]
        colour = np.array(colours[int(rng.integers(len(colours)))])
    return Defect(
        kind=kind,
        centre=centre,
        sigma=sigma,
        amplitude=amplitude,
        colour=colour,
        elongation=rng.uniform(1.0, 2.0),
        angle=rng.uniform(0, np.pi),
        wobble=rng.uniform(0, 2 * np.pi),
    )


@dataclass
class Sample:
    rgb: np.ndarray  # uint8 (H, W, 3)
    xyz: np.ndarray  # float32 (H, W, 3)
    gt: np.ndarray  # bool (H, W)
    normals: np.ndarray  # float (H, W, 3), camera facing
    albedo: np.ndarray  # float (H, W, 3) in [0, 1], before shading
    extra_rgb: list[np.ndarray]  # other lighting conditions (Eyecandies)


def render_sample(
    kind: str,
    camera: Camera,
    rng: np.random.Generator,
    defect_kind: str | None = None,
    lights: Sequence[Sequence[float]] = (KEY_LIGHT,),
    dropout: float = DROPOUT,
) -> Sample:
    plane = Plane.random(rng)
    obj = make_object(kind, rng)
    # The defect draws from its own stream, so the same rng gives the same scene with or
    # without a defect (the tests compare the two).
    defect_rng = np.random.default_rng(int(rng.integers(0, 2**62)))
    defect = make_defect(defect_kind, defect_rng, obj) if defect_kind else None

    def height(a, b):
        h = obj.height(a, b)
        if defect is not None and defect.amplitude != 0.0:
            h = h + defect.dheight(a, b) * (h > 0.002)
        return h

    scene = ray_cast(camera, plane, height)
    on_object = obj.height(scene.a, scene.b) > 1e-4
    albedo = np.where(
        on_object[..., None],
        _texture(rng, scene.a, scene.b, obj.base_colour),
        _support_albedo(rng, scene.a, scene.b),
    )
    gt = np.zeros(on_object.shape, dtype=bool)
    if defect is not None:
        if defect.amplitude != 0.0:
            gt |= np.abs(defect.dheight(scene.a, scene.b)) > 0.0003
        if defect.colour is not None:
            stain = defect.colour_mask(scene.a, scene.b)
            albedo = np.where(stain[..., None], 0.2 * albedo + 0.8 * defect.colour, albedo)
            gt |= stain
        gt &= on_object
    images = []
    for light in lights:
        img = albedo * shade(scene.normals, light)[..., None]
        img = img * 255.0 + rng.normal(0.0, 1.5, img.shape)
        images.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
    xyz = scene.xyz.astype(np.float32)
    if dropout > 0:
        xyz[rng.uniform(size=xyz.shape[:2]) < dropout] = 0.0
    return Sample(
        rgb=images[0], xyz=xyz, gt=gt, normals=scene.normals, albedo=albedo, extra_rgb=images[1:]
    )


# ---------------------------------------------------------------------------------------------
# Writers.


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def _save_xyz(path: Path, xyz: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, xyz.astype(np.float32), photometric="rgb")


FOLDER_DEPTH_SCALE = 1e-4  # metres per unit of the folder layout's depth images (0.1 mm)


def defect_plan(n_test: int) -> list[str]:
    """Defect type of each test sample ('good' for about a third)."""
    n_good = max(1, round(n_test / 3)) if n_test > 1 else n_test
    return ["good"] * n_good + [DEFECT_ORDER[i % len(DEFECT_ORDER)] for i in range(n_test - n_good)]


def write_demo_dataset(
    out: str | Path,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = DEMO_TRAIN_IMAGES,
    n_test: int = DEMO_TEST_IMAGES,
    n_validation: int = 3,
) -> Path:
    """Write the demo dataset in the MVTec 3D-AD layout under ``out``; returns ``out``."""
    out = Path(out)
    for category in list(categories) if categories is not None else list(CATEGORIES):
        write_demo_category(out / category, category, seed, n_train, n_test, n_validation)
    return out


def write_demo_category(
    root: str | Path,
    category: str,
    seed: int = 0,
    n_train: int = DEMO_TRAIN_IMAGES,
    n_test: int = DEMO_TEST_IMAGES,
    n_validation: int = 3,
    layout: str = "mvtec3d",
) -> Path:
    """Write one demo category's ``train``, ``validation`` and ``test`` folders into ``root``.
    Each sample derives from (seed, category, split, kind, index) alone, so a category's files
    do not depend on which other categories are written. ``layout: folder`` writes the
    geometry as 16-bit depth images (``depth/``, :data:`FOLDER_DEPTH_SCALE` metres per unit)
    with the camera in ``intrinsics.json`` (pipeline/data/folder.py) instead of xyz TIFFs."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown demo category {category!r} (have {', '.join(CATEGORIES)})")
    root = Path(root)
    spec = CATEGORIES[category]
    camera = Camera(*spec["shape"], spec["focal"])
    jobs = [("train", "good", i) for i in range(n_train)]
    jobs += [("validation", "good", i) for i in range(n_validation)]
    counters: dict[str, int] = {}
    for kind in defect_plan(n_test):
        jobs.append(("test", kind, counters.get(kind, 0)))
        counters[kind] = counters.get(kind, 0) + 1
    for split, kind, index in jobs:
        rng = _rng(seed, category, split, kind, index)
        sample = render_sample(category, camera, rng, None if kind == "good" else kind)
        stem = f"{index:03d}"
        base = root / split / kind
        _save_png(base / "rgb" / f"{stem}.png", sample.rgb)
        if layout == "folder":
            _save_png(base / "depth" / f"{stem}.png", xyz_to_depth(sample.xyz, FOLDER_DEPTH_SCALE))
        else:
            _save_xyz(base / "xyz" / f"{stem}.tiff", sample.xyz)
        if split == "test" and not (kind == "good" and category in GOOD_GT_MISSING):
            code = 0 if kind == "good" else DEFECT_CODES[kind]
            _save_png(base / "gt" / f"{stem}.png", (sample.gt * code).astype(np.uint8))
    if layout == "folder":  # the pinhole camera of Camera.rays: pixel x at (x - w / 2) / f
        intrinsics = {"fx": spec["focal"], "fy": spec["focal"], "cx": camera.width / 2.0,
                      "cy": camera.height / 2.0, "depth_scale": FOLDER_DEPTH_SCALE}
        (root / INTRINSICS).write_text(json.dumps(intrinsics, indent=2) + "\n")
    return root


EYECANDIES_LIGHTS = (
    (0.0, 0.0, -1.0),  # image_0: all spotlights (frontal)
    (0.0, 0.7, -1.0),  # image_1: bottom
    (0.7, 0.0, -1.0),  # image_2: right
    (0.0, -0.7, -1.0),  # image_3: top
    (-0.7, 0.0, -1.0),  # image_4: left
    (-0.2, -0.3, -1.0),  # image_5: global
)


def write_demo_eyecandies(
    out: str | Path,
    seed: int = 0,
    category: str = "GummyBear",
    n_train: int = 6,
    n_validation: int = 2,
    n_test: int = 8,
    size: int = 256,
) -> Path:
    """Write one category in the Eyecandies layout under ``out``; returns ``out``.

    Test samples alternate good and bad (Eyecandies' test_public is 25 good + 25 bad); bad
    samples carry one of the demo defects, and ``NNN_mask.png`` is 255 on the defect.
    """
    out = Path(out)
    camera = Camera(size, size, FOCAL_LENGTH)
    for split, folder, count, digits in (
        ("train", "train", n_train, 3),
        ("validation", "val", n_validation, 3),
        ("test", "test_public", n_test, 2),
    ):
        data = out / category / folder / "data"
        for index in range(count):
            kind = None
            if split == "test" and index % 2 == 1:
                kind = DEFECT_ORDER[(index // 2) % len(DEFECT_ORDER)]
            rng = _rng(seed, "eyecandies", category, split, index)
            sample = render_sample(
                "GummyBear", camera, rng, kind, lights=EYECANDIES_LIGHTS, dropout=0.0
            )
            stem = f"{index:0{digits}d}"
            for j, img in enumerate([sample.rgb, *sample.extra_rgb]):
                _save_png(data / f"{stem}_image_{j}.png", img)
            z = sample.xyz[..., 2].astype(np.float64)
            lo, hi = float(np.floor(z.min() * 1000) / 1000), float(np.ceil(z.max() * 1000) / 1000)
            depth16 = np.round((z - lo) / (hi - lo) * 65535.0).astype(np.uint16)
            _save_png(data / f"{stem}_depth.png", depth16)
            (data / f"{stem}_info_depth.yaml").write_text(
                yaml.safe_dump({"normalization": {"min": lo, "max": hi}})
            )
            # Normals as Eyecandies stores them: camera frame with Y and Z flipped, to 0..255.
            n = sample.normals * np.array([1.0, -1.0, -1.0])
            _save_png(data / f"{stem}_normals.png", np.round((n + 1) / 2 * 255).astype(np.uint8))
            (data / f"{stem}_pose.txt").write_text(
                "\n".join(" ".join(f"{v:.6f}" for v in row) for row in np.eye(4)) + "\n"
            )
            if split == "test":
                _save_png(data / f"{stem}_mask.png", (sample.gt * 255).astype(np.uint8))
    return out


# ---------------------------------------------------------------------------------------------
# Training pairs for the demo normals model (pipeline/models/demo_training.py).

TRAINING_KINDS = ("disc", "dome", "slab", "GummyBear")
# Defects dealt to training pairs: half plain, the rest each defect kind (relief to learn from).
TRAINING_DEFECTS = (None, None, None, None, "bump", "dent", "stain", "contamination")


def training_camera(kind: str) -> Camera:
    """The demo camera of a category (the Eyecandies camera for GummyBear)."""
    if kind in CATEGORIES:
        return Camera(*CATEGORIES[kind]["shape"], CATEGORIES[kind]["focal"])
    return Camera(256, 256, FOCAL_LENGTH)


def render_training_pair(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB (H, W, 3) uint8 and its exact unit normals (H, W, 3) float64, camera facing, of
    training pair ``index``.

    The random stream is keyed by ``"demo-models"``, so no pair is a scene of the demo
    dataset (``write_demo_dataset`` keys by category and split) or of ``write_demo_eyecandies``
    (keyed by ``"eyecandies"``), whatever the seed. Each pair depends only on (seed, index).
    """
    kind = TRAINING_KINDS[index % len(TRAINING_KINDS)]
    rng = _rng(seed, "demo-models", kind, index)
    defect = TRAINING_DEFECTS[int(rng.integers(len(TRAINING_DEFECTS)))]
    sample = render_sample(kind, training_camera(kind), rng, defect, dropout=0.0)
    return sample.rgb, sample.normals
