"""Token files: the Parquet schema and `gq` metadata (the contract is docs/FORMAT.md)."""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"gq"


def token_type(codebook_size: int) -> pa.DataType:
    """uint16 while every index fits (K <= 65536), else uint32."""
    return pa.uint16() if codebook_size <= 65536 else pa.uint32()


def token_schema(
    tokens_per_image: int, codebook_size: int, metadata: dict | None = None, extra: tuple[pa.Field, ...] = ()
) -> pa.Schema:
    """The columns of docs/FORMAT.md, then `extra` ones (view, width, height, kept members: token_table)."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("tokens", pa.list_(token_type(codebook_size), tokens_per_image), nullable=False),
        *extra,
    ]
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata is not None else None
    return pa.schema(fields, metadata=meta)


def token_table(
    keys: list[str],
    shard: str,
    indices: list[int],
    labels: list[int | None],
    tokens: np.ndarray,
    codebook_size: int,
    metadata: dict,
    extra: dict[pa.Field, list] | None = None,
) -> pa.Table:
    """Rows of one shard; `tokens` is (rows, tokens_per_image) in raster order (row, column, group).
    `extra`: more columns after `tokens`, field -> values (the tokenize job's view, width, height and
    kept members)."""
    n, length = tokens.shape
    np_type = np.uint16 if codebook_size <= 65536 else np.uint32
    if n and (tokens.min() < 0 or tokens.max() >= codebook_size):
        raise ValueError(f"token values outside [0, {codebook_size})")
    flat = pa.array(np.ascontiguousarray(tokens, dtype=np_type).reshape(-1), type=token_type(codebook_size))
    extra = extra or {}
    schema = token_schema(length, codebook_size, metadata, tuple(extra))
    return pa.Table.from_arrays(
        [
            pa.array(keys, pa.string()),
            pa.array([shard] * n, pa.string()),
            pa.array(indices, pa.int32()),
            pa.array(labels, pa.int64()),
            pa.FixedSizeListArray.from_arrays(flat, length),
            *(pa.array(values, f.type) for f, values in extra.items()),
        ],
        schema=schema,
    )


def parquet_bytes(table: pa.Table, row_group_size: int = 1024) -> bytes:
    """The table as a zstd Parquet file. A table without rows (a shard whose every sample was skipped) gets
    no row group at all: Hugging Face `datasets` sizes its batches from the first row group and fails on
    one of 0 rows, which would make the whole token directory unloadable there."""
    buf = io.BytesIO()
    if table.num_rows == 0:
        with pq.ParquetWriter(buf, table.schema, compression="zstd"):
            pass
    else:
        pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue()


def read_metadata(url: str) -> dict:
    """The `gq` metadata of a token file."""
    with fsspec.open(url, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{url}: not a gq token file (no 'gq' metadata)")
    return json.loads(meta[METADATA_KEY])


def row_groups_of(data: bytes) -> list[int]:
    """Rows per row group of a Parquet file's bytes (its footer): what readers plan their splits from."""
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
