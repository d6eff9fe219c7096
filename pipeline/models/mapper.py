"""Cross-modal feature mappers (DESIGN 1.5).

A mapper takes the three layer maps of one modality, ``[(B, C_l, H, W)] * 3``, and predicts the
three layer maps of the other, ``[(B, C'_l, H, W)] * 3``. Two architectures:

- :class:`CAHFM`, the Coordinate-Aware Hierarchical Feature Mapper of CMDS-AD;
- :class:`PixelMLP`, the CFM-style per-pixel MLP baseline used by the ablation.

Width rule for the CAHFM: D is the target's per-layer width (768 for ViT-B). When the target
layers differ in width (EfficientNet stages, e.g. 40/112/320), D is the largest target width
rounded up to a multiple of 8, so GroupNorm(8, D) and the selector's D/2 are well defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import ParamsError

Architecture = Literal["cahfm", "mlp"]
ARCHITECTURES: tuple[str, ...] = ("cahfm", "mlp")
GROUPS = 8


def hidden_width(out_channels: Sequence[int]) -> int:
    """D for the CAHFM: the largest target width, rounded up to a multiple of 8."""
    widest = max(int(c) for c in out_channels)
    return -(-widest // GROUPS) * GROUPS


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al., CVPR 2021) on a (B, C, H, W) tensor.

    Pools along width and along height, encodes both strips with one shared 1x1 conv to
    ``mip = max(8, C // 32)`` channels, BatchNorm and hard-swish, then one 1x1 conv + sigmoid
    per direction gives attention along H and along W; the input is multiplied by both.
    """

    def __init__(self, channels: int, reduction: int = 32, min_mip: int = 8) -> None:
        super().__init__()
        mip = max(min_mip, channels // reduction)
        self.mip = mip
        self.encode = nn.Conv2d(channels, mip, kernel_size=1)
        self.norm = nn.BatchNorm2d(mip)
        self.act = nn.Hardswish()
        self.attend_h = nn.Conv2d(mip, channels, kernel_size=1)
        self.attend_w = nn.Conv2d(mip, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        pooled_h = x.mean(dim=3, keepdim=True)  # (B, C, H, 1): average over width
        pooled_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (B, C, W, 1)
        # One shared encoder over both strips, so the two directions see the same statistics.
        y = self.act(self.norm(self.encode(torch.cat([pooled_h, pooled_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.attend_h(y_h))  # (B, C, H, 1)
        a_w = torch.sigmoid(self.attend_w(y_w.transpose(2, 3)))  # (B, C, 1, W)
        return x * a_h * a_w


class CAHFM(nn.Module):
    """Coordinate-Aware Hierarchical Feature Mapper."""

    architecture = "cahfm"

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]) -> None:
        super().__init__()
        self.in_channels = [int(c) for c in in_channels]
        self.out_channels = [int(c) for c in out_channels]
        n = len(self.in_channels)
        d = hidden_width(self.out_channels)
        self.width = d
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(GROUPS, d), nn.GELU())
            for c in self.in_channels
        )
        self.attention = CoordinateAttention(n * d)
        self.selector = nn.Sequential(
            nn.Conv2d(n * d, d // 2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(d // 2, n, kernel_size=1),
        )
        self.head = nn.Sequential(
            nn.Conv2d(d, d, kernel_size=3, padding=1),
            nn.GroupNorm(GROUPS, d),
            nn.GELU(),
            nn.Conv2d(d, sum(self.out_channels), kernel_size=1),
        )

    def forward(self, layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        f = [proj(x) for proj, x in zip(self.project, layers, strict=True)]
        attended = self.attention(torch.cat(f, dim=1))
        w = torch.softmax(self.selector(attended), dim=1)  # (B, n, H, W) per-pixel layer weights
        # The selector reads the attended tensor but weights the pre-attention maps.
        fused = sum(w[:, i : i + 1] * f_i for i, f_i in enumerate(f))
        out = self.head(fused)
        return list(torch.split(out, self.out_channels, dim=1))


class PixelMLP(nn.Module):
    """CFM-style per-pixel MLP on the concatenated layers (as 1x1 convs).

    Linear-GELU-Linear-GELU-Linear with hidden width (in + out) // 2.
    """

    architecture = "mlp"

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]) -> None:
        super().__init__()
        self.in_channels = [int(c) for c in in_channels]
        self.out_channels = [int(c) for c in out_channels]
        c_in, c_out = sum(self.in_channels), sum(self.out_channels)
        hidden = (c_in + c_out) // 2
        self.width = hidden
        self.net = nn.Sequential(
            nn.Conv2d(c_in, hidden, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(hidden, c_out, kernel_size=1),
        )

    def forward(self, layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = self.net(torch.cat(list(layers), dim=1))
        return list(torch.split(out, self.out_channels, dim=1))


Mapper = CAHFM | PixelMLP


def build_mapper(
    architecture: str, in_channels: Sequence[int], out_channels: Sequence[int]
) -> Mapper:
    """The one factory: ``cahfm`` or ``mlp`` from the source and target layer widths."""
    if len(in_channels) != len(out_channels) or len(in_channels) == 0:
        raise ParamsError(
            f"mapper: need the same number of source and target layers "
            f"(got {list(in_channels)} -> {list(out_channels)})"
        )
    if any(int(c) < 1 for c in [*in_channels, *out_channels]):
        raise ParamsError(f"mapper: layer widths must be positive (got {list(in_channels)} -> "
                          f"{list(out_channels)})")
    if architecture == "cahfm":
        return CAHFM(in_channels, out_channels)
    if architecture == "mlp":
        return PixelMLP(in_channels, out_channels)
    raise ParamsError(
        f"fit_mapper.architecture: unknown architecture {architecture!r} "
        f"(allowed: {', '.join(ARCHITECTURES)})"
    )


def resize_layers(layers: Sequence[torch.Tensor], resolution: int) -> list[torch.Tensor]:
    """Bilinear upsampling of every layer to resolution x resolution (no-op if already there)."""
    out = []
    for x in layers:
        if tuple(x.shape[-2:]) != (resolution, resolution):
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                              align_corners=False)
        out.append(x)
    return out
