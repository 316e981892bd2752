"""Float64 brute force of both search rules, for tests only.

Each query's winner is decided by the rule's direct formula, sum_i -(c_i - mu_i)^2 / sigma_i^2 + beta c_i^2
(posterior) or -||c - mu||^2 (mean), evaluated in float64. To keep this affordable for K = 2^16 the
direct formula only runs on candidates that a float64 expanded-square pre-filter keeps within a
margin 10^6 times its rounding bound. The expansion here is written independently of kernels/rules.py.
"""

from __future__ import annotations

import torch

from kernels.rules import check_rule

_PREFILTER_MARGIN = 1e-9  # relative to the score scale; float64 rounding is ~1e-15 of it


def direct_scores(
    mu: torch.Tensor, logvar: torch.Tensor | None, codes: torch.Tensor, rule: str, beta: float
) -> torch.Tensor:
    """Direct-form float64 scores; mu/logvar (n, d) against codes (n, d) or (n, c, d) -> (n,) or (n, c)."""
    mu64, c64 = mu.double(), codes.double()
    if c64.dim() == 3:
        mu64 = mu64[:, None, :]
    if rule == "mean":
        return -((c64 - mu64) ** 2).sum(-1)
    var64 = torch.exp(logvar.double())
    if c64.dim() == 3:
        var64 = var64[:, None, :]
    return (-((c64 - mu64) ** 2) / var64 + beta * c64**2).sum(-1)


def score_scale(
    mu: torch.Tensor, logvar: torch.Tensor | None, codes: torch.Tensor, rule: str, beta: float
) -> torch.Tensor:
    """Magnitude of the terms that make up a score (the yardstick for 'near-tie'); codes is (n, d)."""
    mu64, c64 = mu.double(), codes.double()
    terms = c64**2 + 2 * (c64 * mu64).abs() + mu64**2
    if rule == "mean":
        return terms.sum(-1)
    return (terms * torch.exp(-logvar.double()) + abs(beta) * c64**2).sum(-1)


def reference_search(
    mu: torch.Tensor,
    logvar: torch.Tensor | None,
    codes: torch.Tensor,
    rule: str = "posterior",
    beta: float = 1.0,
    chunk: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, best direct-form scores) on the CPU; ties go to the lowest index. `device` is where
    the float64 arithmetic runs (a GPU makes K = 2^20 affordable)."""
    check_rule(rule)
    mu, codes = mu.detach().to(device), codes.detach().to(device)
    logvar = None if logvar is None else logvar.detach().to(device)
    c64 = codes.double()
    c2 = c64**2
    cmax, c2max = c64.abs().amax(0), c2.amax(0)  # magnitudes bounded per coordinate
    out_idx = torch.empty(mu.shape[0], dtype=torch.int64)
    out_score = torch.empty(mu.shape[0], dtype=torch.float64)
    for i in range(0, mu.shape[0], chunk):
        m = mu[i : i + chunk].double()
        if rule == "posterior":
            lv = logvar[i : i + chunk]
            p = torch.exp(-lv.double())
            expanded = (beta - p) @ c2.T + 2 * (m * p) @ c64.T - (m * m * p).sum(1, keepdim=True)
            magnitude = (p + abs(beta)) @ c2max + 2 * (m * p).abs() @ cmax + (m * m * p).sum(1)
        else:
            lv = None
            expanded = 2 * m @ c64.T - c2.sum(1)[None] - (m * m).sum(1, keepdim=True)
            magnitude = 2 * m.abs() @ cmax + c2.sum(1).amax() + (m * m).sum(1)
        best = expanded.amax(1, keepdim=True)
        keep = expanded >= best - _PREFILTER_MARGIN * magnitude[:, None]
        for r in range(m.shape[0]):
            cand = keep[r].nonzero().squeeze(1)  # ascending, so argmax's first hit is the lowest index
            s = direct_scores(
                m[r : r + 1].expand(len(cand), -1),
                None if lv is None else lv[r : r + 1].expand(len(cand), -1),
                c64[cand],
                rule,
                beta,
            )
            j = int(s.argmax())
            out_idx[i + r] = cand[j]
            out_score[i + r] = s[j]
    return out_idx, out_score
