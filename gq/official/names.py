"""Tensor names: each encoder/decoder tensor of ours -> its name(s) in the official checkpoints."""

from __future__ import annotations

import re

from gq.checkpoint import CheckpointError
from gq.model import GQVAE
from gq.official.config import NORM_GROUPS
from gq.state_map import network_names
from gq.vit import ViTConfig

# Our name -> the official one, applied in order; `{up}` is the decoder level counted from full resolution.
_RENAMES = (
    (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2."),
    (r"^encoder\.levels\.(\d+)\.blocks\.", r"encoder.down.\1.block."),
    (r"^encoder\.levels\.(\d+)\.attn\.", r"encoder.down.\1.attn."),
    (r"^encoder\.down\.(\d+)\.conv\.", r"encoder.down.\1.downsample.conv."),
    (r"^decoder\.levels\.(\d+)\.blocks\.", "decoder.up.{up}.block."),
    (r"^decoder\.levels\.(\d+)\.attn\.", "decoder.up.{up}.attn."),
    (r"^decoder\.up\.(\d+)\.conv\.", "decoder.up.{up}.upsample.conv."),
    (r"\.skip\.", ".nin_shortcut."),
    (r"\.proj\.", ".proj_out."),
)


def _official_name(name: str, levels: int) -> str:
    for pattern, replacement in _RENAMES:
        match = re.search(pattern, name)
        if match:
            if "{up}" in replacement:
                replacement = replacement.replace("{up}", str(levels - 1 - int(match.group(1))))
            name = re.sub(pattern, replacement, name)
    return name


def official_names(model: GQVAE) -> dict[str, tuple[str, ...]]:
    """Each encoder/decoder tensor of ours -> its official name(s); a fused qkv is three (q, k, v)."""
    if isinstance(model.config.network, ViTConfig):  # gq/vit.py uses the official names
        return {name: (name,) for name in model.state_dict() if name.startswith(("encoder.", "decoder."))}
    if model.config.network.mid_attention:
        raise CheckpointError("the official network has no middle attention (mid_attention=True)")
    if model.config.network.quant_conv or model.config.network.post_quant_conv:
        raise CheckpointError("the official network has no quant_conv / post_quant_conv (a diffusers VAE's)")
    if model.config.network.norm_groups != NORM_GROUPS:
        raise CheckpointError(
            f"the official network uses {NORM_GROUPS} norm groups, this model "
            f"{model.config.network.norm_groups}"
        )
    levels = len(model.config.network.ch_mult)
    return network_names(model, lambda name: _official_name(name, levels), ("q", "k", "v"))
