"""GQ's theorem, in direction: with KL = log2 K + t bits, large errors get likelier as t grows."""

import pytest
import torch

from gq import GaussianCodebook, GaussianQuantizer
from gq.synthetic import kl_bits_rows, large_error_rate, posteriors_at_rate

OFFSETS = [-4.0, -2.0, 0.0, 2.0, 4.0]


@pytest.mark.parametrize(("dim", "size"), [(4, 2**8), (8, 2**12), (16, 2**16)])
@pytest.mark.parametrize("rule", ["posterior", "mean"])
def test_large_error_probability_rises_with_rate_excess(dim, size, rule):
    codebook = GaussianCodebook(size, dim)
    quantizer = GaussianQuantizer(codebook, rule=rule)
    g = torch.Generator().manual_seed(dim)
    rates = []
    for t in OFFSETS:
        mu, logvar = posteriors_at_rate(3000, dim, codebook.bits + t, g)
        assert torch.allclose(
            kl_bits_rows(mu, logvar), torch.full((3000,), codebook.bits + t, dtype=torch.float64), atol=1e-3
        )
        tokens = quantizer.quantize(mu.view(-1, dim, 1, 1), logvar.view(-1, dim, 1, 1))
        chosen = quantizer.dequantize(tokens).view(-1, dim)
        rates.append(large_error_rate(mu, logvar, chosen))
    assert all(b > a + 0.02 for a, b in zip(rates, rates[1:])), rates  # strictly rising in t
    assert rates[-1] > 0.9  # 4 bits short of the rate: large errors almost always
    assert rates[0] < rates[2] - 0.2  # 4 bits to spare: far rarer than at the rate
    if rule == "mean":
        assert rates[0] < 0.01
