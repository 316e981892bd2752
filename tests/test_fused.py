"""The fused search kernel (kernels/nearest.cu + kernels/fused.py).

Without a GPU the kernel's own source runs on the CPU through a host emulation (tests/cuda_host/,
g++ with AddressSanitizer, one std::thread per CUDA thread, a std::barrier per __syncthreads), and
nvcc, where installed, compiles it for sm_90 to check registers and spills. The tests marked `gpu`
run the real CuPy launch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from host_kernel import HostKernel, SanitizerReport, compiler
from test_search import check_against_reference, random_queries

from gq import GaussianCodebook
from kernels import DEFAULT_SCRATCH_BYTES, nearest_code
from kernels.fused import (
    SOURCE_PATH,
    LaunchPlan,
    kernel_inputs,
    padded_features,
    plan_launch,
    search_fused,
)
from kernels.reference import reference_search
from kernels.tiled import search_tiled

needs_gxx = pytest.mark.skipif(compiler() is None, reason="needs g++ for the host emulation")
SCRATCH = 64 * 2**20


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> HostKernel:
    return HostKernel(tmp_path_factory.mktemp("cuda_host"))


def float64_scores(q: np.ndarray, a: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    s = q.astype(np.float64) @ a.astype(np.float64).T
    return s if bias is None else s + bias.astype(np.float64)[None]


# ---------------------------------------------------------------- launch plans (pure)


@pytest.mark.parametrize("rule", ["posterior", "mean"])
def test_plans_cover_every_supported_shape(rule):
    for d in range(1, 65):
        m, bias = padded_features(d, rule)
        core = 2 * d if rule == "posterior" else d
        assert m % 4 == 0 and core <= m < core + 4 and bias == (rule == "mean")
        for log2k in (8, 10, 13, 16, 20):
            k = 2**log2k - (d % 3)  # also K that is no multiple of the tile
            for n in (1, 1000, 262_144):
                p = plan_launch(n, k, m, bias, sm_count=132)
                assert p.queries_per_thread * m <= 128 or p.queries_per_thread == 1
                assert p.tile_codes * m * 4 <= 16384  # static shared memory, well under 48 KiB
                assert p.codes_per_split % p.tile_codes == 0
                assert (p.splits - 1) * p.codes_per_split < k <= p.splits * p.codes_per_split
                assert p.query_blocks * p.threads * p.queries_per_thread >= n
                assert p.query_blocks < 2**31 and p.splits <= 65535
                # per-split scratch is O(n): at most n plus what fills the GPU
                assert p.scratch_rows * n <= n + 8 * 132 * p.threads * p.queries_per_thread * 2


def test_plan_rejects_bad_sizes():
    with pytest.raises(ValueError):
        plan_launch(10, 10, 6, False, 1)
    with pytest.raises(ValueError):
        plan_launch(0, 10, 8, False, 1)


# ---------------------------------------------------------------- the kernel source, on the CPU


@needs_gxx
@pytest.mark.parametrize(
    ("n", "k", "m", "bias", "sm"),
    [
        (1, 1, 4, False, 1),
        (700, 333, 8, True, 1),
        (1500, 2500, 32, False, 8),
        (300, 1100, 128, False, 16),
        (500, 1200, 28, False, 4),
        (400, 900, 36, False, 4),
    ],  # m of the d = 14 and d = 18 posterior
)
def test_kernel_finds_best_and_second_of_every_split(host, n, k, m, bias, sm):
    g = np.random.default_rng(n + k + m)
    q = g.standard_normal((n, m)).astype(np.float32)
    a = g.standard_normal((k, m)).astype(np.float32)
    b = g.standard_normal(k).astype(np.float32) if bias else None
    plan = plan_launch(n, k, m, bias, sm_count=sm)
    out = host.run(plan, q, a, b)
    s = float64_scores(q, a, b)
    tol = 1e-5 * (np.abs(q) @ np.abs(a).max(0) + (np.abs(b).max() if bias else 0))
    for p in range(plan.splits):
        lo, hi = p * plan.codes_per_split, min(k, (p + 1) * plan.codes_per_split)
        part = s[:, lo:hi]
        top2 = np.sort(part, axis=1)[:, ::-1]
        idx = out["idx"][p]
        assert ((idx >= lo) & (idx < hi)).all()
        np.testing.assert_array_less(np.abs(out["best"][p] - top2[:, 0]), tol)
        np.testing.assert_array_less(np.abs(part[np.arange(n), idx - lo] - top2[:, 0]), 2 * tol)
        if hi - lo > 1:
            np.testing.assert_array_less(np.abs(out["second"][p] - top2[:, 1]), tol)
        else:
            assert np.isneginf(out["second"][p]).all()
    # merged: the overall best, and the float64 argmax wherever the float64 gap is clear
    top2 = np.sort(s, axis=1)[:, ::-1]
    np.testing.assert_array_less(np.abs(out["merged_best"] - top2[:, 0]), tol)
    if k > 1:
        np.testing.assert_array_less(np.abs(out["merged_second"] - top2[:, 1]), tol)
    clear = top2[:, 0] - (top2[:, 1] if k > 1 else -np.inf) > 4 * tol
    assert clear.mean() > 0.9
    assert (out["merged_idx"][clear] == s.argmax(1)[clear]).all()


@needs_gxx
def test_kernel_ties_go_to_the_lowest_index(host):
    """Equal codes inside a tile, across tiles and across splits: the lowest index wins and the
    second-best equals the best (so the caller never certifies a tie)."""
    m, k, n = 8, 2048, 300
    g = np.random.default_rng(5)
    a = g.standard_normal((k, m)).astype(np.float32) * 0.1
    q = g.standard_normal((n, m)).astype(np.float32)
    winner = np.abs(g.standard_normal(m)).astype(np.float32) * 10
    q[:] = winner  # every query points at `winner`
    for places in ([5, 6], [100, 1900], [1023, 1024], [1500, 3, 700]):
        aa = a.copy()
        aa[places] = winner
        plan = plan_launch(n, k, m, False, sm_count=4)
        assert plan.splits > 1
        out = host.run(plan, q, aa, None)
        assert (out["merged_idx"] == min(places)).all()
        assert (out["merged_second"] == out["merged_best"]).all()


@needs_gxx
def test_kernel_is_deterministic(host):
    g = np.random.default_rng(9)
    q = g.standard_normal((900, 32)).astype(np.float32)
    a = g.standard_normal((3000, 32)).astype(np.float32)
    plan = plan_launch(900, 3000, 32, False, sm_count=8)
    first, second = host.run(plan, q, a, None), host.run(plan, q, a, None)
    for name in first:
        assert first[name].tobytes() == second[name].tobytes(), name


@needs_gxx
def test_every_launch_configuration_gives_the_same_bits(host):
    """Threads per block, queries per thread and K splits change the schedule, not the float32
    operations per (query, code): best, second-best and index are bitwise equal."""
    g = np.random.default_rng(4)
    n, k, m = 700, 3000, 32
    q, a = g.standard_normal((n, m)).astype(np.float32), g.standard_normal((k, m)).astype(np.float32)
    outs = []
    for threads, qpt, sm, unroll in ((128, None, 8, 1), (64, 1, 1, 2), (256, 2, 1, 4)):
        plan = plan_launch(n, k, m, False, sm, queries_per_thread=qpt, threads=threads, code_unroll=unroll)
        outs.append((plan.splits, host.run(plan, q, a, None)))
    assert len({splits for splits, _ in outs}) == 3
    first = outs[0][1]
    for _, out in outs[1:]:
        for name in ("merged_best", "merged_second", "merged_idx"):
            assert out[name].tobytes() == first[name].tobytes(), name


# ---------------------------------------------------------------- the whole fused search, on the CPU


@needs_gxx
@pytest.mark.parametrize(
    ("d", "k", "n", "rule"),
    [
        (16, 4096, 2000, "posterior"),
        (16, 4096, 2000, "mean"),
        (1, 300, 500, "posterior"),
        (64, 1000, 150, "posterior"),
        (5, 777, 600, "mean"),
        (8, 256, 1, "posterior"),
    ],
)
def test_fused_search_gives_the_cpu_answer(host, d, k, n, rule):
    codes = GaussianCodebook(k, d).vectors
    mu, lv = random_queries(n, d, seed=d * 7 + n, bits=float(np.log2(k)))
    lv = lv if rule == "posterior" else None
    ours = search_fused(mu, lv, codes, rule, 1.0, SCRATCH, launch=host.launch, sm_count=8)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, search_tiled(mu, lv, codes, rule, 1.0, SCRATCH))
    ref, _ = reference_search(mu, lv, codes, rule=rule)
    assert (ours != ref).sum() <= 1e-4 * n


@needs_gxx
def test_fused_search_resolves_duplicated_codes_to_the_lower_index(host):
    base = GaussianCodebook(512, 4).vectors
    codes = torch.cat([base, base])  # every code twice: indices i and i + 512
    mu, lv = random_queries(700, 4, seed=3, bits=9.0)
    for rule, lvr in (("posterior", lv), ("mean", None)):
        ours = search_fused(mu, lvr, codes, rule, 1.0, SCRATCH, launch=host.launch, sm_count=4)
        assert (ours < 512).all()
        assert torch.equal(ours, search_tiled(mu, lvr, base, rule, 1.0, SCRATCH))


@needs_gxx
def test_fused_search_at_the_logvar_clamp(host):
    """Precisions from e^-20 to e^30 (the quantizer's logvar clamp) make scores of very different sizes
    inside one query: still finite, and still the CPU path's answer."""
    codes = GaussianCodebook(2048, 8).vectors
    g = torch.Generator().manual_seed(8)
    mu = torch.randn(600, 8, generator=g) * 3
    logvar = torch.full((600, 8), 20.0)
    logvar[:200] = -30.0
    logvar[200:400] = torch.where(torch.rand(200, 8, generator=g) < 0.5, -30.0, 20.0)
    ours = search_fused(mu, logvar, codes, "posterior", 1.0, SCRATCH, launch=host.launch, sm_count=4)
    assert torch.equal(ours, search_tiled(mu, logvar, codes, "posterior", 1.0, SCRATCH))


@needs_gxx
def test_fused_search_rejects_non_finite_queries(host):
    codes = GaussianCodebook(256, 4).vectors
    mu = torch.zeros(10, 4)
    mu[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        search_fused(mu, None, codes, "mean", 1.0, SCRATCH, launch=host.launch, sm_count=1)


@pytest.mark.parametrize("rule", ["posterior", "mean"])
@pytest.mark.parametrize("scratch", [SCRATCH, 40_000])  # the small one forces many row and code chunks
def test_the_recheck_of_uncertified_rows_is_the_float64_argmax(rule, scratch):
    # search_fused hands the rows it cannot certify to search_tiled: duplicated codes are such rows
    base = GaussianCodebook(3000, 8).vectors
    codes = torch.cat([base, base[:1000]])  # duplicates of the first 1000 codes after them
    mu, lv = random_queries(300, 8, seed=11, bits=11.0)
    lv = lv if rule == "posterior" else None
    ours = search_tiled(mu, lv, codes, rule, 1.0, scratch)
    ref, _ = reference_search(mu, lv, codes, rule=rule)
    assert torch.equal(ours, ref)
    assert (ours < 3000).all()


def test_kernel_inputs_keep_the_rule_and_the_bound():
    codes = GaussianCodebook(1024, 6).vectors
    mu, lv = random_queries(200, 6, seed=2, bits=10.0)
    for rule, lvr in (("posterior", lv), ("mean", None)):
        q, a, bias, err = kernel_inputs(mu, lvr, codes, rule, 1.0)
        assert q.shape == (200, 12 if rule == "posterior" else 8) and a.shape == (1024, q.shape[1])
        s = q.double() @ a.double().T + (0 if bias is None else bias.double()[None])
        # the float32 features give the same argmax as the float64 reference and stay within err
        ref, ref_score = reference_search(mu, lvr, codes, rule=rule)
        assert (s.argmax(1) == ref).float().mean() > 0.99
        assert (err > 0).all() and torch.isfinite(err).all()


# ---------------------------------------------------------------- compiled for the GPU by nvcc


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_every_planned_kernel_compiles_for_hopper_without_spills(tmp_path):
    names = set()
    for d in (1, 4, 8, 14, 16, 18, 32, 64):
        for rule in ("posterior", "mean"):
            m, bias = padded_features(d, rule)
            names.add(plan_launch(262_144, 2**16, m, bias, sm_count=132).kernel_name)
    args = "const float*, const float*, const float*, int, int, int, float*, float*, int*"
    src = tmp_path / "inst.cu"
    src.write_text(
        f'#include "{SOURCE_PATH}"\n'
        + "".join(f"template __global__ void {n}({args});\n" for n in sorted(names))
    )
    proc = subprocess.run(
        [
            "nvcc",
            "-std=c++17",
            "-arch=sm_90",
            "-cubin",
            "-Xptxas",
            "-v",
            "-o",
            str(tmp_path / "k.cubin"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert log.count("Compiling entry function") == len(names) + 1  # + gq_merge
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"] * (len(names) + 1)
    assert max(int(r) for r in re.findall(r"Used (\d+) registers", log)) <= 255


# ---------------------------------------------------------------- the real kernel (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [4, 8, 14, 16, 18])
@pytest.mark.parametrize("log2k", [10, 16, 20])
@pytest.mark.parametrize("rule", ["posterior", "mean"])
def test_gpu_kernel_matches_float64_reference(d, log2k, rule):
    n = 10_000 if log2k == 20 else 20_000
    codes = GaussianCodebook(2**log2k, d).vectors
    mu, lv = random_queries(n, d, seed=d + log2k, bits=float(log2k))
    lv = lv if rule == "posterior" else None
    cuda = [None if t is None else t.cuda() for t in (mu, lv, codes)]
    ours = check_against_reference(*cuda, rule, backend="fused")
    assert ours.is_cuda


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["posterior", "mean"])
def test_gpu_kernel_is_bit_identical_over_runs_and_ties_go_low(rule):
    base = GaussianCodebook(2**15, 16).vectors.cuda()
    codes = torch.cat([base, base])
    mu, lv = random_queries(50_000, 16, seed=1, bits=15.0)
    mu, lv = mu.cuda(), (lv.cuda() if rule == "posterior" else None)
    runs = [nearest_code(mu, lv, codes, rule=rule, backend="fused") for _ in range(10)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert (runs[0] < 2**15).all()
    q, a, bias, _ = kernel_inputs(mu, lv, codes, rule, 1.0)
    from kernels.fused import cupy_launch

    plan = plan_launch(q.shape[0], a.shape[0], q.shape[1], bias is not None, 132)
    raw = [cupy_launch(plan, q, a, bias) for _ in range(10)]
    assert all(torch.equal(raw[0][2], r[2]) and torch.equal(raw[0][0], r[0]) for r in raw[1:])


@pytest.mark.gpu
def test_gpu_kernel_memory_is_linear_in_n_and_follows_torch_streams():
    codes = GaussianCodebook(2**16, 16).vectors.cuda()
    mu, lv = random_queries(262_144, 16, seed=4, bits=16.0)
    mu, lv = mu.cuda(), lv.cuda()
    nearest_code(mu[:1000], lv[:1000], codes, backend="fused")  # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ours = nearest_code(mu, lv, codes, backend="fused")
    torch.cuda.current_stream().wait_stream(side)
    extra = torch.cuda.max_memory_allocated() - base
    # a few hundred bytes a query plus the re-check's fixed scratch; n x K float32 would be 68.7 GB
    assert extra < 400 * mu.shape[0] + 2 * DEFAULT_SCRATCH_BYTES
    tiled = nearest_code(mu, lv, codes, backend="tiled")
    assert torch.equal(ours, tiled)


@needs_gxx
def test_cupy_glue_passes_the_kernel_what_it_expects(host, monkeypatch):
    """cupy_launch against a stand-in `cupy` whose kernels run the host emulation: checks the grid,
    the block, the argument order and the merge hand-off of the real CuPy glue, on CPU tensors."""
    import contextlib
    import types

    from kernels import fused

    calls = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args):
            calls.append((self.name, grid, block))
            if self.name == "gq_merge":  # the merge rules, in numpy, on what the kernel wrote
                best, second, idx, n, splits, ob, os_, oi = args
                assert (int(n), int(splits)) == (best.shape[1], best.shape[0])
                b, s, i = best[0].clone(), second[0].clone(), idx[0].clone()
                for p in range(1, int(splits)):
                    win = best[p] > b
                    s = torch.where(
                        win,
                        torch.maximum(b, torch.maximum(s, second[p])),
                        torch.maximum(s, torch.maximum(best[p], second[p])),
                    )
                    b, i = torch.where(win, best[p], b), torch.where(win, idx[p], i)
                ob.copy_(b), os_.copy_(s), oi.copy_(i)
                return
            m, qpt, tk, threads, bias, unroll = re.match(
                r"gq_nearest<(\d+), (\d+), (\d+), (\d+), (\w+), (\d+)>", self.name
            ).groups()
            q, a, b, n, k, per_split, best, second, idx = args
            n, k, per_split, qpt, threads = int(n), int(k), int(per_split), int(qpt), int(threads)
            plan = LaunchPlan(
                int(m), qpt, int(tk), threads, bias == "true", grid[0], grid[1], per_split, int(unroll)
            )
            assert q.shape == (n, plan.m) and a.shape == (k, plan.m) and block == (threads,)
            assert (
                grid[0] == -(-n // (threads * qpt)) and (grid[1] - 1) * per_split < k <= grid[1] * per_split
            )
            assert best.shape == second.shape == idx.shape == (max(1, plan.scratch_rows), n)
            out = host.run(plan, q.numpy(), a.numpy(), b.numpy() if bias == "true" else None)
            best.copy_(torch.from_numpy(out["best"]))
            second.copy_(torch.from_numpy(out["second"]))
            idx.copy_(torch.from_numpy(out["idx"]))
            Kernel.expected = out

    class RawModule:
        def __init__(self, code, options, name_expressions):
            assert code == SOURCE_PATH.read_text() and len(name_expressions) == 1

        def get_function(self, name):
            return Kernel(name)

    fake = types.SimpleNamespace(
        RawModule=RawModule,
        from_dlpack=lambda t: t,
        cuda=types.SimpleNamespace(
            Device=lambda index: contextlib.nullcontext(),
            ExternalStream=lambda ptr, dev: contextlib.nullcontext(),
        ),
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(fused, "_KERNELS", {})
    codes = GaussianCodebook(3000, 16).vectors
    mu, lv = random_queries(700, 16, seed=21, bits=11.6)
    for rule, lvr in (("posterior", lv), ("mean", None)):
        q, a, bias, _ = kernel_inputs(mu, lvr, codes, rule, 1.0)
        for sm, per_sm in ((1, 1), (8, 8)):  # one split, several splits
            plan = plan_launch(700, 3000, q.shape[1], bias is not None, sm, blocks_per_sm=per_sm)
            best, second, idx = fused.cupy_launch(plan, q, a, bias)
            assert (plan.splits > 1) == (sm == 8)
            assert torch.equal(best, torch.from_numpy(Kernel.expected["merged_best"]))
            assert torch.equal(second, torch.from_numpy(Kernel.expected["merged_second"]))
            assert torch.equal(idx, torch.from_numpy(Kernel.expected["merged_idx"]))
        ours = search_fused(mu, lvr, codes, rule, 1.0, SCRATCH, launch=fused.cupy_launch, sm_count=8)
        assert torch.equal(ours, search_tiled(mu, lvr, codes, rule, 1.0, SCRATCH))
    assert [c[0] for c in calls].count("gq_merge") == 4  # the split launches, and only those


@needs_gxx
def test_kernel_has_no_data_race_and_the_check_would_see_one(tmp_path):
    """ThreadSanitizer over the emulated blocks (real threads sharing the shared-memory tile): the
    kernel is clean, and a copy without the barrier before the next tile load is caught."""
    g = np.random.default_rng(2)
    n, k, m = 1000, 6000, 8
    q, a, b = (g.standard_normal(s).astype(np.float32) for s in ((n, m), (k, m), k))
    plan = plan_launch(n, k, m, True, sm_count=2)
    assert plan.splits > 1 and plan.codes_per_split > plan.tile_codes  # several tiles per block
    clean = HostKernel(tmp_path, sanitizer="thread").run(plan, q, a, b)
    assert (clean["merged_idx"] == float64_scores(q, a, b).argmax(1)).mean() > 0.99
    racy = tmp_path / "racy.cu"
    source = SOURCE_PATH.read_text()
    barrier = "__syncthreads();  // the next tile overwrites shared memory"
    assert barrier in source
    racy.write_text(source.replace(barrier, ""))
    with pytest.raises(SanitizerReport, match="data race"):
        HostKernel(tmp_path, sanitizer="thread", source=racy).run(plan, q, a, b)
