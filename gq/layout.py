"""How the C = d * G latent channels split into G groups of d: the `interleaved` and `contiguous` layouts.

`interleaved` (the reference's released configs): group g holds channels g, g+G, g+2G, ...
(C = 16, d = 4: [0, 4, 8, 12], [1, 5, 9, 13], ...). `contiguous`: group g holds channels g*d .. g*d+d-1.
"""

from __future__ import annotations

import torch

LAYOUTS = ("interleaved", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def split_groups(x: torch.Tensor, groups: int, layout: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, G, d), a view where possible."""
    check_layout(layout)
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) latent, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if groups < 1 or c % groups:
        raise ValueError(f"{c} channels cannot be split into {groups} groups")
    d = c // groups
    if layout == "interleaved":
        return x.reshape(b, d, groups, h, w).permute(0, 3, 4, 2, 1)
    return x.reshape(b, groups, d, h, w).permute(0, 3, 4, 1, 2)


def merge_groups(z: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, H, W, G, d) -> (B, C, H, W), the inverse of `split_groups`."""
    check_layout(layout)
    if z.dim() != 5:
        raise ValueError(f"expected a (B, H, W, G, d) tensor, got shape {tuple(z.shape)}")
    b, h, w, g, d = z.shape
    if layout == "interleaved":
        return z.permute(0, 4, 3, 1, 2).reshape(b, d * g, h, w)
    return z.permute(0, 3, 4, 1, 2).reshape(b, g * d, h, w)
