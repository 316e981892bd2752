"""Writing WebDataset tar shards (plain, gzip or zstd) to any fsspec URL, byte-for-byte reproducibly."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterable
from typing import Any, BinaryIO

import numpy as np
import zstandard

from pipeline.io import atomic_open

_COMPRESSIONS = {None: None, "none": None, "gz": "gzip", "gzip": "gzip", "zst": "zstd", "zstd": "zstd"}
ZSTD_LEVEL = 3


def write_shard(url: str, samples: Iterable[dict[str, Any]], *, compression: str | None = None) -> int:
    """Write `samples` as a WebDataset tar to `url`; returns the number of samples written.

    Each sample is a dict with "__key__" and extension -> value entries, written as members "<key>.<ext>"
    in dict order (other "__" entries are ignored). Values: bytes as is, str as UTF-8, int as ASCII
    digits (e.g. "cls"), dict / list as JSON. `compression` ("gz", "zst" or "none") is inferred from the
    extension (.tar.gz / .tgz / .tar.zst / .tar.zstd) when None. Members have mtime 0, mode 0o444 and no
    owner, so equal samples give equal bytes. The shard appears under its name only once complete
    (`gq.storage.atomic_open`: a local temporary name renamed, or one upload).
    """
    kind = _compression_for(url, compression)
    with atomic_open(url) as f:
        return _write_tar(f, samples, kind)


def _compression_for(url: str, compression: str | None) -> str | None:
    if compression is not None:
        if compression.lower() not in _COMPRESSIONS:
            raise ValueError(f"compression must be one of gz, zst, none; got {compression!r}")
        return _COMPRESSIONS[compression.lower()]
    lowered = url.lower()
    if lowered.endswith((".tar.gz", ".tgz")):
        return "gzip"
    if lowered.endswith((".tar.zst", ".tar.zstd")):
        return "zstd"
    return None


def _write_tar(raw: BinaryIO, samples: Iterable[dict[str, Any]], kind: str | None) -> int:
    if kind == "gzip":
        # mtime=0 and no file name in the gzip header: the same tar gives the same .tar.gz bytes
        sink = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
    elif kind == "zstd":
        # a content checksum, so that readers notice damaged data (pipeline/data/tar_reader.py
        # fails such a shard)
        sink = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).stream_writer(
            raw, closefd=False
        )
    else:
        sink = raw
    count = 0
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, value in sample.items():
                if ext.startswith("__"):
                    continue
                data = _member_bytes(value, f"{key}.{ext}")
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o444
                info.uname = info.gname = ""
                info.uid = info.gid = 0
                tar.addfile(info, io.BytesIO(data))
            count += 1
    if sink is not raw:
        sink.close()
    raw.flush()
    return count


def _member_bytes(value: Any, name: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value)).encode("ascii")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
    raise TypeError(f"member {name!r}: cannot write a {type(value).__name__} (give bytes, str, int or JSON)")
