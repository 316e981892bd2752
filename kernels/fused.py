"""Nearest-code search on CUDA tensors with the fused CuPy kernel (kernels/nearest.cu), finished exactly.

The kernel streams the codebook through shared memory and gives every query its float32 best code
and the float32 second-best score, never the n x K scores. Where the gap between the two exceeds
twice the float32 rounding bound of the query's scores, no other code can overtake the best one in
exact arithmetic, so it is also the float64 argmax. The few queries it cannot certify (near-ties,
duplicated codes) go through the CPU path's own search (kernels.tiled, on the same device). The answer
is therefore the CPU path's: the float64 argmax of the rule, lowest index on ties.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.certificate import certified_answer, core_features, query_inputs

SOURCE_PATH = Path(__file__).with_name("nearest.cu")
THREADS = 128  # threads per block


@dataclass(frozen=True)
class LaunchPlan:
    """One launch of gq_nearest (and gq_merge when the codebook is split).

    m: features per query and code, zero-padded to a multiple of 4 (float4 loads).
    queries_per_thread: query rows each thread keeps in registers.
    tile_codes: codes staged in shared memory at a time.
    threads: threads per block.
    bias: whether scores start from a per-code offset (the mean rule's -||c||^2 / 2).
    query_blocks, splits: the grid; splits cut K into ranges of `codes_per_split` codes, merged after.
    code_unroll: codes per trip of the inner loop (more independent FMA chains; same results).
    """

    m: int
    queries_per_thread: int
    tile_codes: int
    threads: int
    bias: bool
    query_blocks: int
    splits: int
    codes_per_split: int
    code_unroll: int = 1

    @property
    def kernel_name(self) -> str:
        bias = "true" if self.bias else "false"
        shape = f"{self.m}, {self.queries_per_thread}, {self.tile_codes}, {self.threads}"
        return f"gq_nearest<{shape}, {bias}, {self.code_unroll}>"

    @property
    def scratch_rows(self) -> int:
        """Rows of per-split results the launch needs beyond its output (0 without a split)."""
        return 0 if self.splits == 1 else self.splits


def padded_features(dim: int, rule: str) -> tuple[int, bool]:
    """(m, bias): the kernel's feature count for `dim`-dimensional groups and whether it uses a bias."""
    return -(-core_features(dim, rule) // 4) * 4, rule == "mean"


def plan_launch(
    n: int,
    k: int,
    m: int,
    bias: bool,
    sm_count: int,
    *,
    queries_per_thread: int | None = None,
    threads: int = THREADS,
    blocks_per_sm: int = 8,
    code_unroll: int = 1,
) -> LaunchPlan:
    """Pick the kernel's template parameters and grid for n queries, k codes and m padded features.

    About 128 query values per thread stay in registers (QPT * m <= 128, which ptxas fits in 255
    registers without spilling at 2 blocks per SM), and the shared tile is about 16 KiB. The
    codebook is split only as far as needed to give every SM several blocks, so the per-split
    scratch stays O(n) whatever K is.
    """
    if m % 4 or m <= 0:
        raise ValueError(f"m must be a positive multiple of 4, got {m}")
    if not 0 < n < 2**31 or not 0 < k < 2**31:
        raise ValueError(f"n and k must be in [1, 2^31), got n={n}, k={k}")
    qpt = queries_per_thread or max(1, min(8, 128 // m))
    tile = max(32, min(256, 4096 // m))
    query_blocks = -(-n // (threads * qpt))
    wanted = -(-(blocks_per_sm * sm_count) // query_blocks)
    max_splits = max(1, k // (4 * tile))  # each split streams at least 4 tiles
    splits = max(1, min(wanted, max_splits))
    per_split = -(-k // (splits * tile)) * tile  # ceil(k / splits), rounded up to whole tiles
    splits = -(-k // per_split)  # no empty split
    return LaunchPlan(m, qpt, tile, threads, bias, query_blocks, splits, per_split, code_unroll)


def kernel_inputs(
    mu: torch.Tensor, logvar: torch.Tensor | None, codes: torch.Tensor, rule: str, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(q (n, m) float32, a (k, m) float32, bias (k,) float32 or None, err (n,) float64).

    q is rounded from the float64 features (as the CPU path does); err bounds |float32 score -
    exact score| for every code of each query: the m-term accumulation plus the rounding of q and a,
    with a factor 2 to spare (the same bound as kernels/tiled.py).
    """
    d = mu.shape[1]
    k = codes.shape[0]
    m, _ = padded_features(d, rule)
    codes32 = codes.float()
    q, err = query_inputs(mu, logvar, codes32, rule, beta, m)
    a = codes32.new_zeros((k, m))
    if rule == "posterior":
        a[:, :d] = codes32 * codes32
        a[:, d : 2 * d] = codes32
        bias = None
    else:
        a[:, :d] = codes32
        bias = (codes32 * codes32).sum(1) * -0.5  # scaling by a power of 2 is exact
    return q, a.contiguous(), bias, err


Launch = Callable[[LaunchPlan, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple]


_KERNELS: dict[str, tuple] = {}  # kernel name -> (gq_nearest, gq_merge) RawKernels; compiled once per process


def _kernels(name: str) -> tuple:
    import cupy

    kernels = _KERNELS.get(name)
    if kernels is None:
        module = cupy.RawModule(
            code=SOURCE_PATH.read_text(), options=("-std=c++17",), name_expressions=[name]
        )
        kernels = _KERNELS[name] = (module.get_function(name), module.get_function("gq_merge"))
    return kernels


def cupy_launch(
    plan: LaunchPlan, q: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run gq_nearest (+ gq_merge) on torch's current stream: (best, second) float32 and idx int32.

    Tensors cross into CuPy by DLPack (no copy, no host round trip); every buffer is allocated by
    torch, so torch's memory statistics see all of it.
    """
    import cupy
    import numpy as np

    device = q.device
    n, k = q.shape[0], a.shape[0]
    rows = max(1, plan.scratch_rows)
    best = torch.empty((rows, n), dtype=torch.float32, device=device)
    second = torch.empty_like(best)
    idx = torch.empty((rows, n), dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
        kernel, merge = _kernels(plan.kernel_name)
        cq, ca, cb, cs, ci = (cupy.from_dlpack(t) for t in (q, a, best, second, idx))
        cbias = ca if bias is None else cupy.from_dlpack(bias)  # never read without BIAS
        kernel(
            (plan.query_blocks, plan.splits),
            (plan.threads,),
            (cq, ca, cbias, np.int32(n), np.int32(k), np.int32(plan.codes_per_split), cb, cs, ci),
        )
        if plan.splits == 1:
            return best[0], second[0], idx[0]
        out_best = torch.empty(n, dtype=torch.float32, device=device)
        out_second = torch.empty_like(out_best)
        out_idx = torch.empty(n, dtype=torch.int32, device=device)
        threads = 256
        merge(
            (-(-n // threads),),
            (threads,),
            (cb, cs, ci, np.int32(n), np.int32(plan.splits))
            + tuple(cupy.from_dlpack(t) for t in (out_best, out_second, out_idx)),
        )
    return out_best, out_second, out_idx


@torch.no_grad()
def search_fused(
    mu: torch.Tensor,
    logvar: torch.Tensor | None,
    codes: torch.Tensor,
    rule: str,
    beta: float,
    scratch_bytes: int,
    *,
    launch: Launch = cupy_launch,
    sm_count: int | None = None,
    queries_per_thread: int | None = None,
) -> torch.Tensor:
    """Index of the best code per query (int64), the same answer as kernels.tiled.search_tiled.

    `launch` runs the kernel (CuPy on CUDA tensors; the CPU tests pass a host emulation of the
    same source); `sm_count` defaults to the device's multiprocessor count.
    """
    n, k = mu.shape[0], codes.shape[0]
    q, a, bias, err = kernel_inputs(mu, logvar, codes, rule, beta)
    if sm_count is None:
        sm_count = torch.cuda.get_device_properties(mu.device).multi_processor_count
    plan = plan_launch(n, k, q.shape[1], bias is not None, sm_count, queries_per_thread=queries_per_thread)
    best, second, idx = launch(plan, q, a, bias)
    return certified_answer(best, second, idx, err, q, mu, logvar, codes, rule, beta, scratch_bytes)
