"""Nearest-code search as tiled float32 GEMMs with a float64 finish, in plain torch (CPU or any device).

For a block of queries the codebook is streamed in tiles: one float32 GEMM per tile writes a score
tile that stays in cache, and only each query's maximum over every run of BLOCK codes survives it
(never the n x K scores, never the n x K x d broadcast). A run can hold the float64 winner only if its
float32 maximum is within twice the float32 rounding bound of the query's best; usually that leaves
one run per query, rarely a few. Those runs are re-scored in float64, so the answer is the float64
argmax of the rule with the lowest index on ties, and scratch memory is fixed by the tile sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.rules import (
    block_scores,
    code_feature_bound,
    code_features,
    feature_dim,
    query_features,
    score_error_bound,
)

BLOCK = 64  # codes per run whose maximum is kept; the float64 finish re-scores whole runs

# (q32 (nb, m) float32 features of kernels.rules, codes (K, d) float32, rule) -> (nb, runs) float32 maxima
RunMaxima = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]


def plan_tiles(n: int, k: int, d: int, m: int, scratch_bytes: int) -> tuple[int, int, int]:
    """(query block, code tile, finish chunk) sized to the scratch budget, whatever n is."""
    n_runs = -(-k // BLOCK)
    finish = max(1, (scratch_bytes // 4) // (BLOCK * (d + m + 2) * 8))
    bn, bk = 1024, 1024
    rest = scratch_bytes - finish * BLOCK * (d + m + 2) * 8

    def footprint(bn: int, bk: int) -> int:
        # float32 score tile, run maxima, Q (float32 + float64), A tile (float32)
        return bn * bk * 4 + bn * n_runs * 4 + bn * m * 12 + bk * m * 4

    while footprint(bn, bk) > rest and (bn > 1 or bk > BLOCK):
        if bk > BLOCK and (bk >= bn or bn == 1):
            bk //= 2
        else:
            bn //= 2
    return max(1, min(bn, n)), min(bk, -(-k // BLOCK) * BLOCK), finish


def _run_maxima(q32: torch.Tensor, codes: torch.Tensor, rule: str, bk: int, scratch: dict):
    """(nb, runs) float32: each query's maximum score over each run of BLOCK codes."""
    nb, m = q32.shape
    k = codes.shape[0]
    maxima = scratch["maxima"][: nb * -(-k // BLOCK)].view(nb, -1)
    for k0 in range(0, k, bk):
        tile = codes[k0 : k0 + bk]
        kb = tile.shape[0]
        a = code_features(tile, rule, out=scratch["a32"][: kb * m].view(kb, m))
        s = torch.mm(q32, a.T, out=scratch["s32"][: nb * kb].view(nb, kb))
        r0, full = k0 // BLOCK, kb // BLOCK
        if full:
            maxima[:, r0 : r0 + full] = s[:, : full * BLOCK].view(nb, full, BLOCK).amax(2)
        if kb % BLOCK:
            maxima[:, r0 + full] = s[:, full * BLOCK :].amax(1)
    return maxima


def _finish(q64: torch.Tensor, codes: torch.Tensor, rule: str, candidates: torch.Tensor, chunk: int):
    """Float64 argmax over each query's candidate runs; lowest index on ties."""
    nb = q64.shape[0]
    k, d = codes.shape
    rows, runs = candidates.nonzero(as_tuple=True)
    best = q64.new_full((nb,), float("-inf"))
    idx = torch.full((nb,), k, dtype=torch.int64, device=q64.device)
    offsets = torch.arange(BLOCK, device=q64.device)
    for p0 in range(0, rows.numel(), chunk):
        r, run = rows[p0 : p0 + chunk], runs[p0 : p0 + chunk]
        code_idx = run[:, None] * BLOCK + offsets  # (P, BLOCK)
        if k % BLOCK == 0:  # whole runs are contiguous rows: gather them as blocks
            gathered = codes.view(-1, BLOCK, d)[run]
        else:
            gathered = codes[code_idx.clamp(max=k - 1)]
        s = block_scores(gathered.double(), q64[r], rule)
        s.masked_fill_(code_idx >= k, float("-inf"))
        run_best, run_arg = s.max(1)  # first maximum inside a run: its lowest index
        cand_idx = code_idx.gather(1, run_arg[:, None]).squeeze(1)
        # Combine runs per query: the highest score, then the lowest index among equal scores;
        # a query whose best rose in this chunk forgets the index an earlier chunk gave it.
        previous = best.clone()
        best.scatter_reduce_(0, r, run_best, reduce="amax")
        idx.masked_fill_(best > previous, k)
        winner = run_best == best[r]
        idx.scatter_reduce_(0, r[winner], cand_idx[winner], reduce="amin")
    return idx


@torch.no_grad()
def search_tiled(
    mu: torch.Tensor,
    logvar: torch.Tensor | None,
    codes: torch.Tensor,
    rule: str,
    beta: float,
    scratch_bytes: int,
    run_maxima: RunMaxima | None = None,
) -> torch.Tensor:
    """Index of the best code per query (int64): the float64 argmax, lowest index on ties.

    run_maxima: another source of the float32 run maxima (the CPU kernel's; any with the same error
    bound); by default the tiled float32 GEMMs here."""
    n, d = mu.shape
    k = codes.shape[0]
    m = feature_dim(d, rule)
    bn, bk, finish_chunk = plan_tiles(n, k, d, m, scratch_bytes)
    codes = codes.float().contiguous()
    bound = code_feature_bound(codes, rule)
    scratch = {
        "s32": codes.new_empty(bn * bk),
        "a32": codes.new_empty(bk * m),
        "maxima": codes.new_empty(bn * -(-k // BLOCK)),
    }
    out = torch.empty(n, dtype=torch.int64, device=mu.device)
    for i0 in range(0, n, bn):
        lv = None if logvar is None else logvar[i0 : i0 + bn].double()
        q64 = query_features(mu[i0 : i0 + bn].double(), lv, rule, beta)
        q32 = q64.float()
        if not torch.isfinite(q32).all():
            raise ValueError(
                "non-finite search input: mu must be finite and logvar inside the quantizer's clamp"
            )
        if run_maxima is None:
            maxima = _run_maxima(q32, codes, rule, bk, scratch)
        else:
            maxima = run_maxima(q32, codes, rule)
        err = score_error_bound(q64, bound).float()  # |float32 score - exact score| <= err, every code
        candidates = maxima >= (maxima.amax(1) - 2 * err)[:, None]
        out[i0 : i0 + bn] = _finish(q64, codes, rule, candidates, finish_chunk)
    return out
