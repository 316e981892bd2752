"""What `TokenDataset` checks before it reads a row: its arguments, the columns asked for against the
files' recorded columns, and that each file is read once however it is named. A bad argument otherwise
fails at iteration, in every DataLoader worker, mid-epoch; a file named twice is read twice an epoch."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

TOKENS = "tokens"
META_COLUMNS = ("key", "label", "shard", "index")


class _File(Protocol):  # reader.TokenFile: a URL and its `gq` metadata
    url: str
    metadata: dict


def resolved(url: str) -> str:
    """One name per file, whatever the spelling: a local path with links and `..` resolved (`file://`
    included), else the protocol and the normalised path."""
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return os.path.realpath(path)
    return fs.unstrip_protocol(posixpath.normpath(path))


def unique_files(urls: Sequence[str]) -> list[str]:
    """`urls` in order, each file once (its first spelling)."""
    seen: set[str] = set()
    out = []
    for url in urls:
        name = resolved(url)
        if name not in seen:
            seen.add(name)
            out.append(url)
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_arguments(**args: object) -> tuple[str, ...]:
    """TokenDataset's arguments checked before any file is read (ValueError, one line); the `columns`
    asked for as a tuple. Iteration would otherwise fail on them, in every worker, mid-epoch."""
    rules = {
        "seed": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
        "shuffle_buffer": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
        "offset": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
        "bos": ("None or an integer >= 0", lambda v: v is None or (_is_int(v) and v >= 0)),
        "eos": ("None or an integer >= 0", lambda v: v is None or (_is_int(v) and v >= 0)),
        "shuffle": ("True or False", lambda v: isinstance(v, bool)),
        "with_meta": ("True or False", lambda v: isinstance(v, bool)),
        "missing_label": ("an integer", _is_int),
        "views": (
            '"all", "random" or a view number >= 0',
            lambda v: v in ("all", "random") or (_is_int(v) and v >= 0),
        ),
        "dtype": ("torch.int64 or torch.int32", lambda v: v in (torch.int64, torch.int32)),
        "rank": ("None or an integer >= 0", lambda v: v is None or (_is_int(v) and v >= 0)),
        "world_size": ("None or an integer >= 1", lambda v: v is None or (_is_int(v) and v >= 1)),
        "columns": ("a list of distinct column names other than tokens", _valid_columns),
    }
    bad = [f"{k} must be {what}, got {args[k]!r}" for k, (what, ok) in rules.items() if not ok(args[k])]
    if (args["rank"] is None) != (args["world_size"] is None):
        bad.append("give both rank and world_size, or neither")
    if bad:
        raise ValueError(f"TokenDataset: {'; '.join(bad)}")
    return tuple(args["columns"])


def check_epoch(epoch: object) -> int:
    """`set_epoch`'s argument as an int; ValueError unless an integer >= 0 (the shuffle's seed takes it)."""
    if not _is_int(epoch) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    return int(epoch)


def _valid_columns(columns: object) -> bool:
    if isinstance(columns, (str, bytes)) or not isinstance(columns, (list, tuple)):
        return False
    return (
        all(isinstance(c, str) for c in columns)
        and len(set(columns)) == len(columns)
        and TOKENS not in columns
    )


def file_columns(file: _File) -> tuple[str, ...]:
    """The columns a tokenize job's file has besides `tokens`, from its `gq` metadata: key, label, shard,
    index; view (0 in files with one view); width and height (`source_size`); its kept members (`keep`)."""
    pre = file.metadata.get("preprocessing") or {}
    size = ("width", "height") if pre.get("source_size") else ()
    return (*META_COLUMNS, "view", *size, *(pre.get("keep") or ()))


def check_columns(files: Sequence[_File], columns: Sequence[str]) -> None:
    """ValueError (one line) naming a file that lacks a column asked for."""
    for f in files:
        missing = [c for c in columns if c not in file_columns(f)]
        if missing:
            raise ValueError(
                f"columns={list(columns)}: {f.url} has no {missing} column (its columns: "
                f"{', '.join(file_columns(f))}; kept members come from tokenize --keep)"
            )
