"""The published model configs (tests/fixtures/paper_models/) build the published architectures.

Built on the meta device (no memory, no weights), so this takes seconds; the parameter counts
are the published ones (sources in each fixture's ``params_source``). A config that drifts,
or a diffusers/transformers/timm release that builds it differently, fails here rather than
after an hour of GPU time in benchmarks/paper_smoke.py.
"""

from __future__ import annotations

import pytest

from tools.paper_models import (
    build_component,
    build_dino,
    build_scheduler,
    build_tokenizer,
    count_params,
    load_fixture,
)

SD = load_fixture("sd21_base")
MARIGOLD = load_fixture("marigold_normals_v1_1")
DINO = load_fixture("dino_vitb8")

# The published counts, written here a second time on purpose: a fixture edit must not be
# able to move the expectation with it.
PUBLISHED = {
    ("sd21_base", "unet"): 865_910_724,
    ("sd21_base", "vae"): 83_653_863,
    ("sd21_base", "text_encoder"): 340_387_840,
    ("marigold_normals_v1_1", "unet"): 865_922_244,
}


@pytest.mark.parametrize(("fixture", "component"), sorted(PUBLISHED))
def test_component_has_the_published_parameter_count(fixture, component):
    spec = load_fixture(fixture)["components"][component]
    model = build_component(spec, meta=True)
    assert next(model.parameters()).device.type == "meta"
    assert count_params(model) == spec["params"] == PUBLISHED[(fixture, component)]


def test_sd_unet_shapes():
    unet = build_component(SD["components"]["unet"], meta=True)
    assert unet.conv_in.weight.shape == (320, 4, 3, 3)
    # the cross-attention reads the OpenCLIP-H text encoder's hidden states
    attn2 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert attn2.to_k.weight.shape == (320, 1024)
    assert attn2.heads == 5  # attention_head_dim [5, ...] is the head count in diffusers' SD 2
    assert SD["components"]["text_encoder"]["config"]["hidden_size"] == 1024


def test_marigold_unet_takes_image_and_normals_latents():
    unet = build_component(MARIGOLD["components"]["unet"], meta=True)
    assert unet.conv_in.weight.shape == (320, 8, 3, 3)
    assert unet.conv_out.weight.shape == (4, 320, 3, 3)
    index = MARIGOLD["model_index"]
    assert index["_class_name"] == "MarigoldNormalsPipeline"
    assert (index["default_denoising_steps"], index["default_processing_resolution"]) == (4, 768)
    assert (index["prediction_type"], index["use_full_z_range"]) == ("normals", True)


def test_schedulers():
    sd = build_scheduler(SD["components"]["scheduler"])
    assert type(sd).__name__ == "PNDMScheduler" and sd.config.prediction_type == "epsilon"
    mg = build_scheduler(MARIGOLD["components"]["scheduler"])
    assert type(mg).__name__ == "DDIMScheduler"
    assert mg.config.prediction_type == "v_prediction"
    assert mg.config.timestep_spacing == "trailing" and mg.config.rescale_betas_zero_snr
    mg.set_timesteps(1)
    assert int(mg.timesteps[0]) == 999  # trailing: one step starts from the last timestep


def test_dino_vitb8_architecture():
    model = build_dino(DINO, meta=True)
    arch = DINO["architecture"]
    assert tuple(model.patch_embed.patch_size) == (arch["patch_size"],) * 2
    assert tuple(model.patch_embed.img_size) == (arch["img_size"],) * 2
    assert model.embed_dim == arch["embed_dim"] and len(model.blocks) == arch["depth"]
    assert model.blocks[0].attn.num_heads == arch["num_heads"]
    assert model.pos_embed.shape == (1, (224 // 8) ** 2 + 1, 768)
    assert count_params(model) == DINO["params"] == 85_807_872


def test_tokenizer_has_clip_size_and_special_ids(tmp_path):
    spec = SD["components"]["tokenizer"]
    tok = build_tokenizer(spec, tmp_path)
    assert len(tok) == spec["vocab_size"] == SD["components"]["text_encoder"]["config"]["vocab_size"]
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407
    ids = tok("a photo of sks bagel", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and max(ids) < 49408


def _paper_smoke():
    import importlib.util

    from tools.paper_models import REPO

    spec = importlib.util.spec_from_file_location("paper_smoke", REPO / "benchmarks" / "paper_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["paper.yaml", "strict.yaml"])
def test_smoke_overrides_cut_only_budgets_and_validate(preset):
    import yaml

    from pipeline.params import parse_params
    from tools.paper_models import REPO
    from tools.scratch_project import deep_update

    raw = yaml.safe_load((REPO / "presets" / preset).read_text())
    overrides = _paper_smoke().budget_overrides(raw)
    # img2img runs int(inference_steps * strength) steps: exactly one
    assert int(overrides["augment.inference_steps"] * raw["augment"]["strength"]) == 1
    assert overrides["estimate_normals.ensemble"] == 1 and overrides["fewshot.shots"] == [1]
    assert all(not k.startswith(("models.", "infer.", "score.")) for k in overrides)
    params = parse_params(deep_update(raw, overrides))
    assert params.fit_mapper.steps_for(1) == 1  # one update per mapper (benchmarks/paper_smoke.py)


@pytest.mark.parametrize("architecture", ["cahfm", "mlp"])
def test_random_mappers_load_as_trained_ones(tmp_path, architecture):
    """benchmarks/predict.py --paper-shapes: the random mapper folder is one that the
    prediction path loads and accepts for the backbone it was written for."""
    import torch

    from pipeline.inference import load_mappers
    from pipeline.prediction import _check_backbone
    from tools.paper_models import write_random_mappers

    features = {"backbone": "toy", "layers": [1, 2, 3], "grid": [4, 4], "channels": [8, 8, 8]}
    write_random_mappers(tmp_path / "m", architecture, 8, features)
    config, mappers = load_mappers(tmp_path / "m")
    assert sorted(mappers) == sorted(["real_2d_to_3d", "real_3d_to_2d", "est_2d_to_3d",
                                      "est_3d_to_2d"])
    assert config["architecture"] == architecture and config["resolution"] == 8

    class Probe:
        name, layers = "toy", (1, 2, 3)

        def probe(self, height, width):
            return [8, 8, 8], [4, 4]

    _check_backbone(config, Probe(), tmp_path / "m/config.json", 32)
    x = [torch.randn(1, 8, 8, 8) for _ in range(3)]
    assert [tuple(y.shape) for y in mappers["real_2d_to_3d"](x)] == [(1, 8, 8, 8)] * 3
    again = tmp_path / "again"
    write_random_mappers(again, architecture, 8, features)
    assert (again / "est_3d_to_2d.safetensors").read_bytes() == \
        (tmp_path / "m/est_3d_to_2d.safetensors").read_bytes()
