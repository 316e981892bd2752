"""The readiness audit: is this Gaussian VAE ready to be a GQ tokenizer, and at which operating point?

Run:    python jobs/audit.py --checkpoint X.safetensors --input 'val/*.tar' --output audit/ [--images 256]
            [--image-size 256] [--batch-size 8] [--codebook-bits 16] [--device cpu]

Any model `gq.load` reads: ours, a converted official one, a converted diffusers VAE, calibrated or not.
Writes audit.json (per_channel KL bits, mean and variance of the posterior the search sees;
per_group_kl_bits; operating_points: for every d dividing the channels at each K, the predicted share of
groups above log2 K against the measured PSNR drop and codes used; a recommendation), audit.md and PNG
plots. Images are decoded and center-cropped as jobs/tokenize.py does. Exit status: 0 written, 1 written
but a shard was unreadable or no image could be audited, 2 bad arguments (one line).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse

import gq
from gq.audit import candidate_points
from pipeline.data.decode import add_limit_arguments, limits_from_args
from pipeline.data.shards import expand_shards
from pipeline.evaluate.audit import audit_shards, build_audit, write_audit
from pipeline.evaluate.report import EvalSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="our .safetensors checkpoint (path or fsspec URL)")
    p.add_argument("--input", required=True, help="SHARDS: brace pattern, glob, directory or .txt URL list")
    p.add_argument("--output", required=True, help="DIR for audit.json, audit.md and the plots")
    p.add_argument("--images", type=int, default=256, help="audit the first N decodable images")
    p.add_argument("--image-size", type=int, default=256, help="shorter side resized to this, center crop")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument(
        "--codebook-bits", type=int, nargs="+", help="log2 K of the candidate points (default: the model's)"
    )
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, ...)")
    p.add_argument("--decode-threads", type=int, default=2, help="image decoding threads")
    add_limit_arguments(p)
    args = p.parse_args(argv)
    for name in ("images", "image_size", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.codebook_bits and not all(1 <= b <= 20 for b in args.codebook_bits):
        p.error("--codebook-bits must lie in 1..20")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = EvalSettings(
        image_size=args.image_size,
        batch_size=args.batch_size,
        limit=args.images,
        limits=limits_from_args(args),
        decode_threads=args.decode_threads,
    )
    try:
        shards = expand_shards(args.input)
        model = gq.load(args.checkpoint, map_location=args.device)
        if args.image_size % model.downsample:
            raise ValueError(f"--image-size must be a multiple of {model.downsample}, got {args.image_size}")
        points = candidate_points(model.config.latent_channels, tuple(args.codebook_bits or ())) or None
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError
        print(f"audit: error: {e}", file=sys.stderr)
        return 2
    print(
        f"audit: {len(shards)} shards, model {str(model.checkpoint_sha256)[:12]} -> {args.output}", flush=True
    )
    audit, read = audit_shards(model, shards, settings, points)
    report = build_audit(audit, read, args.checkpoint)
    written = write_audit(args.output, report, audit)
    if report["images"]:
        print(f"audit: {report['images']} images. {report['recommendation']}", flush=True)
    print(f"audit: wrote {', '.join(os.path.basename(w) for w in written)}", flush=True)
    if read["shards_unreadable"]:
        print(f"audit: unreadable shards: {', '.join(read['shards_unreadable'])}", file=sys.stderr)
    if not report["images"]:
        print("audit: no image could be audited", file=sys.stderr)
    return 1 if read["shards_unreadable"] or not report["images"] else 0


if __name__ == "__main__":
    sys.exit(main())
