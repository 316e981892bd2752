"""Filling a GQVAE from another codebase's tensors through a name map (official GQ `.ckpt`, diffusers VAEs).

A converter says, for each of our encoder/decoder tensors, which source tensor(s) make it (several are
concatenated along dim 0, as q, k, v make our fused qkv); `load_mapped_state` checks that every source
tensor is consumed and every parameter filled, checks each shape, and loads the model strictly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gq.checkpoint import CheckpointError
from gq.model import GQVAE


def network_names(
    model: GQVAE, rename: Callable[[str], str], qkv: tuple[str, str, str]
) -> dict[str, tuple[str, ...]]:
    """Each encoder/decoder tensor of ours -> its source name(s): `rename(ours)`, and for our fused qkv
    conv the three source names with `.qkv.` replaced by `.{q}.`, `.{k}.`, `.{v}.` in that order."""
    names = {}
    for name in model.state_dict():
        if name.startswith(("encoder.", "decoder.")):
            theirs = rename(name)
            parts = [theirs.replace(".qkv.", f".{p}.") for p in qkv] if ".qkv." in theirs else [theirs]
            names[name] = tuple(parts)
    return names


def _listed(what: str, names: list[str]) -> str:
    extra = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{what} {names[:3]}{extra}"


def _fit(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A linear layer's (out, in) weight where ours is a 1x1 conv's (out, in, 1, 1): the same map."""
    if value.dim() == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1):
        return value.reshape(shape) if value.shape == shape[:2] else value
    return value


def load_mapped_state(model: GQVAE, state: dict, names: dict[str, tuple[str, ...]], name: str) -> None:
    """Fill every tensor of `names` (ours -> its source names) from `state`, which must hold exactly those
    source names; CheckpointError names stray or missing tensors, a non-tensor, or a shape that differs."""
    expected = {o for group in names.values() for o in group}
    stray = sorted(str(k) for k in state if k not in expected)
    missing = sorted(expected - set(state))
    if stray or missing:
        what = _listed("unexpected tensors", stray) if stray else _listed("missing tensors", missing)
        raise CheckpointError(f"{name}: does not match the config's network: {what}")
    ours = model.state_dict()
    unfilled = sorted(k for k in ours if k not in names and not k.startswith(("quantizer.", "tdc.")))
    if unfilled:
        raise CheckpointError(f"{name}: the map leaves {_listed('parameters', unfilled)} unfilled")
    for key, group in names.items():
        parts = [state[o] for o in group]
        if any(not isinstance(p, torch.Tensor) for p in parts):
            raise CheckpointError(f"{name}: {group[0]} is not a tensor")
        value = _fit(torch.cat(parts, 0) if len(parts) > 1 else parts[0], ours[key].shape)
        if value.shape != ours[key].shape:
            raise CheckpointError(
                f"{name}: {' + '.join(group)} has shape {tuple(value.shape)}, the config's network needs "
                f"{tuple(ours[key].shape)}"
            )
        ours[key] = value.to(ours[key].dtype)
    model.load_state_dict(ours, strict=True)
