"""CPU nearest-code search: ours against the reference's torch path, a plain chunked GEMM + argmax, and
the arithmetic floor, all measured in one run; then peak extra memory as n grows.

Run: `python benchmarks/quantize.py [--json out.json]` (or `make bench`). Shape of one 256x256 image at
0.25 bpp: n = 1024 queries, K = 2^16, d = 16, posterior rule. The floor is 2 * n * K * 2d FLOPs at the
float32 rate of a 4096^2 matrix product measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.distributions import Normal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gq import GaussianCodebook  # noqa: E402
from gq.synthetic import posteriors_at_rate  # noqa: E402
from kernels import nearest_code  # noqa: E402
from kernels.rules import code_features, query_features  # noqa: E402


def best_of(fn, reps: int) -> tuple[float, float, object]:
    """(best, median) wall seconds over `reps` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2], result


def matmul_gflops(size: int = 4096, reps: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    best, _, _ = best_of(lambda: torch.mm(a, b, out=out), reps)
    return 2 * size**3 / best / 1e9


def reference_torch_path(mu, std, prior, beta=1.0):
    """The reference's torch backend (GaussianQuantRegularizer, eval): n/8 queries at a time, the
    (n/8) x K x d log-probability broadcast, a sum over d, then argmax."""
    ones = torch.ones(1, prior.shape[1], device=prior.device)
    normal_log_prob = Normal(ones * 0, ones).log_prob(prior)
    bs = max(1, mu.shape[0] // 8)
    indices = torch.zeros(mu.shape[0], dtype=torch.long, device=mu.device)
    for i in range(0, mu.shape[0], bs):
        q = Normal(mu[i : i + bs, None, :], std[i : i + bs, None, :])
        log_ratios = q.log_prob(prior[None]) - normal_log_prob[None] * beta
        indices[i : i + bs] = torch.argmax(log_ratios.sum(2), dim=1)
    return indices


def chunked_gemm_argmax(mu, logvar, codes, chunk=128):
    """The plain fast approach: score chunks of queries against the whole codebook, then argmax
    (the same float32 features as ours, but every score is written out and read back)."""
    a = code_features(codes, "posterior")
    out = torch.empty(mu.shape[0], dtype=torch.long)
    for i in range(0, mu.shape[0], chunk):
        q = query_features(mu[i : i + chunk], logvar[i : i + chunk], "posterior", 1.0)
        out[i : i + chunk] = (q @ a.T).argmax(1)
    return out


MEMORY_PROBE = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from gq import GaussianCodebook
from kernels import nearest_code
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
n, k, d = (int(a) for a in sys.argv[2:5])
codes = GaussianCodebook(k, d).vectors
g = torch.Generator().manual_seed(0)
mu = torch.randn(n, d, generator=g) * 0.7
logvar = torch.full((n, d), -1.4)
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
idx = nearest_code(mu, logvar, codes)
print(status("VmHWM") - base, idx.numel())
"""


def peak_extra_bytes(n: int, k: int, d: int) -> int:
    root = str(Path(__file__).resolve().parents[1])
    argv = [sys.executable, "-c", MEMORY_PROBE, root, str(n), str(k), str(d)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=1024, help="n, latent groups (1024 = one 256^2 image)")
    p.add_argument("--codebook-size", type=int, default=65536, help="K")
    p.add_argument("--dim", type=int, default=16, help="d")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions of the fast paths")
    p.add_argument("--reference-reps", type=int, default=2, help="timed repetitions of the reference path")
    p.add_argument("--memory-n", type=int, nargs="*", default=[1024, 16384, 262144], help="n for memory")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    n, k, d = args.queries, args.codebook_size, args.dim
    codes = GaussianCodebook(k, d).vectors
    mu, logvar = posteriors_at_rate(n, d, math.log2(k), torch.Generator().manual_seed(0))
    std = torch.exp(0.5 * logvar)

    gflops = matmul_gflops()
    floor_s = 2 * n * k * 2 * d / (gflops * 1e9)
    ours_best, ours_median, ours = best_of(lambda: nearest_code(mu, logvar, codes), args.reps)
    gemm_best, _, _ = best_of(lambda: chunked_gemm_argmax(mu, logvar, codes), max(3, args.reps // 4))
    ref_best, _, ref = best_of(lambda: reference_torch_path(mu, std, codes), args.reference_reps)

    agree = float((ours == ref).double().mean())
    memory = {m: peak_extra_bytes(m, k, d) for m in args.memory_n}

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "shape": {"n": n, "K": k, "d": d, "rule": "posterior"},
        "matmul_gflops": round(gflops, 1),
        "floor_ms": round(floor_s * 1e3, 2),
        "ours_ms": round(ours_best * 1e3, 2),
        "ours_median_ms": round(ours_median * 1e3, 2),
        "chunked_gemm_argmax_ms": round(gemm_best * 1e3, 2),
        "reference_torch_ms": round(ref_best * 1e3, 1),
        "speedup_vs_reference": round(ref_best / ours_best, 1),
        "speedup_vs_chunked_gemm": round(gemm_best / ours_best, 2),
        "ours_over_floor": round(ours_best / floor_s, 2),
        "agreement_with_reference_path": agree,
        "peak_extra_mib": {str(m): round(b / 2**20, 1) for m, b in memory.items()},
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n| path | ms (best of runs) | vs ours |\n|---|---|---|\n"
        f"| reference torch path | {ref_best * 1e3:.0f} | {ref_best / ours_best:.0f}x slower |\n"
        f"| chunked GEMM + argmax | {gemm_best * 1e3:.1f} | {gemm_best / ours_best:.2f}x slower |\n"
        f"| **ours** (median {ours_median * 1e3:.1f}) | **{ours_best * 1e3:.1f}** | 1 |\n"
        f"| arithmetic floor ({gflops:.0f} GFLOP/s) | {floor_s * 1e3:.1f} "
        f"| ours = {ours_best / floor_s:.2f}x floor |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
