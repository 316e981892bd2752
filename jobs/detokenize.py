"""Decode token Parquet files back to PNG images with the GQ-VAE that wrote them.

Run:    python jobs/detokenize.py --tokens tokens/ --checkpoint model.safetensors --output images/ \\
            [--limit 16]
Writes DIR/<token file stem>/<key>.png (keys sanitised; a "/" in a key makes a folder). A token file whose
codebook fingerprint or model sha256 differs from the checkpoint's is refused before anything is decoded;
--allow-model-mismatch decodes with another model of the same codebook (for experiments). --tokens and
--output may be fsspec URLs. Exit status: 0 every image written, 1 a token file could not be read,
2 bad arguments or a mismatched checkpoint.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a script, jobs/ heads sys.path and its tokenize.py shadows the stdlib's:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout instead

import argparse

import pyarrow as pa

import gq
from pipeline.tokens.detokenizer import TokenMismatch, check_tokens_match, detokenize_file
from pipeline.tokens.reader import list_token_files
from pipeline.tokens.writer import read_metadata


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", required=True, help="a token .parquet file, a directory of them, or a glob")
    p.add_argument(
        "--checkpoint", required=True, help="the GQ-VAE .safetensors checkpoint (path or fsspec URL)"
    )
    p.add_argument("--output", required=True, help="DIR for <file stem>/<key>.png")
    p.add_argument("--limit", type=int, default=None, help="decode at most this many images in all")
    p.add_argument("--batch-size", type=int, default=16, help="images per decoder pass")
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, ...)")
    p.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="decode tokens written by another checkpoint of the same codebook (codebook still checked)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        p.error("--batch-size and --limit must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files = list_token_files(args.tokens)
        model = gq.load(args.checkpoint, map_location=args.device)
        metas = {url: read_metadata(url) for url in files}
        for url, meta in metas.items():
            check_tokens_match(meta, model, allow_model_mismatch=args.allow_model_mismatch, name=url)
    except TokenMismatch as e:
        print(f"detokenize: refused: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, pa.ArrowException, RuntimeError) as e:
        print(f"detokenize: error: {e}", file=sys.stderr)
        return 2

    progress = files
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(files, desc="detokenize", unit="file")
    written, failed = 0, []
    for url in progress:
        left = None if args.limit is None else args.limit - written
        if left is not None and left <= 0:
            break
        try:
            out = detokenize_file(url, model, args.output, metas[url], batch_size=args.batch_size, limit=left)
        except (OSError, ValueError, pa.ArrowException) as e:
            print(f"detokenize: {url}: {e}", file=sys.stderr)
            failed.append(url)
            continue
        written += len(out)
    print(f"detokenize: {written} images from {len(files)} token files -> {args.output}", flush=True)
    if failed:
        print(f"detokenize: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
