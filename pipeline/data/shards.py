"""Shard listing and opening: a SHARDS argument (brace pattern, glob, directory, URL list) to fsspec URLs,
and a streaming reader of one (possibly compressed) tar shard."""

from __future__ import annotations

import contextlib
import gzip
import posixpath
import re
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import fsspec
import zstandard
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.data.braces import expand_braces, has_brace_expression
from pipeline.data.listing import compact, is_http, iter_listing

# Longest first, so that ".tar.zst" wins over ".tar" style prefixes when stripping.
SHARD_EXTENSIONS = (".tar.zstd", ".tar.zst", ".tar.gz", ".tgz", ".tar")
LIST_EXTENSION = ".txt"


def expand_shards(spec: str) -> list[str]:
    """The shard URLs named by SHARDS, in order, duplicates removed (first kept); see expand_shards_listed."""
    return list(expand_shards_listed(spec)[0])


def expand_shards_listed(spec: str) -> tuple[Sequence[str], dict[str, tuple]]:
    """The shard URLs named by SHARDS, in order, duplicates removed (first kept), and the identities
    (`listing.compact` fields) of those that a listing found on the way (globs and directories; not brace
    patterns, which expand without a request, and lazily: `braces.expand_braces`).

    SHARDS is one of:
    - a brace pattern, `s3://b/train-{000000..000009}.tar` or `{train,val}-0.tar` (expanded as text, with
      bash's zero-padding rule; no request per shard, so 10^6-shard patterns cost nothing); an expanded
      element that still holds a glob is globbed;
    - a glob, `/data/*.tar` or `memory://x/*.tar.zst`: matching shard files, sorted;
    - a directory: the shard files directly in it, sorted;
    - a text file ending `.txt` (local or fsspec): one URL per line in file order, blank lines and lines
      starting with `#` ignored;
    - a single file.
    Shard files are those ending .tar, .tar.gz, .tgz, .tar.zst or .tar.zstd. Local paths come back as
    absolute paths, URLs with their protocol. Raises ValueError when nothing matches.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty SHARDS argument: give a brace pattern, glob, directory or .txt list of URLs")
    listed: dict[str, tuple] = {}
    if has_brace_expression(spec) and not _has_magic(spec):
        return expand_braces(spec), listed
    if has_brace_expression(spec):
        urls = [u for item in expand_braces(spec) for u in _glob(item, listed)]
    elif _path_part(spec).lower().endswith(LIST_EXTENSION):
        urls = _read_list(spec)
    elif _has_magic(spec):
        urls = _glob(spec, listed)
    else:
        urls = _directory_or_file(spec, listed)
    urls = list(dict.fromkeys(urls))
    if not urls:
        raise ValueError(f"no shard files match {spec!r} (expected {', '.join(SHARD_EXTENSIONS)} files)")
    return urls, listed


def shard_stem(url: str) -> str:
    """The shard's base name without its shard extension: ".../train-000001.tar.zst" -> "train-000001"."""
    name = posixpath.basename(_path_part(url).rstrip("/"))
    lowered = name.lower()
    for ext in SHARD_EXTENSIONS:
        if lowered.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return posixpath.splitext(name)[0] or name


def is_shard_file(path: str) -> bool:
    return _path_part(path).lower().endswith(SHARD_EXTENSIONS)


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[BinaryIO]:
    """A readable binary stream of the shard's tar bytes, decompressed on the fly (never whole in memory).

    gzip for .tar.gz/.tgz, zstd for .tar.zst/.tar.zstd (every frame, not only the first); anything else is
    read as a plain tar. Opening errors (missing file, permissions, network) propagate.
    """
    compression = _compression_of(url)
    with fsspec.open(url, "rb", compression=None) as raw:
        if compression == "gzip":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif compression == "zstd":
            # read_across_frames: zstd files written by several writers (or pzstd) hold several frames.
            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
        else:
            stream = raw
        try:
            yield stream
        finally:
            if stream is not raw:
                stream.close()


def _compression_of(url: str) -> str | None:
    path = _path_part(url).lower()
    if path.endswith((".tar.gz", ".tgz")):
        return "gzip"
    if path.endswith((".tar.zst", ".tar.zstd")):
        return "zstd"
    return None


def _path_part(url: str) -> str:
    """The URL without an http query string or fragment (other protocols have none)."""
    return re.split(r"[?#]", url, maxsplit=1)[0] if is_http(url) else url


def _has_magic(url: str) -> bool:
    # "?" is an http query separator, not a wildcard, in http URLs.
    chars = "*[" if is_http(url) else "*?["
    return any(c in url for c in chars)


def _glob(pattern: str, listed: dict[str, tuple]) -> list[str]:
    fs, path = url_to_fs(pattern)
    found = fs.glob(path, detail=True)  # one listing, not a stat per match
    matches = sorted(p for p, info in found.items() if info.get("type") != "directory" and is_shard_file(p))
    urls = [_restore(pattern, fs, p) for p in matches]
    listed.update((u, compact(found[p])) for u, p in zip(urls, matches, strict=True))
    return urls


def _directory_or_file(spec: str, listed: dict[str, tuple]) -> list[str]:
    if is_http(spec):
        # listing an http "directory" means scraping HTML: treat an http URL as one shard
        return [spec]
    fs, path = url_to_fs(spec)
    if fs.isdir(path):
        entries = (e for e in iter_listing(spec) if e.get("type") == "file" and is_shard_file(e["name"]))
        files = {e["name"]: compact(e) for e in entries}
        paths = sorted(files)
        urls = [_restore(spec, fs, p) for p in paths]
        listed.update((u, files[p]) for u, p in zip(urls, paths, strict=True))
        return urls
    if fs.exists(path):
        return [_restore(spec, fs, path)]
    raise ValueError(f"no such shard, directory or list: {spec!r}")


def _read_list(spec: str) -> list[str]:
    fs, path = url_to_fs(spec)
    if not fs.exists(path):
        raise ValueError(f"shard list {spec!r} does not exist")
    with fs.open(path, "rt", encoding="utf-8") as f:
        lines = (line.strip() for line in f)
        return [line for line in lines if line and not line.startswith("#")]


def _restore(spec: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A filesystem path back to the spelling of the argument: plain paths stay plain, URLs keep protocol."""
    if isinstance(fs, LocalFileSystem) and "://" not in spec:
        return path
    return fs.unstrip_protocol(path)
