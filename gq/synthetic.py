"""Synthetic Gaussian posteriors with an exact KL, for checking GQ's theorem and for demos.

Each group gets sigma^2 = exp(-2 KL / d) in every dimension and a mean of norm sqrt(d (1 - sigma^2)) in
a uniformly random direction, so that KL(N(mu, sigma^2 I) || N(0, I)) equals the requested bits
exactly and the means, over many draws, spread like the prior.
"""

from __future__ import annotations

import math

import torch


def posteriors_at_rate(
    n: int, dim: int, bits: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar), each (n, dim) float32, whose KL to N(0, I) is `bits` bits for every row."""
    if bits <= 0:
        raise ValueError(f"bits must be > 0, got {bits}")
    nats = bits * math.log(2.0)
    var = math.exp(-2.0 * nats / dim)
    direction = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    mu = direction * math.sqrt(dim * (1.0 - var))
    logvar = torch.full((n, dim), math.log(var), dtype=torch.float64)
    return mu.float(), logvar.float()


def kl_bits_rows(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL of each row's diagonal Gaussian to N(0, I), in bits (float64)."""
    mu, logvar = mu.double(), logvar.double()
    return 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(1) / math.log(2.0)


def large_error_rate(mu: torch.Tensor, logvar: torch.Tensor, chosen: torch.Tensor) -> float:
    """Fraction of rows whose quantisation error is larger than sigma (RMS over the dimensions)."""
    var = logvar.double().exp()
    err2 = ((chosen.double() - mu.double()) ** 2 / var).mean(1)
    return float((err2 > 1.0).double().mean())
