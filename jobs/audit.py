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
from pipeline.cli import add_config_arguments, config_from_args
from pipeline.data.shards import expand_shards
from pipeline.evaluate.audit import AuditSettings, audit_shards, build_audit, write_audit


def parse_args(argv: list[str] | None = None) -> AuditSettings:
    """Every field of AuditSettings and of its components as an option, its help the field's documentation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, AuditSettings)
    try:
        return config_from_args(AuditSettings, p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        shards = expand_shards(settings.input)
        model = gq.load(settings.checkpoint, map_location=settings.device)
        if settings.image_size % model.downsample:
            raise ValueError(
                f"--image-size must be a multiple of {model.downsample}, got {settings.image_size}"
            )
        points = candidate_points(model.config.latent_channels, tuple(settings.codebook_bits or ())) or None
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError
        print(f"audit: error: {e}", file=sys.stderr)
        return 2
    print(
        f"audit: {len(shards)} shards, model {str(model.checkpoint_sha256)[:12]} -> {settings.output}",
        flush=True,
    )
    audit, read = audit_shards(model, shards, settings.read, points)
    report = build_audit(audit, read, settings.checkpoint)
    written = write_audit(settings.output, report, audit)
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
