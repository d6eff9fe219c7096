"""Released LoRA files in the published lora_pti layout (``augment.lora: official``,
``cmds-ad import-official --lora``): strict checks, identical generation, no pickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.artifacts import open_store
from pipeline.augment import generation, lora_files, lora_pti
from pipeline.augment import lora_training as training
from pipeline.errors import ModelError
from pipeline.models import diffusion as md
from stages import augment as stage
from stages import layout
from tests.test_augment import PROMPTS, SIZE, _generate, _images, _pivotal_cfg, make_params, write_prepare

CPU = torch.device("cpu")
TOKEN = "<bagel>"
# The published run's targets (cli_lora_pti.py defaults; train_lora_mvtec3dad.py for CLIP).
UNET_TARGETS = ["CrossAttention", "Attention", "GEGLU"]
TEXT_TARGETS = ["CLIPSdpaAttention"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "diffusion-models"


def pti_layers(model: torch.nn.Module, classes: set[str]) -> list[str]:
    """lora_pti's order, written out here on its own: each module whose class is a target, in
    ``modules()`` order, then the Linear layers inside it in ``named_modules()`` order."""
    peft = any(hasattr(m, "lora_A") for m in model.modules())  # adapters: their layers

    def adapted(m: torch.nn.Module) -> bool:
        return hasattr(m, "lora_A") if peft else type(m) is torch.nn.Linear

    names = []
    for prefix, module in model.named_modules():
        if type(module).__name__ in classes:
            names += [f"{prefix}.{n}" for n, m in module.named_modules() if adapted(m)]
    return names


def _classes(model: torch.nn.Module, wanted: set[str]) -> set[str]:
    """The names this library version gives the attention classes lora_pti targets."""
    names = {type(m).__name__ for m in model.modules()}
    return {n for n in names if n in wanted or n.endswith("Attention") and "CLIP" in n
            and "CLIPSdpaAttention" in wanted}


def write_pti(path: Path, pipe, pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
              embedding: torch.Tensor, token: str = TOKEN, dtype=torch.float16,
              drop: str | None = None, extra: dict | None = None) -> Path:
    """A file as lora_pti's save_safeloras_with_embeds writes it (keys, metadata, fp16)."""
    weights, metadata = {}, {}
    for name, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        metadata[name] = json.dumps(targets)
        for i, (up, down) in enumerate(pairs[name]):
            metadata[f"{name}:{i}:rank"] = str(down.shape[0])
            weights[f"{name}:{i}:up"] = up.to(dtype).contiguous()
            weights[f"{name}:{i}:down"] = down.to(dtype).contiguous()
    metadata[token] = "<embed>"
    weights[token] = embedding.reshape(-1).contiguous()
    weights.pop(drop, None)
    weights.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata=metadata)
    return path


def native_pairs(pipe) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The trained peft adapters of ``pipe`` as lora_pti's (up, down) list, in its order."""
    out = {}
    for name, model, wanted in (("unet", pipe.unet, {"Attention", "GEGLU"}),
                                ("text_encoder", pipe.text_encoder, {"CLIPSdpaAttention"})):
        layers = pti_layers(model, _classes(model, wanted))
        out[name] = [(model.get_submodule(n).lora_B["default"].weight.detach().clone(),
                      model.get_submodule(n).lora_A["default"].weight.detach().clone())
                     for n in layers]
    return out


def random_pairs(pipe, seed: int = 0, rank: int = 4) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, model, wanted in (("unet", pipe.unet, {"Attention", "GEGLU"}),
                                ("text_encoder", pipe.text_encoder, {"CLIPSdpaAttention"})):
        out[name] = []
        for n in pti_layers(model, _classes(model, wanted)):
            layer = model.get_submodule(n)
            out[name].append((torch.randn(layer.out_features, rank, generator=gen) * 0.05,
                              torch.randn(rank, layer.in_features, generator=gen) * 0.05))
    return out


def test_order_is_lora_ptis(cache: Path) -> None:
    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    unet = [n for n, _ in lora_pti.adapted_layers(pipe.unet, UNET_TARGETS)]
    text = [n for n, _ in lora_pti.adapted_layers(pipe.text_encoder, TEXT_TARGETS)]
    block = "down_blocks.0.attentions.0.transformer_blocks.0."
    assert unet[:9] == [block + s for s in ("attn1.to_q", "attn1.to_k", "attn1.to_v",
                                            "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                                            "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj")]
    # diffusers registers up_blocks before the mid block: lora_pti's modules() order
    ups, mid = [i for i, n in enumerate(unet) if n.startswith("up_blocks")], \
        [i for i, n in enumerate(unet) if n.startswith("mid_block")]
    assert ups and mid and max(ups) < min(mid)
    # CLIP registers k, v, q, then out
    assert [n.split("layers.0.self_attn.")[-1] for n in text[:4]] == \
        ["k_proj", "v_proj", "q_proj", "out_proj"]
    assert unet == pti_layers(pipe.unet, _classes(pipe.unet, {"Attention", "GEGLU"}))
    # the same layers the native paper recipe adapts (attention + GEGLU, CLIP attention)
    training.add_lora(pipe, _pivotal_cfg())
    native = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert native == set(unet)
    assert {n for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A")} == set(text)


def test_released_file_generates_what_the_native_lora_generates(cache: Path, tmp_path: Path) -> None:
    pipe, source = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    with md.demo_threads(CPU, source):
        training.train_lora(pipe, _images(), PROMPTS, _pivotal_cfg())
        lora_files.save_lora(pipe, tmp_path / "native", "lora.safetensors", md.DEMO_SD,
                             train_text_encoder=True, token=TOKEN)
        generation.use_euler_ancestral(pipe)
        expected = _generate(pipe, [42, 1024])
    # the same weights in the published layout (float32 here: fp16 would round them)
    row = lora_files.token_snapshot(pipe, TOKEN)
    released = write_pti(tmp_path / "release" / "bagel" / "final_lora.safetensors", pipe,
                         native_pairs(pipe), row, dtype=torch.float32)
    fresh, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    snapshot = lora_pti.released_snapshot(fresh, released, TOKEN)
    out = tmp_path / "converted"
    path = lora_files.write_lora(snapshot, out, "lora.safetensors", md.DEMO_SD)
    # the converted files hold the native files' tensors, key for key
    native_t, conv_t = load_file(tmp_path / "native" / "lora.safetensors"), load_file(path)
    assert sorted(native_t) == sorted(conv_t)
    assert all(torch.equal(native_t[k], conv_t[k]) for k in native_t)
    assert torch.equal(load_file(out / lora_files.TOKEN_FILE)[TOKEN],
                       load_file(tmp_path / "native" / lora_files.TOKEN_FILE)[TOKEN])
    assert lora_files.load_lora(fresh, path, base_model=md.DEMO_SD)
    generation.use_euler_ancestral(fresh)
    with md.demo_threads(CPU, source):
        assert np.array_equal(_generate(fresh, [42, 1024]), expected)


def test_strict_keys_and_shapes_name_the_key(cache: Path, tmp_path: Path) -> None:
    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    pairs, row = random_pairs(pipe), torch.randn(1, 32)

    def refused(match: str, **kw) -> None:
        path = write_pti(tmp_path / f"case{len(list(tmp_path.iterdir()))}.safetensors", pipe,
                         kw.pop("pairs", pairs), kw.pop("row", row), **kw)
        with pytest.raises(ModelError, match=match):
            lora_pti.released_snapshot(pipe, path, kw.get("token", TOKEN))

    refused(r"tensor 'unet:3:down' missing", drop="unet:3:down")
    refused(r"unexpected tensor 'unet\.to_q'", extra={"unet.to_q": torch.zeros(2, 2)})
    bad = {**pairs, "unet": [*pairs["unet"][:2], (pairs["unet"][2][0], torch.zeros(4, 7)),
                             *pairs["unet"][3:]]}
    refused(r"'unet:2:down' \(4, 7\) do not fit layer unet\.\S+to_v", pairs=bad)
    refused(r"'text_encoder:<i>' LoRA pairs, but this base model has",
            pairs={**pairs, "text_encoder": pairs["text_encoder"][:-1]})
    refused(r"width 16, this base model's text encoder 32", row=torch.randn(1, 16))
    path = write_pti(tmp_path / "tok.safetensors", pipe, pairs, row, token="<cat>")
    with pytest.raises(ModelError, match=r"learned token is '<cat>'.*'<bagel>'"):
        lora_pti.released_snapshot(pipe, path, TOKEN)
    missing = tmp_path / "none" / "final_lora.safetensors"
    with pytest.raises(ModelError, match=f"{missing}: released LoRA file not found"):
        lora_pti.released_snapshot(pipe, missing)


def test_load_is_pickle_free(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    # A pickle with a payload under the released name: refused unread, the payload never runs.
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil" / "bagel" / "final_lora.safetensors"
    evil.parent.mkdir(parents=True)
    evil.write_bytes(pickle.dumps({"unet:0:up": Payload()}))
    with pytest.raises(ModelError, match=f"{evil}: not a readable safetensors file"):
        lora_pti.released_snapshot(pipe, evil)
    assert not marker.exists()
    # A good file converts with torch.load and pickle out of reach.
    good = write_pti(tmp_path / "good.safetensors", pipe, random_pairs(pipe), torch.randn(32))

    def forbidden(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    snapshot = lora_pti.released_snapshot(pipe, good, TOKEN)
    assert snapshot.token == TOKEN and snapshot.token_embedding.shape == (1, 32)
    assert snapshot.unet_metadata["r"] == 4 and snapshot.unet_metadata["lora_alpha"] == 4


def test_stage_uses_the_released_lora_instead_of_training(tmp_path: Path, cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_prepare(tmp_path)
    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    release = tmp_path / "LORA"
    path = write_pti(release / "bagel" / "final_lora.safetensors", pipe, random_pairs(pipe, 3),
                     torch.randn(32))
    params = make_params(cache, tmp_path, lora="official", lora_checkpoints=str(release),
                         placeholder_token="<{category}>", prompt="a photo of {token}")

    def no_training(*a, **k):
        raise AssertionError("trained")

    monkeypatch.setattr(stage, "train_lora", no_training)
    stats = stage.run(params, "bagel", shots=1, seed=0)
    out = layout.augmented("bagel", 1, 0)
    store = open_store(out / "generated.zarr")
    assert store["rgb"].shape == (2, SIZE, SIZE, 3) and stats["lora_steps"] == 0
    assert f'"released": "{path}"' in json.dumps(dict(store.attrs))
    meta = lora_files.read_lora_metadata(out / "lora.safetensors")
    assert meta[lora_files.STATUS_KEY] == "released" and meta[lora_files.TOKEN_KEY] == TOKEN
    # without the file the params name the key
    with pytest.raises(Exception, match="augment.lora_checkpoints.*not found"):
        make_params(cache, tmp_path, lora="official", lora_checkpoints=str(tmp_path / "LORA2x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no bagel/final_lora.safetensors"):
        make_params(cache, tmp_path, lora="official", lora_checkpoints=str(tmp_path / "empty"))


def test_cli_import_official_lora(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    write_pti(tmp_path / "LORA" / "bagel" / "final_lora.safetensors", pipe, random_pairs(pipe),
              torch.randn(32))
    result = CliRunner().invoke(app, ["import-official", "LORA", "-c", "bagel", "--lora", "-o",
                                      "converted", "--base-model", md.DEMO_SD, "--cache-dir",
                                      str(cache)])
    assert result.exit_code == 0, result.output
    assert "token '<bagel>'" in result.output
    fresh, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    assert lora_files.load_lora(fresh, tmp_path / "converted" / "lora.safetensors", md.DEMO_SD)
    result = CliRunner().invoke(app, ["import-official", "LORA", "-c", "bagel", "-o", "x"])
    assert result.exit_code != 0 and "--shots" in result.output


def test_random_release_of_the_smoke_run_converts(cache: Path, tmp_path: Path) -> None:
    """tools/released_lora.py (the paper-shape smoke's LoRA files) writes what the stage reads."""
    from tools.released_lora import write_random_lora_pti

    pipe, _ = md.load_img2img(md.DEMO_SD, cache, CPU, torch.float32)
    path = write_random_lora_pti(tmp_path, "bagel", pipe.unet, pipe.text_encoder, rank=2)
    assert path == lora_pti.released_path(tmp_path, "bagel")
    assert load_file(path)["unet:0:up"].dtype == torch.float16  # lora_pti's as_fp16
    snapshot = lora_pti.released_snapshot(pipe, path, TOKEN)
    assert snapshot.unet_metadata["r"] == 2 and len(snapshot.unet) == 2 * len(
        lora_pti.adapted_layers(pipe.unet, UNET_TARGETS))
