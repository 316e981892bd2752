"""Token files: finding them (a directory, glob, file or list; planned from a commit index where there is
one), opening their footers, refusing files that cannot be mixed (another codebook, another token shape),
and their row groups as the readers' units of work (`TokenDataset`, `export_flat`)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.data.views import VIEW_SETS
from pipeline.tokens.dataset_checks import unique_files
from pipeline.tokens.index import indexed_token_files
from pipeline.tokens.writer import METADATA_KEY


class TokenFileMismatch(ValueError):
    """Token files that cannot be mixed: different codebooks (their token ids mean different vectors)."""


@dataclass(frozen=True)
class WorkUnit:
    """One row group of one token file: the unit of work that ranks and workers share out."""

    url: str
    row_group: int
    rows: int


@dataclass(frozen=True)
class TokenFile:
    url: str
    row_groups: tuple[int, ...]  # rows in each row group
    metadata: dict  # the file's `gq` metadata

    @property
    def rows(self) -> int:
        return sum(self.row_groups)

    @property
    def views(self) -> int:
        """Rows per sample: the view set's size (1 for files from before views, which have no `view`)."""
        views = (self.metadata.get("preprocessing") or {}).get("views", "center")
        return len(VIEW_SETS.get(views, ("center",)))


def list_token_files(source: str | Sequence[str]) -> list[str]:
    """Token file URLs named by `source`: a directory (its `*.parquet`, not those starting with "." or "_"),
    a glob, a single file, or a list of any of these; each entry sorted, order kept, a file named twice
    (`d` and `d/../d`, a link to it, `file://d`) read once (`resolved`).
    Local paths stay paths, URLs keep their protocol. Raises ValueError when nothing matches."""
    entries = [source] if isinstance(source, str) else list(source)
    urls: list[str] = []
    for entry in entries:
        entry = str(entry)
        fs, path = url_to_fs(entry)
        if any(c in entry for c in "*?["):
            found = [p for p in fs.glob(path) if p.endswith(".parquet")]
        elif fs.isdir(path):
            found = [p for p in fs.ls(path, detail=False) if _is_token_file(p)]
        elif fs.exists(path):
            found = [path]
        else:
            raise ValueError(f"no such token file or directory: {entry!r}")
        local = isinstance(fs, LocalFileSystem) and "://" not in entry
        urls.extend(p if local else fs.unstrip_protocol(p) for p in sorted(found))
    urls = unique_files(urls)
    if not urls:
        raise ValueError(f"no token files (*.parquet) in {source!r}")
    return urls


def open_token_files(source: str | Sequence[str]) -> list[TokenFile]:
    """The token files named by `source` (as list_token_files), each with its row groups and metadata. A
    tokenize output directory with a commit index is planned from the index: its committed files, rows per
    row group from their commit records, and one footer for the metadata of them all (one run wrote them),
    O(N / 1000) requests for N files instead of N footers; anything else is listed and opened file by file."""
    entries = [source] if isinstance(source, str) else list(source)
    files: dict[str, TokenFile] = {}
    for entry in entries:
        indexed = indexed_token_files(str(entry))
        if indexed is None:
            found = [open_token_file(u) for u in list_token_files(str(entry))]
        else:
            fs, _ = url_to_fs(str(entry))
            local = isinstance(fs, LocalFileSystem) and "://" not in str(entry)
            found = _from_index([(p if local else fs.unstrip_protocol(p), e) for p, e in indexed])
        files.update((f.url, f) for f in found if f.url not in files)
    if not files:
        raise ValueError(f"no token files (*.parquet) in {source!r}")
    return [files[url] for url in unique_files(list(files))]  # a file named twice (d, d/../d) read once


def _from_index(indexed: list) -> list[TokenFile]:
    """TokenFiles from (url, index entry): the first file's footer gives the metadata that all share (with
    each one's own codebook fingerprint, so that check_same_codebook still compares them); a file whose
    record predates row-group counts is opened."""
    if not indexed:
        return []
    first = open_token_file(indexed[0][0])
    want = first.metadata.get("codebook_fingerprint")
    files = []
    for url, e in indexed:
        if e.row_groups is None:
            files.append(open_token_file(url))
            continue
        own = e.codebook_fingerprint or want
        meta = first.metadata if own == want else {**first.metadata, "codebook_fingerprint": own}
        files.append(TokenFile(url=url, row_groups=e.row_groups, metadata=meta))
    return files


def _is_token_file(path: str) -> bool:
    name = posixpath.basename(path.rstrip("/"))
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def open_token_file(url: str) -> TokenFile:
    """Read one file's footer: rows per row group and its `gq` metadata."""
    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f)
        schema_meta = pf.schema_arrow.metadata or {}
        if METADATA_KEY not in schema_meta:
            raise ValueError(f"{url}: not a gq token file (no 'gq' metadata)")
        meta = json.loads(schema_meta[METADATA_KEY])
        groups = tuple(pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups))
    return TokenFile(url=url, row_groups=groups, metadata=meta)


def check_same_codebook(files: Sequence[TokenFile]) -> dict:
    """The shared metadata (the first file's) when every file has the same codebook fingerprint, else
    TokenFileMismatch naming the first file that differs."""
    first = files[0]
    want = first.metadata.get("codebook_fingerprint")
    for f in files[1:]:
        got = f.metadata.get("codebook_fingerprint")
        if got != want:
            raise TokenFileMismatch(
                f"token files use different codebooks: {f.url} has codebook fingerprint {str(got)[:16]}..., "
                f"{first.url} has {str(want)[:16]}...; tokens of different codebooks cannot be mixed"
            )
    return first.metadata


def token_shape(meta: dict) -> tuple:
    """What fixes a file's sequences: tokens per image, the token grid and the groups per position."""
    return (meta.get("tokens_per_image"), tuple(meta.get("token_grid") or ()), meta.get("groups"))


def check_same_shape(files: Sequence[TokenFile]) -> None:
    """TokenFileMismatch (one line) naming two files whose token shapes differ (a 64 px and a 128 px run):
    their sequences have different lengths, so no batch could hold both."""
    first = files[0]
    want = token_shape(first.metadata)
    for f in files[1:]:
        got = token_shape(f.metadata)
        if got != want:
            raise TokenFileMismatch(
                f"token files of different token shapes: {f.url} has {_shape_text(got)}, {first.url} has "
                f"{_shape_text(want)}; read them with separate datasets"
            )


def _shape_text(shape: tuple) -> str:
    n, grid, groups = shape
    return f"{n} tokens per image (grid {'x'.join(map(str, grid)) or '?'}, {groups} group(s))"


def units_of(files: Sequence[TokenFile]) -> list[WorkUnit]:
    """Every (file, row group) with rows, in file order."""
    return [WorkUnit(f.url, i, n) for f in files for i, n in enumerate(f.row_groups) if n > 0]


def read_unit(unit: WorkUnit, columns: Sequence[str]) -> pa.Table:
    """One row group, only `columns`."""
    with fsspec.open(unit.url, "rb") as f:
        return pq.ParquetFile(f).read_row_group(unit.row_group, columns=list(columns))


def tokens_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A `tokens` fixed_size_list column -> (rows, tokens_per_image) numpy array of its uint16/uint32 type."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    length = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), length)
