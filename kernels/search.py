"""The one nearest-code search function: validates, then runs the implementation for the tensors' device."""

from __future__ import annotations

import functools
import warnings

import torch

from kernels.fused_cpu import kernel_isa, search_fused_cpu
from kernels.rules import check_rule
from kernels.tiled import search_tiled

DEFAULT_SCRATCH_BYTES = 64 * 2**20
BACKENDS = ("auto", "fused", "tiled")


@functools.cache
def fused_available() -> bool:
    """Whether CuPy imports here (the fused kernel's runtime); the kernel itself needs a CUDA device."""
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CuPy built for a CUDA this machine lacks
        return False
    return True


def nearest_code(
    mu: torch.Tensor,
    logvar: torch.Tensor | None,
    codes: torch.Tensor,
    *,
    rule: str = "posterior",
    beta: float = 1.0,
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
    backend: str = "auto",
) -> torch.Tensor:
    """Index of the best code for each query row, int64 of shape (n,).

    mu, logvar: (n, d) float tensors (logvar is unused by rule="mean" and may be None);
    codes: (K, d) float32. rule="posterior" maximises sum_i -(c_i - mu_i)^2 / sigma_i^2 + beta * c_i^2,
    rule="mean" minimises ||c - mu||^2. Ties go to the lowest index. Scratch memory stays within
    `scratch_bytes` whatever n is.

    backend: "fused" runs the fused kernel of the tensors' device (CuPy on CUDA, the C++ kernel of
    kernels/fused_cpu.py on the CPU), "tiled" the plain-torch path (any device), "auto" the fused
    kernel where it is available (CuPy imports; the C++ kernel built, not switched off by
    GQ_CPU_KERNEL=off) and the tiled path otherwise. All give the same answer: the float64 argmax of
    the rule.
    """
    check_rule(rule)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
    if not mu.is_cuda and backend != "tiled":
        return _search_cpu(mu, logvar, codes, rule, beta, scratch_bytes, backend)
    if backend == "auto":
        backend = "fused" if fused_available() else "tiled"
        if backend == "tiled":
            warnings.warn(
                "CuPy does not import, so CUDA searches run the slower plain-torch path; "
                "install the gpu extra (cupy-cuda12x or cupy-cuda13x) for the fused kernel",
                stacklevel=2,
            )
    if backend == "fused":
        from kernels.fused import search_fused

        return search_fused(mu, logvar, codes, rule, beta, scratch_bytes)
    return search_tiled(mu, logvar, codes, rule, beta, scratch_bytes)


def _search_cpu(mu, logvar, codes, rule, beta, scratch_bytes, backend):
    """The C++ kernel on CPU tensors ("auto": where it runs here, else the tiled path)."""
    if mu.device.type != "cpu":
        if backend == "fused":
            raise ValueError(f"backend='fused' needs CUDA or CPU tensors, got {mu.device}")
        return search_tiled(mu, logvar, codes, rule, beta, scratch_bytes)
    isa = kernel_isa()
    if isa is None:
        if backend == "fused":
            raise ValueError("backend='fused' on CPU tensors: the C++ kernel is not available here")
        return search_tiled(mu, logvar, codes, rule, beta, scratch_bytes)
    return search_fused_cpu(mu, logvar, codes, rule, beta, scratch_bytes, isa=isa)
