"""The readiness audit of a Gaussian VAE for GQ, accumulated batch by batch (no file formats here).

GQ's theorem: a group whose KL(q || N(0, I)) is at most log2 K bits is quantized with a small error by K
prior codes; above it the error grows. So the audit measures, on the posterior the search sees (after any
calibration): each channel's mean KL in bits and the aggregate posterior's mean and variance (against
N(0, 1)); for each candidate operating point (d, G = C / d, K) the share of groups whose KL exceeds log2 K
(the prediction) and the measured PSNR of the continuous VAE and of GQ at that point (the outcome), with
the codes used. `recommendation` puts it in words.

>>> audit = ReadinessAudit(model)        # candidates: every d dividing C (d <= 64) at the model's K
>>> for images in batches:               # uint8 (B, H, W, 3)
...     audit.update(images)
>>> result = audit.result()              # JSON-ready dict
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gq.calibration import AggregateMoments
from gq.codebook import MAX_DIM, GaussianCodebook
from gq.layout import split_groups
from gq.metrics import psnr, to_uint8, usage_from_counts
from gq.model import GQVAE
from gq.quantizer import dequantize, quantize
from gq.tdc import BITS_PER_NAT

PSNR_CAP_DB = 100.0
READY_SHARE = (
    0.05  # at most this share of groups above log2 K: the theorem's condition holds nearly everywhere
)
READY_DROP_DB = 1.0  # and GQ costs at most this much PSNR
UNUSED_BITS = 4.0  # a mean group KL this far below log2 K leaves most of each token's rate unused


@dataclass(frozen=True)
class OperatingPoint:
    """A GQ setting of C = dim * groups latent channels with a codebook of K = 2^bits vectors."""

    dim: int  # d, the codebook (group) dimension
    groups: int  # G = C / d
    bits: int  # log2 K


def candidate_points(channels: int, bits: tuple[int, ...] = (16,)) -> list[OperatingPoint]:
    """Every (d, G, K) that fits `channels`: d dividing C (at most the codebook's 64), each K = 2^bits."""
    dims = [d for d in range(1, min(channels, MAX_DIM) + 1) if channels % d == 0]
    return [OperatingPoint(d, channels // d, b) for b in bits for d in sorted(dims, reverse=True)]


def channel_kl_bits(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) of every channel at every position, in bits, float64 (B, C, H, W)."""
    mu, logvar = mu.double(), logvar.double()
    return 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar) * BITS_PER_NAT


class _PointStats:
    """What one candidate operating point accumulates."""

    def __init__(self, point: OperatingPoint, codes: torch.Tensor) -> None:
        self.point, self.codes = point, codes
        self.groups_seen = self.above = self.above_plus_one = 0
        self.kl_min, self.kl_max, self.kl_sum = math.inf, -math.inf, 0.0
        self.code_counts = torch.zeros(codes.shape[0], dtype=torch.int64)
        self.psnr: list[torch.Tensor] = []


class ReadinessAudit:
    """Accumulates the audit of `model` over batches of uint8 images; `result()` is the report's content."""

    def __init__(self, model: GQVAE, points: list[OperatingPoint] | None = None) -> None:
        self.model = model
        q = model.config.quantizer
        self.own = OperatingPoint(q.codebook.dim, q.groups, round(math.log2(q.codebook.size)))
        points = list(points or candidate_points(q.channels, (self.own.bits,)))
        if self.own not in points:
            points.insert(0, self.own)
        self.layout, self.rule, self.beta = q.layout, q.rule, q.beta
        self.stats = {}
        for p in points:
            if p.dim * p.groups != q.channels:
                raise ValueError(f"operating point {p} does not fit the {q.channels} latent channels")
            book = GaussianCodebook(2**p.bits, p.dim, seed=q.codebook.seed, kind=q.codebook.kind)
            self.stats[p] = _PointStats(p, model.quantizer.codes if p == self.own else book.vectors)
        self.moments = AggregateMoments(q.channels)
        self.kl_channel_sum = torch.zeros(q.channels, dtype=torch.float64)
        self.psnr_continuous: list[torch.Tensor] = []
        self.image_shape: tuple[int, int] | None = None
        self.latent_shape: tuple[int, int] | None = None

    @property
    def images(self) -> int:
        return sum(len(p) for p in self.psnr_continuous)

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """Audit one batch of uint8 (B, H, W, 3) images."""
        m = self.model
        x = images.to(m.device)
        mu, logvar = m.encode(x)
        self.moments.update(mu, logvar)
        kl = channel_kl_bits(mu, logvar)
        self.kl_channel_sum += kl.sum((0, 2, 3)).cpu()
        self.psnr_continuous.append(
            psnr(x, to_uint8(m.decode(mu).clamp_(-1, 1))).clamp(max=PSNR_CAP_DB).cpu()
        )
        for s in self.stats.values():
            self._update_point(s, mu, logvar, kl, x)
        self.image_shape, self.latent_shape = (x.shape[1], x.shape[2]), (mu.shape[2], mu.shape[3])

    def _update_point(self, s: _PointStats, mu, logvar, kl, x) -> None:
        p, codes = s.point, s.codes.to(mu.device)
        kappa = split_groups(kl, p.groups, self.layout).sum(-1)  # (B, h, w, G)
        s.groups_seen += kappa.numel()
        s.above += int((kappa > p.bits).sum())
        s.above_plus_one += int((kappa > p.bits + 1).sum())
        s.kl_sum += float(kappa.sum())
        s.kl_min, s.kl_max = min(s.kl_min, float(kappa.min())), max(s.kl_max, float(kappa.max()))
        lv = logvar if self.rule == "posterior" else None
        tokens = quantize(mu, lv, codes, p.groups, self.layout, self.rule, self.beta)
        s.code_counts += torch.bincount(tokens.reshape(-1).cpu(), minlength=codes.shape[0])
        decoded = to_uint8(self.model.decode(dequantize(tokens, codes, self.layout)).clamp_(-1, 1))
        s.psnr.append(psnr(x, decoded).clamp(max=PSNR_CAP_DB).cpu())

    def result(self) -> dict:
        """per_channel, per_group_kl_bits (the model's own point), operating_points and a recommendation."""
        if self.image_shape is None or self.latent_shape is None:
            raise ValueError("no images were audited")
        positions = self.moments.count
        kl = (self.kl_channel_sum / positions).tolist()
        mean, var = self.moments.mean.tolist(), self.moments.var.tolist()
        per_channel = [
            {"channel": c, "kl_bits": kl[c], "mean": mean[c], "var": var[c]} for c in range(len(kl))
        ]
        continuous = float(torch.cat(self.psnr_continuous).double().mean())
        points = [self._point_result(s, continuous) for s in self.stats.values()]
        own = self.stats[self.own]
        result = {
            "images": self.images,
            "image_size": list(self.image_shape),
            "calibrated": self.model.config.calibration is not None,
            "per_channel": per_channel,
            "per_group_kl_bits": {
                "dim": self.own.dim,
                "groups": self.own.groups,
                "target_bits": float(self.own.bits),
                "mean": own.kl_sum / own.groups_seen,
                "min": own.kl_min,
                "max": own.kl_max,
                "share_above_target": own.above / own.groups_seen,
                "share_above_target_plus_1": own.above_plus_one / own.groups_seen,
            },
            "psnr_continuous_db": continuous,
            "operating_points": points,
        }
        result["recommendation"] = recommendation(result)
        return result

    def _point_result(self, s: _PointStats, continuous: float) -> dict:
        p = s.point
        h, w = self.latent_shape
        gq_psnr = float(torch.cat(s.psnr).double().mean())
        tokens = h * w * p.groups
        usage = usage_from_counts(s.code_counts)
        return {
            "dim": p.dim,
            "groups": p.groups,
            "codebook_bits": p.bits,
            "model_point": p == self.own,
            "tokens_per_image": tokens,
            "bits_per_pixel": tokens * p.bits / (self.image_shape[0] * self.image_shape[1]),
            "mean_group_kl_bits": s.kl_sum / s.groups_seen,
            "predicted_share_above_log2k": s.above / s.groups_seen,
            "psnr_continuous_db": continuous,
            "psnr_gq_db": gq_psnr,
            "drop_db": continuous - gq_psnr,
            "codes_used": usage["used"],
            "expected_uniform_codes_used": usage["expected_uniform_usage"] * 2**p.bits,
        }


def recommendation(r: dict) -> str:
    """The audit in words: ready, calibrate, change the operating point, or fine-tune with TDC."""
    own = next(p for p in r["operating_points"] if p["model_point"])
    where = f"d={own['dim']}, G={own['groups']}, K=2^{own['codebook_bits']}"
    words = []
    off = [c for c in r["per_channel"] if abs(c["mean"]) > 0.5 or not 0.5 <= c["var"] <= 2.0]
    if off and not r["calibrated"]:
        words.append(
            f"{len(off)} of {len(r['per_channel'])} channels' aggregate posterior is far from N(0, 1) "
            "(|mean| > 0.5 or variance outside [0.5, 2]): calibrate it (jobs/convert.py calibrate, or "
            "from-diffusers --calibrate)."
        )
    share = own["predicted_share_above_log2k"]
    if share <= READY_SHARE and own["drop_db"] <= READY_DROP_DB:
        words.append(
            f"Ready at {where}: {share:.1%} of groups above log2 K, GQ costs {own['drop_db']:.2f} dB "
            f"(the continuous VAE: {own['psnr_continuous_db']:.2f} dB)."
        )
        if own["mean_group_kl_bits"] < own["codebook_bits"] - UNUSED_BITS:
            words.append(
                f"But a group carries {own['mean_group_kl_bits']:.2f} bits on average of the "
                f"{own['codebook_bits']} a token holds: a smaller K or a larger d would waste less rate."
            )
        return " ".join(words)
    fits = [
        p
        for p in r["operating_points"]
        if p["predicted_share_above_log2k"] <= READY_SHARE and not p["model_point"]
    ]
    if fits:
        best = min(fits, key=lambda p: p["bits_per_pixel"])
        words.append(
            f"At {where} {share:.1%} of groups exceed log2 K (GQ costs {own['drop_db']:.2f} dB); "
            f"d={best['dim']}, G={best['groups']}, K=2^{best['codebook_bits']} fits the theorem "
            f"({best['bits_per_pixel']:.3g} bpp, {best['drop_db']:.2f} dB), or fine-tune with TDC at {where}."
        )
    else:
        words.append(
            f"At {where} {share:.1%} of groups exceed log2 K (GQ costs {own['drop_db']:.2f} dB) and no "
            f"candidate fits the theorem: fine-tune with TDC (jobs/train_vae.py --init)."
        )
    return " ".join(words)
