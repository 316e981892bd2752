"""Directory listings as streams, and the identities of input shards read from them.

A resume at 10^6 shards must neither ask for each shard's metadata alone (10^6 requests) nor hold a
listing of 10^6 entries (about 1 KiB each as fsspec gives them). `iter_listing` yields a directory's
entries one LIST page (1,000 keys) at a time on S3, in key order, from a given name on; `identities`
walks the URLs a planner asks about beside such a listing, so that URLs in sorted order (what a brace
range or a sorted listing gives) cost one LIST page per 1,000 and a page of memory.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Iterator, Mapping

import fsspec
from fsspec.asyn import sync
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

_LOCAL = LocalFileSystem()
LIST_AT_LEAST = 8  # shards asked about in one directory that make listing it cheaper than asking for each


def shard_identity(url: str) -> dict:
    """What tells this shard from another of the same name: its URL, size, and its ETag (object stores,
    http) or else its modification time, where the filesystem has them. One metadata request."""
    if "://" not in url:  # a local path (as plans spell them): no filesystem to resolve, ~40 us a shard
        return identity_of(url, _LOCAL.info(url))
    fs, path = url_to_fs(url)
    return identity_of(url, fs.info(path))


def identity_of(url: str, info: Mapping) -> dict:
    """`shard_identity` from a metadata request's or a listing's entry (they carry the same fields)."""
    identity = {"url": url, "size": info.get("size")}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        identity["etag"] = str(etag).strip('"')
    elif info.get("mtime") is not None:
        identity["mtime"] = float(info["mtime"])
    return identity


def compact(info: Mapping) -> tuple:
    """The fields of a listing entry that `identity_of` reads, small enough to keep one per shard."""
    return info.get("size"), info.get("ETag") or info.get("etag"), info.get("mtime")


def expand(fields: tuple) -> dict:
    size, etag, mtime = fields
    return {"size": size, "ETag": etag, "mtime": mtime}


def identity_mismatch(recorded: dict, url: str, current: dict | None) -> str | None:
    """Why a committed shard's record does not describe the shard `url` now (None when it does). A record
    written before shards carried an identity (only "shard", its URL) is compared by URL alone."""
    pinned = recorded.get("shard_identity") or {"url": recorded.get("shard")}
    now = current or {"url": url}
    diffs = [f"{k} {pinned[k]!r} != {now.get(k)!r}" for k in pinned if pinned[k] != now.get(k)]
    return "; ".join(diffs) or None


def iter_listing(url: str, start_after: str = "") -> Iterator[dict]:
    """The entries of directory `url` whose base names sort after `start_after`, as fsspec info dicts
    (`name` as the filesystem spells paths). On S3 one LIST page at a time, in key order; on a local disk
    as the directory gives them (any order), one stat each; elsewhere from one whole listing. Raises
    FileNotFoundError when there is no such directory."""
    fs, path = url_to_fs(url)
    path = path.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        with os.scandir(path) as entries:
            for entry in entries:
                info = _local_info(fs, entry) if entry.name > start_after else None
                if info is not None:
                    yield info
    elif hasattr(fs, "_list_pages") and hasattr(fs, "split_path"):  # s3fs
        yield from _s3_pages(fs, path, start_after)
    else:
        entries = fs.ls(path, detail=True)
        fs.invalidate_cache(path)  # a listing of 10^6 entries must not stay cached
        names = {posixpath.basename(e["name"].rstrip("/")): e for e in entries}
        yield from (names[n] for n in sorted(names) if n > start_after)


def _local_info(fs: LocalFileSystem, entry: os.DirEntry) -> dict | None:
    try:
        return fs.info(entry)
    except FileNotFoundError:  # removed while listed
        return None


def _s3_pages(fs: fsspec.AbstractFileSystem, path: str, start_after: str) -> Iterator[dict]:
    bucket, key, _ = fs.split_path(path)
    prefix = f"{key}/" if key else ""
    args = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
    if start_after:
        args["StartAfter"] = prefix + start_after
    pages = fs._list_pages("list_objects_v2", **args, **fs.req_kw)

    async def next_page():
        try:
            return await pages.__anext__()
        except StopAsyncIteration:
            return None

    empty = True
    while (page := sync(fs.loop, next_page)) is not None:
        for p in page.get("CommonPrefixes", []):
            empty = False
            yield {"name": f"{bucket}/{p['Prefix'].rstrip('/')}", "type": "directory", "size": 0}
        for c in page.get("Contents", []):
            empty = False
            if not c["Key"].endswith("/"):  # a folder placeholder
                yield {"name": f"{bucket}/{c['Key']}", "type": "file", "size": c["Size"], "ETag": c["ETag"]}
    if empty and not start_after and not fs.exists(path):
        raise FileNotFoundError(path)


def identities(urls: Iterable[str], per_directory: Mapping[str, int] | None = None,
               known: Mapping[str, tuple] | None = None) -> Iterator[tuple[str, dict]]:  # fmt: skip
    """(URL, `shard_identity`) for each URL, in order, from listings rather than a metadata request per
    shard. `per_directory` counts the URLs that will be asked about in each directory: one with fewer
    than LIST_AT_LEAST is asked about shard by shard. Within a directory URLs in increasing order are met
    by one listing read alongside, a page at a time; URLs out of order fall back to one whole listing of
    their directory, kept compact. A local shard costs a stat. `known` (URL -> `compact` fields) are not
    looked up again. A URL its listing lacks is asked for alone, so that a missing one raises as
    `shard_identity` does."""
    known, per_directory = known or {}, per_directory or {}
    walker: _Walker | None = None
    alone: dict[str, bool] = {}  # directory -> whether its shards are looked up one by one
    for url in urls:
        if url in known:
            yield url, identity_of(url, expand(known[url]))
            continue
        directory, name = posixpath.split(url)
        if directory not in alone:  # (resolving a filesystem takes ~40 us: once per directory, not URL)
            few = per_directory.get(directory, LIST_AT_LEAST) < LIST_AT_LEAST
            alone[directory] = few or _alone(url)
        if alone[directory]:
            yield url, shard_identity(url)
            continue
        if walker is None or walker.directory != directory:
            walker = _Walker(directory, name)
        info = walker.find(name)
        yield url, identity_of(url, expand(info)) if info else shard_identity(url)


def _alone(url: str) -> bool:
    """Whether shards like this one are looked up alone: local files (a stat is cheaper than a listing)
    and http URLs (no listing to read)."""
    return is_http(url) or isinstance(url_to_fs(url)[0], LocalFileSystem)


def is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


class _Walker:
    """One directory's listing beside the names asked for: read forward while they increase; the whole
    directory, kept compact, once one does not."""

    def __init__(self, directory: str, first: str) -> None:
        self.directory = directory
        self.last = ""
        self.entries = iter_listing(directory, start_after=first[:-1])  # a prefix of it sorts before it
        self.ahead: tuple[str, tuple] | None = None
        self.table: dict[str, tuple] | None = None  # name -> compact fields, once out of order

    def find(self, name: str) -> tuple | None:
        if self.table is None and name <= self.last:
            self.table = _table(self.directory)
        self.last = name
        if self.table is not None:
            return self.table.get(name)
        while self.ahead is None or self.ahead[0] < name:
            entry = next(self.entries, None)
            if entry is None:
                return None
            if entry.get("type") == "file":
                self.ahead = (posixpath.basename(entry["name"]), compact(entry))
        return self.ahead[1] if self.ahead[0] == name else None


def _table(directory: str) -> dict[str, tuple]:
    entries = iter_listing(directory)
    return {posixpath.basename(e["name"]): compact(e) for e in entries if e.get("type") == "file"}
