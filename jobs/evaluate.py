"""Evaluate a GQ-VAE checkpoint on image shards: rate (bpp), PSNR and SSIM of the continuous VAE and of GQ
tokens, codebook usage, token entropy and the per-group KL spread; report.json, report.md and PNG plots.

Run:    python jobs/evaluate.py --checkpoint model.safetensors --data 'val/val-{000000..000009}.tar' \\
            --output eval/ [--image-size 256] [--batch-size 16] [--limit 10000] [--rule posterior|mean] \\
            [--audit]
Images are decoded and center-cropped exactly as jobs/tokenize.py does; bad samples are skipped and listed
with their reason. --audit also writes the readiness audit of the same images (audit.json, audit.md and
its plots: what jobs/audit.py writes). A plain in-process loop (no Ray); --device cuda uses a GPU. Exit
status: 0 report written, 1 report written but a shard was unreadable or no image could be evaluated, 2 bad
arguments.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse

import gq
from gq.audit import ReadinessAudit
from pipeline.data.decode import add_limit_arguments, limits_from_args
from pipeline.data.shards import expand_shards
from pipeline.evaluate.audit import build_audit, write_audit
from pipeline.evaluate.report import EvalSettings, build_report, evaluate_shards, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to evaluate
    p.add_argument("--checkpoint", required=True, help="GQ-VAE .safetensors checkpoint (path or fsspec URL)")
    p.add_argument("--data", required=True, help="SHARDS: brace pattern, glob, directory or .txt URL list")
    p.add_argument("--output", required=True, help="DIR for report.json, report.md and the PNG plots")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    p.add_argument(
        "--rule",
        choices=["posterior", "mean"],
        default=None,
        help="GQ rule to score (default: the checkpoint's)",
    )
    # preprocessing and bad input (as jobs/tokenize.py)
    p.add_argument("--image-size", type=int, default=256, help="shorter side resized to this, center crop")
    add_limit_arguments(p)
    # throughput
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, ...)")
    p.add_argument("--decode-threads", type=int, default=2, help="image decoding threads")
    p.add_argument("--examples", type=int, default=4, help="rows of the reconstruction grid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--audit", action="store_true", help="also write the readiness audit (jobs/audit.py)")
    args = p.parse_args(argv)
    for name in ("image_size", "batch_size", "min_side", "max_pixels", "max_member_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.decode_threads < 0 or args.examples < 1 or args.max_aspect < 1:
        p.error("--decode-threads must be >= 0, --examples >= 1 and --max-aspect >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = EvalSettings(
        image_size=args.image_size,
        batch_size=args.batch_size,
        limit=args.limit,
        rule=args.rule,
        limits=limits_from_args(args),
        decode_threads=args.decode_threads,
        examples=args.examples,
    )
    try:
        shards = expand_shards(args.data)
        model = gq.load(args.checkpoint, map_location=args.device)
        if args.image_size % model.downsample:
            raise ValueError(f"--image-size must be a multiple of {model.downsample}, got {args.image_size}")
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError; a directory: OSError
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(
        f"evaluate: {len(shards)} shards, model {str(model.checkpoint_sha256)[:12]} -> {args.output}",
        flush=True,
    )

    progress = iter
    if not args.no_progress:
        from tqdm import tqdm

        progress = lambda shards: tqdm(shards, desc="evaluate", unit="shard")  # noqa: E731
    audit = ReadinessAudit(model) if args.audit else None
    run = evaluate_shards(model, shards, settings, progress=progress, also=audit.update if audit else None)
    report = build_report(run, model, args.checkpoint, settings)
    written = write_report(args.output, report, run)
    if audit is not None:
        read = {"shards": len(shards), "shards_unreadable": run.unreadable, "image_size": args.image_size,
                "skipped_by_reason": report["skipped"]["by_reason"]}  # fmt: skip
        written += write_audit(args.output, build_audit(audit, read, args.checkpoint), audit)
    if report["images"]:
        g, c = report["gq"], report["continuous"]
        print(
            f"evaluate: {report['images']} images, {report['rate']['bits_per_pixel']:.4g} bpp; PSNR "
            f"{c['psnr_db']:.2f} dB continuous, {g['psnr_db']:.2f} dB GQ; "
            f"SSIM {c['ssim']:.4f} continuous, {g['ssim']:.4f} GQ; "
            f"codebook usage {report['codebook']['usage']:.4f}; skipped {report['skipped']['count']}",
            flush=True,
        )
    print(f"evaluate: wrote {', '.join(os.path.basename(w) for w in written)}", flush=True)
    if run.unreadable:
        print(f"evaluate: unreadable shards: {', '.join(run.unreadable)}", file=sys.stderr)
    if not report["images"]:
        print("evaluate: no image could be evaluated", file=sys.stderr)
    return 1 if run.unreadable or not report["images"] else 0


if __name__ == "__main__":
    sys.exit(main())
