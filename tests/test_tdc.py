import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from gq import KLStats, TargetDivergenceConstraint, TDCConfig, kl_bits

F = 1.01


def manual_kl_bits(mu, logvar, groups, layout):
    """Per-group KL in bits, with explicit channel lists (float64)."""
    mu, logvar = mu.double(), logvar.double().clamp(-30, 20)
    per = 0.5 * (mu**2 + logvar.exp() - 1 - logvar) / math.log(2)
    c = mu.shape[1]
    d = c // groups
    chans = [[g + j * groups for j in range(d)] if layout == "interleaved" else list(range(g * d, g * d + d))
             for g in range(groups)]  # fmt: skip
    return torch.stack([per[:, ch].sum(1) for ch in chans], dim=-1)


def stats(mean, lo, hi):
    t = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    return KLStats(sum=t(mean * 10), count=t(10), min=t(lo), max=t(hi))


@pytest.mark.parametrize("layout", ["interleaved", "contiguous"])
def test_kl_bits_per_group(layout):
    mu, logvar = torch.randn(2, 12, 3, 3), torch.randn(2, 12, 3, 3) * 2
    ours = kl_bits(mu, logvar, 3, layout)
    assert ours.shape == (2, 3, 3, 3)
    assert torch.allclose(ours.double(), manual_kl_bits(mu, logvar, 3, layout), rtol=1e-5, atol=1e-5)


def test_loss_weights_each_band_and_forward_does_not_update():
    cfg = TDCConfig(target_bits=16.0, groups=2, weight=0.1)
    tdc = TargetDivergenceConstraint(cfg)
    tdc.lam.fill_(2.0)
    tdc.lam_max.fill_(3.0)
    tdc.lam_min.fill_(0.25)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(8, 32, 2, 2, generator=g) * torch.linspace(0.3, 2.0, 8).view(8, 1, 1, 1)
    logvar = (-1 + 0.2 * torch.randn(8, 32, 2, 2, generator=g)).requires_grad_()
    kappa = manual_kl_bits(mu, logvar.detach(), 2, "interleaved")
    assert (kappa > 16.5).any() and (kappa < 15.5).any() and ((kappa - 16).abs() <= 0.5).any()
    w = torch.where(kappa > 16.5, 3.0, torch.where(kappa < 15.5, 0.25, 1.0))
    expected = 0.1 * 2.0 * (w * kappa).sum() / 8
    before = {k: v.clone() for k, v in tdc.state_dict().items()}
    loss, st = tdc(mu, logvar)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert float(st.mean) == pytest.approx(float(kappa.mean()), rel=1e-5)
    assert float(st.min) == pytest.approx(float(kappa.min()), rel=1e-5)
    assert float(st.max) == pytest.approx(float(kappa.max()), rel=1e-5)
    loss.backward()
    assert logvar.grad is not None and torch.isfinite(logvar.grad).all()
    assert all(torch.equal(before[k], v) for k, v in tdc.state_dict().items())


def test_multipliers_move_as_specified():
    tdc = TargetDivergenceConstraint(TDCConfig(target_bits=16.0))
    tdc.update(stats(mean=17, lo=15, hi=20))  # mean above T, max above band, min below band
    assert float(tdc.lam) == pytest.approx(F)
    assert float(tdc.lam_max) == pytest.approx(F)
    assert float(tdc.lam_min) == pytest.approx(1 / F)
    tdc.update(stats(mean=15, lo=15.6, hi=16.4))  # mean below T, everything inside the band
    assert float(tdc.lam) == pytest.approx(1.0)
    assert float(tdc.lam_max) == pytest.approx(1.0)  # F / F
    assert float(tdc.lam_min) == pytest.approx(1.0)  # 1/F * F
    assert int(tdc.updates) == 2


def test_every_multiplier_is_clipped():
    tdc = TargetDivergenceConstraint(TDCConfig(target_bits=8.0))
    for _ in range(2000):
        tdc.update(stats(mean=20, lo=1, hi=30))
    assert float(tdc.lam) == pytest.approx(1e3) and float(tdc.lam_max) == pytest.approx(1e3)
    assert float(tdc.lam_min) == pytest.approx(1e-3)
    for _ in range(2000):
        tdc.update(stats(mean=1, lo=7.9, hi=8.1))
    assert float(tdc.lam) == pytest.approx(1e-3)
    assert float(tdc.lam_max) == pytest.approx(1.0) and float(tdc.lam_min) == pytest.approx(1.0)


def test_state_dict_round_trip(tmp_path):
    tdc = TargetDivergenceConstraint(TDCConfig(target_bits=16.0))
    for i in range(37):
        tdc.update(stats(mean=16 + (i % 3) - 1, lo=14 + i % 2, hi=18 - i % 5))
    path = tmp_path / "tdc.safetensors"
    save_file(tdc.state_dict(), str(path))
    fresh = TargetDivergenceConstraint(TDCConfig(target_bits=16.0))
    fresh.load_state_dict(load_file(str(path)))
    for name in ("lam", "lam_min", "lam_max", "updates"):
        assert torch.equal(getattr(fresh, name), getattr(tdc, name)), name
    assert float(tdc.lam) != 1.0
    assert TDCConfig.from_dict(tdc.config.to_dict()) == tdc.config


def test_plain_kl_mode_has_no_multipliers():
    cfg = TDCConfig(target_bits=16.0, mode="kl", weight=0.5, groups=2, layout="contiguous")
    tdc = TargetDivergenceConstraint(cfg)
    mu, logvar = torch.randn(3, 8, 2, 2), torch.randn(3, 8, 2, 2)
    loss, st = tdc(mu, logvar)
    expected = 0.5 * manual_kl_bits(mu, logvar, 2, "contiguous").sum() / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    tdc.update(st)
    assert float(tdc.lam) == float(tdc.lam_max) == float(tdc.lam_min) == 1.0


def rank_data(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    # rank 0's groups sit above the 8-bit target, rank 1's far below it, the pool below it
    scale = 1.5 if rank == 0 else 0.3
    return torch.randn(4, 16, 4, 4, generator=g) * scale, torch.rand(4, 16, 4, 4, generator=g) * -0.5


def gloo_worker(rank, world, rendezvous, out_dir, steps):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        tdc = TargetDivergenceConstraint(TDCConfig(target_bits=8.0, groups=2))
        for step in range(steps):
            _, st = tdc(*rank_data(rank, step))
            tdc.update(st)
        torch.save({k: v.clone() for k, v in tdc.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_multipliers_identical_across_two_gloo_ranks(tmp_path):
    steps = 40
    mp.spawn(gloo_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path), steps), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    # the single-process run on the pooled statistics of both ranks gives the same multipliers
    pooled = TargetDivergenceConstraint(TDCConfig(target_bits=8.0, groups=2))
    alone = TargetDivergenceConstraint(TDCConfig(target_bits=8.0, groups=2))
    for step in range(steps):
        a, b = (pooled(*rank_data(r, step))[1] for r in (0, 1))
        pooled.update(KLStats(a.sum + b.sum, a.count + b.count, torch.minimum(a.min, b.min),
                              torch.maximum(a.max, b.max)))  # fmt: skip
        alone.update(alone(*rank_data(0, step))[1])
    for name in ("lam", "lam_min", "lam_max"):
        assert torch.equal(r0[name], r1[name]), name
        assert float(r0[name]) == pytest.approx(float(getattr(pooled, name)), rel=1e-12), name
    # and the data really differ: rank 0 on its own would have moved elsewhere
    assert any(float(r0[n]) != pytest.approx(float(getattr(alone, n))) for n in ("lam", "lam_min", "lam_max"))
