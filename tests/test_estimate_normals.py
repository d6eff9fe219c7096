"""Stage ``estimate_normals``: Marigold normals of real and generated images."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from pipeline import normals_estimation as ne
from pipeline.artifacts import StoreWriter, open_store
from pipeline.errors import InputError, ModelError, ParamsError
from pipeline.params import Params, parse_params
from stages import estimate_normals as stage
from stages import layout

SIZE = 32
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "diffusion-models"


def make_params(cache: Path, root: Path, normals: str = "demo:tiny-marigold", **section: object) -> Params:
    values: dict[str, Any] = {"steps": 2, "ensemble": 3, "processing_resolution": 16,
                              "batch_size": 2, "seed": 0}
    values.update(section)
    return parse_params({
        "data": {"dataset": "mvtec3d", "root": str(root), "categories": ["bagel"], "size": SIZE},
        "models": {"normals": normals, "cache_dir": str(cache)},
        "estimate_normals": values,
    })


def write_rgb_store(path: Path, n: int, seed: int = 0, prefix: str = "good",
                    full: int | None = None) -> list[str]:
    """A prepare store or generated.zarr; ``full``: also `rgb_full` at that resolution."""
    ids = [f"{prefix}/{i:03d}" for i in range(n)]
    rng = np.random.default_rng(seed)
    with StoreWriter(path, attrs={"ids": ids, "labels": [i % 2 for i in range(n)]}) as writer:
        writer.create("rgb", n, (SIZE, SIZE, 3), "uint8")
        if n:
            writer.append("rgb", rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))
        if full is not None:
            writer.create("rgb_full", n, (full, full, 3), "uint8")
            if n:
                writer.append("rgb_full", rng.integers(0, 256, (n, full, full, 3), dtype=np.uint8))
    return ids


def write_dataset(root: Path, split: str, n: int, width: int = 40, height: int = 28,
                  seed: int = 0) -> None:
    """A minimal MVTec 3D-AD layout (good samples only) with non-square rgb images."""
    rng = np.random.default_rng(seed)
    folder = root / "bagel" / split / "good"
    for sub in ("rgb", "xyz"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / "rgb" / f"{i:03d}.png")
        tifffile.imwrite(folder / "xyz" / f"{i:03d}.tiff", np.zeros((height, width, 3), np.float32),
                         photometric="rgb")


def record_encoder_inputs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Make the stage's Marigold record the shape of every image its VAE encodes."""
    shapes: list[tuple[int, ...]] = []
    load = stage.load_marigold

    def loading(*args: Any, **kwargs: Any) -> Any:
        pipe, source = load(*args, **kwargs)
        pipe.vae.encoder.register_forward_pre_hook(
            lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
        return pipe, source

    monkeypatch.setattr(stage, "load_marigold", loading)
    return shapes


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def decoded(path: Path) -> np.ndarray:
    return open_store(path)["normals"][:].astype(np.float32) * 2.0 - 1.0


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_rgb_store(layout.prepared("bagel") / "train.zarr", 2, seed=1)
    write_rgb_store(layout.prepared("bagel") / "test.zarr", 3, seed=2)
    return tmp_path


def test_real_images_end_to_end_is_byte_identical(project: Path, cache: Path) -> None:
    params = make_params(cache, project)
    stats = stage.run(params, "bagel")
    out = layout.normals("bagel")
    for split, n in (("train", 2), ("test", 3)):
        store = open_store(out / f"{split}.zarr")
        arr = store["normals"][:]
        assert arr.shape == (n, SIZE, SIZE, 3) and arr.dtype == np.float16
        assert arr.min() >= 0 and arr.max() <= 1
        length = np.linalg.norm(arr.astype(np.float32) * 2 - 1, axis=-1)
        assert np.abs(length - 1).max() < 5e-3  # unit normals (float16 rounding only)
        assert store.attrs["ids"] == [f"good/{i:03d}" for i in range(n)]
        assert store.attrs["labels"] == [i % 2 for i in range(n)]
        assert store.attrs["model"]["model"] == "demo:tiny-marigold"
    assert stats["images"] == 5
    first = tree_digest(out)
    stage.run(params, "bagel")
    assert tree_digest(out) == first
    # Another seed gives other normals (the ensemble members are seeded).
    stage.run(make_params(cache, project, seed=1), "bagel")
    assert tree_digest(out) != first


def test_generated_images_and_empty_input(project: Path, cache: Path) -> None:
    params = make_params(cache, project)
    write_rgb_store(layout.augmented("bagel", 2, 0) / "generated.zarr", 3, prefix="gen/good/000")
    stage.run(params, "bagel", shots=2, seed=0)
    store = open_store(layout.normals_generated("bagel", 2, 0))
    assert store["normals"].shape == (3, SIZE, SIZE, 3)
    assert store.attrs["ids"] == [f"gen/good/000/{i:03d}" for i in range(3)]
    write_rgb_store(layout.augmented("bagel", 1, 0) / "generated.zarr", 0)
    stage.run(params, "bagel", shots=1, seed=0)
    empty = open_store(layout.normals_generated("bagel", 1, 0))
    assert empty["normals"].shape == (0, SIZE, SIZE, 3) and empty.attrs["ids"] == []


def test_batch_size_does_not_change_results(project: Path, cache: Path) -> None:
    stage.run(make_params(cache, project, batch_size=1), "bagel")
    one = decoded(layout.normals("bagel") / "test.zarr")
    stage.run(make_params(cache, project, batch_size=3), "bagel")
    three = decoded(layout.normals("bagel") / "test.zarr")
    assert np.abs(one - three).max() < 1e-2  # per-image seeds: batching changes nothing


def test_stores_match_serial_prediction_batch_by_batch(project: Path, cache: Path) -> None:
    # The stage reads ahead and writes on helper threads, largest store first; each store must
    # still hold exactly what one-call-per-batch prediction gives, in sample order.
    from pipeline.models.diffusion import demo_threads, load_marigold

    params = make_params(cache, project, batch_size=2)
    stage.run(params, "bagel")
    cpu = torch.device("cpu")
    pipe, source = load_marigold("demo:tiny-marigold", cache, cpu, torch.float32)
    p = params.estimate_normals
    run = ne.MarigoldRun(steps=p.steps, ensemble=p.ensemble, processing_resolution=16)
    for split in ("train", "test"):
        inputs = open_store(layout.prepared("bagel") / f"{split}.zarr")
        ids, rgb = inputs.attrs["ids"], inputs["rgb"][:]
        with demo_threads(cpu, source):  # the stage's thread count: same arithmetic
            expected = np.concatenate([
                ne.predict_normals(pipe, rgb[i : i + 2],
                                   ne.image_seeds(p.seed, ids[i : i + 2], p.seeding), run, SIZE)
                for i in range(0, len(ids), 2)
            ])
        stored = open_store(layout.normals("bagel") / f"{split}.zarr")["normals"][:]
        assert np.array_equal(stored, expected), split


@pytest.mark.parametrize("where", ["model", "write"])
def test_failure_mid_run_leaves_no_store(project: Path, cache: Path,
                                         monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    # A failure in a model call (main thread) or in a write (helper thread), after other
    # batches were written, leaves neither an output nor a temporary folder.
    calls = {"n": 0}
    target = "marigold_prediction" if where == "model" else "finish_normals"
    original = getattr(stage, target)

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError(f"injected {where} failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(stage, target, failing)
    write_rgb_store(layout.augmented("bagel", 2, 0) / "generated.zarr", 5, prefix="gen/good/000")
    params = make_params(cache, project, batch_size=2)
    with pytest.raises(RuntimeError, match=f"injected {where} failure"):
        stage.run(params, "bagel")
    assert not (project / "artifacts" / "normals").exists()  # nor the parents it created
    calls["n"] = 0
    with pytest.raises(RuntimeError, match=f"injected {where} failure"):
        stage.run(params, "bagel", shots=2, seed=0)
    assert not (project / "artifacts" / "normals_generated").exists()


def test_bad_inputs_fail_without_artifacts(project: Path, cache: Path) -> None:
    params = make_params(cache, project)
    with pytest.raises(InputError, match="generated.zarr"):
        stage.run(params, "bagel", shots=4, seed=0)  # augment has not run for k=4
    with StoreWriter(layout.prepared("bagel") / "test.zarr", attrs={"ids": ["good/000"]}) as w:
        w.write("rgb", np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(InputError, match="test.zarr.*data.size"):
        stage.run(params, "bagel")
    with StoreWriter(layout.prepared("bagel") / "test.zarr", attrs={}) as w:
        w.write("rgb", np.zeros((1, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(InputError, match="test.zarr.*'ids'"):
        stage.run(params, "bagel")
    write_rgb_store(layout.prepared("bagel") / "test.zarr", 1)
    with pytest.raises(ModelError, match="models.normals.*someone/marigold-not-cached"):
        stage.run(make_params(cache, project, normals="someone/marigold-not-cached"), "bagel",
                  shots=None)
    with pytest.raises(ParamsError, match="estimate_normals.processing_resolution"):
        stage.run(make_params(cache, project, processing_resolution=18), "bagel")
    with pytest.raises(InputError, match="--seed needs --shots"):
        stage.run(params, "bagel", seed=0)
    assert not (project / "artifacts" / "normals").exists()
    assert not (project / "artifacts" / "normals_generated").exists()


def _plane(gx: float, gy: float, size: int = 15) -> np.ndarray:
    """Organised camera-frame points (X right, Y down, Z forward) of z = 0.5 + gx*x + gy*y."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = (u - size // 2) * 0.001
    y = (v - size // 2) * 0.001
    return np.stack([x, y, 0.5 + gx * x + gy * y], -1).astype(np.float32)


@pytest.mark.parametrize("gx, gy", [(0.6, 0.0), (0.0, 0.6), (-0.4, 0.3)])
def test_marigold_frame_matches_real_normal_convention(gx: float, gy: float) -> None:
    # The same tilted plane as Marigold would see it: X right, Y up, Z towards the viewer.
    # Its camera-facing normal in the camera frame is (gx, gy, -1)/|.|; in Marigold's frame
    # that is (gx, -gy, 1)/|.|.
    m = np.array([gx, -gy, 1.0]) / np.linalg.norm([gx, -gy, 1.0])
    marigold = torch.tensor(m, dtype=torch.float32).view(1, 3, 1, 1)
    ours = ne.marigold_to_pipeline_frame(marigold).view(3).numpy()
    # Real-normal definition (DESIGN 1.2): oriented towards the camera, then negated.
    facing = np.array([gx, gy, -1.0]) / np.linalg.norm([gx, gy, -1.0])
    assert np.allclose(ours, -facing, atol=1e-6)
    try:
        from pipeline.normals import estimate_normals as real_normals
    except ImportError:  # pragma: no cover - the real-normal module is another stage's
        return
    real = real_normals(_plane(gx, gy), radius=0.01)[7, 7]
    assert np.allclose(ours, real, atol=1e-3)


def test_resize_renormalises_and_fixes_degenerate_vectors() -> None:
    n = torch.zeros(1, 3, 4, 4)
    n[0, 0, :, :2] = 1.0  # left half faces +x, right half faces -x: bilinear mixes them
    n[0, 0, :, 2:] = -1.0
    n[0, :, 0, 0] = 0.0  # a degenerate vector
    out = ne.resize_normals(n, 8)
    assert out.shape == (1, 3, 8, 8)
    assert torch.allclose(out.norm(dim=1), torch.ones(1, 8, 8), atol=1e-5)
    assert torch.equal(ne.unit_normals(n)[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    enc = ne.encode(out)
    assert enc.dtype == np.float16 and enc.shape == (1, 8, 8, 3)
    assert enc.min() >= 0 and enc.max() <= 1


def test_sample_seed_is_stable_and_distinct() -> None:
    assert ne.sample_seed(0, "good/000") == ne.sample_seed(0, "good/000")
    assert len({ne.sample_seed(s, i) for s in (0, 1) for i in ("good/000", "good/001")}) == 4


# --------------------------------------------------------------------------------------------
# The published path (OFFICIAL.md items 5, 6): original resolution, model default, uint8 output


def published(cache: Path, root: Path, **section: object) -> Params:
    values: dict[str, Any] = {"input": "original", "processing_resolution": None,
                              "precision": "fp32", "output": "uint8", "flip_x": False,
                              "seeding": "same_per_image", "seed": 42}
    values.update(section)
    return make_params(cache, root, **values)


@pytest.fixture
def dataset(project: Path) -> Path:
    """The dataset behind the project's prepare stores: 2 train, 3 test images of 40 x 28."""
    root = project / "data"
    write_dataset(root, "train", 2, seed=1)
    write_dataset(root, "test", 3, seed=2)
    return root


def test_original_resolution_input_reaches_the_model(
        dataset: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real images: the dataset's 40 x 28 rgb padded to 40 x 40 (not the 32 x 32 prepare crop).
    shapes = record_encoder_inputs(monkeypatch)
    stage.run(published(cache, dataset, processing_resolution=0, batch_size=3), "bagel")
    assert shapes and {s[1:] for s in shapes} == {(3, 40, 40)}
    assert sum(s[0] for s in shapes) == 5  # every image, each encoded once
    test = open_store(layout.normals("bagel") / "test.zarr")
    assert test["normals"].shape == (3, SIZE, SIZE, 3)
    assert "padded square" in test.attrs["input"]
    # processing_resolution null: the model's default (the tiny model's 64).
    shapes.clear()
    stage.run(published(cache, dataset), "bagel")
    assert {s[1:] for s in shapes} == {(3, 64, 64)}
    assert open_store(layout.normals("bagel") / "test.zarr").attrs["processing_resolution"] == 64
    # Generated images: `rgb_full` (48 x 48 here), not `rgb`.
    write_rgb_store(layout.augmented("bagel", 2, 0) / "generated.zarr", 3, prefix="gen/good/000",
                    full=48)
    shapes.clear()
    stage.run(published(cache, dataset, processing_resolution=0), "bagel", shots=2, seed=0)
    assert {s[1:] for s in shapes} == {(3, 48, 48)}
    assert open_store(layout.normals_generated("bagel", 2, 0))["normals"].shape == (3, SIZE, SIZE, 3)


def test_original_input_is_the_padded_dataset_image(dataset: Path, cache: Path) -> None:
    # The stored normals are those of pad_square(dataset rgb), zeros around, as prepare pads.
    from pipeline.models.diffusion import demo_threads, load_marigold

    params = published(cache, dataset, processing_resolution=0, batch_size=1)
    stage.run(params, "bagel")
    cpu = torch.device("cpu")
    pipe, source = load_marigold("demo:tiny-marigold", cache, cpu, torch.float32)
    rgb = np.array(Image.open(dataset / "bagel/test/good/rgb/001.png"))
    padded = np.zeros((40, 40, 3), np.uint8)
    padded[6:34] = rgb  # 28 rows centred in 40
    run = ne.MarigoldRun(steps=2, ensemble=3, processing_resolution=0, seeding="same_per_image",
                         output="uint8", flip_x=False)
    with demo_threads(cpu, source):
        expected = ne.predict_normals(pipe, padded[None], [42], run, SIZE)
    stored = open_store(layout.normals("bagel") / "test.zarr")["normals"][1:2]
    assert np.array_equal(stored, expected)


def test_missing_rgb_full_and_missing_samples_are_clear_errors(dataset: Path, cache: Path) -> None:
    write_rgb_store(layout.augmented("bagel", 2, 0) / "generated.zarr", 2, prefix="gen/good/000")
    with pytest.raises(InputError, match=r"generated\.zarr: no array 'rgb_full'"):
        stage.run(published(cache, dataset), "bagel", shots=2, seed=0)
    write_rgb_store(layout.prepared("bagel") / "test.zarr", 4)  # good/003 is not in the dataset
    with pytest.raises(InputError, match=r"data/bagel: sample 'good/003' of .*test\.zarr"):
        stage.run(published(cache, dataset), "bagel")
    assert not (dataset.parent / "artifacts" / "normals").exists()
    assert not (dataset.parent / "artifacts" / "normals_generated").exists()


def test_ensembling_reduction_reaches_the_pipeline(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import MarigoldNormalsPipeline

    from pipeline.models.diffusion import load_marigold

    pipe, _ = load_marigold("demo:tiny-marigold", cache, torch.device("cpu"), torch.float32)
    seen: list[str] = []
    original = MarigoldNormalsPipeline.ensemble_normals

    def spy(normals: torch.Tensor, output_uncertainty: bool, **kwargs: Any) -> Any:
        seen.append(kwargs["reduction"])
        return original(normals, output_uncertainty, **kwargs)

    monkeypatch.setattr(MarigoldNormalsPipeline, "ensemble_normals", staticmethod(spy))
    images = ne.model_input(np.random.default_rng(0).integers(0, 256, (2, 24, 24, 3), np.uint8))
    out = {}
    for reduction in ("closest", "mean"):
        run = ne.MarigoldRun(steps=2, ensemble=4, processing_resolution=0, reduction=reduction)
        out[reduction] = ne.marigold_prediction(pipe, images, [1, 2], run)
    assert seen == ["closest"] * 2 + ["mean"] * 2  # one call per image
    assert not torch.allclose(out["closest"], out["mean"])


def _prediction(seed: int = 0) -> torch.Tensor:
    """Unit normals (1, 3, 12, 12) as Marigold returns them at its processing resolution."""
    n = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    n[:, 2] = n[:, 2].abs()
    return n / n.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("output", ["float", "uint8"])
def test_flip_and_no_flip_frames_differ_exactly_by_the_sign_of_x(output: str) -> None:
    prediction = _prediction()
    frames = {flip: ne.finish_normals(prediction, 40, SIZE, ne.MarigoldRun(
        steps=1, ensemble=1, processing_resolution=0, output=output, flip_x=flip))
        for flip in (False, True)}
    plain, flipped = frames[False], frames[True]
    assert np.array_equal(plain[..., 1:], flipped[..., 1:])  # y and z: bit for bit
    if output == "uint8":
        # the stored q / 255: the two x values are q and 255 - q
        q = np.rint(plain[..., 0].astype(np.float64) * 255).astype(int)
        q_flipped = np.rint(flipped[..., 0].astype(np.float64) * 255).astype(int)
        assert np.array_equal(q + q_flipped, np.full_like(q, 255))
    else:
        x, x_flipped = (f[..., 0].astype(np.float32) * 2 - 1 for f in (plain, flipped))
        assert np.abs(x + x_flipped).max() < 1e-3  # float16 rounding only
    assert np.abs(plain[..., 0] - flipped[..., 0]).max() > 0.1


def test_uint8_output_is_quantised_as_published() -> None:
    import torchvision.transforms.functional as TF

    # Truncation, not rounding; clipping first: 0 -> 127, 1 -> 255, -1 -> 0, 1.3 -> 255.
    values = torch.tensor([0.0, 1.0, -1.0, 1.3, -0.999, 0.5]).view(1, 1, 6, 1).repeat(1, 3, 1, 1)
    q = ne.quantize(values)  # (1, 6, 1, 3)
    assert q.dtype == np.uint8 and q.shape == (1, 6, 1, 3)
    assert q[0, :, 0, 0].tolist() == [127, 255, 0, 255, 0, 191]
    # The whole path, against torchvision's resize (the published resize back, antialiased)
    # and a PIL bilinear resize of the quantised image (the published loader).
    prediction = _prediction(1)
    run = ne.MarigoldRun(steps=1, ensemble=1, processing_resolution=0, output="uint8",
                         flip_x=False)
    ours = ne.finish_normals(prediction, 40, SIZE, run)
    back = TF.resize(prediction, [40, 40], interpolation=TF.InterpolationMode.BILINEAR,
                     antialias=True)[0].clamp(-1, 1).permute(1, 2, 0).numpy()
    png = ((back + 1) * 127.5).astype(np.uint8)
    loaded = np.asarray(Image.fromarray(png).resize((SIZE, SIZE), Image.BILINEAR))
    assert ours.dtype == np.float16 and ours.shape == (1, SIZE, SIZE, 3)
    assert np.array_equal(np.rint(ours[0].astype(np.float64) * 255).astype(np.uint8), loaded)


def test_published_member_noise_is_sequential_draws_of_one_generator() -> None:
    # Published (OFFICIAL 18): batch size 1, so each ensemble member's (1, 4, h, w) noise is
    # drawn in turn from the one generator seeded with 42 for the image.
    gen = torch.Generator().manual_seed(42)
    draws = [torch.randn((1, 4, 3, 3), generator=gen) for _ in range(5)]
    ours = ne.published_member_noise(42, 5, (4, 3, 3), torch.device("cpu"), torch.float32)
    assert torch.equal(ours, torch.cat(draws))
    # One (E, 4, h, w) draw is other noise (here: 36 values a member, not a multiple of the
    # CPU sampler's 16-value blocks; CUDA's Philox offsets advance per call).
    at_once = torch.randn((5, 4, 3, 3), generator=torch.Generator().manual_seed(42))
    assert not torch.equal(at_once, ours)


def test_same_per_image_seeding_is_the_published_generator(cache: Path) -> None:
    # Published: per image a fresh generator seeded with the seed, the members' noise drawn
    # from it one after another. Ours builds those latents itself; the pipeline given them must
    # give what our prediction gives, for each image alone and in a batch.
    from pipeline.models.diffusion import load_marigold

    # The untrained model: the trained one turns the last-bit differences of batched arithmetic
    # into visible ones on these noise images (the "closest" member can change at a pixel).
    pipe, _ = load_marigold("demo:tiny-marigold-untrained", cache, torch.device("cpu"),
                            torch.float32)
    rgb = np.random.default_rng(3).integers(0, 256, (2, 24, 24, 3), np.uint8)
    run = ne.MarigoldRun(steps=2, ensemble=3, processing_resolution=20, seeding="same_per_image")
    h, w = ne.latent_size(pipe, 24, 24, 20)
    assert (4 * h * w) % 16  # a size where sequential and one-shot CPU draws differ
    both = ne.marigold_prediction(pipe, ne.model_input(rgb), [42, 42], run)
    noise = ne.published_member_noise(42, 3, (4, h, w), torch.device("cpu"), torch.float32)
    for i in range(2):
        image = ne.model_input(rgb[i : i + 1])
        settings = dict(num_inference_steps=2, ensemble_size=3, processing_resolution=20,
                        match_input_resolution=False, batch_size=3, output_type="pt")
        theirs = pipe(image, latents=noise, **settings).prediction
        ours = ne.marigold_prediction(pipe, image, [42], run)
        assert torch.equal(ours, theirs)
        # diffusers' own seeded draw is one (E, 4, h, w) tensor: other noise
        one_draw = pipe(image, generator=torch.Generator().manual_seed(42), **settings).prediction
        assert not torch.allclose(ours, one_draw, atol=1e-3)
        # In a batch of two images: the same noise (the arithmetic of a larger batch differs
        # in the last bits only).
        assert torch.allclose(both[i : i + 1], theirs, atol=1e-3)
    # The same image gets the same noise under same_per_image, other noise under per_sample.
    twice = np.concatenate([rgb[:1], rgb[:1]])
    same = ne.marigold_prediction(pipe, ne.model_input(twice), ne.image_seeds(
        42, ["good/000", "good/001"], "same_per_image"), run)
    assert torch.equal(same[0], same[1])
    per_sample = ne.marigold_prediction(pipe, ne.model_input(twice), ne.image_seeds(
        42, ["good/000", "good/001"], "per_sample"), ne.MarigoldRun(2, 3, 20))
    assert not torch.allclose(per_sample[0], per_sample[1])


def test_uint8_input_resize_is_the_published_marigold_resize(cache: Path) -> None:
    # The published Marigold code resizes its uint8 input tensor with torchvision (antialiased
    # bilinear, longer edge to the processing resolution, int() of the scaled edges): the
    # model sees uint8 values. diffusers resizes the [0, 1] float image and does not round.
    from torchvision.transforms.functional import InterpolationMode, resize

    from pipeline.models.diffusion import load_marigold

    rgb = np.random.default_rng(4).integers(0, 256, (1, 30, 30, 3), np.uint8)
    images = ne.model_input(rgb)
    ours = ne.resize_like_published(images, 20)
    published = resize(torch.from_numpy(rgb).permute(0, 3, 1, 2), [20, 20],
                       InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(ours * 255, published.float())
    as_float = torch.nn.functional.interpolate(images, size=(20, 20), mode="bilinear",
                                               antialias=True, align_corners=False)
    assert not torch.allclose(as_float * 255, (as_float * 255).round())  # not on the grid
    assert ne.resize_like_published(images, 0) is images

    pipe, _ = load_marigold("demo:tiny-marigold-untrained", cache, torch.device("cpu"),
                            torch.float32)
    run = ne.MarigoldRun(steps=2, ensemble=2, processing_resolution=20,
                         seeding="same_per_image", input_resize="uint8")
    h, w = ne.latent_size(pipe, 20, 20, 0)
    noise = ne.published_member_noise(42, 2, (4, h, w), torch.device("cpu"), torch.float32)
    theirs = pipe(published.float() / 255, latents=noise, num_inference_steps=2, ensemble_size=2,
                  processing_resolution=0, match_input_resolution=False, batch_size=2,
                  output_type="pt").prediction
    assert torch.equal(ne.marigold_prediction(pipe, images, [42], run), theirs)
    float_resize = ne.marigold_prediction(pipe, images, [42],
                                          dataclasses.replace(run, input_resize="float"))
    assert not torch.equal(float_resize, theirs)


def test_ensemble_batch_size_changes_only_the_batching(cache: Path) -> None:
    # MarigoldRun.batch_size 1 runs the ensemble members one at a time (the published script),
    # 0 all at once (the stage): the same noise, the same prediction up to batched arithmetic.
    from pipeline.models.diffusion import load_marigold

    pipe, _ = load_marigold("demo:tiny-marigold-untrained", cache, torch.device("cpu"),
                            torch.float32)
    calls: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: calls.append(int(args[0].shape[0])))
    rgb = np.random.default_rng(5).integers(0, 256, (1, 24, 24, 3), np.uint8)
    run = ne.MarigoldRun(steps=2, ensemble=3, processing_resolution=16, seeding="same_per_image")
    batched = ne.marigold_prediction(pipe, ne.model_input(rgb), [42], run)
    assert calls == [3, 3]
    calls.clear()
    one = ne.marigold_prediction(pipe, ne.model_input(rgb), [42], dataclasses.replace(run, batch_size=1))
    assert calls == [1] * 6
    assert torch.allclose(one, batched, atol=1e-3)


def test_published_path_is_reproducible_and_seeded(dataset: Path, cache: Path) -> None:
    out = layout.normals("bagel")
    stage.run(published(cache, dataset), "bagel")
    first = tree_digest(out)
    stage.run(published(cache, dataset), "bagel")
    assert tree_digest(out) == first
    stage.run(published(cache, dataset, seed=7), "bagel")
    assert tree_digest(out) != first


@pytest.mark.parametrize(("key", "value"), [
    ("input", "full"), ("processing_resolution", -1), ("precision", "bf16"),
    ("reduction", "median"), ("output", "png"), ("flip_x", "sideways"), ("seeding", "global"),
])
def test_bad_params_name_the_key(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ParamsError, match=rf"estimate_normals\.{key}"):
        make_params(tmp_path, tmp_path, **{key: value})


def test_null_resolution_without_a_model_default_names_the_key(
        project: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load = stage.load_marigold

    def without_default(*args: Any, **kwargs: Any) -> Any:
        pipe, source = load(*args, **kwargs)
        pipe.default_processing_resolution = None
        return pipe, source

    monkeypatch.setattr(stage, "load_marigold", without_default)
    with pytest.raises(ParamsError, match=r"estimate_normals\.processing_resolution: null"):
        stage.run(make_params(cache, project, processing_resolution=None), "bagel")
    assert not (project / "artifacts" / "normals").exists()
