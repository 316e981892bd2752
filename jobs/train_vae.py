"""Train the GQ-VAE (Gaussian VAE + TDC) on WebDataset image shards with Ray Train.

Run on a cluster:   ray job submit --working-dir . -- python jobs/train_vae.py --preset paper-f8c16 \\
                        --data 's3://b/train-{000000..001023}.tar' --output /mnt/runs/gq025 --workers 8 --gpu
Run locally:        python jobs/train_vae.py --preset small-f8c16 --data shards/ --output runs/small \\
                        --image-size 64 --max-steps 2000
Fine-tune a converted model (a diffusers VAE, an official release, one of ours) with TDC instead of
training one:       python jobs/train_vae.py --init sd3-gq.safetensors --data shards/ --output runs/sd3
(--init brings the network, weights, operating point and calibration; the source's sha256 goes into the
provenance). Started again with the same --output after any interruption, it resumes from the last
checkpoint (step, optimizer state, TDC multipliers, data position); a finished run just re-exports
DIR/model.safetensors.
Without a Ray cluster to join it starts an embedded local one. --output must be a directory the driver
and every worker can write (a shared filesystem on a multi-node cluster), and absolute under `ray job
submit`, whose working directory is a temporary copy. Exit status: 0 done, 1 failed (or no room for the
workers within --worker-wait: the checkpoints are kept for a rerun), 2 bad arguments.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse
import traceback

import gq
from gq.tdc import MODES
from jobs import startup
from pipeline.cli import add_config_arguments, config_from_args
from pipeline.train.config import TrainSettings
from pipeline.train.run import InputError, NoRoomForWorkers, run_training


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainSettings]:
    """Every field of TrainSettings and of its components as an option, its help the field's documentation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(
        p,
        TrainSettings,
        preset={"choices": sorted(gq.PRESETS)},
        bpp={"choices": sorted(gq.OPERATING_POINTS)},
        kl_mode={"choices": MODES},
    )
    args = p.parse_args(argv)
    try:  # the settings read --init's config: a bad file is exit 2 here, not a failed run
        settings = config_from_args(TrainSettings, args)
    except (ValueError, OSError) as e:
        p.error(f"--init {args.init!r}: {e}" if args.init else str(e))
    if args.perceptual_weights and not os.path.isfile(args.perceptual_weights):
        p.error(f"--perceptual-weights {args.perceptual_weights!r}: no such file (nothing is downloaded)")
    return args, settings


def main(argv: list[str] | None = None) -> int:
    _, settings = parse_args(argv)
    try:  # a finished run is re-exported without Ray; Ray's default dashboard: Ray Train reports there
        result = run_training(settings, session=lambda: startup.ray_session(include_dashboard=None))
    except InputError as e:  # found before Ray starts: a bad pattern is exit 2, not a failed run
        print(f"train_vae: error: {e}", file=sys.stderr)
        return 2
    except NoRoomForWorkers as e:  # not a failure of the code: one line, no traceback
        print(f"train_vae: stopped: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a clear one-line reason at the end of the log, the traceback above it
        traceback.print_exc()
        print(f"train_vae: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    m = result.metrics
    print(
        f"train_vae: step {result.step} -> {result.model}"
        + (f" (loss {m['loss']:.4g})" if "loss" in m else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
