"""Train the GQ-VAE (Gaussian VAE + TDC) on WebDataset image shards with Ray Train.

Run on a cluster:   ray job submit --working-dir . -- python jobs/train_vae.py --preset paper-f8c16 \\
                        --data 's3://b/train-{000000..001023}.tar' --output /shared/gq025 --workers 8 --gpu
Run locally:        python jobs/train_vae.py --preset small-f8c16 --data shards/ --output runs/small \\
                        --image-size 64 --max-steps 2000
Started again with the same --output after any interruption, it resumes from the last checkpoint (step,
optimizer state, TDC multipliers, data position); a finished run just re-exports DIR/model.safetensors.
Without a Ray cluster to join it starts an embedded local one. --output must be a directory the driver
and every worker can write (a shared filesystem on a multi-node cluster), and absolute under `ray job
submit`, whose working directory is a temporary copy. Exit status: 0 done, 1 failed, 2 bad arguments.
"""

from __future__ import annotations

import startup  # (first: the jobs' shared start-up, jobs/startup.py)

# isort: split
import argparse
import os
import sys
import traceback

import gq
from gq.losses import LossConfig
from pipeline.data.shards import expand_shards
from pipeline.train.config import TrainSettings
from pipeline.train.loop import export_finished, run_training


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainSettings]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainSettings(preset="small-f8c16", data="", output="")  # defaults, for the help texts
    # model
    p.add_argument("--preset", required=True, choices=sorted(gq.PRESETS), help="network preset")
    p.add_argument(
        "--bpp", type=float, default=d.bpp, choices=sorted(gq.OPERATING_POINTS), help="operating point"
    )
    p.add_argument(
        "--kl-mode", choices=["tdc", "kl"], default=d.kl_mode, help="tdc, or kl (plain VAE ablation)"
    )
    p.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of the KL / TDC term")
    # data and output
    p.add_argument(
        "--data", required=True, help="training SHARDS: brace pattern, glob, directory or .txt list"
    )
    p.add_argument("--val-data", default=None, help="validation SHARDS (PSNR, codebook usage, KL spread)")
    p.add_argument("--output", required=True, help="DIR for metrics.jsonl, checkpoints and model.safetensors")
    p.add_argument("--image-size", type=int, default=d.image_size, help="training crop size (multiple of 8)")
    # scale
    p.add_argument("--workers", type=int, default=d.workers, help="data-parallel Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default CPU (gloo)")
    p.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker, help="CPUs (threads) per worker")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per worker per step")
    # optimisation
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="total autoencoder steps")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate of the autoencoder")
    p.add_argument("--l1-weight", type=float, default=d.loss.l1_weight, help="weight of the L1 loss")
    p.add_argument("--l2-weight", type=float, default=d.loss.l2_weight, help="weight of the L2 loss")
    p.add_argument(
        "--perceptual-weights",
        default=None,
        help="local LPIPS-VGG .safetensors or TorchScript file; absent: no perceptual loss (none downloaded)",
    )
    p.add_argument("--perceptual-weight", type=float, default=d.loss.perceptual_weight, help="its weight")
    p.add_argument("--disc-start", type=int, default=d.loss.disc_start, help="first step with the GAN loss")
    p.add_argument("--disc-weight", type=float, default=d.loss.disc_weight, help="adaptive GAN weight scale")
    p.add_argument("--disc-lr", type=float, default=None, help="discriminator learning rate (default: --lr)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of init, data order, crops and noise")
    # bookkeeping
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints"
    )
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept")
    p.add_argument(
        "--max-failures",
        type=int,
        default=d.max_failures,
        help="worker failures recovered in-run (Ray Train)",
    )
    p.add_argument("--val-every", type=int, default=d.val_every, help="steps between validations/exports")
    p.add_argument("--val-images", type=int, default=d.val_images, help="validation images used")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between metric lines")
    p.add_argument("--decode-threads", type=int, default=d.decode_threads, help="decoding threads per worker")
    args = p.parse_args(argv)
    try:
        loss = LossConfig(
            l1_weight=args.l1_weight,
            l2_weight=args.l2_weight,
            perceptual_weights=args.perceptual_weights,
            perceptual_weight=args.perceptual_weight,
            disc_start=args.disc_start,
            disc_weight=args.disc_weight,
            disc_lr=args.disc_lr,
        )
        settings = TrainSettings(
            preset=args.preset,
            data=args.data,
            output=args.output,
            val_data=args.val_data,
            bpp=args.bpp,
            workers=args.workers,
            gpu=args.gpu,
            cpus_per_worker=args.cpus_per_worker,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            image_size=args.image_size,
            kl_mode=args.kl_mode,
            kl_weight=args.kl_weight,
            loss=loss,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            max_failures=args.max_failures,
            val_every=args.val_every,
            val_images=args.val_images,
            log_every=args.log_every,
            decode_threads=args.decode_threads,
            seed=args.seed,
        )
    except ValueError as e:
        p.error(str(e))
    if args.perceptual_weights and not os.path.isfile(args.perceptual_weights):
        p.error(f"--perceptual-weights {args.perceptual_weights!r}: no such file (nothing is downloaded)")
    return args, settings


def check_data(settings: TrainSettings) -> str | None:
    """Why the shard arguments cannot be used, or None."""
    try:
        shards = expand_shards(settings.data)
        if settings.val_data:
            expand_shards(settings.val_data)
    except (ValueError, OSError) as e:
        return str(e)
    if len(shards) < settings.workers:
        return f"{len(shards)} training shards for {settings.workers} workers: every worker needs one"
    return None


def main(argv: list[str] | None = None) -> int:
    _, settings = parse_args(argv)
    try:
        result = export_finished(settings)  # a finished run: re-export only, no Ray
        if result is None:
            problem = check_data(settings)
            if problem:
                print(f"train_vae: error: {problem}", file=sys.stderr)
                return 2
            with startup.ray_session(include_dashboard=None):  # Ray's default: Ray Train reports there
                result = run_training(settings)
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
