"""The certificate that makes a float32 best/second-best search exact, shared by the fused kernels.

A fused kernel (kernels/fused.py on CUDA, kernels/fused_cpu.py on the CPU) scores every code in float32
and keeps, per query, the best score, its index and the second-best score. Every float32 score is within
`err` of the exact one (the m-term accumulation plus the rounding of the query and code features, with a
factor 2 to spare: the bound of kernels/tiled.py), so where best - second > 2 * err no other code can
overtake the best one in exact arithmetic and it is the float64 argmax. The rows it cannot certify
(near-ties, duplicated codes) go through kernels.tiled's own search, so the answer is the float64 argmax
of the rule with the lowest index on ties, on every backend.
"""

from __future__ import annotations

import torch

from kernels.rules import code_feature_bound, query_features, score_error_bound
from kernels.tiled import RunMaxima, search_tiled

_QUERY_CHUNK = 65536  # rows whose float64 features exist at once while the inputs are built


def core_features(dim: int, rule: str) -> int:
    """Features a fused kernel multiplies: 2d for the posterior rule, d for the mean rule (whose constant
    -1/2 feature becomes the per-code bias -||c||^2 / 2)."""
    return 2 * dim if rule == "posterior" else dim


def query_inputs(
    mu: torch.Tensor, logvar: torch.Tensor | None, codes32: torch.Tensor, rule: str, beta: float, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (n, width) float32, err (n,) float64): the query's core features rounded from float64 (as the
    CPU path does), zero-padded to `width`, and the bound on |float32 score - exact score| for every code."""
    n, d = mu.shape
    core = core_features(d, rule)
    bound = code_feature_bound(codes32, rule)
    q = mu.new_zeros((n, width), dtype=torch.float32)
    err = torch.empty(n, dtype=torch.float64, device=mu.device)
    for i0 in range(0, n, _QUERY_CHUNK):
        lv = None if logvar is None else logvar[i0 : i0 + _QUERY_CHUNK].double()
        q64 = query_features(mu[i0 : i0 + _QUERY_CHUNK].double(), lv, rule, beta)
        q[i0 : i0 + q64.shape[0], :core] = q64[:, :core]
        err[i0 : i0 + q64.shape[0]] = score_error_bound(q64, bound)
    return q, err


def uncertified(best: torch.Tensor, second: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """Rows whose float32 best is not certainly the exact best: gap to the second best <= 2 * err."""
    return best.double() - second.double() <= 2 * err


def certified_answer(
    best: torch.Tensor,
    second: torch.Tensor,
    idx: torch.Tensor,
    err: torch.Tensor,
    q: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor | None,
    codes: torch.Tensor,
    rule: str,
    beta: float,
    scratch_bytes: int,
    run_maxima: RunMaxima | None = None,
) -> torch.Tensor:
    """int64 indices: the kernel's where certified, kernels.tiled's exact search elsewhere (its float32
    candidate runs from `run_maxima` where given, e.g. the same kernel's)."""
    finite = torch.isfinite(q).all(1)
    uncertain = uncertified(best, second, err) | ~finite
    n_bad, n_uncertain = torch.stack([(~finite).sum(), uncertain.sum()]).tolist()  # one sync
    if n_bad:
        raise ValueError("non-finite search input: mu must be finite and logvar inside the quantizer's clamp")
    out = idx.long()
    if n_uncertain:
        rows = uncertain.nonzero().squeeze(1)
        lv = None if logvar is None else logvar[rows]
        # the CPU path itself decides these rows, so the answer is its answer by construction
        out[rows] = search_tiled(mu[rows], lv, codes, rule, beta, scratch_bytes, run_maxima)
    return out
