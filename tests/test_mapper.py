"""The CAHFM and MLP mappers: sizes, shapes, wiring."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ParamsError
from pipeline.models.mapper import (
    CAHFM,
    CoordinateAttention,
    PixelMLP,
    build_mapper,
    hidden_width,
    resize_layers,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_cahfm_params(c_in: list[int], c_out: list[int]) -> int:
    """Count from DESIGN 1.5, layer by layer (convs with bias, GroupNorm/BatchNorm affine)."""
    d = -(-max(c_out) // 8) * 8
    n = len(c_in)
    project = sum(c * d + d + 2 * d for c in c_in)  # 1x1 conv + GroupNorm
    mip = max(8, n * d // 32)
    attention = (n * d * mip + mip) + 2 * mip + 2 * (mip * n * d + n * d)
    selector = (n * d * (d // 2) * 9 + d // 2) + (d // 2 * n + n)
    head = (d * d * 9 + d) + 2 * d + (d * sum(c_out) + sum(c_out))
    return project + attention + selector + head


def test_cahfm_vit_b_parameter_count() -> None:
    model = build_mapper("cahfm", [768] * 3, [768] * 3)
    count = n_params(model)
    assert count == expected_cahfm_params([768] * 3, [768] * 3)
    assert 17_200_000 <= count <= 17_400_000
    assert model.attention.mip == 72  # max(8, 3 * 768 / 32)


@pytest.mark.parametrize("architecture", ["cahfm", "mlp"])
def test_output_shapes_unequal_widths(architecture: str) -> None:
    c_in, c_out = [8, 16, 24], [12, 20, 4]
    model = build_mapper(architecture, c_in, c_out)
    x = [torch.randn(2, c, 5, 7) for c in c_in]
    out = model(x)
    assert [tuple(o.shape) for o in out] == [(2, c, 5, 7) for c in c_out]


def test_width_rule_and_mlp_hidden() -> None:
    assert hidden_width([40, 112, 320]) == 320
    assert hidden_width([41, 7, 3]) == 48
    cahfm = build_mapper("cahfm", [40, 112, 320], [41, 7, 3])
    assert isinstance(cahfm, CAHFM) and cahfm.width == 48
    assert n_params(cahfm) == expected_cahfm_params([40, 112, 320], [41, 7, 3])
    mlp = build_mapper("mlp", [10, 20, 30], [6, 6, 6])
    assert isinstance(mlp, PixelMLP) and mlp.width == (60 + 18) // 2
    h = 39
    assert n_params(mlp) == (60 * h + h) + (h * h + h) + (h * 18 + 18)


def test_unknown_architecture_and_bad_widths() -> None:
    with pytest.raises(ParamsError, match="fit_mapper.architecture"):
        build_mapper("transformer", [8] * 3, [8] * 3)
    with pytest.raises(ParamsError, match="same number"):
        build_mapper("mlp", [8] * 3, [8] * 2)


def test_coordinate_attention_matches_definition() -> None:
    torch.manual_seed(0)
    ca = CoordinateAttention(64).eval()
    # Non-trivial BatchNorm statistics so that eval mode matters.
    ca.norm.running_mean.uniform_(-1, 1)
    ca.norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 64, 5, 6)
    with torch.no_grad():
        y = ca(x)
        enc = lambda t: torch.nn.functional.hardswish(ca.norm(ca.encode(t)))  # noqa: E731
        along_h = enc(x.mean(3, keepdim=True))  # (B, mip, H, 1), BN in eval is per element
        along_w = enc(x.mean(2, keepdim=True))  # (B, mip, 1, W)
        expected = x * torch.sigmoid(ca.attend_h(along_h)) * torch.sigmoid(ca.attend_w(along_w))
    assert ca.mip == 8
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, x)


def test_every_parameter_gets_a_gradient() -> None:
    """The selector, attention and head are all wired into the output."""
    torch.manual_seed(0)
    model = build_mapper("cahfm", [8, 8, 16], [8, 16, 8]).train()
    out = model([torch.randn(2, c, 6, 6) for c in (8, 8, 16)])
    sum((o**2).mean() for o in out).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_resize_layers() -> None:
    x = [torch.ones(1, 3, 4, 4), torch.zeros(1, 2, 8, 8)]
    out = resize_layers(x, 8)
    assert [tuple(o.shape) for o in out] == [(1, 3, 8, 8), (1, 2, 8, 8)]
    assert out[1] is x[1]
    torch.testing.assert_close(out[0], torch.ones(1, 3, 8, 8))
