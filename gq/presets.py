"""Named model sizes and GQ operating points, in one place: `model_config("small-f8c16", bpp=0.25)`."""

from __future__ import annotations

import math

from gq.codebook import CodebookSpec
from gq.model import ModelConfig
from gq.networks import NetworkConfig
from gq.quantizer import QuantizerConfig
from gq.tdc import TDCConfig

# Network presets. Every one is f = 8 with C = 16 latent channels ("f8c16"); the operating point decides
# how those 16 channels split into groups.
PRESETS: dict[str, NetworkConfig] = {
    # The official "sd3unet" exactly (configs/sd3unet_gq_*.yaml): ch 128, ch_mult [1,2,4,4], 2 res blocks,
    # attention after each block of the lowest level (32x32 of a 256 config: `attn_resolutions: [32]`),
    # none in the middle. 35,325,856 encoder + 51,648,771 decoder parameters, as the official code counts.
    "paper-f8c16": NetworkConfig(
        ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_levels=(3,), mid_attention=False
    ),
    # Same latent shape, a few million parameters: trains on a CPU, and is the debug model of the tests.
    "small-f8c16": NetworkConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, mid_attention=True),
}

LATENT_CHANNELS = 16

# bits per pixel at K = 2^16 -> (codebook dim d, groups G); d * G = 16 channels (docs/METHOD.md, section 5).
OPERATING_POINTS: dict[float, tuple[int, int]] = {0.25: (16, 1), 0.5: (8, 2), 1.0: (4, 4)}


def model_config(
    preset: str = "small-f8c16",
    bpp: float = 0.25,
    *,
    codebook_size: int = 65536,
    codebook_kind: str = "sobol",
    codebook_seed: int = 42,
    rule: str = "posterior",
    layout: str = "interleaved",
    kl_mode: str = "tdc",
    kl_weight: float = 1.0,
) -> ModelConfig:
    """A full model config from a network preset and an operating point (0.25, 0.5 or 1.0 bpp)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if bpp not in OPERATING_POINTS:
        raise ValueError(f"unknown operating point {bpp} bpp; choose one of {sorted(OPERATING_POINTS)}")
    dim, groups = OPERATING_POINTS[bpp]
    spec = CodebookSpec(size=codebook_size, dim=dim, seed=codebook_seed, kind=codebook_kind)
    return ModelConfig(
        network=PRESETS[preset],
        quantizer=QuantizerConfig(codebook=spec, groups=groups, layout=layout, rule=rule),
        tdc=TDCConfig(
            target_bits=math.log2(codebook_size), groups=groups, layout=layout, mode=kl_mode, weight=kl_weight
        ),
        preset=preset,
    )
