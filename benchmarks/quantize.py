"""CPU nearest-code search: ours against the reference's torch path, a plain chunked GEMM + argmax, and
the arithmetic floor, all measured in one run; a grid of shapes, rules and ISAs; then peak extra memory.

Run: `python benchmarks/quantize.py [--json out.json]` (or `make bench`). Headline shape, one 256x256
image at 0.25 bpp: n = 1024 queries, K = 2^16, d = 16, posterior rule. The grid: n in {1024, 16384},
both rules, d in {4, 8, 14, 16, 18} (14 and 18: the 256-token presets' groups), `nearest_code` with
the fused kernel (each ISA this CPU runs) and the tiled path, and the share of queries the kernel
cannot certify (they take the float64 finish). The floor is 2 * n * K * m FLOPs (m = 2d posterior,
d + 1 mean: the features of kernels/rules.py) at the float32 rate of a 4096^2 matrix product measured
in the same run (the faster of a measurement before and one after the grid, so the floor is the
stricter one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from kernels.certificate import uncertified  # noqa: E402
from kernels.fused_cpu import ENV, kernel_isa, kernel_scores, supported_isas  # noqa: E402
from kernels.rules import code_features, feature_dim, query_features  # noqa: E402


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


def grid_row(n: int, k: int, d: int, rule: str, gflops: float, isas: list[str], reps: int) -> dict:
    """One shape of the grid: ms of each path, ours over the floor, the uncertified share."""
    codes = GaussianCodebook(k, d).vectors
    mu, logvar = posteriors_at_rate(n, d, math.log2(k), torch.Generator().manual_seed(1))
    lv = logvar if rule == "posterior" else None
    floor_s = 2 * n * k * feature_dim(d, rule) / (gflops * 1e9)
    row: dict = {"n": n, "K": k, "d": d, "rule": rule, "floor_ms": round(floor_s * 1e3, 2)}
    tiled_best, _, tiled = best_of(lambda: nearest_code(mu, lv, codes, rule=rule, backend="tiled"), 3)
    row["tiled_ms"] = round(tiled_best * 1e3, 2)
    for isa in isas:
        os.environ[ENV] = isa
        best, median, ours = best_of(lambda: nearest_code(mu, lv, codes, rule=rule), reps)
        top, second, _, err, _ = kernel_scores(mu, lv, codes, rule, 1.0, isa=isa)
        row[isa] = {
            "ms": round(best * 1e3, 2),
            "median_ms": round(median * 1e3, 2),
            "over_floor": round(best / floor_s, 2),
            "median_over_floor": round(median / floor_s, 2),
            "uncertified_share": round(float(uncertified(top, second, err).double().mean()), 5),
            "agreement_with_tiled": float((ours == tiled).double().mean()),
        }
    os.environ.pop(ENV, None)
    return row


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
    p.add_argument("--grid-n", type=int, nargs="*", default=[1024, 16384], help="n of the grid (none: skip)")
    p.add_argument("--grid-d", type=int, nargs="*", default=[4, 8, 14, 16, 18], help="d of the grid")
    p.add_argument("--grid-reps", type=int, default=10, help="timed repetitions per grid cell at n <= 4096")
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
    isas = supported_isas() if kernel_isa() is not None else []
    grid = [
        grid_row(gn, k, gd, rule, gflops, isas, args.grid_reps if gn <= 4096 else max(3, args.grid_reps // 3))
        for gn in args.grid_n
        for rule in ("posterior", "mean")
        for gd in args.grid_d
    ]
    gflops_after = matmul_gflops() if grid else gflops
    floor_s *= gflops / max(gflops, gflops_after)  # the headline floor too: the faster measurement
    for row in grid:  # the stricter floor: the faster of the two matmul measurements
        scale = gflops / max(gflops, gflops_after)
        row["floor_ms"] = round(row["floor_ms"] * scale, 2)
        for isa in isas:
            row[isa]["over_floor"] = round(row[isa]["over_floor"] / scale, 2)
            row[isa]["median_over_floor"] = round(row[isa]["median_over_floor"] / scale, 2)
    memory = {m: peak_extra_bytes(m, k, d) for m in args.memory_n}

    result = {
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads, ISA {kernel_isa() or 'none (tiled)'}",
        "torch": torch.__version__,
        "shape": {"n": n, "K": k, "d": d, "rule": "posterior"},
        "matmul_gflops": round(gflops, 1),
        "matmul_gflops_after_grid": round(gflops_after, 1),
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
        "grid": grid,
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n| path | ms (best of runs) | vs ours |\n|---|---|---|\n"
        f"| reference torch path | {ref_best * 1e3:.0f} | {ref_best / ours_best:.0f}x slower |\n"
        f"| chunked GEMM + argmax | {gemm_best * 1e3:.1f} | {gemm_best / ours_best:.2f}x slower |\n"
        f"| **ours** (median {ours_median * 1e3:.1f}) | **{ours_best * 1e3:.1f}** | 1 |\n"
        f"| arithmetic floor ({max(gflops, gflops_after):.0f} GFLOP/s) | {floor_s * 1e3:.1f} "
        f"| ours = {ours_best / floor_s:.2f}x floor |"
    )
    if grid:
        print("\n| n | rule | d | floor ms | " + " | ".join(f"{i} ms (median) | {i} / floor" for i in isas))
        for r in grid:
            cells = " | ".join(
                f"{r[i]['ms']} ({r[i]['median_ms']}) | {r[i]['over_floor']} ({r[i]['median_over_floor']})"
                for i in isas
            )
            print(f"| {r['n']} | {r['rule']} | {r['d']} | {r['floor_ms']} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def cpu_model() -> str:
    """The CPU's model name and its vector ISA flags, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({' '.join(isa) or 'no AVX2'})"


if __name__ == "__main__":
    sys.exit(main())
