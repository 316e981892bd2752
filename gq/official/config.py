"""The official YAML config <-> our ModelConfig: reading it (within the bounds of `yaml_bounds`), checking
each field this version builds, and translating the UNet's or (through `vit`) the ViT's network and the
regularizer into our network, quantizer and TDC settings. `CheckpointError` names a field it refuses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from gq.checkpoint import CheckpointError
from gq.codebook import CodebookSpec
from gq.model import ModelConfig
from gq.networks import NetworkConfig
from gq.official.vit import VIT_ENCODER, vit_from_official
from gq.official.yaml_bounds import check_config_values, load_config, read_config_text, resolve_interpolations
from gq.quantizer import LOGVAR_RANGE, QuantizerConfig
from gq.tdc import TDCConfig

CONVERTER_VERSION = 1  # bumped when the translation of a config or of a tensor name changes
ENGINE = "pit.models.autoencoder.AutoencodingEngine"
ENCODER = "pit.modules.unet.Encoder"
DECODER = "pit.modules.unet.Decoder"
REGULARIZER = "pit.quantization.gaussian.GaussianQuantRegularizer"  # `group` = d, `n_samples` = K
REGULARIZER2 = "pit.quantization.gaussian.GaussianQuantRegularizer2"  # `dim` = d, `codebook_size` = K
NORM_GROUPS = 32  # the official Normalize is GroupNorm(32, eps 1e-6) everywhere
DECODER_PARAMS = "${model.params.encoder_config.params}"  # how the published configs share the shape
# The network fields the decoder must share with the encoder: we build both from one NetworkConfig.
SHARED_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels", "out_ch")
# Settings of the official classes we build exactly only at this value (field -> the value).
NETWORK_FIXED = {
    "double_z": True,
    "resamp_with_conv": True,
    "use_linear_attn": False,
    "padding_mode": "zeros",
    "give_pre_end": False,
    "tanh_out": False,
}
ENGINE_FIXED = {"latent_stats": False, "use_vf_flow": False, "encode_patch": -1}


# --- the YAML -------------------------------------------------------------------------------------------


def read_config(config: str | dict) -> dict:
    """The official YAML (a path or fsspec URL, or an already parsed dict) with interpolations resolved,
    read within the bounds of `gq.official.yaml_bounds`."""
    if isinstance(config, dict):
        try:
            check_config_values(config)
        except CheckpointError as e:
            raise CheckpointError(f"config: {e}") from None
        raw = config
    else:
        raw = load_config(read_config_text(str(config)), f"config {config}")
    if not isinstance(raw, dict):
        raise CheckpointError(f"config {config}: not a YAML mapping")
    return resolve_interpolations(raw)


def _get(params: Any, name: str, where: str) -> Any:
    """params[name], or a CheckpointError naming the missing field `where.name`."""
    if not isinstance(params, dict) or name not in params:
        raise CheckpointError(f"config: missing field {where}.{name}")
    return params[name]


# Fields whose value, where present and not null, must be a mapping (a list there is refused by name).
MAPPINGS = (
    "model",
    "model.params",
    "model.params.encoder_config",
    "model.params.encoder_config.params",
    "model.params.decoder_config",
    "model.params.decoder_config.params",
    "model.params.regularizer_config",
    "model.params.regularizer_config.params",
    "model.params.loss_config",
    "model.params.loss_config.params",
    "model.params.loss_config.params.regularization_weights",
)


def _check_mappings(cfg: dict) -> None:
    """Refuse a list or a scalar where the official code expects a mapping, naming the field."""
    for path in MAPPINGS:
        node: Any = cfg
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            raise CheckpointError(f"config: {path} is a {type(node).__name__}; a mapping belongs there")


def _config_errors(translate: Callable[[str | dict], ModelConfig]) -> Callable[[str | dict], ModelConfig]:
    """A value of the wrong type the named checks do not foresee is still a one-line config error."""

    @functools.wraps(translate)
    def checked(config: str | dict) -> ModelConfig:
        try:
            return translate(config)
        except CheckpointError:  # a ValueError already worded
            raise
        except (TypeError, ValueError, AttributeError, KeyError, ArithmeticError) as e:
            raise CheckpointError(
                f"config: a field of the wrong type or value ({type(e).__name__}: {e})"
            ) from None

    return checked


def _require(value: Any, expected: Any, path: str) -> None:
    if value != expected:
        raise CheckpointError(f"config: {path} = {value!r}; this version builds only {expected!r}")


# --- config translation ---------------------------------------------------------------------------------


def _attn_levels(resolution: int, attn_resolutions: list, levels: int) -> tuple[int, ...]:
    """Levels whose resolution, as the official Encoder and Decoder each compute it, is listed."""
    encoder = [i for i in range(levels) if resolution // 2**i in attn_resolutions]
    lowest = resolution // 2 ** (levels - 1)  # the Decoder counts up from the lowest level
    decoder = [i for i in range(levels) if lowest * 2 ** (levels - 1 - i) in attn_resolutions]
    if encoder != decoder:
        raise CheckpointError(
            f"config: resolution {resolution} puts attention at encoder levels {encoder} but decoder levels "
            f"{decoder}; this version builds the same levels in both"
        )
    return tuple(encoder)


def network_from_official(params: dict, where: str) -> NetworkConfig:
    """`pit.modules.unet.Encoder` params -> NetworkConfig (no middle attention, attention by resolution)."""

    def get(name: str) -> Any:
        return _get(params, name, where)

    for name, value in NETWORK_FIXED.items():
        if name in params:
            _require(params[name], value, f"{where}.{name}")
    _require(
        params.get("attn_type", "vanilla") in ("vanilla", "vanilla-xformers"), True, f"{where}.attn_type"
    )
    _require(get("out_ch"), get("in_channels"), f"{where}.out_ch")
    try:
        in_channels = int(get("in_channels"))
        ch_mult = tuple(int(m) for m in get("ch_mult"))
        return NetworkConfig(
            ch=int(get("ch")),
            ch_mult=ch_mult,
            num_res_blocks=int(get("num_res_blocks")),
            attn_levels=_attn_levels(int(get("resolution")), list(get("attn_resolutions")), len(ch_mult)),
            mid_attention=False,  # the official middle block has no attention (`mid.attn_1` is commented out)
            norm_groups=NORM_GROUPS,
            dropout=float(params.get("dropout", 0.0)),
            in_channels=in_channels,
        )
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config: {where}: {e}") from None


def _regularizer(reg: dict, z_channels: int, where: str, fmt: str = "bchw") -> tuple[QuantizerConfig, dict]:
    """The regularizer config -> (QuantizerConfig, TDC settings); `fmt` is the backbone's latent layout
    (a UNet's "bchw", a ViT's "blc")."""
    target = _get(reg, "target", where)
    params = dict(reg.get("params") or {})
    if target == REGULARIZER:
        layout, dim_key, size_key = "interleaved", "group", "n_samples"
        known = {"format", "n_samples", "group", "logvar_range", "tolerance", "lam_factor", "seed", "beta"}
        _require(params.get("format", "bchw"), fmt, f"{where}.params.format")
    elif target == REGULARIZER2 and fmt == "blc":
        raise CheckpointError(
            f"config: {where}.target = {target!r}: this version builds the ViT with {REGULARIZER}"
        )
    elif target == REGULARIZER2:
        layout, dim_key, size_key = "contiguous", "dim", "codebook_size"
        known = {
            "dim",
            "codebook_size",
            "dim_idx",
            "logvar_range",
            "tolerance",
            "lam_factor",
            "seed",
            "beta",
            "use_ste",
        }
        _require(params.get("dim_idx", 1), 1, f"{where}.params.dim_idx")
    else:
        raise CheckpointError(
            f"config: {where}.target = {target!r}: this version builds {REGULARIZER} and {REGULARIZER2}"
        )
    unknown = sorted(set(params) - known - {"backend"})
    if unknown:
        raise CheckpointError(f"config: {where}.params.{unknown[0]}: a field this version does not know")
    _require(
        params.get("logvar_range", list(LOGVAR_RANGE)), list(LOGVAR_RANGE), f"{where}.params.logvar_range"
    )
    try:
        dim = int(params.get(dim_key, 1) if dim_key == "group" else _get(params, dim_key, f"{where}.params"))
        size = int(_get(params, size_key, f"{where}.params"))
        if dim < 1:
            raise ValueError(f"{dim_key} = {dim}: a codebook dimension is at least 1")
        if z_channels % dim:
            raise ValueError(f"z_channels {z_channels} do not split into groups of {dim} ({dim_key})")
        spec = CodebookSpec(size=size, dim=dim, seed=int(params.get("seed", 42)), kind="sobol")
        quantizer = QuantizerConfig(
            spec,
            groups=z_channels // dim,
            layout=layout,
            rule="posterior",
            beta=float(params.get("beta", 1.0)),
        )
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config: {where}.params: {e}") from None
    tdc = {"tolerance": float(params.get("tolerance", 0.5)), "factor": float(params.get("lam_factor", 1.01))}
    return quantizer, tdc


def _unet_from_official(encoder: dict, decoder: dict) -> tuple[NetworkConfig, int]:
    """The UNet's encoder and decoder configs -> (NetworkConfig, z_channels)."""
    _require(
        _get(encoder, "target", "model.params.encoder_config"), ENCODER, "model.params.encoder_config.target"
    )
    _require(
        _get(decoder, "target", "model.params.decoder_config"), DECODER, "model.params.decoder_config.target"
    )
    enc = _get(encoder, "params", "model.params.encoder_config")
    dec = _get(decoder, "params", "model.params.decoder_config")
    for name in SHARED_FIELDS:
        if name in enc and dec.get(name) != enc[name]:
            raise CheckpointError(
                f"config: model.params.decoder_config.params.{name} = {dec.get(name)!r} differs from the "
                f"encoder's {enc[name]!r}; this version builds one shape for both"
            )
    network = network_from_official(enc, "model.params.encoder_config.params")
    network_from_official(dec | {"double_z": True}, "model.params.decoder_config.params")  # its own checks
    z_channels = int(_get(enc, "z_channels", "model.params.encoder_config.params"))
    return network, z_channels


@_config_errors
def model_config_from_official(config: str | dict) -> ModelConfig:
    """An official YAML (path, URL or parsed dict) -> our ModelConfig; CheckpointError names a bad field."""
    cfg = read_config(config)
    _check_mappings(cfg)
    params = _get(_get(cfg, "model", "config"), "params", "model")
    for name, value in ENGINE_FIXED.items():
        if name in params:
            _require(params[name], value, f"model.params.{name}")
    if params.get("clamp_range") not in (None, [-1, 1], [-1.0, 1.0]):
        _require(params["clamp_range"], [-1, 1], "model.params.clamp_range")
    encoder = _get(params, "encoder_config", "model.params")
    decoder = _get(params, "decoder_config", "model.params")
    if _get(encoder, "target", "model.params.encoder_config") == VIT_ENCODER:
        network, z_channels = vit_from_official(
            _get(encoder, "params", "model.params.encoder_config"),
            _get(decoder, "params", "model.params.decoder_config"),
            _get(decoder, "target", "model.params.decoder_config"),
        )
        fmt = "blc"
    else:
        network, z_channels = _unet_from_official(encoder, decoder)
        fmt = "bchw"
    quantizer, tdc = _regularizer(
        _get(params, "regularizer_config", "model.params"), z_channels, "model.params.regularizer_config", fmt
    )
    weights = (params.get("loss_config") or {}).get("params", {}).get("regularization_weights") or {}
    tdc_config = TDCConfig(
        target_bits=math.log2(quantizer.codebook.size),
        groups=quantizer.groups,
        layout=quantizer.layout,
        weight=float(weights.get("kl_loss", 1.0)),
        **tdc,
    )
    return ModelConfig(network=network, quantizer=quantizer, tdc=tdc_config, preset="")
