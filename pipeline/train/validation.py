"""Validation during training: PSNR of the continuous and GQ reconstructions, codebook usage, KL spread."""

from __future__ import annotations

from functools import partial
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
import torch

import gq
from gq.evaluation import Evaluator
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


def validate(model: gq.GQVAE, images: torch.Tensor, s: TrainSettings) -> dict:
    """PSNR of the continuous (decode mu) and GQ-quantized reconstructions, codebook usage, KL spread: the
    evaluation job's `gq.evaluation.Evaluator`, flattened into the metrics log's fields."""
    ev = Evaluator(model, examples=0)
    for i in range(0, len(images), s.inputs.batch_size):
        ev.update(images[i : i + s.inputs.batch_size])
    r = ev.result()
    kl, codebook = r["kl_bits"], r["codebook"]
    return {
        "val_images": r["images"],
        "psnr_continuous": r["continuous"]["psnr_db"],
        "psnr_quantized": r["gq"]["psnr_db"],
        "codebook_usage": codebook["usage"],
        "codes_used": codebook["used"],
        "code_perplexity": codebook["perplexity"],
        "kl_bits_mean": kl["mean"],
        "kl_bits_std": kl["std"],
        "kl_bits_min": kl["min"],
        "kl_bits_max": kl["max"],
        "kl_bits_in_band": kl["within_band_fraction"],
        "kl_bits_target": kl["target_bits"],
    }


def format_val(val: dict) -> str:
    return (
        f"PSNR {val['psnr_continuous']:.2f} dB continuous, {val['psnr_quantized']:.2f} dB GQ; "
        f"codebook usage {val['codebook_usage']:.4f} ({val['codes_used']} codes); "
        f"KL bits {val['kl_bits_mean']:.2f} +- {val['kl_bits_std']:.2f} (target {val['kl_bits_target']:.0f})"
    )
