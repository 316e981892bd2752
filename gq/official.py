"""The paper's released checkpoints, in and out: official Lightning `.ckpt` + YAML <-> our GQVAE.

The official code (github.com/tongdaxu/VQ-VAE-from-Gaussian-VAE) builds `pit.modules.unet.Encoder` /
`Decoder` and a `GaussianQuantRegularizer` (interleaved groups) or `GaussianQuantRegularizer2`
(contiguous) from a YAML config. `from_official` translates that config into a `ModelConfig` (refusing,
with the field's name, anything this version cannot build), maps every official tensor name onto ours
(our attention keeps q, k, v in one 1x1 conv, concatenated in that order) and checks every shape.
`to_official` is the way back: the official names, shapes and a YAML the authors' code loads.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import re
from collections.abc import Callable
from typing import Any

import fsspec
import torch
import yaml

from gq.checkpoint import CheckpointError
from gq.codebook import CodebookSpec
from gq.model import GQVAE, ModelConfig
from gq.networks import NetworkConfig
from gq.official_shapes import check_before_building
from gq.official_vit import VIT_ENCODER, vit_from_official, vit_to_official
from gq.official_yaml import check_config_values, load_config, read_config_text, resolve_interpolations
from gq.quantizer import LOGVAR_RANGE, QuantizerConfig
from gq.state_map import load_mapped_state
from gq.storage import write_atomic
from gq.tdc import TDCConfig
from gq.unpickler import load_checkpoint
from gq.version import __version__
from gq.vit import ViTConfig

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
    read within the bounds of `gq.official_yaml`."""
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
        known = {"dim", "codebook_size", "dim_idx", "logvar_range", "tolerance", "lam_factor", "seed", "beta",
                 "use_ste"}  # fmt: skip
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


# --- tensor names ---------------------------------------------------------------------------------------

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
    names = {}
    for name in model.state_dict():
        if not name.startswith(("encoder.", "decoder.")):
            continue
        official = _official_name(name, levels)
        if ".qkv." in official:
            names[name] = tuple(official.replace(".qkv.", f".{p}.") for p in "qkv")
        else:
            names[name] = (official,)
    return names


# --- checkpoints ----------------------------------------------------------------------------------------


def read_official_checkpoint(checkpoint: str) -> tuple[dict, dict]:
    """The `state_dict` of an official `.ckpt` (path or URL) and what else it held, never running its code."""
    try:
        with fsspec.open(str(checkpoint), "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {checkpoint}: cannot read it: {e}") from None
    try:
        obj, skipped = load_checkpoint(data)
    except Exception as e:  # noqa: BLE001 (nothing of the file runs: any error is a malformed file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {checkpoint}: damaged or not a PyTorch checkpoint ({first})"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not any(str(k).startswith("encoder.") for k in state):
        raise CheckpointError(f"checkpoint {checkpoint}: holds no `state_dict` with encoder.* tensors")
    source = {
        "source": str(checkpoint),
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "epoch": _count(obj.get("epoch")),
        "global_step": _count(obj.get("global_step")),
        "ignored_entries": sorted(str(k) for k in obj if k != "state_dict") if state is not obj else [],
        "skipped_pickle_globals": skipped,
    }
    return state, source


def _count(value: Any) -> int | None:
    """`epoch` / `global_step` when an integer, else None: entries the conversion ignores anyway."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def load_official_state(model: GQVAE, state: dict, name: str = "checkpoint") -> list[str]:
    """Fill every encoder/decoder tensor of `model` from official names; the keys ignored.

    Tensors outside encoder.* / decoder.* (the training loss's `loss.*`: LPIPS, discriminator) are not
    part of the tokenizer: ignored, as the official code's own non-strict load does, and returned."""
    ours_part = {k: str(k).startswith(("encoder.", "decoder.")) for k in state}
    ignored = sorted(str(k) for k, mine in ours_part.items() if not mine)
    load_mapped_state(model, {k: v for k, v in state.items() if ours_part[k]}, official_names(model), name)
    return ignored


def from_official(checkpoint: str, config: str | dict) -> GQVAE:
    """An official GQ checkpoint (`.ckpt` path or fsspec URL) and its YAML -> our GQVAE in eval mode.

    `model.provenance["official"]` records the source file's sha256, the resolved official config, the
    converter version, the ignored tensors (`loss.*`) and other entries, and any pickle globals skipped.
    The config is checked against the checkpoint's tensor shapes before the network is built.
    """
    resolved = read_config(config)
    model_config = model_config_from_official(resolved)
    state, source = read_official_checkpoint(checkpoint)
    check_before_building(model_config, state, str(checkpoint))
    model = GQVAE(model_config)
    ignored = load_official_state(model, state, str(checkpoint))
    model.provenance = {
        "official": source
        | {
            "config": resolved.get("model", {}),
            "converter": f"gq-tokenizer {__version__} / official converter v{CONVERTER_VERSION}",
            "ignored_keys": ignored,
        }
    }
    model.checkpoint_sha256 = source["source_sha256"]
    return model.eval()


def to_official_state(model: GQVAE) -> dict[str, torch.Tensor]:
    """Our encoder/decoder tensors under the official names and shapes (qkv split into q, k, v)."""
    ours = model.state_dict()
    state = {}
    for key, group in official_names(model).items():
        parts = ours[key].detach().cpu().chunk(len(group), 0)
        for official, part in zip(group, parts):
            state[official] = part.clone().contiguous()
    return state


def to_official_config(model: GQVAE, resolution: int | None = None) -> dict:
    """The official YAML (as a dict) for this model; `resolution` places attention (default: the
    converted model's own, else 256)."""
    c = model.config
    q, net = c.quantizer, c.network
    if c.calibration is not None:
        raise CheckpointError("the official code has no calibrated prior (this model has a calibration)")
    if q.codebook.kind != "sobol":
        raise CheckpointError("the official code builds only Sobol codebooks (codebook kind 'iid')")
    if q.rule != "posterior":
        raise CheckpointError(f"the official code tokenizes only by the posterior rule (rule {q.rule!r})")
    source = model.provenance.get("official", {}).get("config", {})
    vit = isinstance(net, ViTConfig)
    if vit and q.layout != "interleaved":
        raise CheckpointError("the official ViT configs group channels interleaved (layout 'contiguous')")
    if vit:
        encoder, decoder = vit_to_official(net, c.latent_channels, DECODER_PARAMS)
    else:
        encoder, decoder = _unet_to_official(model, source, resolution)
    common = {
        "seed": q.codebook.seed,
        "beta": q.beta,
        "tolerance": c.tdc.tolerance,
        "lam_factor": c.tdc.factor,
    }
    if q.layout == "interleaved":
        reg = {
            "target": REGULARIZER,
            "params": {
                "format": "blc" if vit else "bchw",
                "group": q.codebook.dim,
                "n_samples": q.codebook.size,
            }
            | common,
        }
    else:
        reg = {
            "target": REGULARIZER2,
            "params": {"dim": q.codebook.dim, "codebook_size": q.codebook.size} | common,
        }
    loss = source.get("params", {}).get("loss_config") or {
        "target": "pit.modules.losses.discriminator_loss.GeneralLPIPSWithDiscriminator",
        "params": {
            "perceptual_weight": 1.0,
            "disc_start": 20001,
            "disc_weight": 0.75,
            "learn_logvar": True,
            "regularization_weights": {"kl_loss": c.tdc.weight},
        },
    }
    params = {
        "input_key": "img",
        "loss_config": loss,
        "regularizer_config": reg,
        "encoder_config": encoder,
        "decoder_config": decoder,
    }
    return {"model": {"base_learning_rate": 1e-4, "target": ENGINE, "params": params}}


def _unet_to_official(model: GQVAE, source: dict, resolution: int | None) -> tuple[dict, dict]:
    """The UNet's (encoder_config, decoder_config); `resolution` places attention."""
    c, net = model.config, model.config.network
    enc_source = source.get("params", {}).get("encoder_config", {}).get("params", {})
    resolution = int(resolution or enc_source.get("resolution") or 256)
    levels = len(net.ch_mult)
    if resolution % 2 ** (levels - 1):
        raise CheckpointError(f"resolution {resolution} does not halve {levels - 1} times exactly")
    official_names(model)  # refuses networks the official code cannot build
    encoder = {
        "attn_type": "vanilla",
        "double_z": True,
        "z_channels": c.latent_channels,
        "resolution": resolution,
        "in_channels": net.in_channels,
        "out_ch": net.in_channels,
        "ch": net.ch,
        "ch_mult": list(net.ch_mult),
        "num_res_blocks": net.num_res_blocks,
        "attn_resolutions": [resolution // 2**i for i in net.attn_levels],
        "dropout": net.dropout,
    }
    return {"target": ENCODER, "params": encoder}, {"target": DECODER, "params": DECODER_PARAMS}


def save_official(model: GQVAE, checkpoint: str, config: str, resolution: int | None = None) -> None:
    """Write an official-format `.ckpt` (Lightning layout, `state_dict` only) and its YAML."""
    yaml_text = yaml.safe_dump(to_official_config(model, resolution), sort_keys=False)
    steps = int(model.provenance.get("steps") or 0)
    payload = {"epoch": 0, "global_step": steps, "state_dict": to_official_state(model)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(checkpoint, buffer.getvalue())
    write_atomic(config, yaml_text.encode("utf-8"))
