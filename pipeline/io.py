"""URLs and writes shared by every part of the pipeline: joins that keep URL schemes, and the atomic write
(defined once, in `gq.storage`, which checkpoints use too)."""

from __future__ import annotations

import posixpath

from gq.storage import atomic_open, remove_temporaries, write_atomic

__all__ = ["atomic_open", "join", "remove_temporaries", "write_atomic"]


def join(base: str, *parts: str) -> str:
    """Path join that keeps URL schemes (`s3://b/x` + `y` -> `s3://b/x/y`)."""
    return posixpath.join(base.rstrip("/"), *parts)
