"""Before building: the official UNet a config describes, checked against the checkpoint's tensor shapes.

Building a network allocates its weights: `ch: 4096` or `num_res_blocks: 1000000` would allocate until
memory runs out before the tensor-by-tensor check of `gq.official` could refuse them. `check_before_building`
compares the fields that fix the network's size with the checkpoint's official tensors: the first
convolution's channels, the number of levels, the blocks per level and their channels, the latent channels.
When they agree, the network holds no more weights than the checkpoint already does (attention blocks,
which the config places, at most double it); the full name and shape check still follows.
"""

from __future__ import annotations

import re

import torch

from gq.checkpoint import CheckpointError
from gq.model import ModelConfig
from gq.networks import NetworkConfig


def _shape(state: dict, key: str, name: str) -> tuple[int, ...]:
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        raise CheckpointError(f"{name}: holds no weight tensor {key}, which the config's network has")
    return tuple(value.shape)


def _indices(state: dict, prefix: str) -> set[int]:
    """The distinct N of the keys `prefix` + `N.`."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for key in state if (m := pattern.match(str(key)))}


def _agree(name: str, field: str, value: int, found: int, where: str) -> None:
    if value != found:
        raise CheckpointError(
            f"{name}: the config's {field} = {value} does not match the checkpoint ({where}: {found})"
        )


def check_before_building(config: ModelConfig, state: dict, name: str) -> None:
    """Refuse a config whose UNet differs in size from the official tensors in `state`, before any weight
    is allocated; other backbones are left to their own check."""
    net = config.network
    if not isinstance(net, NetworkConfig):
        return
    conv_in = _shape(state, "encoder.conv_in.weight", name)
    _agree(name, "ch", net.ch, conv_in[0], "encoder.conv_in.weight output channels")
    _agree(name, "in_channels", net.in_channels, conv_in[1], "encoder.conv_in.weight input channels")
    levels = _indices(state, "encoder.down.")
    _agree(name, "len(ch_mult)", len(net.ch_mult), len(levels), "encoder.down.* levels")
    for level, mult in enumerate(net.ch_mult):
        blocks = _indices(state, f"encoder.down.{level}.block.")
        _agree(
            name, "num_res_blocks", net.num_res_blocks, len(blocks), f"encoder.down.{level}.block.* blocks"
        )
        conv1 = _shape(state, f"encoder.down.{level}.block.0.conv1.weight", name)
        _agree(name, f"ch * ch_mult[{level}]", net.ch * mult, conv1[0], f"encoder.down.{level}.block.0.conv1")
    conv_out = _shape(state, "encoder.conv_out.weight", name)
    _agree(name, "2 * z_channels", 2 * config.latent_channels, conv_out[0], "encoder.conv_out.weight")
