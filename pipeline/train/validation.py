"""Validation during training: PSNR of the continuous and GQ reconstructions, codebook usage, KL spread."""

from __future__ import annotations

from functools import partial
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
import torch

import gq
from gq.metrics import codebook_usage, psnr
from gq.tdc import kl_bits
from pipeline.data.decode import Decoded, decode_sample
from pipeline.data.stages import decoded, shard_samples

if TYPE_CHECKING:
    from pipeline.train.config import TrainSettings


def load_val_images(val_shards: list[str], s: TrainSettings) -> torch.Tensor | None:
    """The first `val_images` decodable validation images, center-cropped, uint8 (N, S, S, 3)."""
    decode = partial(decode_sample, image_size=s.inputs.image_size)
    items = (d for url in val_shards for d in decoded(shard_samples(url), decode, threads=0))
    images = list(islice((d.image for d in items if isinstance(d, Decoded)), s.inputs.val_images))
    return torch.from_numpy(np.stack(images)) if images else None


@torch.no_grad()
def validate(model: gq.GQVAE, images: torch.Tensor, s: TrainSettings) -> dict:
    """PSNR of the continuous (decode mu) and GQ-quantized reconstructions, codebook usage, KL spread."""
    continuous, quantized, tokens, kappa = [], [], [], []
    for i in range(0, len(images), s.inputs.batch_size):
        x = images[i : i + s.inputs.batch_size]
        mu, logvar = model.encode(x)
        recon = model.decode(mu).clamp_(-1.0, 1.0)  # = model.reconstruct(x)
        t = model.quantizer.quantize(mu, logvar)  # = model.tokenize(x)
        continuous.append(psnr(x, recon.cpu()))
        quantized.append(psnr(x, model.detokenize(t).cpu()))
        tokens.append(t.cpu())
        c = model.config.tdc
        kappa.append(kl_bits(mu, logvar, c.groups, c.layout).flatten().double().cpu())
    k = torch.cat(kappa)
    c = model.config.tdc
    usage = codebook_usage(torch.cat(tokens), model.config.quantizer.codebook.size)
    return {
        "val_images": len(images),
        "psnr_continuous": finite_mean(torch.cat(continuous)),
        "psnr_quantized": finite_mean(torch.cat(quantized)),
        "codebook_usage": usage["usage"],
        "codes_used": usage["used"],
        "code_perplexity": usage["perplexity"],
        "kl_bits_mean": float(k.mean()),
        "kl_bits_std": float(k.std()) if k.numel() > 1 else 0.0,
        "kl_bits_min": float(k.min()),
        "kl_bits_max": float(k.max()),
        "kl_bits_in_band": float(((k - c.target_bits).abs() <= c.tolerance).double().mean()),
        "kl_bits_target": c.target_bits,
    }


def finite_mean(values: torch.Tensor) -> float:
    """Mean PSNR; an exact reconstruction (inf) counts as 100 dB."""
    return float(values.clamp(max=100.0).mean())


def format_val(val: dict) -> str:
    return (
        f"PSNR {val['psnr_continuous']:.2f} dB continuous, {val['psnr_quantized']:.2f} dB GQ; "
        f"codebook usage {val['codebook_usage']:.4f} ({val['codes_used']} codes); "
        f"KL bits {val['kl_bits_mean']:.2f} +- {val['kl_bits_std']:.2f} (target {val['kl_bits_target']:.0f})"
    )
