"""Model sources for the diffusion stages: demo builds, local folders, hub ids offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import ModelError
from pipeline.models import diffusion as md

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by the diffusion test modules of one session: the demo models build once.
    return tmp_path_factory.getbasetemp() / "diffusion-models"


def test_demo_sd_is_a_real_pipeline_with_placeholder_token(cache: Path) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, source = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    assert isinstance(pipe, StableDiffusionImg2ImgPipeline)
    assert source.kind == "demo" and (Path(source.location) / "model_index.json").is_file()
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a photo of sks disc").input_ids)
    assert "sks</w>" in tokens  # the placeholder is one token, as in CLIP's real vocabulary
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.dtype == torch.float32
    # The cached folder is reused: a second resolve does not rebuild (same mtime).
    index = Path(source.location) / "model_index.json"
    before = index.stat().st_mtime_ns
    md.resolve_source(md.DEMO_SD, "models.diffusion", cache)
    assert index.stat().st_mtime_ns == before


def test_demo_marigold_is_a_real_marigold_pipeline(cache: Path) -> None:
    from diffusers import DDIMScheduler, MarigoldNormalsPipeline

    pipe, source = md.load_marigold(md.DEMO_MARIGOLD, cache, CPU, torch.float32)
    assert isinstance(pipe, MarigoldNormalsPipeline)
    assert pipe.unet.config.in_channels == 8 and pipe.unet.config.out_channels == 4
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert source.spec == md.DEMO_MARIGOLD


def test_demo_marigold_has_a_default_resolution_and_loads_in_either_precision(cache: Path) -> None:
    # estimate_normals.processing_resolution: null resolves to the model's default, and
    # estimate_normals.precision picks the dtype the pipeline is loaded in.
    for dtype in (torch.float32, torch.float16):
        pipe, _ = md.load_marigold(md.DEMO_MARIGOLD, cache, CPU, dtype)
        assert {p.dtype for p in pipe.unet.parameters()} == {dtype}
        assert pipe.dtype == dtype
        assert pipe.default_processing_resolution == 64
        assert pipe.default_processing_resolution % pipe.vae_scale_factor == 0


def test_cpu_loading_skips_the_move_but_leaves_everything_on_the_cpu(cache: Path) -> None:
    # load_* skip pipe.to() for the CPU (components load there); nothing may be left elsewhere
    # and the requested dtype must hold.
    for load, spec in ((md.load_img2img, md.DEMO_SD), (md.load_marigold, md.DEMO_MARIGOLD)):
        pipe, _ = load(spec, cache, CPU, torch.float32)
        for name in ("unet", "vae", "text_encoder"):
            tensors = [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]
            assert {t.device.type for t in tensors} == {"cpu"}, (spec, name)
            assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.float32}
        assert pipe.device.type == "cpu"


def test_demo_build_is_deterministic(tmp_path: Path) -> None:
    md.build_tiny_sd(tmp_path / "a")
    md.build_tiny_sd(tmp_path / "b")
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes(), part


def test_hub_id_offline_is_a_quick_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        md.load_img2img("someone/not-a-cached-model-xyz", cache, CPU, torch.float32)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "models.diffusion" in message and "someone/not-a-cached-model-xyz" in message
    assert "huggingface-cli download" in message and "--local-dir" in message
    with pytest.raises(ModelError, match="models.normals.*someone/marigold-missing"):
        md.load_marigold("someone/marigold-missing", cache, CPU, torch.float32)


def test_local_path_that_is_not_a_model_folder(tmp_path: Path, cache: Path) -> None:
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(ModelError, match=f"{folder}.*not a diffusers model folder"):
        md.load_img2img(str(folder), cache, CPU, torch.float32)
    with pytest.raises(ModelError, match="not_there.*not found"):
        md.load_img2img(str(tmp_path / "not_there"), cache, CPU, torch.float32)


def test_unknown_demo_and_wrong_model_kind(cache: Path) -> None:
    with pytest.raises(ModelError, match="unknown built-in model 'demo:nope'"):
        md.resolve_source("demo:nope", "models.diffusion", cache)
    sd_folder = md.resolve_source(md.DEMO_SD, "models.diffusion", cache).location
    with pytest.raises(ModelError, match="models.normals"):
        md.load_marigold(sd_folder, cache, CPU, torch.float32)


def test_model_clock_accumulates() -> None:
    clock = md.ModelClock()
    with clock():
        time.sleep(0.02)
    with clock():
        time.sleep(0.02)
    assert 0.035 < clock.seconds < 1.0


def test_concurrent_demo_build_never_replaces_a_finished_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-sd-v1"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")  # another process finished first

    def build(target: Path) -> None:
        (target / "model_index.json").write_text('{"mine": true}')
        (target / "extra").mkdir()
        (target / "extra" / "file").write_text("x")

    md._build_once(folder, build)
    assert (folder / "model_index.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-sd-v1"]  # temp copy removed
