"""The fixed Gaussian codebook of GQ: K quasi-random (or i.i.d.) N(0, I) vectors, rebuilt from a recipe.

From Xu et al., "Vector Quantization using Gaussian Variational Autoencoder" (arXiv 2512.06609):
the codebook is a sample of the prior; the authors' code draws it as scrambled Sobol points through
the inverse normal CDF, which `kind="sobol"` reproduces bit for bit (docs/METHOD.md, section 2).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.quasirandom import SobolEngine

KINDS = ("sobol", "iid")
MAX_SIZE = 2**20
MAX_DIM = 64


@dataclass(frozen=True)
class CodebookSpec:
    """Everything needed to rebuild a codebook bit for bit; stored in checkpoints and token files."""

    size: int  # K, number of codebook vectors (2 .. 2^20)
    dim: int  # d, dimension of each vector (1 .. 64)
    seed: int = 42  # seed of the Sobol scrambling or of the i.i.d. generator
    kind: str = "sobol"  # "sobol" (the reference construction) or "iid" (seeded torch.randn)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"codebook kind must be one of {KINDS}, got {self.kind!r}")
        if not 2 <= self.size <= MAX_SIZE:
            raise ValueError(f"codebook size must be in [2, {MAX_SIZE}], got {self.size}")
        if not 1 <= self.dim <= MAX_DIM:
            raise ValueError(f"codebook dim must be in [1, {MAX_DIM}], got {self.dim}")
        if self.seed < 0:
            raise ValueError(f"codebook seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict:
        return asdict(self)


def sobol_gaussian(size: int, dim: int, seed: int) -> torch.Tensor:
    """The reference's `prior_samples`: scrambled Sobol points -> inverse normal CDF in float64 -> float32.

    The reference draws the Sobol points in float32 (torch's default dtype) and maps them with
    scipy's `norm.ppf`; `torch.special.ndtri` in float64 gives the same bits (checked by the tests).
    A float32 Sobol coordinate can round up to exactly 1.0 (once in d=64, K=2^20, seed=42), where the
    reference yields +inf; we map it to the largest float32 below 1 so every vector is finite.
    """
    points = SobolEngine(dim, scramble=True, seed=seed).draw(size, dtype=torch.float32)
    points = points.clamp_(max=float(np.nextafter(np.float32(1.0), np.float32(0.0))))
    return torch.special.ndtri(points.double()).float()


def iid_gaussian(size: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(size, dim, generator=generator, dtype=torch.float32)


def fingerprint(vectors: torch.Tensor) -> str:
    """sha256 of the float32 codebook bytes (row-major, little-endian)."""
    array = np.ascontiguousarray(vectors.detach().cpu().numpy(), dtype="<f4")
    return hashlib.sha256(array.tobytes()).hexdigest()


class GaussianCodebook:
    """K fixed N(0, I) vectors of dimension d, shared by every latent position and group.

    >>> cb = GaussianCodebook(size=65536, dim=16, seed=42, kind="sobol")
    >>> cb.vectors.shape, cb.fingerprint[:8]
    """

    def __init__(self, size: int, dim: int, seed: int = 42, kind: str = "sobol") -> None:
        self.spec = CodebookSpec(size=size, dim=dim, seed=seed, kind=kind)
        build = sobol_gaussian if kind == "sobol" else iid_gaussian
        self.vectors: torch.Tensor = build(size, dim, seed)
        self.fingerprint: str = fingerprint(self.vectors)

    @classmethod
    def from_spec(cls, spec: CodebookSpec | dict) -> GaussianCodebook:
        spec = spec if isinstance(spec, CodebookSpec) else CodebookSpec(**spec)
        return cls(size=spec.size, dim=spec.dim, seed=spec.seed, kind=spec.kind)

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def bits(self) -> float:
        """log2 K: the rate of one token, and TDC's per-group KL target."""
        return float(np.log2(self.spec.size))

    def __len__(self) -> int:
        return self.spec.size

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"GaussianCodebook(size={s.size}, dim={s.dim}, seed={s.seed}, kind={s.kind!r}, "
            f"fingerprint={self.fingerprint[:12]}...)"
        )
