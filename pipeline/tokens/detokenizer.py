"""Token files back to images: checks against the checkpoint, batched decoding, PNG files with safe names.

A token file is decoded only by a model it matches: the same codebook (fingerprint), groups and layout,
and, unless `allow_model_mismatch`, the very checkpoint that wrote it (model sha256). Decoding with another
decoder of the same codebook is legitimate for experiments, never by accident.
"""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from fsspec.core import url_to_fs
from PIL import Image

from gq.metrics import to_uint8
from gq.model import GQVAE
from pipeline.cli import option
from pipeline.io import join
from pipeline.tokens.files import tokens_array

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_PART = 200  # characters per path component (file systems allow 255 bytes)


@dataclass(frozen=True)
class DetokenizeSettings:
    """The command line of jobs/detokenize.py."""

    tokens: str = field(metadata=option(type=None))  # a token .parquet file, a directory of them, or a glob
    checkpoint: str = field(metadata=option(type=None))  # the GQ-VAE .safetensors checkpoint (path or URL)
    output: str = field(metadata=option(type=None))  # DIR for <file stem>/<key>.png
    limit: int | None = None  # decode at most this many images in all
    batch_size: int = 16  # images per decoder pass
    device: str = field(default="cpu", metadata=option(type=None))  # torch device of the model (cpu, cuda)
    allow_model_mismatch: bool = field(
        default=False, metadata=option(action="store_true")
    )  # decode tokens written by another checkpoint of the same codebook (codebook still checked)
    progress: bool = field(default=True, metadata=option(negated=True, help="no progress bar"))  # a bar

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("--batch-size and --limit must be >= 1")


class TokenMismatch(ValueError):
    """The token file was not written with this checkpoint's codebook (or, strictly, this checkpoint)."""


def check_tokens_match(
    meta: dict, model: GQVAE, *, allow_model_mismatch: bool = False, name: str = ""
) -> None:
    """Raise TokenMismatch, saying what differs, unless `model` may decode the tokens described by `meta`."""
    q = model.config.quantizer
    problems = []
    if meta.get("codebook_fingerprint") != model.codebook_fingerprint:
        problems.append(
            f"codebook fingerprint {str(meta.get('codebook_fingerprint'))[:16]}... != the checkpoint's "
            f"{model.codebook_fingerprint[:16]}... "
            f"(codebook {meta.get('codebook')} vs {q.codebook.to_dict()})"
        )
    if meta.get("groups") != q.groups or meta.get("layout") != q.layout:
        problems.append(
            f"groups/layout {meta.get('groups')}/{meta.get('layout')} != "
            f"the checkpoint's {q.groups}/{q.layout}"
        )
    if not allow_model_mismatch and meta.get("model_sha256") != model.checkpoint_sha256:
        problems.append(
            f"written by model {str(meta.get('model_sha256'))[:16]}..., not this checkpoint "
            f"({str(model.checkpoint_sha256)[:16]}...); --allow-model-mismatch decodes with it anyway "
            "when the codebook is the same"
        )
    if problems:
        raise TokenMismatch(f"{name or 'token file'}: " + "; ".join(problems))


def key_path(key: str) -> str:
    """A relative path for a sample key: "/" keeps making folders, every other character outside
    [A-Za-z0-9._-] becomes "_", no component is empty or starts with "." (so never "..")."""
    parts = []
    for part in key.split("/"):
        if part in ("", "."):
            continue
        part = _UNSAFE.sub("_", part)[:_MAX_PART]
        parts.append("_" + part if part.startswith(".") else part)
    return "/".join(parts) or "_"


def token_grid(tokens: np.ndarray, meta: dict) -> torch.Tensor:
    """(rows, tokens_per_image) raster-order tokens -> (rows, h, w, groups) int64, as the metadata says."""
    h, w = meta["token_grid"]
    g = int(meta["groups"])
    if tokens.shape[1] != h * w * g:
        raise ValueError(f"{tokens.shape[1]} tokens per row, metadata says {h} x {w} x {g}")
    return torch.from_numpy(tokens.astype(np.int64)).view(len(tokens), h, w, g)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def file_stem(url: str) -> str:
    name = posixpath.basename(url.rstrip("/"))
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def decoded_batches(
    url: str, model: GQVAE, meta: dict, *, batch_size: int = 16, limit: int | None = None
) -> Iterator[tuple[list[str], list[int], np.ndarray]]:
    """(keys, indices, uint8 images (B, H, W, 3)) of the file's rows in order, at most `limit` rows."""
    left = limit
    with fsspec.open(url, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(
            batch_size=batch_size, columns=["key", "index", "tokens"]
        ):
            if left is not None:
                if left <= 0:
                    return
                batch = batch.slice(0, left)
                left -= batch.num_rows
            tokens = token_grid(tokens_array(batch.column("tokens")), meta)
            with torch.inference_mode():
                images = to_uint8(model.detokenize(tokens.to(model.device))).cpu().numpy()
            yield batch.column("key").to_pylist(), batch.column("index").to_pylist(), images


def detokenize_file(
    url: str,
    model: GQVAE,
    output: str,
    meta: dict,
    *,
    batch_size: int = 16,
    limit: int | None = None,
) -> list[str]:
    """Decode one token file to `output/<file stem>/<key path>.png` (PNG, lossless: the pixels are exactly
    `to_uint8(model.detokenize(tokens))`); returns the URLs written. Two keys that sanitise to the same
    path get their row index appended. `meta` must have passed `check_tokens_match`."""
    fs, _ = url_to_fs(output)
    base = join(output, file_stem(url))
    used: set[str] = set()
    made: set[str] = set()
    written = []
    for keys, indices, images in decoded_batches(url, model, meta, batch_size=batch_size, limit=limit):
        for key, index, image in zip(keys, indices, images):
            name = key_path(key)
            if name in used:
                name = f"{name}-{index}"
            used.add(name)
            target = join(base, f"{name}.png")
            parent = posixpath.dirname(target)
            if parent not in made:
                fs.makedirs(url_to_fs(parent)[1], exist_ok=True)
                made.add(parent)
            fs.pipe_file(url_to_fs(target)[1], png_bytes(image))
            written.append(target)
    return written
