"""``data.eyecandies_background``: the published Eyecandies converter leaves a constant non-zero
point at every background pixel (processing/preprocess_eyecandies.py:74-86); ``published``
follows it (xyz, foreground, real normals), ``zero`` keeps the clean background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.data import list_samples, load_sample
from pipeline.data.eyecandies import FOCAL_LENGTH
from pipeline.data.preprocess import PreprocessConfig, preprocess, real_normals
from pipeline.errors import ParamsError
from pipeline.params import parse_params

H = W = 64
LO, HI = 0.8, 1.1


def depth_map() -> np.ndarray:
    """A plane 1.0 m away with a box 10 cm in front of it (the object)."""
    depth = np.full((H, W), 1.0)
    depth[20:40, 20:44] = 0.9
    return depth


def write_sample(root: Path, pose: np.ndarray) -> Path:
    """One training sample in the Eyecandies layout (CandyCane/train/data/000_*)."""
    data = root / "CandyCane" / "train" / "data"
    data.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([xx * 4, yy * 4, np.full_like(xx, 90)], -1).astype(np.uint8)
    for j in range(6):
        Image.fromarray(rgb).save(data / f"000_image_{j}.png")
    raw = np.round((depth_map() - LO) / (HI - LO) * 65535).astype(np.uint16)
    Image.fromarray(raw).save(data / "000_depth.png")
    (data / "000_info_depth.yaml").write_text(yaml.safe_dump({"normalization": {"min": LO, "max": HI}}))
    np.savetxt(data / "000_pose.txt", pose)
    return root


def published_reference(depth: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """processing/preprocess_eyecandies.py (depth_to_pointcloud, remove_point_cloud_background),
    written out again with its own formulas: inv(K @ pose) on (u, v, 1, 1/d), times d; the
    rotation from the rows 256 / -256; background points set to -start, rotated back."""
    k = np.array([[FOCAL_LENGTH, 0, W / 2, 0], [0, FOCAL_LENGTH, H / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    v, u = np.mgrid[0:H, 0:W]
    vec = np.stack([u.ravel(), v.ravel(), np.ones(H * W), 1 / depth.ravel()])
    pc = (depth.reshape(-1, 1) * (np.linalg.inv(k @ pose) @ vec).T)[:, :3]
    dz, dy = pc[256, 1] - pc[-256, 1], pc[256, 2] - pc[-256, 2]
    norm = np.sqrt(dz ** 2 + dy ** 2)
    start = np.array([0, pc[-256, 1], pc[-256, 2]])
    c, s = dy / norm, dz / norm
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    proc = (rot @ (pc - start).T).T
    bg = (proc[:, 1] > -0.02) | (proc[:, 2] > 1.8) | (proc[:, 0] > 1) | (proc[:, 0] < -1)
    proc[bg] = -start
    out = (rot.T @ proc.T).T + start
    return (out[:, [0, 2, 1]] * [0.1, -0.1, 0.1]).reshape(H, W, 3)


def config(background: str) -> PreprocessConfig:
    return PreprocessConfig(size=32, clean_xyz=False, foreground="published", normals="published",
                            rgb_interpolation="bilinear", eyecandies_background=background)


IDENTITY = np.eye(4)
SHIFTED = np.array([[1, 0, 0, 0], [0, 1, 0, 5.0], [0, 0, 1, 0], [0, 0, 0, 1]])  # moves the point's z below 0


@pytest.mark.parametrize("pose", [IDENTITY, SHIFTED], ids=["identity", "shifted"])
def test_published_background_is_the_converters_point(tmp_path, pose):
    (ref,) = list_samples("eyecandies", write_sample(tmp_path, pose), "CandyCane", "train")
    raw = load_sample(ref, "published")
    object_px = np.any(raw.xyz != 0, -1)
    assert object_px[30, 30] and not object_px[5, 5] and 0 < object_px.mean() < 0.5
    depth = np.asarray(Image.open(ref.depth), dtype=np.float64) / 65535 * (HI - LO) + LO
    reference = published_reference(depth, pose)
    filled = np.where(object_px[..., None], raw.xyz, raw.background)
    np.testing.assert_allclose(filled, reference, atol=1e-6)
    assert raw.background[0] == 0 and np.all(raw.background[1:] != 0)


def test_foreground_and_normals_follow_the_point_or_stay_clean(tmp_path):
    encoded_z = {}
    for name, pose in (("identity", IDENTITY), ("shifted", SHIFTED)):
        (ref,) = list_samples("eyecandies", write_sample(tmp_path / name, pose), "CandyCane", "train")
        raw = load_sample(ref, "published")
        clean, follow = config("zero"), config("published")
        prep0 = preprocess(raw.rgb, raw.xyz, raw.gt, clean, raw.background)
        prep1 = preprocess(raw.rgb, raw.xyz, raw.gt, follow, raw.background)
        # published: the point passes the foreground test, the whole image is foreground
        assert prep1.fg.all() and 0 < prep0.fg.mean() < 0.6 and prep0.fg[15, 15] == 1
        assert np.allclose(prep1.xyz[0, 0], raw.background) and not prep0.xyz[0, 0].any()
        n0 = real_normals(raw.xyz, prep0, clean, raw.background)
        n1 = real_normals(raw.xyz, prep1, follow, raw.background)
        # the object's normals are the same; the background's are (0, 0, +-1)
        assert np.array_equal(n0[15, 15], n1[15, 15])
        assert np.allclose(n0[2, 2], [127 / 255, 127 / 255, 1.0])
        sign = 1.0 if raw.background[2] > 0 else -1.0
        assert np.allclose(n1[2, 2], [127 / 255, 127 / 255, 1.0 if sign > 0 else 0.0])
        encoded_z[name] = float(n1[2, 2, 2])
        # without a published point (the camera frame, MVTec) nothing changes
        assert np.array_equal(real_normals(raw.xyz, prep0, follow, None), n0)
    assert encoded_z == {"identity": 1.0, "shifted": 0.0}  # both orientations were exercised


def test_published_background_needs_the_published_eyecandies_frame():
    base = {"data": {"dataset": "eyecandies", "root": "x", "categories": ["CandyCane"],
                     "eyecandies_xyz": "published", "eyecandies_background": "published"}}
    assert parse_params(base).data.eyecandies_background == "published"
    base["data"]["eyecandies_xyz"] = "camera"
    with pytest.raises(ParamsError, match="data.eyecandies_background"):
        parse_params(base)
