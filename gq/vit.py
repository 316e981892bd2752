"""The ViT encoder and decoder: the paper's second backbone (BSQ-ViT style, the reference's `bsqvit` configs).

An image of the config's fixed size is cut into `patch_size` patches, row-major over the patch grid; each
patch is one token position of a pre-LN transformer (learned positional embedding per position, hence the
fixed size). The encoder ends in a linear map to (mu, logvar); the decoder maps each latent back to a
patch through a tanh feed-forward layer. Parameter names follow the reference's modules, so its
checkpoints load under the same names; the latent is exchanged as (B, C, h, w), the grid in row-major
order, which is the reference's (B, L, C) `blc` layout with L = h * w.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

BACKBONE = "vit"  # the `backbone` key of a saved ViTConfig (a UNet NetworkConfig has none)


@dataclass(frozen=True)
class ViTConfig:
    """Shape of the ViT encoder/decoder pair; `downsample` = patch_size, tokens = (image_size / patch)^2."""

    image_size: int = 256  # the only image side the model takes (its positional embeddings are per patch)
    patch_size: int = 8  # pixels per patch side: the downsampling factor
    width: int = 768  # transformer width
    layers: int = 12  # transformer blocks in the encoder, and as many in the decoder
    heads: int = 12  # attention heads; width must divide by it
    mlp_ratio: float = 4.0  # hidden width of each block's MLP, as a multiple of width
    dim_ffn_output: int = 3072  # width of the decoder's tanh output layer before the patch projection
    dropout: float = 0.0  # dropout after each block's MLP (the reference's drop_rate)
    in_channels: int = 3  # image channels
    backbone: str = BACKBONE  # tells a saved config from a UNet's

    def __post_init__(self) -> None:
        if self.backbone != BACKBONE:
            raise ValueError(f"ViTConfig.backbone must be {BACKBONE!r}, got {self.backbone!r}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.layers < 1 or self.heads < 1 or self.width % self.heads:
            raise ValueError(f"width {self.width} must split into {self.heads} heads, with layers >= 1")
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))

    @property
    def downsample(self) -> int:
        return self.patch_size

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        return cls(**data)


class Attention(nn.Module):
    """Multi-head self-attention, batch first, with the packed q/k/v projection of nn.MultiheadAttention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, c / heads)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a GELU MLP."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        width, hidden = config.width, int(config.width * config.mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, config.heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))
        self.mlp.add_module("drop2", nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(Block(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


def _init_(module: nn.Module, positional: nn.Parameter) -> None:
    """The reference's start: positions N(0, 0.02^2); linear weights truncated N(0, 0.02^2), biases 0."""
    nn.init.normal_(positional, std=0.02)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Attention):
            nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
            nn.init.zeros_(m.in_proj_bias)


class ViTEncoder(nn.Module):
    """Image (B, 3, S, S), S = image_size, in [-1, 1] -> (mu, logvar), each (B, C, S/p, S/p)."""

    def __init__(self, config: ViTConfig, latent_channels: int) -> None:
        super().__init__()
        self.config = config
        c, p = config, config.patch_size
        self.conv1 = nn.Linear(c.in_channels * p * p, c.width, bias=False)  # no bias: ln_pre follows
        self.positional_embedding = nn.Parameter(torch.zeros(c.grid * c.grid, c.width))
        self.ln_pre = nn.LayerNorm(c.width)
        self.transformer = Transformer(c)
        self.ln_post = nn.LayerNorm(c.width)
        self.quant_embed = nn.Linear(c.width, 2 * latent_channels)
        _init_(self, self.positional_embedding)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, p = self.config, self.config.patch_size
        b, ch, h, w = x.shape
        if (h, w) != (c.image_size, c.image_size):
            raise ValueError(
                f"this ViT takes {c.image_size}x{c.image_size} images only (its positional embeddings fix "
                f"the size), got {h}x{w}: resize or crop the images to {c.image_size}"
            )
        g = c.grid  # patches flattened channel-major, (c, sh, sw), in row-major grid order
        x = x.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * p * p)
        x = self.ln_pre(self.conv1(x) + self.positional_embedding.to(x.dtype))
        x = self.quant_embed(self.ln_post(self.transformer(x)))  # (B, L, 2C)
        x = x.transpose(1, 2).reshape(b, -1, g, g)
        mu, logvar = x.chunk(2, dim=1)
        return mu, logvar


class ViTDecoder(nn.Module):
    """Latent (B, C, S/p, S/p) -> image (B, 3, S, S), unbounded (about [-1, 1])."""

    def __init__(self, config: ViTConfig, latent_channels: int) -> None:
        super().__init__()
        self.config = config
        c, p = config, config.patch_size
        self.post_quant_embed = nn.Linear(latent_channels, c.width)
        self.positional_embedding = nn.Parameter(torch.zeros(c.grid * c.grid, c.width))
        self.ln_pre = nn.LayerNorm(c.width)
        self.transformer = Transformer(c)
        self.ln_post = nn.LayerNorm(c.width)
        self.ffn = nn.Sequential(nn.Linear(c.width, c.dim_ffn_output), nn.Tanh())
        self.conv_out = nn.Linear(c.dim_ffn_output, c.in_channels * p * p)
        _init_(self, self.positional_embedding)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c, p = self.config, self.config.patch_size
        b, _, h, w = z.shape
        if (h, w) != (c.grid, c.grid):
            raise ValueError(f"this ViT decodes {c.grid}x{c.grid} latent grids only, got {h}x{w}")
        x = self.post_quant_embed(z.flatten(2).transpose(1, 2))  # (B, L, C) -> (B, L, width)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = self.conv_out(self.ffn(self.ln_post(self.transformer(x))))  # (B, L, 3 p p)
        x = x.reshape(b, h, w, c.in_channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c.in_channels, h * p, w * p)
