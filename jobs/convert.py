"""Convert between the paper's official GQ checkpoints and ours.

Run:    python jobs/convert.py from-official --checkpoint sd3unet_gq_0.25.ckpt \\
            --config sd3unet_gq_0.25.yaml --output gq-paper-0.25bpp.safetensors
        python jobs/convert.py to-official --checkpoint model.safetensors --output model.ckpt \\
            [--config-output model.yaml] [--resolution 256]
        python jobs/convert.py from-diffusers --vae sd3-vae/ --group-dim 16 --codebook-bits 16 \\
            [--calibrate 'shards/*.tar' --calibrate-images 1000] --output sd3-gq.safetensors
        python jobs/convert.py calibrate --checkpoint model.safetensors --calibrate 'shards/*.tar' \\
            --output model-calibrated.safetensors

What each does: pipeline/convert/conversions.py. Paths may be fsspec URLs; nothing is downloaded. Exit
status: 0 written, 2 bad arguments or a checkpoint/config this version cannot convert (one line saying
which field or tensor).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse

import gq
from pipeline.convert.conversions import SUBCOMMANDS, calibration_in, diffusers_in, official_in, official_out
from pipeline.evaluate.calibration import CalibrationError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", required=True)
    for name, (help_, options) in SUBCOMMANDS.items():
        parser = sub.add_parser(name, help=help_)
        for flag, keywords in options.items():
            parser.add_argument(flag, **keywords)
        parser.add_argument("--force", action="store_true", help="replace output files that already exist")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[str]:
    """The conversion the subcommand names; the lines to print."""
    if args.direction == "from-official":
        return official_in(args.checkpoint, args.config, args.output, force=args.force)
    if args.direction == "to-official":
        return official_out(
            args.checkpoint, args.output, args.config_output, resolution=args.resolution, force=args.force
        )
    calibration = args.calibrate and {
        "shards": args.calibrate,
        "images": args.calibrate_images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
    }
    if args.direction == "calibrate":
        return calibration_in(args.checkpoint, args.output, calibration, force=args.force)
    return diffusers_in(
        args.vae,
        args.output,
        group_dim=args.group_dim,
        codebook_bits=args.codebook_bits,
        layout=args.layout,
        calibration=calibration,
        force=args.force,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lines = run(args)
    except (gq.CheckpointError, CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
