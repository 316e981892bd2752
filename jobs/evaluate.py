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
from pipeline.cli import add_config_arguments, config_from_args
from pipeline.data.shards import expand_shards
from pipeline.evaluate.audit import build_audit, write_audit
from pipeline.evaluate.report import EvalJob, build_report, evaluate_shards, summary_line, write_report


def parse_args(argv: list[str] | None = None) -> EvalJob:
    """Every field of EvalJob and of its components as an option, its help the field's documentation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, EvalJob)
    try:
        return config_from_args(EvalJob, p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    job = parse_args(argv)
    settings = job.settings
    try:
        shards = expand_shards(job.data)
        model = gq.load(job.checkpoint, map_location=job.device)
        settings = settings.for_model(model)  # the image size: a ViT's own by default, else 256
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError; a directory: OSError
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(
        f"evaluate: {len(shards)} shards, model {str(model.checkpoint_sha256)[:12]} -> {job.output}",
        flush=True,
    )

    progress = iter
    if job.progress:
        from tqdm import tqdm

        progress = lambda shards: tqdm(shards, desc="evaluate", unit="shard")  # noqa: E731
    audit = ReadinessAudit(model) if job.audit else None
    run = evaluate_shards(model, shards, settings, progress=progress, also=audit.update if audit else None)
    report = build_report(run, model, job.checkpoint, settings)
    written = write_report(job.output, report, run)
    if audit is not None:
        read = {
            "shards": len(shards),
            "shards_unreadable": run.unreadable,
            "image_size": settings.image_size,
            "skipped_by_reason": report["skipped"]["by_reason"],
        }
        written += write_audit(job.output, build_audit(audit, read, job.checkpoint), audit)
    if report["images"]:
        print(f"evaluate: {summary_line(report)}", flush=True)
    print(f"evaluate: wrote {', '.join(os.path.basename(w) for w in written)}", flush=True)
    if run.unreadable:
        print(f"evaluate: unreadable shards: {', '.join(run.unreadable)}", file=sys.stderr)
    if not report["images"]:
        print("evaluate: no image could be evaluated", file=sys.stderr)
    return 1 if run.unreadable or not report["images"] else 0


if __name__ == "__main__":
    sys.exit(main())
