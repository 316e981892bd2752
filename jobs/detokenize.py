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
from pipeline.cli import add_config_arguments, config_from_args
from pipeline.tokens.detokenizer import DetokenizeSettings, TokenMismatch, check_tokens_match, detokenize_file
from pipeline.tokens.files import list_token_files
from pipeline.tokens.writer import read_metadata


def parse_args(argv: list[str] | None = None) -> DetokenizeSettings:
    """Every field of DetokenizeSettings as an option, its help the field's documentation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, DetokenizeSettings)
    try:
        return config_from_args(DetokenizeSettings, p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        files = list_token_files(settings.tokens)
        model = gq.load(settings.checkpoint, map_location=settings.device)
        metas = {url: read_metadata(url) for url in files}
        for url, meta in metas.items():
            check_tokens_match(meta, model, allow_model_mismatch=settings.allow_model_mismatch, name=url)
    except TokenMismatch as e:
        print(f"detokenize: refused: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, pa.ArrowException, RuntimeError) as e:
        print(f"detokenize: error: {e}", file=sys.stderr)
        return 2

    progress = files
    if settings.progress:
        from tqdm import tqdm

        progress = tqdm(files, desc="detokenize", unit="file")
    written, failed = 0, []
    for url in progress:
        left = None if settings.limit is None else settings.limit - written
        if left is not None and left <= 0:
            break
        try:
            out = detokenize_file(
                url, model, settings.output, metas[url], batch_size=settings.batch_size, limit=left
            )
        except (OSError, ValueError, pa.ArrowException) as e:
            print(f"detokenize: {url}: {e}", file=sys.stderr)
            failed.append(url)
            continue
        written += len(out)
    print(f"detokenize: {written} images from {len(files)} token files -> {settings.output}", flush=True)
    if failed:
        print(f"detokenize: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
