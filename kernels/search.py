"""The one nearest-code search function: validates, then runs the implementation for the tensors' device."""

from __future__ import annotations

import torch

from kernels.rules import check_rule
from kernels.tiled import search_tiled

DEFAULT_SCRATCH_BYTES = 64 * 2**20


def nearest_code(
    mu: torch.Tensor,
    logvar: torch.Tensor | None,
    codes: torch.Tensor,
    *,
    rule: str = "posterior",
    beta: float = 1.0,
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
) -> torch.Tensor:
    """Index of the best code for each query row, int64 of shape (n,).

    mu, logvar: (n, d) float tensors (logvar is unused by rule="mean" and may be None);
    codes: (K, d) float32. rule="posterior" maximises sum_i -(c_i - mu_i)^2 / sigma_i^2 + beta * c_i^2,
    rule="mean" minimises ||c - mu||^2. Ties go to the lowest index. Scratch memory stays within
    `scratch_bytes` whatever n is.
    """
    check_rule(rule)
    if mu.dim() != 2 or codes.dim() != 2 or mu.shape[1] != codes.shape[1]:
        raise ValueError(
            f"expected mu (n, d) and codes (K, d), got {tuple(mu.shape)} and {tuple(codes.shape)}"
        )
    if rule == "posterior" and (logvar is None or logvar.shape != mu.shape):
        raise ValueError("rule='posterior' needs logvar with the shape of mu")
    if mu.device != codes.device:
        raise ValueError(f"mu is on {mu.device} but codes are on {codes.device}")
    if mu.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=mu.device)
    # Issue 6: the CuPy kernel takes CUDA tensors here; the tiled torch path serves every device until then.
    return search_tiled(mu, logvar, codes, rule, beta, scratch_bytes)
