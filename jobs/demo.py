"""The README demo: tokenize the bundled sample photos with the demo model through the real Ray pipeline,
decode the tokens back to images, and print PSNR and codebook usage.

Run: `make demo` (or `python jobs/demo.py --help`). It writes `out/demo/tokens/` (Parquet token files,
commit records, run record) and `out/demo/grid.png` (original | continuous VAE | GQ tokens).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse
from pathlib import Path

import gq
from jobs import startup
from pipeline.evaluate.roundtrip import round_trip
from pipeline.tokenize.driver import run_job
from pipeline.tokenize.options import TokenizeOptions
from pipeline.tokenize.plan import plan, prepare_output
from pipeline.tokenize.settings import JobSettings

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "assets" / "demo" / "gq-small-f8c16-0.25bpp-tdc.safetensors"
SAMPLES = REPO / "assets" / "samples" / "photos-000000.tar"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help="GQ-VAE checkpoint (the demo model)")
    p.add_argument("--input", default=str(SAMPLES), help="image SHARDS to tokenize (the bundled photos)")
    p.add_argument("--output", default=str(REPO / "out" / "demo"), help="DIR for tokens/ and grid.png")
    p.add_argument("--image-size", type=int, default=256, help="tokenized image size")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tokens_dir = str(Path(args.output) / "tokens")
    settings = JobSettings(
        input=args.input,
        output=tokens_dir,
        checkpoint=args.checkpoint,
        options=TokenizeOptions(image_size=args.image_size, batch_size=args.batch_size),
        on_existing="overwrite",
        progress=False,
    )
    shards, run = plan(settings)
    prepare_output(settings, run)

    print(f"1/3 tokenizing {len(shards)} shard(s) with {Path(args.checkpoint).name} on a local Ray ...")
    with startup.ray_session(logging_level="ERROR"):
        summary = run_job(settings, shards, run)
    print(summary.format())
    if summary.exit_code:
        return summary.exit_code

    print("2/3 reading the token files back and decoding them ...")
    model = gq.load(args.checkpoint)
    trip = round_trip(tokens_dir, args.input, model, args.image_size)
    grid = Path(args.output) / "grid.png"
    grid.write_bytes(trip.png())

    print("3/3 results")
    (h, w, groups), k = trip.grid, trip.codebook_size
    p_gq, p_cont = trip.psnr_db()
    usage = trip.usage()
    print(f"images: {len(trip.tokens)}, {trip.tokens.shape[1]} tokens each ({h}x{w}x{groups}, K = {k})")
    print(f"PSNR, GQ tokens decoded:      {p_gq:.2f} dB")
    print(f"PSNR, continuous VAE (mu):    {p_cont:.2f} dB   (quantization costs {p_cont - p_gq:.2f} dB)")
    print(
        f"codebook usage: {usage['used']} of {k} codes ({100 * usage['usage']:.1f}%; a uniform draw of "
        f"{usage['tokens']} tokens would hit {100 * usage['expected_uniform_usage']:.1f}%), "
        f"token entropy {usage['entropy_bits']:.2f} bits"
    )
    print(f"reconstructions: {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
