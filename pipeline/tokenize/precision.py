"""The encoder precision of a tokenize job: `auto` is bfloat16 only where the CPU computes bf16 natively.

bfloat16 autocast pays on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX: oneDNN's bf16
convolutions), 1.5x for the whole job on the AVX-512 dev machine (docs/BENCHMARKS.md). Elsewhere oneDNN
and ATen emulate it, and the encoder becomes several times slower than float32 (6.6x measured on a 2-core
AVX2 EPYC: 1,691 vs 256 ms per 256x256 image). `auto` is therefore bfloat16 on a CPU with native bf16
and float32 everywhere else, GPU actors included (pass bfloat16 explicitly for tensor cores). The job
records the resolved precision, never `auto`, so a resume on another machine cannot mix precisions.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHOICES = ("auto", "float32", "bfloat16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names
EMULATED_COST = (
    "the encoder ran 6.6x slower than float32 on a 2-core AVX2 EPYC (1,691 vs 256 ms per 256x256 image; "
    "docs/BENCHMARKS.md)"
)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(flags: set[str] | None = None, capability: str | None = None) -> bool:
    """Whether this CPU runs bf16 natively: ATen dispatches AVX-512 (or better) kernels here, and the CPU
    has AVX512-BF16 or AMX-BF16. ATEN_CPU_CAPABILITY=avx2 (or an older CPU) makes this False."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    if flags is None:
        flags = cpu_flags()
        if not flags:  # no /proc/cpuinfo: ask torch's cpuinfo where this build has it
            probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
            return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def resolve_encoder_precision(
    choice: str, gpu: bool, native: bool | None = None, recorded: str | None = None
) -> tuple[str, str | None]:
    """(precision, warning or None) for `--encoder-precision choice` on CPU (gpu=False) or GPU actors.

    recorded: the precision of the run being resumed (its run record), which `auto` keeps, so that a
    directory started before `auto` existed (float32), or on another CPU, resumes instead of being refused."""
    if choice not in CHOICES:
        raise ValueError(f"encoder precision must be one of {CHOICES}, got {choice!r}")
    if choice == "auto" and recorded in CHOICES[1:]:
        choice = recorded  # and warned below like an explicit choice
    if gpu:
        return ("float32" if choice == "auto" else choice), None
    native = native_bf16() if native is None else native
    if choice == "auto":
        return ("bfloat16" if native else "float32"), None
    if choice == "bfloat16" and not native:
        return choice, (
            "--encoder-precision bfloat16 on a CPU without native bf16 (no AVX512-BF16 or AMX): bf16 is "
            f"emulated there and {EMULATED_COST}; 'auto' or float32 is faster"
        )
    return choice, None
