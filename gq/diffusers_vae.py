"""Bring your own VAE: a diffusers `AutoencoderKL` directory -> our GQVAE (the SD, SDXL, SD3, FLUX.1 VAEs).

Reads what `save_pretrained` writes (`config.json` + `diffusion_pytorch_model.safetensors`, a local path or
fsspec URL; nothing is downloaded and diffusers is not imported) into our LDM encoder/decoder
(`gq/networks.py`) with what `AutoencoderKL` adds: mid-block attention as `mid_block_add_attention` says
and the 1x1 `quant_conv` / `post_quant_conv`. Every tensor is mapped by name (`gq.state_map`) and its shape
checked. `encode` then gives the VAE's own posterior (`latent_dist.mean`, `.logvar`, clamped alike), before
`scaling_factor` / `shift_factor`, which are the diffusion model's conventions: they are kept in the
provenance. GQ groups its channels into `group_dim`-sized groups (default: one group of every channel).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from gq.calibration import Calibration
from gq.checkpoint import CheckpointError
from gq.codebook import CodebookSpec
from gq.model import GQVAE, ModelConfig
from gq.networks import NetworkConfig
from gq.quantizer import QuantizerConfig
from gq.state_map import load_mapped_state, network_names
from gq.tdc import TDCConfig
from gq.version import __version__

CONVERTER_VERSION = 1  # bumped when the translation of a config or of a tensor name changes
CLASS_NAME = "AutoencoderKL"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
# AutoencoderKL's config fields; any other (not starting with "_") may change the network: refused.
KNOWN_FIELDS = {
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "force_upcast",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
}
# Kept in the provenance: the diffusion side's conventions, not part of the VAE's posterior.
DIFFUSION_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")


def _join(path: str, name: str) -> str:
    return f"{str(path).rstrip('/')}/{name}"


def read_diffusers_config(path: str) -> dict:
    """`config.json` of a diffusers model directory (path or fsspec URL), checked to be an AutoencoderKL's."""
    url = _join(path, "config.json")
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json (not a diffusers model directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{url}: cannot read it as JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{url}: not a JSON object")
    name = config.get("_class_name")
    if name != CLASS_NAME:
        raise CheckpointError(f"{url}: _class_name is {name!r}; this version converts only {CLASS_NAME}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in KNOWN_FIELDS)
    if unknown:
        raise CheckpointError(f"{url}: field {unknown[0]!r} is one this version does not know")
    return config


def _require(config: dict, field: str, ok: bool, expected: str) -> None:
    if not ok:
        raise CheckpointError(f"config.json: {field} = {config.get(field)!r}; this version builds {expected}")


def network_from_diffusers(config: dict) -> tuple[NetworkConfig, int]:
    """An AutoencoderKL config -> (our NetworkConfig, latent channels); CheckpointError names a bad field."""
    widths = [int(b) for b in config.get("block_out_channels", (64,))]
    levels = len(widths)
    _require(config, "act_fn", config.get("act_fn", "silu") == "silu", "'silu'")
    down = list(config.get("down_block_types", (DOWN_BLOCK,)))
    up = list(config.get("up_block_types", (UP_BLOCK,)))
    _require(config, "down_block_types", down == [DOWN_BLOCK] * levels, f"{levels} x {DOWN_BLOCK!r}")
    _require(config, "up_block_types", up == [UP_BLOCK] * levels, f"{levels} x {UP_BLOCK!r}")
    in_channels = int(config.get("in_channels", 3))
    _require(config, "out_channels", int(config.get("out_channels", 3)) == in_channels, "in_channels")
    _require(
        config,
        "block_out_channels",
        levels > 0 and all(w > 0 and w % widths[0] == 0 for w in widths),
        "widths that are multiples of the first",
    )
    try:
        network = NetworkConfig(
            ch=widths[0],
            ch_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=int(config.get("layers_per_block", 1)),
            attn_levels=(),
            mid_attention=bool(config.get("mid_block_add_attention", True)),
            norm_groups=int(config.get("norm_num_groups", 32)),
            in_channels=in_channels,
            quant_conv=bool(config.get("use_quant_conv", True)),
            post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        )
        latent_channels = int(config.get("latent_channels", 4))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: {e}") from None
    if latent_channels < 1:
        raise CheckpointError(f"config.json: latent_channels = {latent_channels}; must be >= 1")
    return network, latent_channels


def model_config_from_diffusers(
    config: dict,
    *,
    group_dim: int | None = None,
    codebook_bits: int = 16,
    layout: str = "interleaved",
    codebook_seed: int = 42,
    rule: str = "posterior",
    calibration: Calibration | None = None,
) -> ModelConfig:
    """An AutoencoderKL config and a GQ operating point (d = group_dim, K = 2^codebook_bits): ModelConfig."""
    network, channels = network_from_diffusers(config)
    d = channels if group_dim is None else int(group_dim)
    if d < 1 or channels % d:
        raise CheckpointError(f"group_dim {d} does not divide the VAE's {channels} latent channels")
    try:
        spec = CodebookSpec(size=2 ** int(codebook_bits), dim=d, seed=codebook_seed, kind="sobol")
        groups = channels // d
        quantizer = QuantizerConfig(spec, groups=groups, layout=layout, rule=rule)
        tdc = TDCConfig(target_bits=math.log2(spec.size), groups=groups, layout=layout)
        return ModelConfig(network, quantizer, tdc, preset="", calibration=calibration)
    except ValueError as e:
        raise CheckpointError(f"operating point: {e}") from None


# --- tensor names ---------------------------------------------------------------------------------------

# Our name -> diffusers', applied in order (decoder levels count from the lowest resolution in both).
_RENAMES = (
    (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.1\.proj\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^(encoder|decoder)\.mid\.1\.", r"\1.mid_block.attentions.0."),
    (r"^encoder\.levels\.(\d+)\.blocks\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"^decoder\.levels\.(\d+)\.blocks\.", r"decoder.up_blocks.\1.resnets."),
    (r"^decoder\.up\.(\d+)\.conv\.", r"decoder.up_blocks.\1.upsamplers.0.conv."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^encoder\.quant_conv\.", "quant_conv."),
    (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
)
# Attention names of VAEs saved before diffusers 0.14 (still in some published SD VAE files).
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def diffusers_names(model: GQVAE) -> dict[str, tuple[str, ...]]:
    """Each network tensor of ours -> its diffusers name(s); our fused qkv is three (to_q, to_k, to_v)."""
    return network_names(model, _diffusers_name, ("to_q", "to_k", "to_v"))


def _diffusers_name(name: str) -> str:
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def _modern_name(name: str) -> str:
    if ".mid_block.attentions." in name:
        for old, new in _LEGACY_ATTENTION.items():
            name = name.replace(old, new)
    return name


def read_diffusers_weights(path: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """The weights of a diffusers directory: (tensors under current names, the file's URL, its sha256)."""
    fs, root = fsspec.core.url_to_fs(str(path))
    url = next((_join(path, w) for w in WEIGHTS if fs.exists(_join(root, w))), None)
    if url is None:
        raise CheckpointError(f"{path}: no {WEIGHTS[0]} (this version reads safetensors weights only)")
    with fsspec.open(url, "rb") as f:
        data = f.read()
    try:
        tensors = st_load(data)
    except SafetensorError as e:
        raise CheckpointError(f"{url}: damaged or truncated safetensors file ({e})") from None
    return {_modern_name(k): v for k, v in tensors.items()}, url, hashlib.sha256(data).hexdigest()


def from_diffusers(
    path: str,
    *,
    group_dim: int | None = None,
    codebook_bits: int = 16,
    layout: str = "interleaved",
    codebook_seed: int = 42,
    rule: str = "posterior",
    calibration: Calibration | None = None,
) -> GQVAE:
    """A diffusers AutoencoderKL directory (path or fsspec URL) -> our GQVAE in eval mode.

    `model.provenance["diffusers"]` records the weights file and its sha256, the config, the diffusion-side
    `scaling_factor` / `shift_factor` / `latents_mean` / `latents_std` (not applied) and the converter.
    """
    config = read_diffusers_config(path)
    model_config = model_config_from_diffusers(
        config,
        group_dim=group_dim,
        codebook_bits=codebook_bits,
        layout=layout,
        codebook_seed=codebook_seed,
        rule=rule,
        calibration=calibration,
    )
    model = GQVAE(model_config)
    state, url, sha = read_diffusers_weights(path)
    load_mapped_state(model, state, diffusers_names(model), url)
    diffusion: dict[str, Any] = {k: config.get(k) for k in DIFFUSION_FIELDS}
    model.provenance = {
        "diffusers": {
            "source": str(path),
            "weights": url,
            "source_sha256": sha,
            "config": config,
            "diffusion": diffusion,
            "converter": f"gq-tokenizer {__version__} / diffusers converter v{CONVERTER_VERSION}",
        }
    }
    model.checkpoint_sha256 = sha
    return model.eval()
