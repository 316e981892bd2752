"""The two search rules written as one maximum inner product: score[n, k] = Q[n] . A[k].

posterior (the reference's rule, per group vector mu, sigma in R^d):
    argmax_k sum_i [-(c_ki - mu_i)^2 / sigma_i^2 + beta * c_ki^2]
    = argmax_k  [(beta - 1/sigma^2) / 2, mu / sigma^2] . [c_k^2, c_k]          (m = 2d)
mean (plain nearest neighbour of mu):
    argmin_k ||mu - c_k||^2 = argmax_k  [mu, -1/2] . [c_k, ||c_k||^2]          (m = d + 1)
The dropped terms are constant per query, so the argmax (and every tie) is the same.
"""

from __future__ import annotations

import torch

RULES = ("posterior", "mean")


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def feature_dim(dim: int, rule: str) -> int:
    return 2 * dim if rule == "posterior" else dim + 1


def query_features(mu: torch.Tensor, logvar: torch.Tensor | None, rule: str, beta: float) -> torch.Tensor:
    """Q (n, m) in the dtype of `mu`."""
    if rule == "posterior":
        precision = torch.exp(-logvar)
        return torch.cat([(beta - precision) * 0.5, mu * precision], dim=1)
    return torch.cat([mu, mu.new_full((mu.shape[0], 1), -0.5)], dim=1)


def code_features(codes: torch.Tensor, rule: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """A (k, m) in the dtype of `codes` (or written into `out`)."""
    k, d = codes.shape
    if out is None:
        out = codes.new_empty(k, feature_dim(d, rule))
    if rule == "posterior":
        torch.mul(codes, codes, out=out[:, :d])
        out[:, d:].copy_(codes)
    else:
        out[:, :d].copy_(codes)
        torch.sum(codes * codes, dim=1, out=out[:, d])
    return out


def code_feature_bound(codes: torch.Tensor, rule: str) -> torch.Tensor:
    """An upper bound of |A[k, j]| over the codebook for every feature j, in float64.

    One global max |c| (two flat reductions) instead of per-column maxima: column reductions are
    several times slower here, and the per-column maxima of a Gaussian codebook are nearly equal.
    """
    d = codes.shape[1]
    cmax = torch.maximum(codes.max(), -codes.min()).double()
    if rule == "posterior":
        return torch.cat([(cmax * cmax).expand(d), cmax.expand(d)])
    sq_norm = torch.linalg.vector_norm(codes, dim=1).amax().double() ** 2
    return torch.cat([cmax.expand(d), (sq_norm * (1 + 1e-6)).reshape(1)])


def score_error_bound(q64: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """(n,) float64 bound on |float32 score - exact score| for every code: the m-term float32
    accumulation plus the rounding of Q and A to float32, with a factor 2 to spare (bound: from
    code_feature_bound; q64: the float64 features). Shared by the tiled path and the fused kernels."""
    return 2 * (q64.shape[1] + 4) * 2.0**-24 * (q64.abs() @ bound)


def block_scores(codes: torch.Tensor, q: torch.Tensor, rule: str) -> torch.Tensor:
    """Scores Q[p] . A[p, j] for blocks of codes (P, B, d) and one query row each (P, m) -> (P, B)."""
    d = codes.shape[2]
    if rule == "posterior":
        return torch.baddbmm(torch.bmm(codes * codes, q[:, :d, None]), codes, q[:, d:, None]).squeeze(2)
    norms = (codes * codes).sum(2)
    return torch.baddbmm(q[:, d, None, None] * norms.unsqueeze(2), codes, q[:, :d, None]).squeeze(2)
