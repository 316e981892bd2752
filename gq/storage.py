"""Whole-file writes that a reader never sees half done, to a local path or any fsspec URL."""

from __future__ import annotations

import contextlib
import os
import re
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

# `.<name>.<32 hex>.tmp` beside the file: what a writer killed mid-write leaves behind.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of write_atomic's temporary names."""
    return bool(_TEMPORARY.match(name))


def remove_temporaries(directory: str) -> list[str]:
    """Delete write_atomic's leftover temporary files directly in a local directory (object stores have
    none: a PUT is never seen half done); the names deleted. Only while no writer is running there."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if is_temporary(n)]
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, n))
    return names


def write_atomic(url: str, data: bytes) -> None:
    """Local paths: temporary name, fsync, rename. Object stores: one PUT, which is atomic there."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)
