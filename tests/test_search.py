import pytest
import torch

from gq import GaussianCodebook
from gq.synthetic import posteriors_at_rate
from kernels import nearest_code
from kernels.reference import direct_scores, reference_search, score_scale
from kernels.tiled import BLOCK, plan_tiles

NEAR_TIE = 1e-5  # a disagreement is allowed only where the float64 score gap is below this x scale


def random_queries(n: int, d: int, seed: int, bits: float | None = None):
    """A mix of wide random posteriors (sigma from 0.02 to 2.7, so some weights are negative) and
    posteriors whose KL sits at the codebook's rate, like a TDC-trained encoder's."""
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    mu = torch.randn(half, d, generator=g) * 1.5
    logvar = torch.rand(half, d, generator=g) * 10 - 8
    mu2, lv2 = posteriors_at_rate(n - half, d, bits or 2.0 * d, g)
    return torch.cat([mu, mu2]), torch.cat([logvar, lv2])


def check_against_reference(mu, logvar, codes, rule, beta=1.0, **kwargs):
    ours = nearest_code(mu, logvar, codes, rule=rule, beta=beta, **kwargs)
    ref, ref_score = reference_search(mu, logvar, codes, rule=rule, beta=beta, device=mu.device)
    result, ours = ours, ours.cpu()
    mu, codes = mu.cpu(), codes.cpu()
    logvar = None if logvar is None else logvar.cpu()
    assert ours.dtype == torch.int64 and ours.shape == (mu.shape[0],)
    differ = (ours != ref).nonzero().squeeze(1)
    assert len(differ) <= 1e-4 * mu.shape[0], f"{len(differ)} of {mu.shape[0]} queries disagree"
    if len(differ):
        lv = None if logvar is None else logvar[differ]
        chosen = codes[ours[differ]]
        gap = ref_score[differ] - direct_scores(mu[differ], lv, chosen, rule, beta)
        assert (gap >= 0).all()
        assert (gap <= NEAR_TIE * score_scale(mu[differ], lv, chosen, rule, beta)).all()
    return result


@pytest.mark.parametrize("d", [1, 4, 8, 16])
@pytest.mark.parametrize("log2k", [8, 10, 12, 14, 16])
def test_posterior_rule_matches_float64_reference(d, log2k):
    k = 2**log2k
    n = {8: 6000, 10: 4000, 12: 3000, 14: 1500, 16: 600}[log2k]
    codes = GaussianCodebook(k, d).vectors
    mu, logvar = random_queries(n, d, seed=d * 100 + log2k, bits=float(log2k))
    check_against_reference(mu, logvar, codes, "posterior")


@pytest.mark.parametrize(("d", "log2k"), [(1, 16), (4, 12), (8, 16), (16, 10), (16, 16)])
def test_mean_rule_matches_exact_l2_argmin(d, log2k):
    codes = GaussianCodebook(2**log2k, d).vectors
    mu, logvar = random_queries(800, d, seed=7 + d, bits=float(log2k))
    ours = check_against_reference(mu, None, codes, "mean")
    # and against torch's own float64 distances, with no shared code at all
    dist = torch.cdist(mu.double(), codes.double())
    exact = dist.argmin(1)
    assert (ours == exact).float().mean() >= 0.9999
    assert torch.allclose(dist.gather(1, ours[:, None]), dist.min(1, keepdim=True).values, rtol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_beta_is_honoured(beta):
    codes = GaussianCodebook(4096, 8).vectors
    mu, logvar = random_queries(1000, 8, seed=11)
    check_against_reference(mu, logvar, codes, "posterior", beta=beta)


def test_rules_differ_as_documented():
    # The posterior rule is not nearest neighbour of mu; docs/METHOD.md: they agree on ~60% of draws.
    codes = GaussianCodebook(4096, 4).vectors
    mu, logvar = random_queries(4000, 4, seed=5)
    same = (nearest_code(mu, logvar, codes) == nearest_code(mu, None, codes, rule="mean")).float().mean()
    assert 0.2 < float(same) < 0.95


@pytest.mark.parametrize("k", [2, 3, 100, 1000, 4097])
@pytest.mark.parametrize("scratch", [2**16, 2**26])
def test_any_codebook_size_and_scratch_budget(k, scratch):
    codes = GaussianCodebook(k, 4, kind="iid").vectors
    mu, logvar = random_queries(700, 4, seed=k)
    for rule in ("posterior", "mean"):
        check_against_reference(
            mu, logvar if rule == "posterior" else None, codes, rule, scratch_bytes=scratch
        )


@pytest.mark.parametrize("rule", ["posterior", "mean"])
@pytest.mark.parametrize("scratch", [2**15, 2**26])
def test_ties_return_lowest_index(rule, scratch):
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(5000, 4, generator=g)
    # duplicates inside one run, in another run, and in another GEMM tile
    for dup in (7, BLOCK + 3, 3000, 4999):
        codes[dup] = codes[5]
    codes[4000] = codes[4001] = codes[2500]
    exact = torch.stack([codes[5], codes[2500]]).repeat(25, 1)
    near = exact + 1e-3 * torch.randn(50, 4, generator=g)  # near, not exactly on, the duplicates
    mu = torch.cat([exact, near])
    logvar = torch.full_like(mu, -6.0)
    ours = nearest_code(mu, logvar if rule == "posterior" else None, codes, rule=rule, scratch_bytes=scratch)
    ref, _ = reference_search(mu, logvar if rule == "posterior" else None, codes, rule=rule)
    assert torch.equal(ours, ref)
    assert ours[:50].tolist() == [5, 2500] * 25
    # a codebook of one repeated vector: every query gets index 0
    same = torch.ones(3000, 4)
    assert (nearest_code(mu, logvar, same, rule=rule, scratch_bytes=scratch) == 0).all()


def test_small_and_empty_batches():
    codes = GaussianCodebook(1024, 8).vectors
    mu, logvar = random_queries(7, 8, seed=1)
    for n in (0, 1, 2, 7):
        out = nearest_code(mu[:n], logvar[:n], codes)
        assert out.shape == (n,)
        if n:
            assert torch.equal(out, reference_search(mu[:n], logvar[:n], codes)[0])


def test_scratch_is_bounded_whatever_n():
    budget = 64 * 2**20
    for n in (1, 1024, 262144, 10**8):
        for k, d in ((2**16, 16), (2**20, 64), (256, 1)):
            m = 2 * d
            bn, bk, fin = plan_tiles(n, k, d, m, budget)
            runs = -(-k // BLOCK)
            used = bn * bk * 4 + bn * runs * 4 + bn * m * 12 + bk * m * 4 + fin * BLOCK * (d + m + 2) * 8
            assert used <= budget
            assert bn <= 1024 and bk <= 1024


def test_bad_inputs_raise():
    codes = GaussianCodebook(256, 4).vectors
    mu = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="logvar"):
        nearest_code(mu, None, codes)
    with pytest.raises(ValueError, match="rule"):
        nearest_code(mu, mu, codes, rule="nearest")
    with pytest.raises(ValueError, match="expected"):
        nearest_code(torch.zeros(3, 5), torch.zeros(3, 5), codes)
    with pytest.raises(ValueError, match="non-finite"):
        nearest_code(torch.full((3, 4), float("nan")), mu, codes)
    with pytest.raises(ValueError, match="non-finite"):
        nearest_code(mu, torch.full((3, 4), -200.0), codes)  # unclamped logvar overflows 1/sigma^2


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["posterior", "mean"])
def test_cuda_tensors_give_the_cpu_answer(rule):
    codes = GaussianCodebook(2**16, 16).vectors
    mu, logvar = random_queries(4096, 16, seed=3, bits=16.0)
    lv = logvar if rule == "posterior" else None
    cpu = nearest_code(mu, lv, codes, rule=rule)
    gpu = nearest_code(mu.cuda(), None if lv is None else lv.cuda(), codes.cuda(), rule=rule)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
