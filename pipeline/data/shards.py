"""Shard listing and opening: a SHARDS argument (brace pattern, glob, directory, URL list) to fsspec URLs,
and a streaming reader of one (possibly compressed) tar shard."""

from __future__ import annotations

import contextlib
import gzip
import posixpath
import re
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import fsspec
import zstandard
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

# Longest first, so that ".tar.zst" wins over ".tar" style prefixes when stripping.
SHARD_EXTENSIONS = (".tar.zstd", ".tar.zst", ".tar.gz", ".tgz", ".tar")
LIST_EXTENSION = ".txt"
LIST_AT_LEAST = 8  # shards of one directory that make listing it cheaper than asking for each

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_shards(spec: str) -> list[str]:
    """The shard URLs named by SHARDS, in order, duplicates removed (first kept); see expand_shards_listed."""
    return expand_shards_listed(spec)[0]


def expand_shards_listed(spec: str) -> tuple[list[str], dict[str, dict]]:
    """The shard URLs named by SHARDS, in order, duplicates removed (first kept), and the identities
    (`shard_identity`) of those that a listing found on the way (globs and directories; not brace patterns,
    which expand without a request).

    SHARDS is one of:
    - a brace pattern, `s3://b/train-{000000..000009}.tar` or `{train,val}-0.tar` (expanded as text, with
      bash's zero-padding rule; no request per shard, so 10k-shard patterns cost nothing); an expanded
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
    listed: dict[str, dict] = {}
    if _has_brace_expression(spec):
        urls = []
        for item in _expand_braces(spec):
            urls.extend(_glob(item, listed) if _has_magic(item) else [item])
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


def shard_identity(url: str) -> dict:
    """What tells this shard from another of the same name: its URL, size, and its ETag (object stores,
    http) or else its modification time, where the filesystem has them. One metadata request."""
    fs, path = url_to_fs(url)
    return identity_of(url, fs.info(path))


def identity_of(url: str, info: dict) -> dict:
    """`shard_identity` from a metadata request's or a listing's entry (they carry the same fields)."""
    identity = {"url": url, "size": info.get("size")}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        identity["etag"] = str(etag).strip('"')
    elif info.get("mtime") is not None:
        identity["mtime"] = float(info["mtime"])
    return identity


def listed_identities(urls: Iterable[str], known: dict[str, dict] | None = None) -> dict[str, dict]:
    """`shard_identity` of each URL, from LISTing the directories they lie in (one request per 1,000
    entries) rather than one metadata request per shard; `known` ones are not looked up again. A URL that
    its directory's listing lacks, or whose directory holds fewer than LIST_AT_LEAST of them (listing a
    large directory for a few would cost more), is asked for alone, so that a missing one raises as
    `shard_identity` does."""
    known = known or {}
    found: dict[str, dict] = {}
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        if url in known:
            found[url] = known[url]
        elif _is_http(url):
            found[url] = shard_identity(url)
        else:
            by_dir.setdefault(posixpath.dirname(url), []).append(url)
    for directory, members in by_dir.items():
        infos = {}
        if len(members) >= LIST_AT_LEAST:
            fs, path = url_to_fs(directory)
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                infos = {posixpath.basename(i["name"]): i for i in fs.ls(path, detail=True)}
            fs.invalidate_cache(path)  # a listing of 10^6 entries must not stay cached
        for url in members:
            info = infos.get(posixpath.basename(url))
            found[url] = (
                identity_of(url, info) if info and info.get("type") == "file" else shard_identity(url)
            )
    return found


def identity_mismatch(recorded: dict, url: str, current: dict | None) -> str | None:
    """Why a committed shard's record does not describe the shard `url` now (None when it does). A record
    written before shards carried an identity (only "shard", its URL) is compared by URL alone."""
    pinned = recorded.get("shard_identity") or {"url": recorded.get("shard")}
    now = current or {"url": url}
    diffs = [f"{k} {pinned[k]!r} != {now.get(k)!r}" for k in pinned if pinned[k] != now.get(k)]
    return "; ".join(diffs) or None


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


def _is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def _path_part(url: str) -> str:
    """The URL without an http query string or fragment (other protocols have none)."""
    return re.split(r"[?#]", url, maxsplit=1)[0] if _is_http(url) else url


def _has_magic(url: str) -> bool:
    # "?" is an http query separator, not a wildcard, in http URLs.
    chars = "*[" if _is_http(url) else "*?["
    return any(c in url for c in chars)


def _has_brace_expression(spec: str) -> bool:
    return any("," in m.group(1) or _RANGE.match(m.group(1)) for m in _BRACE.finditer(spec))


def _expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion, innermost first: {a,b} lists and {0..9} / {000..099} ranges."""
    for match in _BRACE.finditer(pattern):
        alternatives = _brace_alternatives(match.group(1))
        if alternatives is None:
            continue
        head, tail = pattern[: match.start()], pattern[match.end() :]
        out: list[str] = []
        for alternative in alternatives:
            out.extend(_expand_braces(head + alternative + tail))
        return out
    return [pattern]


def _brace_alternatives(body: str) -> list[str] | None:
    span = _RANGE.match(body)
    if span:
        first, last = span.group(1), span.group(2)
        start, stop = int(first), int(last)
        # bash pads to the wider bound when either bound has a leading zero
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if stop >= start else -1
        return [str(i).zfill(width) for i in range(start, stop + step, step)]
    if "," in body:
        return body.split(",")
    return None


def _glob(pattern: str, listed: dict[str, dict]) -> list[str]:
    fs, path = url_to_fs(pattern)
    found = fs.glob(path, detail=True)  # one listing, not a stat per match
    matches = sorted(p for p, info in found.items() if info.get("type") != "directory" and is_shard_file(p))
    urls = [_restore(pattern, fs, p) for p in matches]
    listed.update((u, identity_of(u, found[p])) for u, p in zip(urls, matches, strict=True))
    return urls


def _directory_or_file(spec: str, listed: dict[str, dict]) -> list[str]:
    if _is_http(spec):
        # listing an http "directory" means scraping HTML: treat an http URL as one shard
        return [spec]
    fs, path = url_to_fs(spec)
    if fs.isdir(path):
        entries = {e["name"]: e for e in fs.ls(path, detail=True)}
        files = sorted(p for p, e in entries.items() if e.get("type") == "file" and is_shard_file(p))
        urls = [_restore(spec, fs, p) for p in files]
        listed.update((u, identity_of(u, entries[p])) for u, p in zip(urls, files, strict=True))
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
