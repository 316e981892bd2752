"""Flat export: token Parquet files -> one memory-mappable token file plus an offsets index (LLM-style).

For an output PREFIX three local files are written (each to a temporary name, then renamed):

    PREFIX.bin    every sequence's tokens back to back, little-endian uint16 when every value (offset,
                  BOS and EOS included) is below 65536, else uint32; no header:
                  `np.memmap("PREFIX.bin", dtype="<u2")` reads it.
    PREFIX.idx    a 24-byte header then offsets, all little-endian:
                    bytes 0-7    magic b"GQTOKIDX"
                    bytes 8-11   uint32 format version (1)
                    bytes 12-15  uint32 bytes per token (2 or 4)
                    bytes 16-23  uint64 number of sequences N
                    then         N + 1 int64 token offsets: sequence i is tokens[offsets[i]:offsets[i + 1]],
                                 offsets[0] = 0 and offsets[N] = the token count of PREFIX.bin
    PREFIX.json   what the tokens are: the source files' `gq` metadata (codebook, model, grid), offset,
                  bos, eos, vocab_size, dtype, and the source files with their row counts, in export order.

Sequences are the rows of the source files in order (files as listed, rows in file order), each
[BOS] + (tokens + offset) + [EOS]; with `view=v`, only the rows of that view (files tokenized with
`--views flip|tencrop`; a file without a `view` column has view 0 only). `open_flat(PREFIX)` maps the
tokens and reads the offsets.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence

import numpy as np

from pipeline.io import atomic_open, write_atomic
from pipeline.tokens.files import (
    WorkUnit,
    check_same_codebook,
    open_token_files,
    read_unit,
    tokens_array,
)

MAGIC = b"GQTOKIDX"
VERSION = 1
_HEADER = struct.Struct("<8sIIQ")


def flat_dtype(max_value: int) -> np.dtype:
    """uint16 when every token id fits, else uint32."""
    if max_value < 2**16:
        return np.dtype("<u2")
    if max_value < 2**32:
        return np.dtype("<u4")
    raise ValueError(f"token ids up to {max_value} do not fit uint32")


def _paths(prefix: str) -> tuple[str, str, str]:
    for ext in (".bin", ".idx", ".json"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return prefix + ".bin", prefix + ".idx", prefix + ".json"


def export_flat(
    source: str | Sequence[str],
    prefix: str,
    *,
    offset: int = 0,
    bos: int | None = None,
    eos: int | None = None,
    view: int | None = None,
) -> dict:
    """Write PREFIX.bin / .idx / .json (see the module doc) from the token files named by `source` (a
    directory, glob, file, or list, local or fsspec); `prefix` is a local path. Returns the .json content.
    Files with different codebooks are refused (pipeline.tokens.files.TokenFileMismatch)."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    files = open_token_files(source)
    meta = check_same_codebook(files)
    if view is not None and not 0 <= view < min(f.views for f in files):
        raise ValueError(f"view {view}: the files have {min(f.views for f in files)} view(s) per sample")
    size = int(meta["codebook"]["size"])
    top = max([offset + size - 1] + [t for t in (bos, eos) if t is not None])
    dtype = flat_dtype(top)
    bin_path, idx_path, json_path = _paths(prefix)
    with atomic_open(bin_path) as out:  # every file: a temporary name, fsync, rename
        lengths = list(_write_sequences(out, files, dtype, offset, bos, eos, view))
    counts = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    header = _HEADER.pack(MAGIC, VERSION, dtype.itemsize, len(counts))
    write_atomic(idx_path, header + offsets.astype("<i8").tobytes())
    info = {
        "format": "gq-tokenizer/flat-tokens",
        "version": VERSION,
        "dtype": dtype.str,
        "sequences": int(len(counts)),
        "tokens": int(offsets[-1]),
        "offset": offset,
        "bos": bos,
        "eos": eos,
        "view": view,
        "vocab_size": top + 1,
        "codebook_size": size,
        "sources": [{"file": f.url, "rows": f.rows} for f in files],
        "gq": meta,
    }
    write_atomic(json_path, json.dumps(info, indent=1, sort_keys=True).encode())
    return info


def _write_sequences(out, files, dtype, offset, bos, eos, view) -> Iterator[np.ndarray]:
    """Write every row's [BOS] + (tokens + offset) + [EOS] to `out`, row group by row group; yields each
    group's sequence lengths."""
    for f in files:
        for row_group, rows in enumerate(f.row_groups):
            if not rows:
                continue
            columns = ["tokens", "view"] if view is not None and f.views > 1 else ["tokens"]
            table = read_unit(WorkUnit(f.url, row_group, rows), columns)
            tokens = tokens_array(table.column("tokens")).astype(np.int64) + offset
            if len(columns) > 1:
                tokens = tokens[table.column("view").to_numpy() == view]
            parts = [tokens]
            if bos is not None:
                parts.insert(0, np.full((len(tokens), 1), bos, np.int64))
            if eos is not None:
                parts.append(np.full((len(tokens), 1), eos, np.int64))
            sequences = np.concatenate(parts, axis=1)
            out.write(sequences.astype(dtype).tobytes())
            yield np.full(len(sequences), sequences.shape[1], np.int64)


def open_flat(path: str) -> tuple[np.memmap, np.ndarray]:
    """(tokens, offsets) of a flat export: PREFIX, PREFIX.bin or PREFIX.idx. `tokens` is a read-only
    np.memmap of uint16/uint32; sequence i is tokens[offsets[i]:offsets[i + 1]]."""
    bin_path, idx_path, _ = _paths(path)
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise ValueError(f"{idx_path}: too short for a flat-token index")
        magic, version, itemsize, n = _HEADER.unpack(header)
        if magic != MAGIC or version != VERSION or itemsize not in (2, 4):
            raise ValueError(f"{idx_path}: not a version-{VERSION} flat-token index")
        offsets = np.frombuffer(f.read(8 * (n + 1)), dtype="<i8").astype(np.int64)
    if len(offsets) != n + 1:
        raise ValueError(f"{idx_path}: truncated ({len(offsets)} offsets for {n} sequences)")
    dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    expected = int(offsets[-1]) * itemsize
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise ValueError(f"{bin_path}: {actual} bytes, its index says {expected}")
    if expected == 0:
        return np.zeros(0, dtype), offsets  # np.memmap cannot map an empty file
    return np.memmap(bin_path, dtype=dtype, mode="r"), offsets
