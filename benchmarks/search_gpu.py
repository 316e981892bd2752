"""GPU nearest-code search: the fused kernel against the reference's dense approach, torch chunked
matmul + argmax, and the float32 FMA floor, all in one run on one device; then peak extra memory.

Run on a CUDA machine: `python benchmarks/search_gpu.py [--json out.json]`. Shape of a batch of 256
images of 256x256 at 0.25 bpp: n = 262,144 queries, K = 2^16, d = 16, both rules. The FMA floor is
n * K * m FMAs (m = 2d for the posterior rule, d for the mean rule) at the float32 FMA rate measured
here by a kernel of independent FMA chains. `--smoke` runs every path at a tiny size on the CPU
(the tiled path standing in for the kernel) so the script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize import reference_torch_path  # noqa: E402  (the reference's dense path, device-aware)

from gq import GaussianCodebook  # noqa: E402
from gq.synthetic import posteriors_at_rate  # noqa: E402
from kernels import nearest_code  # noqa: E402
from kernels.fused import kernel_inputs, plan_launch  # noqa: E402
from kernels.rules import code_features, query_features  # noqa: E402

FMA_PEAK_SOURCE = r"""
extern "C" __global__ void fma_peak(float* out, int iters, float a, float b) {
    float x[8];
    for (int j = 0; j < 8; ++j) x[j] = threadIdx.x * 1e-3f + j;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) x[j] = fmaf(x[j], a, b);
    }
    float s = 0.f;
    for (int j = 0; j < 8; ++j) s += x[j];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""


def timed(fn, reps: int, device: torch.device) -> tuple[float, float, object]:
    """(median, best) milliseconds over `reps` calls after one warm-up, and the last result.
    CUDA events on a GPU, the host clock on the CPU."""
    result = fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times), result


def fma_rate(device: torch.device) -> tuple[float, str]:
    """Measured float32 FMAs per second, and how it was measured."""
    if device.type != "cuda":
        return float("nan"), "not measured (CPU smoke run)"
    import cupy

    kernel = cupy.RawModule(code=FMA_PEAK_SOURCE).get_function("fma_peak")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks, threads, iters = sms * 16, 256, 1 << 14
    out = torch.empty(blocks * threads, device=device)
    stream = torch.cuda.current_stream(device)

    def run():
        with cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
            kernel(
                (blocks,),
                (threads,),
                (cupy.from_dlpack(out), cupy.int32(iters), cupy.float32(0.999), cupy.float32(1e-3)),
            )

    median, best, _ = timed(run, 10, device)
    fmas = blocks * threads * iters * 8
    return fmas / (best / 1e3), f"{blocks} blocks x {threads} threads x 8 chains x {iters} FMAs, best of 10"


def reference_dense_mean(mu, prior):
    """The dense approach for the mean rule: the whole n x K distance matrix, then argmin."""
    return torch.cdist(mu, prior).argmin(1)


def chunked_argmax(mu, logvar, codes, rule, chunk=16384):
    """torch chunked matmul + argmax in float32 (the same features as ours; every score written)."""
    a = code_features(codes, rule)
    out = torch.empty(mu.shape[0], dtype=torch.long, device=mu.device)
    for i in range(0, mu.shape[0], chunk):
        lv = None if logvar is None else logvar[i : i + chunk]
        q = query_features(mu[i : i + chunk], lv, rule, 1.0)
        out[i : i + chunk] = (q @ a.T).argmax(1)
    return out


def dense_size(n: int, k: int, d: int, device: torch.device, smoke: bool) -> int:
    """Largest power-of-two n' <= n whose (n'/8) x K x d float32 broadcast (about 4 alive at once)
    fits in half the free memory."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 2**30
    n_dense = n
    while n_dense > 8 and (n_dense // 8) * k * d * 4 * 4 > free // 2:
        n_dense //= 2
    return n_dense if not smoke else min(n_dense, n)


def peak_extra_mib(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_rule(rule, mu, logvar, codes, args, device, rate) -> dict:
    n, d = mu.shape
    k = codes.shape[0]
    lv = logvar if rule == "posterior" else None
    backend = "tiled" if args.smoke else "fused"
    m = 2 * d if rule == "posterior" else d
    floor_ms = n * k * m / rate * 1e3
    ours_ms, ours_best, ours = timed(
        lambda: nearest_code(mu, lv, codes, rule=rule, backend=backend), args.reps, device
    )
    row = {"rule": rule, "floor_ms": floor_ms, "ours_ms": ours_ms, "ours_best_ms": ours_best}

    q, a, bias, err = kernel_inputs(mu, lv, codes, rule, 1.0)
    if device.type == "cuda":
        from kernels.fused import cupy_launch

        sms = torch.cuda.get_device_properties(device).multi_processor_count
        default = plan_launch(n, k, q.shape[1], bias is not None, sms)
        best, second, idx = cupy_launch(default, q, a, bias)
        sweep, same = {}, True
        for threads in (64, 128, 256):
            for qpt in (1, 2, 4, 8):
                for unroll in (1, 2):
                    if qpt * q.shape[1] > 256:
                        continue
                    plan = plan_launch(
                        n, k, q.shape[1], bias is not None, sms, queries_per_thread=qpt, threads=threads,
                        code_unroll=unroll,
                    )  # fmt: skip
                    ms, _, out = timed(lambda plan=plan: cupy_launch(plan, q, a, bias), args.reps, device)
                    sweep[f"threads={threads} qpt={qpt} unroll={unroll}"] = ms
                    # every configuration does the same float32 operations per (query, code): same bits
                    same &= all(torch.equal(x, y) for x, y in zip(out, (best, second, idx), strict=True))
        row["kernel_only_ms"] = sweep[f"threads={default.threads} qpt={default.queries_per_thread} unroll=1"]
        row["kernel_sweep_ms"] = sweep
        row["kernel_sweep_best"] = min(sweep, key=sweep.get)
        row["kernel_sweep_bit_identical"] = same
        row["plan"] = default.kernel_name + f" grid=({default.query_blocks}, {default.splits})"
        row["uncertified_rows"] = int((best.double() - second.double() <= 2 * err).sum())
    chunk_ms, _, chunked = timed(lambda: chunked_argmax(mu, lv, codes, rule), max(3, args.reps // 4), device)
    row["chunked_matmul_argmax_ms"] = chunk_ms

    n_dense = dense_size(n, k, d, device, args.smoke)
    if rule == "posterior":
        std = torch.exp(0.5 * logvar[:n_dense])
        dense_ms, _, dense = timed(lambda: reference_torch_path(mu[:n_dense], std, codes), 2, device)
    else:
        dense_ms, _, dense = timed(lambda: reference_dense_mean(mu[:n_dense], codes), 2, device)
    row["dense_n"] = n_dense
    row["dense_ms_measured"] = dense_ms
    row["dense_ms_scaled"] = dense_ms * n / n_dense

    row["exact_tiled_agreement"] = float(
        (ours == nearest_code(mu, lv, codes, rule=rule, backend="tiled")).double().mean()
    )
    row["chunked_agreement"] = float((ours == chunked).double().mean())
    row["dense_agreement"] = float((ours[:n_dense] == dense).double().mean())
    row["speedup_vs_dense"] = row["dense_ms_scaled"] / ours_ms
    row["speedup_vs_chunked"] = chunk_ms / ours_ms
    row["ours_over_floor"] = ours_ms / floor_ms
    row["peak_extra_mib"] = {
        str(size): peak_extra_mib(
            lambda size=size: nearest_code(
                mu[:size], None if lv is None else lv[:size], codes, rule=rule, backend=backend
            ),
            device,
        )
        for size in args.memory_n
        if size <= n
    }
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=262_144, help="n (262,144 = 256 images at 0.25 bpp)")
    p.add_argument("--codebook-size", type=int, default=65_536, help="K")
    p.add_argument("--dim", type=int, default=16, help="d")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions of the fast paths")
    p.add_argument("--memory-n", type=int, nargs="*", default=[16_384, 65_536, 262_144])
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU: tests the script, measures nothing"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.queries, args.codebook_size, args.dim, args.reps, args.memory_n = 2048, 4096, 8, 2, [512, 2048]
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        p.error("needs a CUDA GPU (or --smoke)")

    n, k, d = args.queries, args.codebook_size, args.dim
    codes = GaussianCodebook(k, d).vectors.to(device)
    mu, logvar = posteriors_at_rate(n, d, math.log2(k), torch.Generator().manual_seed(0))
    mu, logvar = mu.to(device), logvar.to(device)
    rate, how = fma_rate(device)
    if args.smoke:
        rate = 1e9  # a stand-in so the ratios are numbers; nothing is measured in a smoke run
    rows = [run_rule(rule, mu, logvar, codes, args, device, rate) for rule in ("posterior", "mean")]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "shape": {"n": n, "K": k, "d": d},
        "fma_per_s": rate,
        "fma_rate_measured_by": how,
        "rules": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\n{result['device']}, n={n}, K={k}, d={d}, FMA rate {rate / 1e12:.1f} T/s ({how})")
    print(
        "| rule | ours ms | kernel only | chunked matmul+argmax | dense (scaled from n') "
        "| FMA floor | ours/floor | vs dense | vs chunked |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['rule']} | {r['ours_ms']:.2f} | {r.get('kernel_only_ms', float('nan')):.2f} | "
            f"{r['chunked_matmul_argmax_ms']:.2f} | {r['dense_ms_scaled']:.0f} (n'={r['dense_n']}) | "
            f"{r['floor_ms']:.2f} | {r['ours_over_floor']:.2f}x | {r['speedup_vs_dense']:.0f}x | "
            f"{r['speedup_vs_chunked']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
