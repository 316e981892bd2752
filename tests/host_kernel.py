"""kernels/nearest.cu compiled for the CPU (g++ against tests/cuda_host/shim.h) and run as a `launch`
for kernels.fused.search_fused, so the kernel's own source is tested without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from kernels.fused import LaunchPlan

HERE = Path(__file__).parent / "cuda_host"
REPO = Path(__file__).parent.parent


class SanitizerReport(AssertionError):
    """The harness failed: a sanitizer's report, or a crash."""


def compiler() -> str | None:
    return shutil.which("g++")


SANITIZERS = {
    "address": ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"],  # out-of-bounds, UB
    "thread": ["-fsanitize=thread", "-g"],  # data races: a missing __syncthreads shows up here
    None: [],
}


class HostKernel:
    """Compiles one harness per kernel configuration (with a sanitizer) into `workdir` and runs it on
    numpy copies of the inputs. `source` replaces kernels/nearest.cu (to plant a bug in a copy)."""

    def __init__(self, workdir: Path, sanitizer: str | None = "address", source: Path | None = None):
        self.workdir = Path(workdir)
        self.sanitizer = sanitizer
        self.source = source
        self._binaries: dict[tuple, Path] = {}

    def binary(self, plan: LaunchPlan) -> Path:
        key = (plan.m, plan.queries_per_thread, plan.tile_codes, plan.threads, plan.bias, plan.code_unroll)
        if key not in self._binaries:
            out = self.workdir / ("harness_" + "_".join(str(int(v)) for v in key) + f"_{self.sanitizer}")
            flags = list(SANITIZERS[self.sanitizer])
            if self.source is not None:
                flags.append(f'-DGQ_KERNEL_SOURCE="{Path(self.source).resolve()}"')
            defines = [
                f"-DGQ_M={plan.m}",
                f"-DGQ_QPT={plan.queries_per_thread}",
                f"-DGQ_TK={plan.tile_codes}",
                f"-DGQ_THREADS={plan.threads}",
                f"-DGQ_BIAS={int(plan.bias)}",
                f"-DGQ_UNROLL={plan.code_unroll}",
            ]
            cmd = [compiler(), "-std=c++20", "-O1", "-ffp-contract=off", "-pthread", *flags, *defines]
            cmd += [f"-I{HERE}", str(HERE / "harness.cpp"), "-o", str(out)]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            self._binaries[key] = out
        return self._binaries[key]

    def run(self, plan: LaunchPlan, q, a, bias) -> dict[str, np.ndarray]:
        """Per-split and merged outputs as numpy arrays; a sanitizer's report fails the run."""
        q = np.ascontiguousarray(np.asarray(q, dtype=np.float32))
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
        n, k = q.shape[0], a.shape[0]
        assert q.shape[1] == plan.m and a.shape[1] == plan.m
        src = self.workdir / "in.bin"
        dst = self.workdir / "out.bin"
        with open(src, "wb") as f:
            np.array([n, k, plan.codes_per_split, plan.splits], dtype=np.int64).tofile(f)
            q.tofile(f)
            a.tofile(f)
            if plan.bias:
                np.asarray(bias, dtype=np.float32).tofile(f)
        proc = subprocess.run(
            [str(self.binary(plan)), str(src), str(dst)],
            capture_output=True,
            text=True,
            timeout=600,
            env={
                **os.environ,
                "ASAN_OPTIONS": "detect_leaks=0",
                "UBSAN_OPTIONS": "halt_on_error=1",
                "TSAN_OPTIONS": "halt_on_error=1",
            },
        )
        if proc.returncode != 0 or "Sanitizer" in proc.stderr:
            raise SanitizerReport(proc.stderr[-4000:] or f"exit status {proc.returncode}")
        raw = np.fromfile(dst, dtype=np.uint8)
        parts = plan.splits * n
        sizes = [("best", parts, np.float32), ("second", parts, np.float32), ("idx", parts, np.int32)]
        sizes += [
            ("merged_best", n, np.float32),
            ("merged_second", n, np.float32),
            ("merged_idx", n, np.int32),
        ]
        out, offset = {}, 0
        for name, count, dtype in sizes:
            out[name] = raw[offset : offset + 4 * count].view(dtype)
            offset += 4 * count
        assert offset == raw.size
        for name in ("best", "second", "idx"):
            out[name] = out[name].reshape(plan.splits, n)
        src.unlink()
        dst.unlink()
        return out

    def launch(self, plan: LaunchPlan, q: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None):
        """The `launch` contract of kernels.fused.search_fused, on CPU tensors."""
        out = self.run(plan, q.numpy(), a.numpy(), None if bias is None else bias.numpy())
        return (
            torch.from_numpy(out["merged_best"].copy()),
            torch.from_numpy(out["merged_second"].copy()),
            torch.from_numpy(out["merged_idx"].copy()),
        )
