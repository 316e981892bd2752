"""Rate-distortion and codebook metrics of a GQ-VAE, accumulated batch by batch (no file formats here).

>>> ev = Evaluator(model)                 # or Evaluator(model, rule="mean") to score the other GQ rule
>>> for images in batches:                # uint8 (B, H, W, 3), preprocessed as for tokenizing
...     ev.update(images)
>>> report = ev.result()                  # plain dict of floats and lists (JSON-ready)

Per batch: one encoder pass gives the posterior; the continuous VAE decodes mu (= `model.reconstruct`), GQ
quantizes (mu, logvar) and decodes the codes (= `model.detokenize(model.tokenize(x))`). PSNR and SSIM are
per image on uint8 pixels (clamped and rounded, as saved), averaged over images as the reference does.
Codebook statistics come from the histogram of every token; the per-group KL from a running histogram
(exact count, mean, min, max and band counts; percentiles to within one bin, 1/32 bit by default).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gq.metrics import psnr, to_uint8, usage_from_counts
from gq.model import GQVAE
from gq.quantizer import quantize
from gq.ssim import ssim
from gq.tdc import kl_bits
from kernels import RULES

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
PSNR_CAP_DB = 100.0  # an exact reconstruction (infinite PSNR) counts as this much, as in training logs


class KLHistogram:
    """Running statistics of per-group KL values (bits) against the target T = log2 K.

    Exact: count, sum (mean), min, max, how many exceed T, how many lie within T +- tolerance. Percentiles
    come from fixed bins of `bin_bits` over [0, high) plus one overflow bin (a percentile falling there is
    reported as the exact max), interpolated linearly inside a bin and clipped to [min, max].
    """

    def __init__(
        self, target_bits: float, tolerance: float = 0.5, bin_bits: float = 1 / 32, high: float | None = None
    ) -> None:
        self.target_bits = float(target_bits)
        self.tolerance = float(tolerance)
        self.bin_bits = float(bin_bits)
        self.high = float(high if high is not None else max(16 * target_bits, 64.0))
        self.bins = math.ceil(self.high / self.bin_bits)
        self.counts = torch.zeros(self.bins + 1, dtype=torch.int64)  # last: values >= high
        self.count = 0
        self.sum = 0.0
        self.sum_sq = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.above = 0
        self.in_band = 0

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).double()
        if v.numel() == 0:
            return
        index = (v / self.bin_bits).floor().clamp_(0, self.bins).long()
        self.counts += torch.bincount(index, minlength=self.bins + 1).cpu()
        self.count += v.numel()
        self.sum += float(v.sum())
        self.sum_sq += float(v.square().sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        self.above += int((v > self.target_bits).sum())
        self.in_band += int(((v - self.target_bits).abs() <= self.tolerance).sum())

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1), to within one bin."""
        if self.count == 0:
            return math.nan
        rank = q * self.count
        cumulative = torch.cumsum(self.counts, 0).double()
        b = int(torch.searchsorted(cumulative, torch.tensor([max(rank, 1e-12)], dtype=torch.float64))[0])
        if b >= self.bins:
            return self.max
        before = float(cumulative[b - 1]) if b else 0.0
        inside = float(self.counts[b])
        value = (b + (rank - before) / inside) * self.bin_bits if inside else b * self.bin_bits
        return min(max(value, self.min), self.max)

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1), 0 for a single value."""
        n = self.count
        if n < 2:
            return 0.0 if n else math.nan
        return math.sqrt(max(self.sum_sq - self.sum * self.sum / n, 0.0) / (n - 1))

    def summary(self) -> dict:
        n = self.count
        return {
            "target_bits": self.target_bits,
            "tolerance_bits": self.tolerance,
            "values": n,
            "min": self.min if n else math.nan,
            "mean": self.sum / n if n else math.nan,
            "max": self.max if n else math.nan,
            "std": self.std,
            "percentiles": {f"p{p}": self.quantile(p / 100) for p in PERCENTILES},
            "above_target": self.above,
            "above_target_fraction": self.above / n if n else math.nan,
            "within_band_fraction": self.in_band / n if n else math.nan,
            "percentile_resolution_bits": self.bin_bits,
        }


class Evaluator:
    """Accumulates the evaluation of `model` over batches of uint8 images; `result()` is the report."""

    def __init__(self, model: GQVAE, *, rule: str | None = None, examples: int = 4) -> None:
        self.model = model
        q = model.config.quantizer
        self.rule = rule or q.rule
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        self.codebook_size = q.codebook.size
        self.groups, self.layout, self.beta = q.groups, q.layout, q.beta
        self.kl = KLHistogram(target_bits=math.log2(self.codebook_size), tolerance=model.config.tdc.tolerance)
        self.code_counts = torch.zeros(self.codebook_size, dtype=torch.int64)
        self.kl_group_sum = torch.zeros(self.groups, dtype=torch.float64)  # by group index g
        self.kl_channel_sum = torch.zeros(q.channels, dtype=torch.float64)  # by latent channel
        self.positions = 0  # latent positions seen (images * h * w)
        self.per_image: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("psnr_continuous", "psnr_gq", "ssim_continuous", "ssim_gq")
        }
        self.examples_wanted = examples
        self.examples: dict[str, list[np.ndarray]] = {"original": [], "continuous": [], "gq": []}
        self.image_shape: tuple[int, int] | None = None
        self.token_shape: tuple[int, int, int] | None = None

    @property
    def images(self) -> int:
        return sum(len(t) for t in self.per_image["psnr_gq"])

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score one batch of uint8 (B, H, W, 3) images; returns this batch's per-image metrics (on CPU)."""
        m = self.model
        x = images.to(m.device)
        if x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 (B, H, W, 3) images, got {x.dtype}")
        mu, logvar = m.encode(x)
        continuous = to_uint8(m.decode(mu).clamp_(-1.0, 1.0))  # = model.reconstruct(x)
        tokens = quantize(
            mu,
            logvar if self.rule == "posterior" else None,
            m.quantizer.codes,
            self.groups,
            self.layout,
            self.rule,
            self.beta,
        )  # = model.tokenize(x) under the model's rule
        quantized = to_uint8(m.detokenize(tokens))
        batch = {
            "psnr_continuous": psnr(x, continuous).clamp(max=PSNR_CAP_DB),
            "psnr_gq": psnr(x, quantized).clamp(max=PSNR_CAP_DB),
            "ssim_continuous": ssim(x, continuous),
            "ssim_gq": ssim(x, quantized),
        }
        batch = {k: v.double().cpu() for k, v in batch.items()}
        for k, v in batch.items():
            self.per_image[k].append(v)

        self.code_counts += torch.bincount(tokens.reshape(-1), minlength=self.codebook_size).cpu()
        kappa = kl_bits(mu, logvar, self.groups, self.layout)  # (B, h, w, G)
        self.kl.update(kappa)
        self.kl_group_sum += kappa.double().sum((0, 1, 2)).cpu()
        channels = mu.shape[1]
        self.kl_channel_sum += kl_bits(mu, logvar, channels, "contiguous").double().sum((0, 1, 2)).cpu()
        self.positions += kappa.shape[0] * kappa.shape[1] * kappa.shape[2]
        self.image_shape = (x.shape[1], x.shape[2])
        self.token_shape = tuple(tokens.shape[1:])

        room = self.examples_wanted - len(self.examples["original"])
        if room > 0:
            for name, batch_images in (("original", x), ("continuous", continuous), ("gq", quantized)):
                self.examples[name].extend(batch_images[:room].cpu().numpy())
        return batch

    def result(self) -> dict:
        """The report: rate, distortion (continuous, GQ, drop), codebook usage and the per-group KL."""
        if self.image_shape is None or self.token_shape is None:
            raise ValueError("no images were evaluated")
        per_image = {k: torch.cat(v) for k, v in self.per_image.items()}
        h, w, g = self.token_shape
        tokens_per_image = h * w * g
        bits_per_token = math.log2(self.codebook_size)
        height, width = self.image_shape

        def scores(kind: str) -> dict:
            p, s = per_image[f"psnr_{kind}"], per_image[f"ssim_{kind}"]
            return {
                "psnr_db": float(p.mean()),
                "psnr_db_std": float(p.std()) if len(p) > 1 else 0.0,
                "ssim": float(s.mean()),
                "ssim_std": float(s.std()) if len(s) > 1 else 0.0,
            }

        continuous, quantized = scores("continuous"), scores("gq")
        kl = self.kl.summary()
        kl["per_group_index_mean"] = (self.kl_group_sum / self.positions).tolist()
        kl["per_channel_mean"] = (self.kl_channel_sum / self.positions).tolist()
        return {
            "images": self.images,
            "image_size": [height, width],
            "rule": self.rule,
            "rate": {
                "codebook_size": self.codebook_size,
                "bits_per_token": bits_per_token,
                "token_grid": [h, w],
                "groups": g,
                "tokens_per_image": tokens_per_image,
                "bits_per_pixel": tokens_per_image * bits_per_token / (height * width),
            },
            "continuous": continuous,
            "gq": quantized,
            "drop": {
                "psnr_db": continuous["psnr_db"] - quantized["psnr_db"],
                "ssim": continuous["ssim"] - quantized["ssim"],
            },
            "psnr_cap_db": PSNR_CAP_DB,
            "codebook": {"size": self.codebook_size, **usage_from_counts(self.code_counts)},
            "kl_bits": kl,
        }

    def example_images(self) -> dict[str, np.ndarray]:
        """The first few images as uint8 (n, H, W, 3) arrays: original, continuous and GQ reconstruction."""
        return {k: np.stack(v) if v else np.zeros((0, 0, 0, 3), np.uint8) for k, v in self.examples.items()}
