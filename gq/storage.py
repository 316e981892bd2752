"""Whole-file writes that a reader never sees half done, to a local path or any fsspec URL."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

# `.<name>.<32 hex>.tmp` beside the file: what a writer killed mid-write leaves behind.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of atomic_open's (and so write_atomic's) temporary names."""
    return bool(_TEMPORARY.match(name))


def remove_temporaries(directory: str) -> list[str]:
    """Delete atomic_open's leftover temporary files directly in a local directory (object stores have
    none: a PUT is never seen half done); the names deleted. Only while no writer is running there."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if is_temporary(n)]
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, n))
    return names


@contextlib.contextmanager
def atomic_open(url: str) -> Iterator[BinaryIO]:
    """A binary file to write `url` through, seen under its name only once the block ends without error.
    Local paths: a temporary name beside it (`is_temporary`), fsync, rename. Object stores: the bytes
    gather in a local temporary file, then go up in one upload (atomic there)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    with tempfile.TemporaryFile() as f:
        yield f
        f.seek(0)
        with fs.open(path, "wb") as out:
            shutil.copyfileobj(f, out, 16 * 2**20)


def write_atomic(url: str, data: bytes) -> None:
    """`data` under `url`, never seen half written: locally through `atomic_open`; on an object store one
    PUT of the bytes in memory."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        with atomic_open(url) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)
