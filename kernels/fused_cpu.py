"""Nearest-code search on CPU tensors with the fused C++ kernel (kernels/nearest_cpu.cpp), finished exactly.

The kernel streams the codebook through cache-sized tiles and keeps, per query, only the float32 best
score, its index and the second-best score (kernels/nearest_cpu_simd.h says how), vectorised for AVX-512
or AVX2 + FMA (chosen at run time) on `torch.get_num_threads()` threads; kernels/certificate.py turns
that into the float64 argmax (the rows it cannot certify go through kernels.tiled).

The extension is compiled on first use by torch.utils.cpp_extension (g++ and ninja) into torch's
extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), under a name that carries
the sources' hash, so an edited kernel is rebuilt and a cached one loads in well under a second. Where
it cannot build (no compiler, not x86-64), `kernel()` returns None and nearest_code keeps the tiled path.
GQ_CPU_KERNEL=avx512|avx2 forces an ISA (the AVX2 build runs on an AVX-512 machine too), =off the tiled path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sysconfig
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from kernels.certificate import certified_answer, core_features, query_inputs
from kernels.tiled import BLOCK

SOURCES = (Path(__file__).with_name("nearest_cpu.cpp"), Path(__file__).with_name("nearest_cpu_simd.h"))
ENV = "GQ_CPU_KERNEL"
CHOICES = ("auto", "avx512", "avx2", "off")
TILE_BYTES = 64 * 2**10  # packed code features per tile: L2-resident, streamed by every row block
CHUNK_ROWS = 16384  # rows searched at once: ~2.4 KiB each of features, bound and per-thread lane state
# torch's build lock is a bare file that every load takes for a moment (to run ninja); a process killed
# while holding it (a Ray actor, a test's SIGKILL) leaves it, and each later load would wait on it forever.
STALE_LOCK_S = 300.0  # a build takes 1-3 min on 2 busy cores; an older lock has no live owner
# -fopenmp: at::parallel_for runs on torch's own OpenMP threads (libgomp.so.1, the one torch loaded)
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]


def _source_hash() -> str:
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(torch.__version__.encode())  # the build directory is per Python, not per torch: its ABI
    return h.hexdigest()[:16]


@functools.cache
def _build() -> ModuleType | None:
    """The compiled extension, or None (with one warning) where it cannot be built here."""
    if (
        shutil.which("ninja") is None
    ):  # the pip-installed ninja sits beside this interpreter, maybe not on PATH
        os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        name = f"gq_nearest_cpu_{_source_hash()}"
        directory = _get_build_directory(name, verbose=False)
        built = _import_built(name, directory)
        if built is not None:
            return built
        clear_stale_lock(os.path.join(directory, "lock"))
        return load(
            name=name,
            sources=[str(SOURCES[0])],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(SOURCES[0].parent)],
            verbose=False,
        )
    except Exception as e:  # no compiler or ninja, an unsupported platform, a failed build
        warnings.warn(
            f"the fused CPU search kernel could not be built ({type(e).__name__}: {str(e)[:300]}); "
            "CPU searches use the slower tiled path",
            stacklevel=3,
        )
        return None


def _import_built(name: str, directory: str) -> ModuleType | None:
    """The extension already built for these sources, flags and torch, imported without torch's `load`:
    that takes the build directory's lock and runs ninja on every first use in a process, so a process
    killed meanwhile (an actor, a preempted job) leaves a lock that stalls the next one, and a checkout at
    another path would rebuild it. None when it is not built yet or does not import (a cut build)."""
    from torch.utils.cpp_extension import LIB_EXT, _import_module_from_library

    path = os.path.join(directory, f"{name}{LIB_EXT}")
    if not os.path.exists(path):
        return None
    try:
        return _import_module_from_library(name, directory, True)
    except ImportError:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # let `load` build it again
        return None


def clear_stale_lock(lock: str, stale_s: float = STALE_LOCK_S) -> None:
    """Wait while a live build holds `lock`; remove it once it is older than `stale_s` (its owner died)."""
    while True:
        try:
            age = time.time() - os.path.getmtime(lock)
        except FileNotFoundError:
            return
        if age > stale_s:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
            warnings.warn(f"removed a stale build lock {lock} ({age:.0f} s old)", stacklevel=2)
            return
        time.sleep(0.5)


def supported_isas() -> list[str]:
    """The ISAs the kernel runs on this CPU, best first (none where it did not build)."""
    module = _build()
    return module.supported_isas() if module is not None else []


def kernel_isa(choice: str | None = None) -> str | None:
    """The ISA the CPU kernel runs with ("avx512" or "avx2"), or None where the tiled path runs instead:
    `choice` (default: $GQ_CPU_KERNEL, else "auto") is off, the kernel did not build, or the CPU lacks it."""
    choice = (choice if choice is not None else os.environ.get(ENV, "auto")).lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {CHOICES}, got {choice!r}")
    if choice == "off":
        return None
    supported = supported_isas()
    if choice == "auto":
        return supported[0] if supported else None
    if choice not in supported:
        raise ValueError(f"{ENV}={choice}: this CPU or build cannot run it (it runs {supported})")
    return choice


@torch.no_grad()
def search_fused_cpu(
    mu: torch.Tensor,
    logvar: torch.Tensor | None,
    codes: torch.Tensor,
    rule: str,
    beta: float,
    scratch_bytes: int,
    *,
    isa: str,
    threads: int | None = None,
) -> torch.Tensor:
    """Index of the best code per query (int64), the same answer as kernels.tiled.search_tiled.

    Rows go CHUNK_ROWS at a time, so the features, bounds and kernel state in memory stay bounded
    whatever n is (only the int64 answer grows with n)."""
    codes = codes.float().contiguous()
    maxima = functools.partial(kernel_run_maxima, isa=isa, threads=threads)
    out = torch.empty(mu.shape[0], dtype=torch.int64)
    for i0 in range(0, mu.shape[0], CHUNK_ROWS):
        m, lv = mu[i0 : i0 + CHUNK_ROWS], None if logvar is None else logvar[i0 : i0 + CHUNK_ROWS]
        best, second, idx, err, q = kernel_scores(m, lv, codes, rule, beta, isa=isa, threads=threads)
        out[i0 : i0 + m.shape[0]] = certified_answer(
            best, second, idx, err, q, m, lv, codes, rule, beta, scratch_bytes, maxima
        )
    return out


def kernel_run_maxima(
    q32: torch.Tensor, codes: torch.Tensor, rule: str, *, isa: str, threads: int | None = None
) -> torch.Tensor:
    """kernels.tiled's float32 run maxima from this kernel: the exact path's candidate runs of the rows
    the kernel could not certify, without the tiled GEMMs' fixed cost per call. q32 has the features of
    kernels.rules (the mean rule's constant -1/2 last: the kernel folds it into its per-code bias)."""
    q = q32[:, : core_features(codes.shape[1], rule)].contiguous()
    return _build().run_maxima(
        q,
        codes.float().contiguous(),
        rule == "posterior",
        threads or torch.get_num_threads(),
        isa,
        BLOCK,
        TILE_BYTES,
    )


def kernel_scores(
    mu: torch.Tensor,
    logvar: torch.Tensor | None,
    codes: torch.Tensor,
    rule: str,
    beta: float,
    *,
    isa: str,
    threads: int | None = None,
    tile_bytes: int = TILE_BYTES,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, ...]:
    """(best, second float32, idx int64, err float64, q float32): the kernel's uncertified answer."""
    codes32 = codes.float().contiguous()
    q, err = query_inputs(mu, logvar, codes32, rule, beta, core_features(mu.shape[1], rule))
    module = _build()
    best, second, idx = module.search(
        q, codes32, rule == "posterior", threads or torch.get_num_threads(), isa, tile_bytes, chunk_rows
    )
    return best, second, idx, err, q
