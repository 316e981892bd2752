"""Named model sizes and GQ operating points, in one place: `model_config("small-f8c16", bpp=0.25)` or
`model_config("paper-f16c14", tokens=256, bits=14)`.

A preset fixes the network, hence the downsampling f and the latent channels C ("f16c14": f = 16, C = 14).
An operating point splits the C channels of each latent position into G groups of d = C / G and gives
each group a codebook of K = 2^bits vectors: an image of the preset's native side S (256; a ViT's fixed
image_size) becomes (S / f)^2 * G tokens of `bits` bits each.
"""

from __future__ import annotations

import math

from gq.codebook import CodebookSpec
from gq.model import ModelConfig
from gq.networks import NetworkConfig
from gq.quantizer import QuantizerConfig
from gq.tdc import TDCConfig
from gq.vit import ViTConfig

_F16 = {
    "ch": 128,
    "ch_mult": (1, 2, 4, 4, 4),
    "num_res_blocks": 2,
    "attn_levels": (3,),
    "mid_attention": False,
}

PRESETS: dict[str, NetworkConfig | ViTConfig] = {
    # The official "sd3unet" exactly (configs/sd3unet_gq_*.yaml): ch 128, ch_mult [1,2,4,4], 2 res blocks,
    # attention after each block of the lowest level (32x32 of a 256 config: `attn_resolutions: [32]`),
    # none in the middle. 35,325,856 encoder + 51,648,771 decoder parameters, as the official code counts.
    "paper-f8c16": NetworkConfig(
        ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_levels=(3,), mid_attention=False
    ),
    # Same latent shape, a few million parameters: trains on a CPU, and is the debug model of the tests.
    "small-f8c16": NetworkConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, mid_attention=True),
    # The official BSQ-ViT-B backbone of configs/bsqvit_gq_*.yaml: 256x256 images only, patch 8, width 768,
    # 12 layers, 12 heads. 86,016,032 encoder + 88,809,408 decoder parameters, as the official code counts.
    "paper-vit-f8c16": ViTConfig(image_size=256, patch_size=8, width=768, layers=12, heads=12, mlp_ratio=4),
    # The authors' 256-token tokenizers: the sd3unet with a fifth level (16x16 latents at 256; attention
    # still at the 32x32 level), one token per position. c14: K = 2^14 (LlamaGen's point); c18: K = 2^18.
    "paper-f16c14": NetworkConfig(**_F16),
    "paper-f16c18": NetworkConfig(**_F16),
    # A 16x network a CPU trains: 4x4 tokens for a 64x64 image; the tests' f16 model.
    "small-f16c14": NetworkConfig(ch=32, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=1, mid_attention=True),
}

# Latent channels C of each preset (the "cN" of its name).
CHANNELS: dict[str, int] = {name: int(name.rsplit("c", 1)[1]) for name in PRESETS}
LATENT_CHANNELS = 16  # the f8 presets' C

# The named f8c16 operating points, bits per pixel at K = 2^16 -> (codebook dim d, groups G); d * G = 16
# (docs/METHOD.md, section 5).
OPERATING_POINTS: dict[float, tuple[int, int]] = {0.25: (16, 1), 0.5: (8, 2), 1.0: (4, 4)}


def native_size(preset: str) -> int:
    """The image side a preset's tokens per image are counted at: a ViT's fixed size, else 256."""
    network = PRESETS[preset]
    return network.image_size if isinstance(network, ViTConfig) else 256


def operating_point(
    preset: str, bpp: float | None = None, tokens: int | None = None, bits: int | None = None
) -> tuple[int, int, int]:
    """(d, G, K) of a point named by bpp (the f8c16 table) or by tokens per image and bits per token;
    neither: one token of C channels per position, K = 2^C."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    channels, grid = CHANNELS[preset], native_size(preset) // PRESETS[preset].downsample
    if bpp is not None:
        if tokens is not None or bits is not None:
            raise ValueError("name an operating point by bpp or by tokens and bits, not both")
        if bpp not in OPERATING_POINTS or channels != LATENT_CHANNELS:
            known = sorted(OPERATING_POINTS) if channels == LATENT_CHANNELS else []
            raise ValueError(
                f"no {bpp} bpp point for {preset}: bpp names {known or 'none of its points'}; name a point "
                f"by tokens per image and bits per token, e.g. tokens={grid * grid}, bits={channels}"
            )
        dim, groups = OPERATING_POINTS[bpp]
        return dim, groups, 1 << 16
    tokens = grid * grid if tokens is None else tokens
    bits = channels if bits is None else bits
    groups = tokens // (grid * grid)
    if tokens < 1 or tokens % (grid * grid) or channels % groups:
        raise ValueError(
            f"{tokens} tokens per {native_size(preset)}px image: {preset} has {grid}x{grid} positions of "
            f"{channels} channels, so tokens must be {grid * grid} x a divisor of {channels}"
        )
    if not 1 <= bits <= 24:
        raise ValueError(f"bits per token must be 1..24 (K = 2^bits codebook vectors), got {bits}")
    return channels // groups, groups, 1 << bits


def model_config(
    preset: str = "small-f8c16",
    bpp: float | None = None,
    *,
    tokens: int | None = None,
    bits: int | None = None,
    codebook_size: int | None = None,
    codebook_kind: str = "sobol",
    codebook_seed: int = 42,
    rule: str = "posterior",
    layout: str = "interleaved",
    kl_mode: str = "tdc",
    kl_weight: float = 1.0,
) -> ModelConfig:
    """A full model config from a network preset and an operating point: `bpp` (0.25, 0.5 or 1.0 for the
    f8c16 presets), or `tokens` per image and `bits` per token; `codebook_size` overrides K."""
    dim, groups, size = operating_point(preset, bpp, tokens, bits)
    if codebook_size is not None and bits is not None and codebook_size != size:
        raise ValueError(f"codebook_size {codebook_size} is not 2^bits = {size}")
    size = size if codebook_size is None else codebook_size
    spec = CodebookSpec(size=size, dim=dim, seed=codebook_seed, kind=codebook_kind)
    return ModelConfig(
        network=PRESETS[preset],
        quantizer=QuantizerConfig(codebook=spec, groups=groups, layout=layout, rule=rule),
        tdc=TDCConfig(
            target_bits=math.log2(size), groups=groups, layout=layout, mode=kl_mode, weight=kl_weight
        ),
        preset=preset,
    )


def describe_point(config: ModelConfig, size: int | None = None) -> dict:
    """Tokens per image, bits per token and bits per pixel of a model config at image side `size`
    (default: its preset's native side, else 256)."""
    network = config.network
    side = size or (network.image_size if isinstance(network, ViTConfig) else 256)
    q = config.quantizer
    tokens = (side // network.downsample) ** 2 * q.groups
    bits = math.log2(q.codebook.size)
    return {"tokens": tokens, "bits_per_token": bits, "bpp": tokens * bits / side**2}
