"""GQ's theorem on synthetic posteriors: quantization error at, below and above the codebook's rate.

Run: `python jobs/theorem.py` (`--help` for the options). It builds the reference Sobol codebook, quantizes
posteriors whose KL is log2 K + t bits, and shows GQ's theorem at work: the chance of an error larger
than sigma falls as the KL drops below log2 K and rises above it. It also checks the token round trip
and times the CPU search. (The README's demo, on real photos, is jobs/demo.py.)
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse
import time

import torch

import gq
from gq.synthetic import large_error_rate, posteriors_at_rate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # codebook
    p.add_argument("--codebook-size", type=int, default=65536, help="K, number of codebook vectors")
    p.add_argument("--dim", type=int, default=16, help="d, dimension of a codebook vector (one group)")
    p.add_argument("--seed", type=int, default=42, help="codebook seed (42 is the reference's)")
    # synthetic posteriors
    p.add_argument("--queries", type=int, default=4096, help="latent groups to quantize per rate")
    p.add_argument(
        "--offsets", type=float, nargs="+", default=[-4, -2, 0, 2, 4], help="t: KL = log2 K + t bits"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    codebook = gq.GaussianCodebook(args.codebook_size, args.dim, seed=args.seed)
    print(f"{codebook}  built in {time.perf_counter() - t0:.2f} s")
    print(f"target: every group's KL near log2 K = {codebook.bits:.1f} bits\n")

    print(f"{'KL bits':>8} {'t':>5} | P(error > sigma): posterior rule  mean rule | posterior search ms")
    generator = torch.Generator().manual_seed(0)
    for t in args.offsets:
        mu, logvar = posteriors_at_rate(args.queries, args.dim, codebook.bits + t, generator)
        rates = []
        for rule in ("posterior", "mean"):
            quantizer = gq.GaussianQuantizer(codebook, groups=1, rule=rule)
            start = time.perf_counter()
            tokens = quantizer.quantize(mu.view(-1, args.dim, 1, 1), logvar.view(-1, args.dim, 1, 1))
            if rule == "posterior":
                ms = (time.perf_counter() - start) * 1e3
            chosen = quantizer.dequantize(tokens).view(-1, args.dim)
            rates.append(large_error_rate(mu, logvar, chosen))
        line = f"{codebook.bits + t:8.1f} {t:+5.1f} | {rates[0]:32.3f} {rates[1]:10.3f} |"
        print(f"{line} {ms:19.1f}")

    # The token round trip on a latent of one 256x256 image at 0.25 bpp (32 x 32 x 16).
    quantizer = gq.GaussianQuantizer(codebook, groups=1)
    mu = torch.randn(1, args.dim, 32, 32)
    logvar = torch.full_like(mu, -2.0)
    tokens = quantizer.quantize(mu, logvar)
    z = quantizer.dequantize(tokens)
    same = torch.equal(z.permute(0, 2, 3, 1).reshape(-1, args.dim), codebook.vectors[tokens.reshape(-1)])
    print(f"\none image's latent {tuple(mu.shape)} -> tokens {tuple(tokens.shape)} -> {tuple(z.shape)}")
    print(f"dequantize(quantize(x)) equals the selected codebook vectors: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
