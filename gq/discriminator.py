"""The PatchGAN discriminator of taming-transformers / latent diffusion (`NLayerDiscriminator`).

Same layer shape as taming's: a stride-2 4x4 conv stem, `layers - 1` more stride-2 4x4 convs with the width
doubling (capped at 8x), one stride-1 4x4 conv, and a 1-channel stride-1 4x4 conv of patch logits. One
change: GroupNorm replaces BatchNorm, so the network has no running statistics, behaves the same in
train and eval mode, and needs nothing synchronised across data-parallel ranks.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> patch logits (B, 1, h, w), h = H / 2^layers - 2 for large H."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        if channels < 1 or layers < 1:
            raise ValueError(f"channels and layers must be >= 1, got {channels} and {layers}")
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers):
            prev, mult = mult, min(2**n, 8)
            seq += [
                nn.Conv2d(channels * prev, channels * mult, 4, 2, 1, bias=False),
                _norm(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**layers, 8)
        seq += [
            nn.Conv2d(channels * prev, channels * mult, 4, 1, 1, bias=False),
            _norm(channels * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(channels * mult, 1, 4, 1, 1),
        ]
        self.main = nn.Sequential(*seq)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    """taming's `weights_init`: conv weights N(0, 0.02), norm scales N(1, 0.02) and shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
