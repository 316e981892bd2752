"""The fused C++ CPU search kernel (kernels/fused_cpu.py, kernels/nearest_cpu.cpp): every ISA this machine
runs against the float64 reference, its raw best / second best against float64 scores, and the tiled
fallback where it cannot build or is switched off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_search import check_against_reference, random_queries

from gq import GaussianCodebook
from kernels import fused_cpu, nearest_code
from kernels.certificate import core_features, query_inputs, uncertified
from kernels.reference import direct_scores, reference_search
from kernels.rules import code_features, query_features

ISAS = fused_cpu.supported_isas()
needs_kernel = pytest.mark.skipif(not ISAS, reason="the C++ kernel does not build here")
SCRATCH = 64 * 2**20


@pytest.fixture(params=ISAS or ["none"])
def isa(request, monkeypatch) -> str:
    """Each ISA this machine runs (AVX2 is forced on an AVX-512 machine too), through GQ_CPU_KERNEL."""
    if request.param == "none":
        pytest.skip("the C++ kernel does not build here")
    monkeypatch.setenv(fused_cpu.ENV, request.param)
    return request.param


@pytest.mark.parametrize("rule", ["posterior", "mean"])
@pytest.mark.parametrize("d", [3, 4, 5, 8, 14, 16, 18])
def test_kernel_matches_float64_reference(isa, rule, d):
    # n and K are multiples of no block: rows per microkernel (4 or 8), lanes (8 or 16), tiles; d = 14
    # and 18 are the 256-token presets' (2d = 28 and 36 features: no multiple of the lanes either)
    k = {3: 3001, 4: 5003, 5: 4099, 8: 4097, 14: 2**12 + 3, 16: 2**12 + 7, 18: 2**12 + 5}[d]
    codes = GaussianCodebook(k, d).vectors
    mu, lv = random_queries(1001, d, seed=d, bits=12.0)
    assert fused_cpu.kernel_isa() == isa
    check_against_reference(mu, lv if rule == "posterior" else None, codes, rule, backend="fused")


def test_kernel_on_a_full_size_codebook(isa):
    codes = GaussianCodebook(2**16, 16).vectors
    mu, lv = random_queries(300, 16, seed=4, bits=16.0)
    check_against_reference(mu, lv, codes, "posterior", backend="fused")


@pytest.mark.parametrize("rule", ["posterior", "mean"])
@pytest.mark.parametrize(
    ("tile_bytes", "chunk_rows"), [(fused_cpu.TILE_BYTES, fused_cpu.CHUNK_ROWS), (1024, 480)]
)
def test_best_and_second_are_float32_scores_of_the_right_codes(isa, rule, tile_bytes, chunk_rows):
    # small tiles and chunks: 3 threads share ~90 tiles per chunk of 480 rows, so their states merge
    codes = GaussianCodebook(3000, 8).vectors
    mu, lv = random_queries(500, 8, seed=9, bits=11.0)
    lvr = lv if rule == "posterior" else None
    best, second, idx, err, _ = fused_cpu.kernel_scores(
        mu, lvr, codes, rule, 1.0, isa=isa, threads=3, tile_bytes=tile_bytes, chunk_rows=chunk_rows
    )
    exact = query_features(mu.double(), None if lvr is None else lvr.double(), rule, 1.0)
    exact = exact @ code_features(codes.double(), rule).T  # (n, K) float64 scores, same argmax as the rule
    top2 = exact.topk(2, dim=1).values
    assert (best >= second).all()
    assert ((best.double() - top2[:, 0]).abs() <= err).all()  # the best score is within the bound
    assert (second.double() >= top2[:, 1] - err).all()  # nothing is hidden above the second best
    certified = ~uncertified(best, second, err)
    assert certified.float().mean() > 0.9
    assert torch.equal(idx[certified], exact.argmax(1)[certified])


@pytest.mark.parametrize("rule", ["posterior", "mean"])
def test_ties_and_duplicated_codes_go_to_the_lowest_index(isa, rule):
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(5000, 4, generator=g)
    # duplicates in the same lane and tile (16 and 128 codes on), another lane, another tile
    for dup in (5 + 16, 5 + 128, 7, 3000, 4999):
        codes[dup] = codes[5]
    codes[4000] = codes[4001] = codes[2500]
    exact = torch.stack([codes[5], codes[2500]]).repeat(25, 1)
    near = exact + 1e-3 * torch.randn(50, 4, generator=g)
    mu = torch.cat([exact, near])
    logvar = torch.full_like(mu, -6.0) if rule == "posterior" else None
    ours = nearest_code(mu, logvar, codes, rule=rule, backend="fused")
    assert torch.equal(ours, reference_search(mu, logvar, codes, rule=rule)[0])
    assert ours[:50].tolist() == [5, 2500] * 25
    best, second, _, err, _ = fused_cpu.kernel_scores(
        mu[:50], logvar if logvar is None else logvar[:50], codes, rule, 1.0, isa=isa
    )
    assert uncertified(best, second, err).all()  # exact duplicates are never certified by the kernel
    same = torch.ones(3000, 4)  # one repeated vector: every query gets index 0
    assert (nearest_code(mu, logvar, same, rule=rule, backend="fused") == 0).all()


def test_logvar_at_the_clamp_edges(isa):
    codes = GaussianCodebook(4096, 8).vectors
    mu, lv = random_queries(400, 8, seed=3, bits=12.0)
    lv[:100] = -30.0  # the quantizer's clamp: precision e^30, features near 1e13
    lv[100:200] = 20.0  # sigma e^10: the weights are ~(1 - 1e-9) / 2, the prior term decides
    lv[200:300, ::2] = -30.0
    lv[200:300, 1::2] = 20.0
    check_against_reference(mu, lv, codes, "posterior", backend="fused")


@pytest.mark.parametrize("k", [1, 2, 3, 17, 33])
@pytest.mark.parametrize("n", [1, 2, 7, 9])
def test_tiny_codebooks_and_batches(isa, k, n):
    codes = torch.randn(k, 5, generator=torch.Generator().manual_seed(k))
    mu, lv = random_queries(n, 5, seed=k * 10 + n)
    for rule, lvr in (("posterior", lv), ("mean", None)):
        assert torch.equal(
            nearest_code(mu, lvr, codes, rule=rule, backend="fused"),
            reference_search(mu, lvr, codes, rule=rule)[0],
        )


def test_threads_do_not_change_the_bits(isa):
    codes = GaussianCodebook(4096, 16).vectors
    mu, lv = random_queries(2000, 16, seed=5, bits=12.0)
    runs = [
        fused_cpu.kernel_scores(mu, lv, codes, "posterior", 1.0, isa=isa, threads=t, tile_bytes=4096)
        for t in (1, 2, 3)
    ]
    for run in runs[1:]:
        for a, b in zip(runs[0][:3], run[:3]):
            assert torch.equal(a, b)


@needs_kernel
def test_isas_give_the_same_bits():
    codes = GaussianCodebook(4096, 8).vectors
    mu, lv = random_queries(700, 8, seed=6, bits=12.0)
    runs = [fused_cpu.kernel_scores(mu, lv, codes, "posterior", 1.0, isa=isa) for isa in ISAS]
    for run in runs[1:]:
        for a, b in zip(runs[0][:3], run[:3]):
            assert torch.equal(a, b)


def test_auto_picks_the_kernel_and_off_or_a_failed_build_falls_back_to_tiled(monkeypatch):
    codes = GaussianCodebook(1024, 4).vectors
    mu, lv = random_queries(300, 4, seed=8)
    ref = reference_search(mu, lv, codes)[0]
    monkeypatch.delenv(fused_cpu.ENV, raising=False)
    assert fused_cpu.kernel_isa() == (ISAS[0] if ISAS else None)
    monkeypatch.setenv(fused_cpu.ENV, "off")
    assert fused_cpu.kernel_isa() is None
    assert torch.equal(nearest_code(mu, lv, codes), ref)
    monkeypatch.setenv(fused_cpu.ENV, "sse2")
    with pytest.raises(ValueError, match=fused_cpu.ENV):
        nearest_code(mu, lv, codes)
    monkeypatch.delenv(fused_cpu.ENV)

    def broken(**kwargs):
        raise RuntimeError("no compiler here")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(fused_cpu, "_import_built", lambda name, directory: None)  # not built yet
    fused_cpu._build.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built"):
            assert fused_cpu.kernel_isa() is None
        assert torch.equal(nearest_code(mu, lv, codes), ref)  # the tiled path
        with pytest.raises(ValueError, match="not available"):
            nearest_code(mu, lv, codes, backend="fused")
    finally:
        fused_cpu._build.cache_clear()
    monkeypatch.undo()
    assert fused_cpu.kernel_isa() == (ISAS[0] if ISAS else None)  # rebuilt from the cache


def test_direct_scores_confirm_the_answer_on_real_sized_posteriors(isa):
    # the float64 direct form (not the expanded features) of the chosen code is the best one found
    codes = GaussianCodebook(2**14, 4).vectors
    mu, lv = random_queries(500, 4, seed=12, bits=14.0)
    ours = nearest_code(mu, lv, codes, backend="fused")
    ref, ref_score = reference_search(mu, lv, codes)
    chosen = direct_scores(mu, lv, codes[ours], "posterior", 1.0)
    assert torch.allclose(chosen, ref_score, rtol=1e-12, atol=0)
    assert (ours == ref).float().mean() >= 0.998


@pytest.mark.parametrize("rule", ["posterior", "mean"])
def test_run_maxima_for_the_exact_finish_are_within_the_bound(isa, rule):
    # the exact path's candidate runs come from the kernel: each run's maximum within err of the float64 one
    codes = GaussianCodebook(1000, 5).vectors  # 1000 = 15 runs of 64 and a partial one
    mu, lv = random_queries(37, 5, seed=13, bits=10.0)
    q64 = query_features(mu.double(), lv.double() if rule == "posterior" else None, rule, 1.0)
    maxima = fused_cpu.kernel_run_maxima(q64.float(), codes, rule, isa=isa)
    exact = q64 @ code_features(codes.double(), rule).T
    exact = torch.nn.functional.pad(exact, (0, 24), value=float("-inf")).view(37, 16, 64).amax(2)
    _, err = query_inputs(mu, lv if rule == "posterior" else None, codes, rule, 1.0, core_features(5, rule))
    assert maxima.shape == (37, 16)
    assert ((maxima.double() - exact).abs() <= err[:, None]).all()


def test_rows_go_in_chunks_with_the_same_answer(isa, monkeypatch):
    monkeypatch.setattr(fused_cpu, "CHUNK_ROWS", 128)  # 350 rows: two whole chunks and a partial one
    codes = GaussianCodebook(2048, 4).vectors
    mu, lv = random_queries(350, 4, seed=21, bits=11.0)
    check_against_reference(mu, lv, codes, "posterior", backend="fused")


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_load(tmp_path):
    """torch's build lock outlives a process killed holding it (a SIGKILLed actor): a live one is waited
    for, a stale one removed, instead of every later load waiting forever."""
    import os
    import threading
    import time

    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(1.0, lock.unlink).start()  # a live build that ends after 1 s
    t = time.perf_counter()
    fused_cpu.clear_stale_lock(str(lock), stale_s=60)
    assert 0.9 < time.perf_counter() - t < 30 and not lock.exists()
    lock.touch()
    os.utime(lock, (time.time() - 120,) * 2)  # left by a process that died two minutes ago
    with pytest.warns(UserWarning, match="stale build lock"):
        fused_cpu.clear_stale_lock(str(lock), stale_s=60)
    assert not lock.exists()


def test_a_built_kernel_loads_without_the_build_lock(tmp_path):
    """Once built, a fresh process imports the extension directly: a lock that a killed process left
    (fresh, so the build path would wait up to STALE_LOCK_S for it) costs nothing."""
    import os
    import subprocess
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    if fused_cpu.kernel_isa() is None:
        pytest.skip("the CPU kernel does not build here")
    name = f"gq_nearest_cpu_{fused_cpu._source_hash()}"
    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    lock.touch()
    try:
        code = (
            "import time, torch; t = time.perf_counter(); from kernels import fused_cpu; "
            "m = fused_cpu._build(); print(m is not None, time.perf_counter() - t)"
        )
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(root)},
        )  # fmt: skip
        loaded, seconds = out.stdout.split()
        assert loaded == "True" and float(seconds) < 20, out.stderr[-2000:]
    finally:
        lock.unlink(missing_ok=True)
