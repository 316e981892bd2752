"""The Target Divergence Constraint: a KL loss whose multipliers push every group's KL towards log2 K bits.

Loss = weight * lam * (1/B) * sum_{b, position, g} w_g * kappa_g, kappa_g the group's KL in bits and
w_g = lam_max above T + alpha, 1 inside the band, lam_min below T - alpha (docs/METHOD.md, section 4).
Unlike the reference, the multipliers are buffers (saved with the model), their update is an explicit
call made once per autoencoder optimiser step, the KL statistics are all-reduced across data-parallel
ranks first (every rank holds the same multipliers), and every multiplier is clipped.

The Target Divergence Constraint is from Xu et al., "Vector Quantization using Gaussian Variational
Autoencoder" (arXiv 2512.06609); docs/METHOD.md, section 4, lists each difference from the
authors' code and why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from gq.layout import split_groups
from gq.quantizer import clamp_logvar

MODES = ("tdc", "kl")
BITS_PER_NAT = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class TDCConfig:
    """Settings of the KL term; stored in checkpoints."""

    target_bits: float  # T, the per-group KL target in bits: log2 K of the codebook
    groups: int = 1  # G, groups per latent position (C = dim * G channels)
    layout: str = "interleaved"  # channel grouping, the quantizer's
    mode: str = "tdc"  # "tdc", or "kl" for a plain Gaussian-VAE KL (the ablation), no multipliers
    weight: float = 1.0  # overall loss weight (the reference configs use 0.1)
    tolerance: float = 0.5  # alpha, half-width of the accepted band around T, in bits
    factor: float = 1.01  # multiplicative step of every multiplier update
    lam_range: tuple[float, float] = (1e-3, 1e3)  # clip of lam (unbounded in the reference)
    lam_max_range: tuple[float, float] = (1.0, 1e3)  # clip of lam_max (weight above the band)
    lam_min_range: tuple[float, float] = (1e-3, 1.0)  # clip of lam_min (weight below the band)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.factor <= 1.0:
            raise ValueError(f"factor must be > 1, got {self.factor}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TDCConfig:
        data = dict(data)
        for key in ("lam_range", "lam_max_range", "lam_min_range"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class KLStats:
    """Per-group KL statistics of one batch, in bits (detached); `sum`/`count` make the mean reducible."""

    sum: torch.Tensor
    count: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def all_reduce(self) -> KLStats:
        """The statistics over every data-parallel rank (a no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        summed = torch.stack([self.sum, self.count]).double()
        extremes = torch.stack([self.max, -self.min]).double()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        return KLStats(sum=summed[0], count=summed[1], min=-extremes[1], max=extremes[0])


def kl_bits(mu: torch.Tensor, logvar: torch.Tensor, groups: int, layout: str = "interleaved") -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) of every latent group in bits: (B, C, H, W) -> (B, H, W, G)."""
    logvar = clamp_logvar(logvar)
    per_dim = 0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar) * BITS_PER_NAT
    return split_groups(per_dim, groups, layout).sum(-1)


class TargetDivergenceConstraint(nn.Module):
    """TDC loss with multiplier buffers `lam`, `lam_min`, `lam_max`; call `update(stats)` once per step.

    >>> tdc = TargetDivergenceConstraint(TDCConfig(target_bits=16.0))
    >>> loss, stats = tdc(mu, logvar)
    >>> loss.backward(); optimizer.step(); tdc.update(stats)
    """

    def __init__(self, config: TDCConfig) -> None:
        super().__init__()
        self.config = config
        one = torch.ones((), dtype=torch.float64)
        self.register_buffer("lam", one.clone())
        self.register_buffer("lam_min", one.clone())
        self.register_buffer("lam_max", one.clone())
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, KLStats]:
        """(loss, batch KL statistics); leaves the multipliers untouched."""
        c = self.config
        kappa = kl_bits(mu, logvar, c.groups, c.layout)
        batch = kappa.shape[0]
        with torch.no_grad():
            stats = KLStats(
                sum=kappa.sum().double(),
                count=torch.tensor(float(kappa.numel()), dtype=torch.float64, device=kappa.device),
                min=kappa.min().double(),
                max=kappa.max().double(),
            )
        if c.mode == "kl":
            return c.weight * kappa.sum() / batch, stats
        high = c.target_bits + c.tolerance
        low = c.target_bits - c.tolerance
        with torch.no_grad():
            w = torch.ones_like(kappa)
            w = torch.where(kappa > high, self.lam_max.to(kappa.dtype), w)
            w = torch.where(kappa < low, self.lam_min.to(kappa.dtype), w)
        loss = c.weight * self.lam.to(kappa.dtype) * (w * kappa).sum() / batch
        return loss, stats

    @torch.no_grad()
    def update(self, stats: KLStats) -> KLStats:
        """One multiplier step from the batch-global statistics (all-reduced across ranks); returns them."""
        c = self.config
        stats = stats.all_reduce()
        if c.mode == "kl":
            return stats
        f = c.factor
        up_down = lambda grow: f if bool(grow) else 1.0 / f  # noqa: E731
        self.lam.mul_(up_down(stats.mean > c.target_bits)).clamp_(*c.lam_range)
        self.lam_max.mul_(up_down(stats.max > c.target_bits + c.tolerance)).clamp_(*c.lam_max_range)
        self.lam_min.mul_(up_down(stats.min >= c.target_bits - c.tolerance)).clamp_(*c.lam_min_range)
        self.updates.add_(1)
        return stats

    def log_dict(self, stats: KLStats) -> dict[str, float]:
        """Scalars for a training log: KL bits mean/min/max against the target, and the multipliers."""
        return {
            "kl_bits_mean": float(stats.mean),
            "kl_bits_min": float(stats.min),
            "kl_bits_max": float(stats.max),
            "kl_bits_target": self.config.target_bits,
            "lam": float(self.lam),
            "lam_min": float(self.lam_min),
            "lam_max": float(self.lam_max),
        }

    def extra_repr(self) -> str:
        c = self.config
        return f"mode={c.mode}, target_bits={c.target_bits}, tolerance={c.tolerance}, weight={c.weight}"
