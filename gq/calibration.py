"""An affine prior for GQ: a VAE whose aggregate posterior is N(shift, scale^2) per channel, not N(0, 1).

GQ's codebook is drawn from N(0, I), so it fits a VAE trained against that prior. A VAE trained otherwise (a
diffusers `AutoencoderKL`: SD's latents have a std near 5.5) is the same model under the prior
N(shift, diag(scale^2)): with mu' = (mu - shift) / scale and sigma' = sigma / scale before the search, and
z = shift + scale * code before the decoder, GQ is exact for that prior. `AggregateMoments` measures the
aggregate posterior's per-channel moments over data (shift_c = E[mu_c],
scale_c^2 = E[mu_c^2 + sigma_c^2] - shift_c^2: the mixture's mean and variance); `normalize` and
`denormalize` are the two maps, pure functions over tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Calibration:
    """Per-latent-channel prior N(shift_c, scale_c^2); stored in the model config (so in every checkpoint)."""

    shift: tuple[float, ...]  # shift_c, the aggregate posterior's mean of channel c
    scale: tuple[float, ...]  # scale_c > 0, its standard deviation
    images: int = 0  # how many images measured it (0: given by hand), for people reading the config

    def __post_init__(self) -> None:
        object.__setattr__(self, "shift", tuple(float(v) for v in self.shift))
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        if len(self.shift) != len(self.scale) or not self.shift:
            raise ValueError(f"calibration: {len(self.shift)} shifts but {len(self.scale)} scales")
        if not all(math.isfinite(v) for v in self.shift + self.scale) or min(self.scale) <= 0:
            raise ValueError("calibration: shifts must be finite and scales finite and > 0")

    @property
    def channels(self) -> int:
        return len(self.shift)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale), each float32 (1, C, 1, 1), to broadcast over (B, C, H, W) latents."""
        shape = (1, self.channels, 1, 1)
        return (
            torch.tensor(self.shift, dtype=torch.float32, device=device).view(shape),
            torch.tensor(self.scale, dtype=torch.float32, device=device).view(shape),
        )

    def to_dict(self) -> dict:
        return {"shift": list(self.shift), "scale": list(self.scale), "images": self.images}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(shift=tuple(data["shift"]), scale=tuple(data["scale"]), images=int(data.get("images", 0)))


def normalize(
    mu: torch.Tensor, logvar: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior under N(0, 1): mu' = (mu - shift) / scale, log sigma'^2 = logvar - 2 log scale."""
    return (mu - shift) / scale, logvar - 2.0 * torch.log(scale)


def denormalize(z: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A latent (or code) of the N(0, 1) space -> the decoder's own: shift + scale * z."""
    return shift + scale * z


class AggregateMoments:
    """Running per-channel moments of the aggregate posterior, in float64, over every latent position."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.sum_mu = torch.zeros(channels, dtype=torch.float64)
        self.sum_second = torch.zeros(channels, dtype=torch.float64)  # sum of mu^2 + sigma^2

    def update(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        """Add one batch of posteriors, each (B, C, H, W)."""
        mu, logvar = mu.detach().double(), logvar.detach().double()
        self.count += mu.shape[0] * mu.shape[2] * mu.shape[3]
        self.sum_mu += mu.sum((0, 2, 3)).cpu()
        self.sum_second += (mu.square() + logvar.exp()).sum((0, 2, 3)).cpu()

    @property
    def mean(self) -> torch.Tensor:
        """E[mu_c], float64 (C,)."""
        return self.sum_mu / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """E[mu_c^2 + sigma_c^2] - E[mu_c]^2: the variance of the aggregate posterior, float64 (C,)."""
        return (self.sum_second / max(self.count, 1) - self.mean.square()).clamp(min=0.0)

    def calibration(self, images: int = 0) -> Calibration:
        """The prior N(mean, var) as a Calibration; ValueError when nothing was measured."""
        if not self.count:
            raise ValueError("calibration: no latent positions were measured")
        return Calibration(tuple(self.mean.tolist()), tuple(self.var.sqrt().tolist()), images)
