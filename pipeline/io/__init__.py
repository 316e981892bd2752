"""URLs and writes shared by every part of the pipeline: joins that keep URL schemes, and the atomic write
(defined once, in `gq.storage`, which checkpoints use too). pipeline.io.resumable is the resumable output
directory (plan record, commit records, temporaries) that the jobs write into."""

from __future__ import annotations

import json
import posixpath

import fsspec

from gq.storage import atomic_open, remove_temporaries, write_atomic

__all__ = ["atomic_open", "cat_whole", "join", "read_json", "remove_temporaries", "write_atomic"]


def join(base: str, *parts: str) -> str:
    """Path join that keeps URL schemes (`s3://b/x` + `y` -> `s3://b/x/y`)."""
    return posixpath.join(base.rstrip("/"), *parts)


def cat_whole(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """A small file's bytes in one request: from offset 0, because s3fs asks for the size first (a HEAD)
    when no range is given, to decide on a parallel download."""
    return fs.cat_file(path, start=0)


def read_json(url: str) -> dict | None:
    """The JSON document at `url`, or None when there is none (listings cached by fsspec are dropped
    first: another process may have written it since)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    try:
        data = cat_whole(fs, path)  # one GET on an object store (an existence check first would be two)
    except FileNotFoundError:
        return None
    return json.loads(data)
