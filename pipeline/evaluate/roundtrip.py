"""A token directory checked against the images it came from: each row's tokens decoded with the model
and compared with the preprocessed source image and with the continuous VAE's reconstruction (the demo's
report; a quick check that tokens on disk mean what the model means)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow.parquet as pq
import torch

import gq
from gq.metrics import psnr, to_uint8, usage_from_counts
from pipeline.data.decode import Decoded, decode_sample
from pipeline.data.shards import expand_shards, shard_stem
from pipeline.data.stages import decoded, shard_samples
from pipeline.evaluate.plots import reconstruction_grid


@dataclass(frozen=True)
class RoundTrip:
    """The rows of a token directory decoded back, beside their sources."""

    tokens: torch.Tensor  # (rows, tokens_per_image) int64, raster order
    grid: tuple[int, int, int]  # (h, w, groups) of each row's tokens
    codebook_size: int
    originals: torch.Tensor  # uint8 (rows, H, W, 3): the preprocessed images that were tokenized
    decoded: torch.Tensor  # uint8: the tokens decoded (GQ)
    continuous: torch.Tensor  # uint8: the continuous VAE's reconstruction (decode mu)

    def psnr_db(self) -> tuple[float, float]:
        """Mean PSNR of the GQ tokens decoded, and of the continuous VAE."""
        x = self.originals
        return psnr(x, self.decoded).mean().item(), psnr(x, self.continuous).mean().item()

    def usage(self) -> dict:
        return usage_from_counts(torch.bincount(self.tokens.reshape(-1), minlength=self.codebook_size))

    def png(self) -> bytes:
        """original | continuous | GQ, a row per image."""
        return reconstruction_grid([self.originals.numpy(), self.continuous.numpy(), self.decoded.numpy()])


def round_trip(tokens_dir: str, shards: str, model: gq.GQVAE, image_size: int) -> RoundTrip:
    """Decode every row of `tokens_dir` and pair it with its source image in `shards` (by shard and key)."""
    table = pq.read_table(tokens_dir, columns=["shard", "key", "tokens"])
    h, w = (image_size // model.downsample,) * 2
    groups = model.config.quantizer.groups
    tokens = torch.from_numpy(np.stack(table["tokens"].to_numpy(zero_copy_only=False)).astype(np.int64))
    images = _originals(shards, image_size)
    keys = zip(table["shard"].to_pylist(), table["key"].to_pylist())
    x = torch.from_numpy(np.stack([images[key] for key in keys]))  # the shard column holds the stem
    with torch.no_grad():
        gq_images = to_uint8(model.detokenize(tokens.reshape(len(tokens), h, w, groups)))
        continuous = to_uint8(model.reconstruct(x))
    size = model.config.quantizer.codebook.size
    return RoundTrip(tokens, (h, w, groups), size, x, gq_images, continuous)


def _originals(spec: str, image_size: int) -> dict[tuple[str, str], np.ndarray]:
    """(shard stem, key) -> the preprocessed uint8 image the pipeline tokenized."""
    decode = partial(decode_sample, image_size=image_size)
    return {
        (shard_stem(url), d.key): d.image
        for url in expand_shards(spec)
        for d in decoded(shard_samples(url), decode)
        if isinstance(d, Decoded)
    }
