"""Stage ``augment``: LoRA training with peft, diffusers LoRA files, img2img generation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.augment import generation, lora_files
from pipeline.augment import images as image_ops
from pipeline.augment import lora_training as training
from pipeline.augment.images import resize_rgb
from pipeline.artifacts import StoreWriter, open_store
from pipeline.errors import InputError, ModelError, ParamsError
from pipeline.models import diffusion as md
from pipeline.params import Params, parse_params
from stages import augment as stage
from stages import layout

CPU = torch.device("cpu")
SIZE = 32  # data.size for the synthetic stores (small: fast)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "diffusion-models"


def make_params(cache: Path, root: Path, **augment: object) -> Params:
    section = {"n_per_shot": 2, "steps": 3, "resolution": 32, "inference_steps": 5,
               "strength": 0.4, "lora_rank": 4, "lr": 1e-3}
    section.update(augment)
    return parse_params({
        "data": {"dataset": "mvtec3d", "root": str(root), "categories": ["bagel"], "size": SIZE},
        "fewshot": {"shots": [1, 2], "seeds": [0]},
        "models": {"diffusion": "demo:tiny-sd", "cache_dir": str(cache)},
        "augment": section,
        "fit_mapper": {"steps": {1: 1, 2: 1}},
    })


def write_prepare(root: Path, n: int = 3) -> list[str]:
    """A prepare output for bagel: train.zarr with n smooth coloured images, and shots.json."""
    ids = [f"good/{i:03d}" for i in range(n)]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    images = np.stack([
        np.stack([xx * 255, yy * 255, np.full_like(xx, 60 * (i + 1))], -1) for i in range(n)
    ]).astype(np.uint8)
    folder = root / layout.prepared("bagel")
    with StoreWriter(folder / "train.zarr", attrs={"ids": ids}) as writer:
        writer.create("rgb", n, (SIZE, SIZE, 3), "uint8")
        writer.append("rgb", images)
    (folder / "shots.json").write_text(json.dumps({"k1-s0": ids[:1], "k2-s0": ids[:2]}))
    return ids


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_prepare(tmp_path)
    return tmp_path


def test_stage_end_to_end_is_byte_identical(project: Path, cache: Path) -> None:
    params = make_params(cache, project)
    stats = stage.run(params, "bagel", shots=2, seed=0)
    out = layout.augmented("bagel", 2, 0)
    store = open_store(out / "generated.zarr")
    rgb = store["rgb"][:]
    assert rgb.shape == (4, SIZE, SIZE, 3) and rgb.dtype == np.uint8
    assert store.attrs["ids"] == ["gen/good/000/0", "gen/good/000/1", "gen/good/001/0",
                                  "gen/good/001/1"]
    assert store.attrs["source_ids"] == ["good/000", "good/000", "good/001", "good/001"]
    assert store.attrs["seeds"] == [generation.image_seed(0, 2, 0, i, j) for i in (0, 1) for j in (0, 1)]
    assert len(set(store.attrs["seeds"])) == 4
    assert store.attrs["base_model"] == "demo:tiny-sd"
    assert store.attrs["stage"] == "augment" and store.attrs["params"]["n_per_shot"] == 2
    assert not np.array_equal(rgb[0], rgb[1])  # different seeds, different images
    meta = lora_files.read_lora_metadata(out / "lora.safetensors")
    assert meta[lora_files.BASE_MODEL_KEY] == "demo:tiny-sd" and meta[lora_files.STATUS_KEY] == "trained"
    assert stats["lora_steps"] == 3 and stats["images"] == 4
    # The artifact reproduces: a fresh pipeline + the saved LoRA + the recorded seeds give the
    # stored images again.
    pipe, source = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    assert lora_files.load_lora(pipe, out / "lora.safetensors", base_model="demo:tiny-sd")
    generation.use_euler_ancestral(pipe)
    shot = open_store(layout.prepared("bagel") / "train.zarr")["rgb"][1]
    with md.demo_threads(CPU, source):
        full, again = generation.generate(pipe, shot, "a photo of sks bagel", store.attrs["seeds"][2:],
                                   strength=0.4, guidance=4.0, inference_steps=5,
                                   resolution=32, out_size=SIZE)
    assert np.array_equal(again, rgb[2:])
    assert store["rgb_full"].shape == (4, 32, 32, 3)  # at augment.resolution
    assert np.array_equal(full, store["rgb_full"][2:])
    first = tree_digest(out)
    stage.run(params, "bagel", shots=2, seed=0)
    assert tree_digest(out) == first
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp leftovers


def test_lora_changes_output_and_reloads_identically(tmp_path: Path, cache: Path) -> None:
    images = [np.full((32, 32, 3), v, np.uint8) for v in (40, 200)]
    cfg = training.LoraTraining(rank=4, targets=("to_q", "to_k", "to_v", "to_out.0"),
                           train_text_encoder=True, lr=1e-2, steps=3, resolution=32,
                           color_jitter=0.1, seed=0)
    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    gen = torch.Generator().manual_seed(0)
    sample, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500])
    tokens = pipe.tokenizer("a photo of sks bagel", padding="max_length",
                            max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids

    def output(p: object) -> torch.Tensor:
        with torch.no_grad():
            text = p.text_encoder(tokens)[0]
            return p.unet(sample, t, text).sample

    before = output(pipe)
    losses = training.train_lora(pipe, images, "a photo of sks bagel", cfg)
    assert len(losses) == 3 and all(np.isfinite(losses))
    after = output(pipe)
    assert (after - before).abs().max() > 1e-4  # the LoRA changes the model
    lora_files.save_lora(pipe, tmp_path, "lora.safetensors", md.DEMO_SD, train_text_encoder=True)
    keys = load_file(tmp_path / "lora.safetensors").keys()
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys)

    fresh, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    assert torch.equal(output(fresh), before)
    fresh.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")  # plain diffusers API
    assert torch.allclose(output(fresh), after, atol=1e-6)
    other, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    assert lora_files.load_lora(other, tmp_path / "lora.safetensors", base_model=md.DEMO_SD)
    assert torch.allclose(output(other), after, atol=1e-5)


def _one_step_lora(folder: Path, cache: Path, base_model: str, train_text_encoder: bool,
                   seed: int) -> Path:
    """A LoRA trained for one step on one flat image and saved under ``base_model``."""
    images = [np.full((32, 32, 3), 90 + 30 * seed, np.uint8)]
    cfg = training.LoraTraining(rank=4, targets=("to_q", "to_v"),
                           train_text_encoder=train_text_encoder, lr=1e-3, steps=1,
                           resolution=32, color_jitter=0.0, seed=seed)
    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    training.train_lora(pipe, images, "x", cfg)
    return lora_files.save_lora(pipe, folder, "lora.safetensors", base_model, train_text_encoder)


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_lora_from_another_base_model_is_rejected(tmp_path: Path, cache: Path) -> None:
    path = _one_step_lora(tmp_path, cache, "someone/other-base", False, seed=1)
    fresh, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    with pytest.raises(ModelError, match=f"{path}.*'someone/other-base'"):
        lora_files.load_lora(fresh, path, base_model=md.DEMO_SD)
    # No recorded id, but tensors that do not fit this UNet (another architecture).
    _, tensors = _read_safetensors(path)
    down = next(k for k in tensors if "down" in k or "lora_A" in k)
    tensors[down] = torch.zeros(tensors[down].shape[0], tensors[down].shape[1] + 5)
    bad = tmp_path / "bad" / "lora.safetensors"
    bad.parent.mkdir()
    save_file(tensors, str(bad), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=f"{bad}.*does not fit"):
        lora_files.load_lora(fresh, bad)
    with pytest.raises(ModelError, match="LoRA file not found"):
        lora_files.load_lora(fresh, tmp_path / "missing.safetensors")


def test_lora_file_equals_a_full_reserialisation(tmp_path: Path, cache: Path) -> None:
    # save_lora adds our metadata by rewriting the header of diffusers' file only; the bytes
    # must equal re-serialising every tensor with the merged metadata (the former way).
    path = _one_step_lora(tmp_path, cache, md.DEMO_SD, True, seed=2)
    metadata, tensors = _read_safetensors(path)
    assert metadata[lora_files.BASE_MODEL_KEY] == md.DEMO_SD and metadata[lora_files.STATUS_KEY] == "trained"
    again = tmp_path / "again.safetensors"
    save_file(tensors, str(again), metadata=metadata)
    lora_files.canonicalise_safetensors(again)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("failing", ["lora write", "store append", "second image batch"])
def test_failure_mid_stage_leaves_no_artifact(project: Path, cache: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              failing: str) -> None:
    # The LoRA file and the generated store are written on a helper thread during generation;
    # a failure there or of the generation itself must fail the stage and leave neither an
    # output nor a temporary folder.
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(f"injected {failing} failure")

    if failing == "lora write":
        monkeypatch.setattr(stage, "write_lora", fail)
    elif failing == "store append":
        monkeypatch.setattr(stage.StoreWriter, "append", fail)
    else:
        real_generate, calls = stage.generate, []

        def generate_once(*args: object, **kwargs: object) -> np.ndarray:
            calls.append(1)
            if len(calls) == 2:
                fail()
            return real_generate(*args, **kwargs)

        monkeypatch.setattr(stage, "generate", generate_once)
    with pytest.raises(OSError, match=f"injected {failing} failure"):
        stage.run(make_params(cache, project), "bagel", shots=2, seed=0)
    # nothing at all: the failed run also removes the parent folders it created
    assert not (project / "artifacts" / "augment").exists()


def test_n_per_shot_zero_writes_empty_outputs(project: Path, cache: Path) -> None:
    params = make_params(cache, project, n_per_shot=0)
    stats = stage.run(params, "bagel", shots=1, seed=0)
    out = layout.augmented("bagel", 1, 0)
    store = open_store(out / "generated.zarr")
    assert store["rgb"].shape == (0, SIZE, SIZE, 3) and store.attrs["ids"] == []
    assert stats["lora_steps"] == 0
    assert lora_files.read_lora_metadata(out / "lora.safetensors")[lora_files.STATUS_KEY] == "empty"
    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    assert lora_files.load_lora(pipe, out / "lora.safetensors") is False


def test_released_mappers_skip_augmentation(project: Path, cache: Path, monkeypatch) -> None:
    """fit_mapper.mappers official converts the released mappers, which read no generated
    image: augment writes the empty outputs without loading the diffusion model."""
    params = make_params(cache, project)
    # model_copy: the official setup's other keys (ViT-B/8, the checkpoint folder) do not
    # matter to augment
    params = params.model_copy(update={"fit_mapper": params.fit_mapper.model_copy(
        update={"mappers": "official"})})

    def no_model(*args, **kwargs):
        raise AssertionError("the diffusion model was loaded")

    monkeypatch.setattr(stage, "load_img2img", no_model)
    stats = stage.run(params, "bagel", shots=1, seed=0)
    out = layout.augmented("bagel", 1, 0)
    assert open_store(out / "generated.zarr").attrs["ids"] == [] and stats["lora_steps"] == 0
    assert lora_files.read_lora_metadata(out / "lora.safetensors")[lora_files.STATUS_KEY] == "empty"


def test_k_without_shots_entry_names_fewshot_shots(project: Path, cache: Path) -> None:
    params = make_params(cache, project)
    with pytest.raises(InputError, match="fewshot.shots"):
        stage.run(params, "bagel", shots=4, seed=0)
    assert not (project / "artifacts" / "augment").exists()


def test_negative_n_per_shot_is_rejected_by_params(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(ParamsError, match="augment.n_per_shot"):
        make_params(cache, tmp_path, n_per_shot=-1)


def test_bad_generation_and_target_params(project: Path, cache: Path) -> None:
    with pytest.raises(ParamsError, match="augment.strength"):
        stage.run(make_params(cache, project, strength=0.1, inference_steps=5), "bagel", 1, 0)
    with pytest.raises(ParamsError, match="augment.resolution"):
        stage.run(make_params(cache, project, resolution=34), "bagel", 1, 0)
    with pytest.raises(ParamsError, match="augment.lora_targets"):
        stage.run(make_params(cache, project, lora_targets=["no_such_layer"]), "bagel", 1, 0)
    assert not (project / "artifacts" / "augment").exists()


def test_offline_hub_model_fails_fast_without_artifact(project: Path, cache: Path) -> None:
    params = make_params(cache, project)
    params = params.model_copy(update={"models": params.models.model_copy(
        update={"diffusion": "someone/sd-not-cached"})})
    with pytest.raises(ModelError, match="someone/sd-not-cached.*--local-dir"):
        stage.run(params, "bagel", shots=1, seed=0)
    assert not (project / "artifacts" / "augment").exists()


def test_train_split_option_reads_raw_training_images(project: Path, cache: Path) -> None:
    good = project / "data" / "bagel" / "train" / "good"
    (good / "rgb").mkdir(parents=True)
    (good / "xyz").mkdir()
    for i in range(3):  # non-square raw images: padded to square and resized by the stage
        Image.fromarray(np.full((30, 40, 3), 50 * i, np.uint8)).save(good / "rgb" / f"{i:03d}.png")
        (good / "xyz" / f"{i:03d}.tiff").write_bytes(b"")
    params = make_params(cache, project / "data", train_on="train_split", n_per_shot=1)
    images = stage.read_training_split(params, "bagel", 32)
    assert len(images) == 3 and images[0].shape == (32, 32, 3)
    assert images[2][0, 0].tolist() == [0, 0, 0]  # padding rows are black
    assert images[2][16, 16].tolist() == [100, 100, 100]
    stage.run(params, "bagel", shots=1, seed=0)
    assert open_store(layout.augmented("bagel", 1, 0) / "generated.zarr")["rgb"].shape[0] == 1


def test_colour_jitter_is_seeded_and_bounded() -> None:
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = image_ops.colour_jitter(x, 0.3, torch.Generator().manual_seed(5))
    b = image_ops.colour_jitter(x, 0.3, torch.Generator().manual_seed(5))
    c = image_ops.colour_jitter(x, 0.3, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(image_ops.colour_jitter(x, 0.0, torch.Generator()), x)


# --------------------------------------------------------------------------------------------
# Pivotal tuning (textual inversion + LoRA), the published recipe


def _pivotal_cfg(**overrides: object) -> training.LoraTraining:
    inversion = training.TextualInversion(token="<bagel>", steps=3, lr=5e-2, accumulation=2,
                                     init_std=0.017, norm_target=0.4, continue_lr=1e-2)
    values = dict(rank=4, targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"),
                  train_text_encoder=True, lr=1e-2, steps=2, resolution=32,
                  color_jitter=(0.1, 0.1), seed=0, text_encoder_lr=1e-3, weight_decay=1e-3,
                  lr_schedule="linear", warmup_steps=1, grad_clip=1.0, timestep_fraction=0.8,
                  hflip=0.5, interpolation="bilinear", cache_latents=True, inversion=inversion)
    values.update(overrides)
    return training.LoraTraining(**values)


def _images() -> list[np.ndarray]:
    yy, xx = np.mgrid[0:32, 0:32] / 32
    return [np.stack([xx * 255, yy * 255, np.full_like(xx, v)], -1).astype(np.uint8)
            for v in (40, 200)]


PROMPTS = [t.format("<bagel>") for t in training.OBJECT_TEMPLATES]


def test_textual_inversion_changes_only_the_new_token_row(cache: Path) -> None:
    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    n = len(pipe.tokenizer)
    cfg = _pivotal_cfg()
    losses = training.train_lora(pipe, _images(), PROMPTS, cfg)
    assert len(losses) == 3 + 2 and all(np.isfinite(losses))
    assert len(pipe.tokenizer) == n + 1
    token_id = pipe.tokenizer.convert_tokens_to_ids("<bagel>")
    assert token_id == n
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert after.shape == (n + 1, before.shape[1])
    assert torch.equal(after[:n], before)  # every original row is untouched (both phases)
    init = torch.randn(before.shape[1], generator=torch.Generator().manual_seed(0)) * 0.017
    assert (after[n] - init).abs().max() > 1e-3  # the new row learned
    # The prompt holds the new token as one id.
    ids = pipe.tokenizer("a photo of a <bagel>").input_ids
    assert token_id in ids
    # A token that is already in the vocabulary cannot be learned.
    other, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    bad = _pivotal_cfg(inversion=training.TextualInversion(token="sks", steps=1))
    with pytest.raises(ParamsError, match="augment.placeholder_token"):
        training.train_lora(other, _images(), ["x"], bad)


def test_lora_targets_include_geglu_and_text_encoder(cache: Path, tmp_path: Path) -> None:
    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    unet_params, text_params = training.add_lora(pipe, _pivotal_cfg())
    names = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")]
    assert any(n.endswith("ff.net.0.proj") for n in names)  # GEGLU's Linear
    assert {n.rsplit(".", 1)[-1] for n in names if "attn" in n} >= {"to_q", "to_k", "to_v"}
    assert any(n.endswith("to_out.0") for n in names)
    geglu = pipe.unet.get_submodule(next(n for n in names if n.endswith("ff.net.0.proj")))
    assert type(pipe.unet.get_submodule(next(n for n in names if n.endswith("ff.net.0.proj"))
                                        .rsplit(".", 1)[0])).__name__ == "GEGLU"
    assert geglu.r["default"] == 4 and geglu.scaling["default"] == 1.0
    te_names = [n for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A")]
    assert {n.rsplit(".", 1)[-1] for n in te_names} == set(training.TEXT_ENCODER_TARGETS)
    assert unet_params and text_params
    # Without the text encoder and with today's targets: attention only.
    plain, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    _, none = training.add_lora(plain, _pivotal_cfg(targets=("to_q", "to_k", "to_v", "to_out.0"),
                                                train_text_encoder=False))
    assert none == []
    assert not any(n.endswith("ff.net.0.proj") for n, m in plain.unet.named_modules()
                   if hasattr(m, "lora_A"))


def test_optimiser_schedule_warmup_and_clip_reach_the_optimiser() -> None:
    cfg = _pivotal_cfg(lr=4e-4, text_encoder_lr=4e-5, warmup_steps=100, steps=1000,
                       weight_decay=1e-3)
    unet_p, te_p = [torch.nn.Parameter(torch.zeros(3))], [torch.nn.Parameter(torch.zeros(2))]
    emb = torch.nn.Parameter(torch.zeros(4, 2))
    groups = training.tuning_param_groups(unet_p, te_p, emb, cfg)
    optimizer, scheduler = training.make_tuning_optimizer(groups, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder", "token"]
    assert all(g["weight_decay"] == 1e-3 for g in optimizer.param_groups)
    base = [4e-4, 4e-5, 1e-2]  # continue_lr of _pivotal_cfg
    training.advance_schedule(scheduler)  # stepped before the first update, as lora_pti
    assert np.allclose([g["lr"] for g in optimizer.param_groups], [b / 100 for b in base])
    for _ in range(99):
        training.advance_schedule(scheduler)
    assert np.allclose([g["lr"] for g in optimizer.param_groups], base)
    for _ in range(450):
        training.advance_schedule(scheduler)
    assert np.allclose([g["lr"] for g in optimizer.param_groups], [b * 0.5 for b in base])
    # No continued inversion: no token group. A constant schedule without warm-up stays put.
    groups = training.tuning_param_groups(unet_p, [], emb, _pivotal_cfg(
        inversion=training.TextualInversion(token="<t>", continue_lr=0.0)))
    assert [g["name"] for g in groups] == ["unet"]
    opt, sched = training.make_tuning_optimizer(groups, _pivotal_cfg(lr_schedule="constant",
                                                                warmup_steps=0))
    training.advance_schedule(sched)
    assert opt.param_groups[0]["lr"] == 1e-2
    with pytest.raises(ParamsError, match="augment.lr_schedule"):
        training.make_lr_scheduler(opt, "cosine", 0, 10)
    # Gradient clipping to a global norm of 1.
    p = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))]
    p[0].grad, p[1].grad = torch.full((4,), 3.0), torch.full((3,), 4.0)
    assert training.clip_gradients(p, 1.0) == pytest.approx(float(np.sqrt(36 + 48)))
    assert float(torch.cat([q.grad for q in p]).norm()) == pytest.approx(1.0, rel=1e-5)
    assert training.clip_gradients(p, 0.0) is None
    # Timesteps below 0.8 T.
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([training.sample_timestep(1000, 0.8, gen) for _ in range(2000)])
    assert int(t.max()) < 800 and int(t.max()) > 780 and int(t.min()) >= 0
    # lora_pti's clip_ti_decay moves the norm towards the target by min(1, 100 lr).
    row = torch.tensor([3.0, 4.0])
    assert float(training.decay_token_norm(row, 2e-3, 0.4).norm()) == pytest.approx(5 + 0.2 * (0.4 - 5))


def _generate(pipe: object, seeds: list[int]) -> np.ndarray:
    full, _ = generation.generate(pipe, _images()[0], "a low high light and real photo of <bagel>",
                           seeds, strength=0.5, guidance=4.0, inference_steps=4,
                           resolution=32, out_size=16)
    return full


def test_lora_and_token_save_and_reload_give_identical_images(cache: Path, tmp_path: Path) -> None:
    pipe, source = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    with md.demo_threads(CPU, source):
        training.train_lora(pipe, _images(), PROMPTS, _pivotal_cfg())
        path = lora_files.save_lora(pipe, tmp_path, "lora.safetensors", md.DEMO_SD,
                             train_text_encoder=True, token="<bagel>")
        generation.use_euler_ancestral(pipe)
        expected = _generate(pipe, [42, 1024])
    assert lora_files.read_lora_metadata(path)[lora_files.TOKEN_KEY] == "<bagel>"
    tokens = load_file(tmp_path / lora_files.TOKEN_FILE)
    assert list(tokens) == ["<bagel>"] and tokens["<bagel>"].shape == (1, 32)
    assert any("ff.net.0.proj" in k for k in load_file(path))
    fresh, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    assert lora_files.load_lora(fresh, path, base_model=md.DEMO_SD)
    generation.use_euler_ancestral(fresh)
    with md.demo_threads(CPU, source):
        again = _generate(fresh, [42, 1024])
        assert np.array_equal(again, expected)
        # Without the token the prompt means something else: the images differ.
        no_token, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
        no_token.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
        generation.use_euler_ancestral(no_token)
        assert not np.array_equal(_generate(no_token, [42, 1024]), expected)
    # A LoRA that names a token whose file is gone is a clear error.
    (tmp_path / lora_files.TOKEN_FILE).unlink()
    other, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    with pytest.raises(ModelError, match="token embedding file not found"):
        lora_files.load_lora(other, path)


def test_published_like_stage_reads_original_rgb_and_fixed_seeds(project: Path, cache: Path) -> None:
    good = project / "data" / "bagel" / "train" / "good"
    (good / "rgb").mkdir(parents=True)
    (good / "xyz").mkdir()
    for i in range(3):  # non-square originals: padded to a square by the stage
        Image.fromarray(np.full((30, 40, 3), 60 + 50 * i, np.uint8)).save(good / "rgb" / f"{i:03d}.png")
        (good / "xyz" / f"{i:03d}.tiff").write_bytes(b"")
    shots = stage.read_original_shots(make_params(cache, project / "data"), "bagel", ["good/001"])
    assert shots[0].shape == (40, 40, 3) and shots[0][0, 0].tolist() == [0, 0, 0]
    assert shots[0][20, 20].tolist() == [110, 110, 110]
    params = make_params(
        cache, project / "data", image_source="original", n_per_shot=2,
        image_seeds=[42, 1024, 2026], placeholder_token="<{category}>",
        prompt="a low high light and real photo of {token}", train_prompts="object",
        textual_inversion={"steps": 2, "accumulation": 2, "norm_target": 0.4,
                           "continue_lr": 1e-4}, train_text_encoder=True, text_encoder_lr=1e-4,
        lora_targets=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"],
        lr_schedule="linear", lr_warmup_steps=1, grad_clip=1.0, timestep_fraction=0.8,
        color_jitter=[0.1, 0.1], hflip=0.5, cache_latents=True, interpolation="bilinear",
        generator_device="device", resolution=48,
    )
    # generated images to data.size with torchvision's default bilinear, as published
    params = params.model_copy(update={"data": params.data.model_copy(
        update={"rgb_interpolation": "bilinear"})})
    stats = stage.run(params, "bagel", shots=2, seed=0)
    out = layout.augmented("bagel", 2, 0)
    store = open_store(out / "generated.zarr")
    assert store.attrs["seeds"] == [42, 1024, 42, 1024]
    assert store.attrs["token"] == "<bagel>"
    assert store["rgb_full"].shape == (4, 48, 48, 3) and store["rgb"].shape == (4, SIZE, SIZE, 3)
    assert stats["lora_steps"] == 2 + 3
    assert (out / lora_files.TOKEN_FILE).is_file()
    # Reload LoRA + token into a fresh pipeline: the stored full-resolution images again.
    pipe, source = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    assert lora_files.load_lora(pipe, out / "lora.safetensors", base_model=md.DEMO_SD)
    generation.use_euler_ancestral(pipe)
    with md.demo_threads(CPU, source):
        full, small = generation.generate(pipe, shots[0], "a low high light and real photo of <bagel>",
                                   [42, 1024], strength=0.4, guidance=4.0, inference_steps=5,
                                   resolution=48, out_size=SIZE, out_interpolation="bilinear")
    assert np.array_equal(full, store["rgb_full"][2:]) and np.array_equal(small, store["rgb"][2:])
    for big, stored in zip(store["rgb_full"][:], store["rgb"][:]):
        np.testing.assert_array_equal(stored, resize_rgb(big, SIZE, "bilinear"))
    assert not np.array_equal(store["rgb"][:], np.stack(
        [resize_rgb(big, SIZE, "bicubic") for big in store["rgb_full"][:]]))


def test_bad_pivotal_params_name_the_key(project: Path, cache: Path) -> None:
    with pytest.raises(ParamsError, match="augment.image_seeds"):
        make_params(cache, project, image_seeds=[1], n_per_shot=2)
    with pytest.raises(ParamsError, match="augment.color_jitter"):
        make_params(cache, project, color_jitter=[0.1, 0.1, 0.1, 0.9])
    with pytest.raises(ParamsError, match="augment.timestep_fraction"):
        make_params(cache, project, timestep_fraction=0)
    with pytest.raises(ParamsError, match="augment.lr_schedule"):
        make_params(cache, project, lr_schedule="cosine")
    with pytest.raises(ParamsError, match="augment.prompt"):
        stage.run(make_params(cache, project, prompt="a photo of {thing}"), "bagel", 1, 0)
    # The demo vocabulary already holds "sks" as one token: it cannot be a new TI token.
    with pytest.raises(ParamsError, match="augment.placeholder_token"):
        stage.run(make_params(cache, project, placeholder_token="sks",
                              textual_inversion={"steps": 1}), "bagel", 1, 0)
    assert not (project / "artifacts" / "augment").exists()
