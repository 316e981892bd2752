import hashlib

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch.quasirandom import SobolEngine

from gq import CodebookSpec, GaussianCodebook


def reference_prior_samples(size: int, dim: int, seed: int) -> torch.Tensor:
    """The reference construction, independently: SobolEngine -> scipy norm.ppf (float64) -> float32."""
    points = SobolEngine(dim, scramble=True, seed=seed).draw(size)
    return torch.from_numpy(norm.ppf(points)).float()


@pytest.mark.parametrize(
    ("size", "dim", "seed"),
    [(256, 1, 42), (65536, 4, 42), (65536, 16, 42), (4096, 64, 42), (1000, 3, 7), (2**20, 8, 42)],
)
def test_sobol_matches_reference_bit_for_bit(size, dim, seed):
    ours = GaussianCodebook(size, dim, seed=seed, kind="sobol").vectors
    ref = reference_prior_samples(size, dim, seed)
    assert ours.dtype == torch.float32 and ours.shape == (size, dim)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


def test_sobol_point_rounding_to_one_is_kept_finite():
    # d = 64, K = 2^20, seed 42 has one float32 Sobol coordinate equal to 1.0: +inf in the reference.
    ours = GaussianCodebook(2**20, 64, seed=42).vectors
    ref = reference_prior_samples(2**20, 64, 42)
    bad = ~torch.isfinite(ref)
    assert int(bad.sum()) == 1
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[~bad], ref[~bad])
    assert float(ours[bad]) == pytest.approx(float(norm.ppf(np.nextafter(np.float32(1), np.float32(0)))))


def test_iid_is_a_seeded_normal_draw():
    a = GaussianCodebook(4096, 16, seed=3, kind="iid").vectors
    b = GaussianCodebook(4096, 16, seed=3, kind="iid").vectors
    c = GaussianCodebook(4096, 16, seed=4, kind="iid").vectors
    expected = torch.randn(4096, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a, expected)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["sobol", "iid"])
def test_codebook_is_standard_normal(kind):
    v = GaussianCodebook(65536, 8, kind=kind).vectors.double()
    assert v.mean(0).abs().max() < 0.02
    assert (v.std(0) - 1).abs().max() < 0.02
    # per-coordinate quantiles against N(0, 1)
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    emp = torch.quantile(v[:, 0], q)
    assert torch.allclose(emp, torch.from_numpy(norm.ppf(q.numpy())), atol=0.03)


def test_sobol_is_more_uniform_than_iid():
    # Quasi-random: the Sobol codebook's coordinate histogram is far closer to the Gaussian's.
    def ks(v):
        x = np.sort(v[:, 0].numpy().astype(np.float64))
        return np.abs(norm.cdf(x) - (np.arange(len(x)) + 0.5) / len(x)).max()

    assert ks(GaussianCodebook(4096, 4).vectors) < 0.2 * ks(GaussianCodebook(4096, 4, kind="iid").vectors)


def test_fingerprint_is_sha256_of_float32_bytes():
    cb = GaussianCodebook(1024, 16)
    expected = hashlib.sha256(np.ascontiguousarray(cb.vectors.numpy(), dtype="<f4").tobytes()).hexdigest()
    assert cb.fingerprint == expected
    assert GaussianCodebook(1024, 16, seed=1).fingerprint != expected
    assert GaussianCodebook(1024, 16, kind="iid").fingerprint != expected


def test_spec_round_trip_and_validation():
    cb = GaussianCodebook(512, 4, seed=9, kind="iid")
    again = GaussianCodebook.from_spec(cb.spec.to_dict())
    assert again.fingerprint == cb.fingerprint and again.spec == cb.spec
    assert cb.bits == 9.0
    for bad in [
        dict(size=1, dim=4),
        dict(size=2**20 + 1, dim=4),
        dict(size=16, dim=0),
        dict(size=16, dim=65),
    ]:
        with pytest.raises(ValueError):
            CodebookSpec(**bad)
    with pytest.raises(ValueError, match="kind"):
        GaussianCodebook(16, 2, kind="uniform")
