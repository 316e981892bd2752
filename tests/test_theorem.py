"""GQ's theorem, in direction: with KL = log2 K + t bits, large errors get likelier as t grows."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_readme_command_runs_as_a_script():
    """`python jobs/theorem.py` from a checkout: jobs/ heads sys.path there, where jobs/tokenize.py would
    shadow the standard library's tokenize unless the script's start-up moves it away."""
    repo = Path(__file__).resolve().parents[1]
    args = ["--codebook-size", "256", "--dim", "4", "--queries", "200", "--offsets", "-4", "4"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "jobs/theorem.py", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split("|") for line in res.stdout.splitlines() if line.count("|") == 2 and "KL" not in line]
    assert [float(r[0].split()[0]) for r in rows] == [4.0, 12.0]  # log2 256 = 8 bits, -4 and +4
    below, above = (float(r[1].split()[0]) for r in rows)
    assert below < 0.5 < 0.9 < above  # the theorem's direction, as the library test checks in-process
    assert "dequantize(quantize(x)) equals the selected codebook vectors: True" in res.stdout
