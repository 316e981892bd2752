"""Calibrating a model's prior on image shards: the aggregate posterior's per-channel mean and std
(`gq.calibration.AggregateMoments`) over every latent position of the first N decodable images, decoded
and center-cropped as for tokenizing, stored as the model's `Calibration`.
"""

from __future__ import annotations

from collections import Counter

import torch

import gq
from gq.calibration import AggregateMoments
from pipeline.data.samples import Skip
from pipeline.evaluate.report import EvalSettings, image_batches


class CalibrationError(ValueError):
    """No image could be measured (every shard unreadable or every sample skipped)."""


def measure(model: gq.GQVAE, shards: list[str], settings: EvalSettings) -> tuple[AggregateMoments, dict]:
    """The aggregate posterior's moments of `model` as it is (calibrated or not) over the images of
    `shards` (at most `settings.limit`), and what was read: images, shards, skipped samples by reason."""
    skipped: Counter[str] = Counter()

    def on_skip(url: str, skip: Skip) -> None:
        skipped[skip.reason] += 1

    moments = AggregateMoments(model.config.latent_channels)
    images = 0
    with torch.no_grad():
        for batch in image_batches(shards, settings, on_skip):
            moments.update(*model.encode(batch.to(model.device)))
            images += batch.shape[0]
    return moments, {"images": images, "shards": len(shards), "skipped": dict(sorted(skipped.items()))}


def calibrate(model: gq.GQVAE, shards: list[str], settings: EvalSettings) -> gq.GQVAE:
    """The model under the prior N(shift, scale^2) measured on its raw posterior (any calibration it had is
    replaced); `provenance["calibration"]` records the data read. CalibrationError when no image was read."""
    raw = model.with_calibration(None)
    moments, read = measure(raw, shards, settings)
    if not read["images"]:
        raise CalibrationError(f"calibration: no image could be read from {len(shards)} shard(s) {read}")
    calibrated = raw.with_calibration(moments.calibration(read["images"]))
    calibrated.provenance["calibration"] = read | {"image_size": settings.image_size}
    return calibrated
