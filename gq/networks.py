"""The latent-diffusion style conv encoder and decoder (residual blocks, attention, f = 2^(levels - 1)).

The layout follows the LDM / SD autoencoder the reference's "sd3unet" backbone uses: a stem conv, per level
`num_res_blocks` residual blocks (plus optional attention) and a stride-2 downsample, a middle of
res-attention-res, and a mirrored decoder with nearest-neighbour upsampling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of the encoder/decoder pair; `downsample` = 2^(len(ch_mult) - 1)."""

    ch: int = 128  # channels of the first level; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # per-level channel multipliers (4 levels -> f = 8)
    num_res_blocks: int = 2  # residual blocks per level (the decoder uses one more, as LDM does)
    attn_levels: tuple[int, ...] = ()  # levels (0 = full resolution) with self-attention after each block
    mid_attention: bool = True  # attention in the middle block, i.e. at the latent resolution (32x32 at 256)
    norm_groups: int = 32  # GroupNorm groups; every level's channel count must divide by it
    dropout: float = 0.0  # dropout inside residual blocks
    in_channels: int = 3  # image channels
    # diffusers' AutoencoderKL adds a 1x1 conv on (mu, logvar) after the encoder and one on the latent before
    # the decoder (`use_quant_conv`, `use_post_quant_conv`); the LDM / official network has neither.
    quant_conv: bool = False
    post_quant_conv: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_levels", tuple(int(a) for a in self.attn_levels))
        if not self.ch_mult or self.num_res_blocks < 1:
            raise ValueError("ch_mult must be non-empty and num_res_blocks >= 1")
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(f"channels {self.ch * m} do not divide into {self.norm_groups} norm groups")
        for a in self.attn_levels:
            if not 0 <= a < len(self.ch_mult):
                raise ValueError(f"attn level {a} outside 0..{len(self.ch_mult) - 1}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        # Fields added later are written only when set, so an existing model's saved config stays the same.
        return {k: v for k, v in asdict(self).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}

    @classmethod
    def from_dict(cls, data: dict) -> NetworkConfig:
        return cls(**data)


_LATER_FIELDS = {"quant_conv": False, "post_quant_conv": False}  # field -> its default


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding keeps H/2 exactly


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attn: list[nn.Module]) -> nn.ModuleDict:
    return nn.ModuleDict({"blocks": nn.ModuleList(blocks), "attn": nn.ModuleList(attn)})


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> (mu, logvar), each (B, latent_channels, H/f, W/f)."""

    def __init__(self, config: NetworkConfig, latent_channels: int) -> None:
        super().__init__()
        c = config
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.levels = nn.ModuleList()
        self.down = nn.ModuleList()
        c_in = c.ch
        for i, mult in enumerate(c.ch_mult):
            c_out = c.ch * mult
            blocks, attn = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(c_in, c_out, g, c.dropout))
                attn.append(Attention(c_out, g) if i in c.attn_levels else nn.Identity())
                c_in = c_out
            self.levels.append(_level(blocks, attn))
            self.down.append(Downsample(c_in) if i < len(c.ch_mult) - 1 else nn.Identity())
        self.mid = nn.Sequential(
            ResBlock(c_in, c_in, g, c.dropout),
            Attention(c_in, g) if c.mid_attention else nn.Identity(),
            ResBlock(c_in, c_in, g, c.dropout),
        )
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, 2 * latent_channels, 3, padding=1)
        self.quant_conv = (
            nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if c.quant_conv else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_in(x)
        for level, down in zip(self.levels, self.down):
            for block, attn in zip(level["blocks"], level["attn"]):
                h = attn(block(h))
            h = down(h)
        h = self.quant_conv(self.conv_out(F.silu(self.norm_out(self.mid(h)))))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, 3, h*f, w*f), unbounded (about [-1, 1])."""

    def __init__(self, config: NetworkConfig, latent_channels: int) -> None:
        super().__init__()
        c = config
        g = c.norm_groups
        c_in = c.ch * c.ch_mult[-1]
        self.post_quant_conv = (
            nn.Conv2d(latent_channels, latent_channels, 1) if c.post_quant_conv else nn.Identity()
        )
        self.conv_in = nn.Conv2d(latent_channels, c_in, 3, padding=1)
        self.mid = nn.Sequential(
            ResBlock(c_in, c_in, g, c.dropout),
            Attention(c_in, g) if c.mid_attention else nn.Identity(),
            ResBlock(c_in, c_in, g, c.dropout),
        )
        # Built from the lowest resolution up; levels[j] serves encoder level len - 1 - j.
        self.levels = nn.ModuleList()
        self.up = nn.ModuleList()
        n = len(c.ch_mult)
        for i in reversed(range(n)):
            c_out = c.ch * c.ch_mult[i]
            blocks, attn = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(c_in, c_out, g, c.dropout))
                attn.append(Attention(c_out, g) if i in c.attn_levels else nn.Identity())
                c_in = c_out
            self.levels.append(_level(blocks, attn))
            self.up.append(Upsample(c_in) if i > 0 else nn.Identity())
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level, up in zip(self.levels, self.up):
            for block, attn in zip(level["blocks"], level["attn"]):
                h = attn(block(h))
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))
