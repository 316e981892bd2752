"""The reference's ViT backbone in its YAML: `pit.modules.vit.TransformerEncoder` / `TransformerDecoder`
params <-> our ViTConfig (the `bsqvit_gq_*` configs). gq/official/ calls these for a ViT config.

The tensor names need no translation: gq/vit.py names its parameters as the reference does.
"""

from __future__ import annotations

from typing import Any

from gq.checkpoint import CheckpointError
from gq.vit import ViTConfig

VIT_ENCODER = "pit.modules.vit.TransformerEncoder"
VIT_DECODER = "pit.modules.vit.TransformerDecoder"
DIM_FFN_OUTPUT = 3072  # the reference decoder's default `dim_ffn_output`
# Settings of the reference classes built here only at this value (a missing field takes its default).
VIT_FIXED = {
    "double_z": True,
    "num_frames": 1,
    "ls_init_value": None,
    "attn_drop_rate": 0.0,
    "drop_path_rate": 0.0,
    "ln_pre": True,
    "ln_post": True,
    "act_layer": "gelu",
    "norm_layer": "layer_norm",
    "use_ffn_output": True,
    "logit_laplace": False,
}
VIT_IGNORED = {"cross_frames", "mask_block_size"}  # no effect with one frame and no attention mask
VIT_SHAPE = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "drop_rate", "z_channels")
VIT_KNOWN = set(VIT_FIXED) | VIT_IGNORED | set(VIT_SHAPE) | {"mask_type", "dim_ffn_output"}


def _field(params: dict, name: str, where: str) -> Any:
    if name not in params:
        raise CheckpointError(f"config: missing field {where}.{name}")
    return params[name]


def _check_fixed(params: dict, where: str) -> None:
    unknown = sorted(set(params) - VIT_KNOWN)
    if unknown:
        raise CheckpointError(f"config: {where}.{unknown[0]}: a field this version does not know")
    for name, value in VIT_FIXED.items():
        if name in params and params[name] != value:
            raise CheckpointError(
                f"config: {where}.{name} = {params[name]!r}; this version builds only {value!r}"
            )
    if str(params.get("mask_type", "none")).lower() != "none":
        raise CheckpointError(
            f"config: {where}.mask_type = {params['mask_type']!r}; this version builds only 'none'"
        )


def _side(value: Any, where: str) -> int:
    """The reference's `to_2tuple`: an int, or a square [s, s]."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"config: {where} = {value!r}; this version builds square sizes only")
        value = value[0]
    return int(value)


def vit_from_official(enc: dict, dec: dict, decoder_target: str) -> tuple[ViTConfig, int]:
    """Encoder and decoder params of the reference ViT -> (ViTConfig, z_channels)."""
    where_e, where_d = "model.params.encoder_config.params", "model.params.decoder_config.params"
    if decoder_target != VIT_DECODER:
        raise CheckpointError(
            f"config: model.params.decoder_config.target = {decoder_target!r}; the ViT encoder needs "
            f"{VIT_DECODER!r}"
        )
    _check_fixed(enc, where_e)
    _check_fixed(dec, where_d)
    if "dim_ffn_output" in enc:
        raise CheckpointError(
            f"config: {where_e}.dim_ffn_output: a decoder field the reference encoder refuses"
        )
    for name in VIT_SHAPE:
        if name in enc and dec.get(name, enc[name]) != enc[name]:
            raise CheckpointError(
                f"config: {where_d}.{name} = {dec.get(name)!r} differs from the encoder's {enc[name]!r}; "
                "this version builds one shape for both"
            )
    try:
        network = ViTConfig(
            image_size=_side(_field(enc, "image_size", where_e), f"{where_e}.image_size"),
            patch_size=_side(_field(enc, "patch_size", where_e), f"{where_e}.patch_size"),
            width=int(_field(enc, "width", where_e)),
            layers=int(_field(enc, "layers", where_e)),
            heads=int(_field(enc, "heads", where_e)),
            mlp_ratio=float(_field(enc, "mlp_ratio", where_e)),
            dim_ffn_output=int(dec.get("dim_ffn_output", DIM_FFN_OUTPUT)),
            dropout=float(enc.get("drop_rate", 0.0)),
        )
        return network, int(_field(enc, "z_channels", where_e))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config: {where_e}: {e}") from None


def vit_to_official(network: ViTConfig, z_channels: int, shared: str) -> tuple[dict, dict]:
    """(encoder_config, decoder_config) of the reference for this ViT; the decoder shares the encoder's
    params through the `shared` interpolation unless its output layer differs from the default."""
    if network.in_channels != 3:
        raise CheckpointError(f"the reference ViT takes 3 image channels, this model {network.in_channels}")
    ratio = network.mlp_ratio
    params = {
        "double_z": True,
        "z_channels": z_channels,
        "image_size": network.image_size,
        "patch_size": network.patch_size,
        "width": network.width,
        "layers": network.layers,
        "heads": network.heads,
        "mlp_ratio": int(ratio) if ratio.is_integer() else ratio,
        "drop_rate": network.dropout,
    }
    decoder: str | dict = shared
    if network.dim_ffn_output != DIM_FFN_OUTPUT:
        decoder = params | {"dim_ffn_output": network.dim_ffn_output}
    return {"target": VIT_ENCODER, "params": params}, {"target": VIT_DECODER, "params": decoder}
