"""Our model out, in the official format: the official tensor names and shapes, and a YAML the authors'
code loads (`to_official_config`), written as a Lightning-layout `.ckpt` by `save_official`."""

from __future__ import annotations

import io

import torch
import yaml

from gq.checkpoint import CheckpointError
from gq.model import GQVAE
from gq.official.config import DECODER, DECODER_PARAMS, ENCODER, ENGINE, REGULARIZER, REGULARIZER2
from gq.official.names import official_names
from gq.official.vit import vit_to_official
from gq.storage import write_atomic
from gq.vit import ViTConfig


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
