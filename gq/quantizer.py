"""Gaussian Quant: map each latent group's posterior N(mu, sigma^2) to one fixed Gaussian codebook vector.

`quantize` / `dequantize` are pure functions over tensors; `GaussianQuantizer` is the thin module that
holds the codebook (as a buffer, so it follows `.to(device)`) and the settings.

Gaussian Quant (GQ) is from Xu et al., "Vector Quantization using Gaussian Variational Autoencoder"
(arXiv 2512.06609); the posterior rule is the authors' code (`pit/quantization/gaussian.py`).
The method as implemented, and where it differs from that code: docs/METHOD.md, section 3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from gq.codebook import CodebookSpec, GaussianCodebook
from gq.layout import check_layout, merge_groups, split_groups
from kernels import RULES, nearest_code

LOGVAR_RANGE = (-30.0, 20.0)  # the reference's clamp, applied before sigma is used anywhere


@dataclass(frozen=True)
class QuantizerConfig:
    """How latents become tokens; stored in checkpoints and token files."""

    codebook: CodebookSpec  # recipe of the codebook (kind, size, dim, seed)
    groups: int = 1  # G, codebook vectors per latent position; channels C = dim * G
    layout: str = "interleaved"  # channel grouping: "interleaved" (reference configs) or "contiguous"
    rule: str = "posterior"  # "posterior" (reference: max importance weight q(c)/p(c)^beta) or "mean"
    beta: float = 1.0  # prior exponent of the posterior rule

    def __post_init__(self) -> None:
        check_layout(self.layout)
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")

    @property
    def channels(self) -> int:
        return self.codebook.dim * self.groups

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantizerConfig:
        data = dict(data)
        data["codebook"] = CodebookSpec(**data["codebook"])
        return cls(**data)


def clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    return logvar.clamp(*LOGVAR_RANGE)


def quantize(
    mu: torch.Tensor,
    logvar: torch.Tensor | None,
    codes: torch.Tensor,
    groups: int,
    layout: str = "interleaved",
    rule: str = "posterior",
    beta: float = 1.0,
) -> torch.Tensor:
    """mu, logvar (B, C, H, W) with C = d * groups -> token indices (B, H, W, groups) int64."""
    d = codes.shape[1]
    if mu.dim() != 4 or mu.shape[1] != d * groups:
        raise ValueError(
            f"expected mu of shape (B, {d * groups}, H, W) for {groups} groups of dim {d}, "
            f"got {tuple(mu.shape)}"
        )
    if rule == "posterior" and (logvar is None or logvar.shape != mu.shape):
        raise ValueError("rule='posterior' needs logvar with the shape of mu")
    mu_g = split_groups(mu.float(), groups, layout)
    b, h, w = mu_g.shape[:3]
    lv = None
    if rule == "posterior":
        lv = split_groups(clamp_logvar(logvar.float()), groups, layout).reshape(-1, d)
    idx = nearest_code(mu_g.reshape(-1, d), lv, codes, rule=rule, beta=beta)
    return idx.view(b, h, w, groups)


def dequantize(indices: torch.Tensor, codes: torch.Tensor, layout: str = "interleaved") -> torch.Tensor:
    """Token indices (B, H, W, G) -> (B, G * d, H, W) float32: the codebook vectors in the latent layout."""
    if indices.dim() != 4:
        raise ValueError(f"expected indices of shape (B, H, W, G), got {tuple(indices.shape)}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    k = codes.shape[0]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
        raise ValueError(
            f"token indices must lie in [0, {k}), got [{int(indices.min())}, {int(indices.max())}]"
        )
    z = codes[indices.long()]  # (B, H, W, G, d)
    return merge_groups(z, layout)


class GaussianQuantizer(nn.Module):
    """GQ as a module: `quantize(mu, logvar)` -> tokens, `dequantize(tokens)` -> latent.

    >>> q = GaussianQuantizer(GaussianCodebook(65536, 16), groups=1)
    >>> idx = q.quantize(mu, logvar)      # (B, H, W, 1)
    >>> z = q.dequantize(idx)             # (B, 16, H, W), the chosen codebook vectors
    """

    def __init__(
        self,
        codebook: GaussianCodebook,
        groups: int = 1,
        layout: str = "interleaved",
        rule: str = "posterior",
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.config = QuantizerConfig(codebook.spec, groups, layout, rule, float(beta))
        self.fingerprint = codebook.fingerprint
        # Rebuilt from the recipe on load, never saved: the fingerprint pins its exact bytes.
        self.register_buffer("codes", codebook.vectors.clone(), persistent=False)

    @classmethod
    def from_config(cls, config: QuantizerConfig) -> GaussianQuantizer:
        c = config
        return cls(GaussianCodebook.from_spec(c.codebook), c.groups, c.layout, c.rule, c.beta)

    @torch.no_grad()
    def quantize(self, mu: torch.Tensor, logvar: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        return quantize(mu, logvar, self.codes, c.groups, c.layout, c.rule, c.beta)

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        return dequantize(indices.to(self.codes.device), self.codes, self.config.layout)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"K={c.codebook.size}, d={c.codebook.dim}, groups={c.groups}, layout={c.layout}, "
            f"rule={c.rule}, beta={c.beta}, codebook={self.fingerprint[:12]}"
        )
