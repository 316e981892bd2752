"""Tokenize WebDataset image shards into Parquet token files with a GQ-VAE, on a Ray actor pool.

Run on a cluster:   ray job submit --working-dir . -- python jobs/tokenize.py --input SHARDS --output DIR \\
                        --checkpoint CKPT
Run locally:        python jobs/tokenize.py --input 'shards/train-{000000..000009}.tar' --output tokens/ \\
                        --checkpoint model.safetensors
Without a cluster to join it starts an embedded local Ray. Started again after any interruption it skips
the committed shards. Exit status: 0 every shard committed, 1 a shard could not be committed (unreadable,
or failing after retries; named in the summary) or the run stopped with no actor left and none placed
within --actor-wait (the summary says what was asked for and what the cluster has), 2 bad arguments.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse
import contextlib

import gq
from gq.model import fixed_image_size
from jobs import startup
from pipeline.cli import add_dataclass_arguments, dataclass_from_args
from pipeline.data.decode import DecodeLimits
from pipeline.data.extras import check_keep
from pipeline.data.views import VIEW_SETS
from pipeline.tokenize.driver import ON_EXISTING, JobSettings, plan, prepare_output, run_job
from pipeline.tokenize.precision import CHOICES as PRECISIONS
from pipeline.tokenize.precision import resolve_encoder_precision
from pipeline.tokenize.processor import JPEG_DECODERS, TokenizeOptions
from pipeline.tokens.records import read_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to read and write
    p.add_argument("--input", required=True, help="SHARDS: brace pattern, glob, directory or .txt URL list")
    p.add_argument("--output", required=True, help="DIR for <shard>.parquet, _manifest/ and _run.json")
    p.add_argument("--checkpoint", required=True, help="GQ-VAE .safetensors checkpoint (path or fsspec URL)")
    p.add_argument(
        "--on-existing",
        choices=ON_EXISTING,
        default="skip",
        help="skip: resume, keeping committed shards; overwrite: delete what earlier runs recorded in DIR "
        "(their token files, commit records, run record) and start afresh",
    )
    p.add_argument(
        "--allow-nonempty-output",
        action="store_true",
        help="write into a DIR holding other files but no run record of this tool (they are never deleted)",
    )
    # preprocessing and bad input
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="shorter side resized to this, center crop (default: the model's own size for a ViT, else 256)",
    )
    p.add_argument(
        "--views",
        choices=list(VIEW_SETS),
        default="center",
        help="rows per sample: center (1); flip: the center crop and its mirror (2); tencrop: 4 corners + "
        "center of a 1.1x square, each also mirrored (10); a `view` column numbers them (LlamaGen's views)",
    )
    p.add_argument(
        "--keep",
        default="",
        help="member extensions kept as columns, comma-separated (txt,json): .txt as a UTF-8 string, .json "
        "as its JSON text, others as bytes; invalid UTF-8 or JSON gives null and a note",
    )
    add_dataclass_arguments(p, DecodeLimits)
    # throughput and resources
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--actors", type=int, default=1, help="tokenizer actors (one model each)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor; 0 runs on CPU")
    p.add_argument(
        "--cpus-per-actor", type=float, default=None, help="CPUs per actor (default: all CPUs / actors)"
    )
    p.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="image decoding threads per actor (default: 1 on CPU actors, 4 on GPU actors)",
    )
    p.add_argument(
        "--encoder-precision",
        choices=list(PRECISIONS),
        default="auto",
        help="auto: bfloat16 on CPU actors whose CPU has native bf16 (AVX512-BF16 or AMX; ~1.5x there), "
        "float32 elsewhere; bfloat16: encoder under autocast (GPU tensor cores; emulated, several times "
        "slower, on CPUs without native bf16); the search stays float32. _run.json keeps the resolved one",
    )
    p.add_argument(
        "--jpeg-decoder",
        choices=list(JPEG_DECODERS),
        default="pil",
        help="pil-draft: large JPEGs decoded at 1/2-1/8 scale by libjpeg (~2.3x faster, pixels differ "
        "slightly); nvjpeg: decode JPEGs on the actor's GPU in batches (needs torchvision, --gpus-per-actor)",
    )
    p.add_argument("--retries", type=int, default=3, help="attempts per shard after the first")
    p.add_argument(
        "--actor-wait",
        type=float,
        default=300.0,
        metavar="S",
        help="with no actor alive and none placed within S seconds (the cluster lost its nodes, or has no "
        "room for one), stop with exit 1; committed shards are kept and a rerun completes the rest. While "
        "one actor is alive the run goes on, and replacements of lost actors join when placed",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary still prints)")
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = default_image_size(args.checkpoint)
    for name in ("image_size", "batch_size", "actors", "min_side", "max_pixels", "max_member_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.decode_threads is None:
        args.decode_threads = 1 if args.gpus_per_actor == 0 else 4
    if args.decode_threads < 0 or args.retries < 0 or args.gpus_per_actor < 0 or args.max_aspect < 1:
        p.error("--decode-threads, --retries, --gpus-per-actor must be >= 0 and --max-aspect >= 1")
    if not args.actor_wait > 0:
        p.error("--actor-wait must be > 0")
    if args.jpeg_decoder == "nvjpeg" and args.gpus_per_actor == 0:
        p.error("--jpeg-decoder nvjpeg needs GPU actors (--gpus-per-actor > 0)")
    if args.jpeg_decoder == "nvjpeg" and args.views != "center":
        p.error("--views flip and tencrop crop on the CPU: use --jpeg-decoder pil or pil-draft")
    try:
        args.keep = check_keep(tuple(e for e in args.keep.split(",") if e.strip()))
    except ValueError as e:
        p.error(str(e))
    return args


def default_image_size(checkpoint: str) -> int:
    """The model's fixed image size (a ViT's), else 256; an unreadable checkpoint is reported by plan()."""
    try:
        return fixed_image_size(gq.describe(checkpoint).config) or 256
    except (OSError, ValueError):
        return 256


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # resolved here, on the driver's CPU, so the run record pins a concrete precision
    recorded_preprocessing = {}  # of the run in DIR, if any
    with contextlib.suppress(OSError, ValueError):  # an unreadable DIR is reported by plan() below
        recorded_preprocessing = (read_run(args.output) or {}).get("preprocessing") or {}
    recorded = recorded_preprocessing.get("encoder_precision")
    # a directory from before width/height columns resumes without them, so that its files agree
    resumed = bool(recorded_preprocessing) and args.on_existing == "skip"
    source_size = not (resumed and "source_size" not in recorded_preprocessing)
    gpu = args.gpus_per_actor > 0
    precision, warning = resolve_encoder_precision(args.encoder_precision, gpu=gpu, recorded=recorded)
    if warning:
        print(f"tokenize: warning: {warning}", file=sys.stderr, flush=True)
    options = TokenizeOptions(
        image_size=args.image_size,
        limits=dataclass_from_args(DecodeLimits, args),
        batch_size=args.batch_size,
        decode_threads=args.decode_threads,
        encoder_precision=precision,
        jpeg_decoder=args.jpeg_decoder,
        keep=args.keep,
        views=args.views,
        source_size=source_size,
    )
    settings = JobSettings(
        input=args.input,
        output=args.output,
        checkpoint=args.checkpoint,
        options=options,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        on_existing=args.on_existing,
        allow_nonempty_output=args.allow_nonempty_output,
        retries=args.retries,
        actor_wait=args.actor_wait,
        progress=not args.no_progress,
    )
    try:
        shards, run = plan(settings)
        prepare_output(settings, run)
    except (ValueError, OSError) as e:  # bad arguments, unreadable paths: one line, exit 2
        print(f"tokenize: error: {e}", file=sys.stderr)
        return 2
    model = run["model_sha256"][:12]
    print(f"tokenize: {len(shards)} shards -> {settings.output} (model {model})", flush=True)

    with startup.ray_session():
        summary = run_job(settings, shards, run)
    print(summary.format(), flush=True)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
