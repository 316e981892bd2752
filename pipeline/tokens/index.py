"""The compacted commit index of an output directory: what a resume and a reader need from every commit
record, in one Parquet file, so that they cost one LIST page per 1,000 shards instead of a read per shard.

`DIR/_manifest/_index-<k>.parquet` (k grows with each rewrite; each is written whole, then the older ones
deleted) holds one row per committed stem: the input shard's identity, rows, rows per row group and the
codebook fingerprint, as its commit record says, and the record's own listing tag (ETag, or size and
modification time) when it was indexed. The commit records stay the truth; the index is a cache of them,
trusted entry by entry only where the `_manifest/` LIST shows the record with that same tag. A record
newer than its entry, or missing from the index, is read; an entry whose record is gone is dropped; an
index that cannot be read is ignored (every record is read, as without one). Any of these makes the
index stale, and the next rewrite (every few hundred commits and at the end of a run) rebuilds it.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.listing import iter_listing
from pipeline.io import cat_whole, join, write_atomic
from pipeline.tokens.records import MANIFEST_DIR

INDEX_NAME = re.compile(r"^_index-(\d+)\.parquet$")
BATCH = 10_000  # index rows per row group, and per batch read: what a reader holds decoded at once
REWRITE_EVERY = 500  # commits between rewrites, at least; at most a tenth of the index (see due())
SCHEMA = pa.schema(
    [
        ("stem", pa.string()),
        ("record_tag", pa.string()),  # the commit record's listing tag when indexed (record_tag())
        ("shard_identity", pa.string()),  # JSON of what the record pins of its input shard
        ("rows", pa.int64()),
        ("row_groups", pa.list_(pa.int64())),  # null for records from before they said
        ("codebook_fingerprint", pa.string()),
    ]
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One commit record as the index keeps it."""

    tag: str | None  # the record's listing tag; None until a listing has shown it
    shard_identity: str  # JSON: URL, size, ETag or mtime (only the URL for the oldest records)
    rows: int
    row_groups: tuple[int, ...] | None
    codebook_fingerprint: str | None

    @property
    def pinned(self) -> dict:
        return json.loads(self.shard_identity)


def record_tag(info: dict) -> str:
    """What changes when a listed object is rewritten: its ETag, or else its size and modification time."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    mtime = info.get("mtime", info.get("LastModified", info.get("updated")))
    return f"size:{info.get('size')}:mtime:{mtime}"


def entry_of(record: dict, tag: str | None = None) -> Entry:
    pinned = record.get("shard_identity") or {"url": record.get("shard")}
    groups = record.get("row_groups")
    return Entry(
        tag=tag,
        shard_identity=json.dumps(pinned),
        rows=int(record.get("rows", 0)),
        row_groups=tuple(groups) if groups is not None else None,
        codebook_fingerprint=record.get("codebook_fingerprint"),
    )


@dataclass
class Listing:
    """One LIST of `DIR/_manifest/`: each record's stem and tag, and the index files' generations."""

    tags: dict[str, str] = field(default_factory=dict)
    indexes: list[int] = field(default_factory=list)  # newest first


def list_manifest(output: str) -> Listing:
    """One LIST of `DIR/_manifest/`, read a page at a time: only each record's stem and tag are kept."""
    fs, _ = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()  # object-store listings are cached per filesystem instance
    listing = Listing()
    try:
        for info in iter_listing(join(output, MANIFEST_DIR)):
            name = posixpath.basename(info["name"].rstrip("/"))
            if m := INDEX_NAME.match(name):
                listing.indexes.append(int(m.group(1)))
            elif name.endswith(".json") and not name.startswith(".") and info.get("type") != "directory":
                listing.tags[name[: -len(".json")]] = record_tag(info)
    except (FileNotFoundError, NotADirectoryError):  # no commit yet, or DIR is a file (a reader's source)
        return Listing()
    listing.indexes.sort(reverse=True)
    return listing


def index_url(output: str, k: int) -> str:
    return join(output, MANIFEST_DIR, f"_index-{k:09d}.parquet")


def read_index(output: str, k: int) -> dict[str, Entry] | None:
    """The entries of index generation k, or None when it cannot be read or is not one of ours."""
    try:
        fs, path = fsspec.core.url_to_fs(index_url(output, k))
        file = pq.ParquetFile(io.BytesIO(cat_whole(fs, path)))  # one GET (read_table: +3 s importing)
        if not file.schema_arrow.equals(SCHEMA):
            return None
        entries, shared = {}, {}  # one object for the values most entries repeat (codebook, row groups)
        for batch in file.iter_batches(BATCH):  # decoded a batch at a time: 10^6 rows never are at once
            columns = [batch.column(n).to_pylist() for n in SCHEMA.names]
            for stem, tag, identity, rows, groups, fingerprint in zip(*columns, strict=True):
                groups = shared.setdefault(tuple(groups), tuple(groups)) if groups is not None else None
                fingerprint = shared.setdefault(fingerprint, fingerprint)
                entries[stem] = Entry(tag, identity, rows, groups, fingerprint)
    except (OSError, ValueError, pa.ArrowException):
        return None
    return entries


def write_index(output: str, entries: dict[str, Entry], k: int, older: Iterable[int] = ()) -> None:
    """Index generation k of `entries` (in one atomic write), then the older generations deleted."""
    stems = sorted(entries)
    rows = [entries[s] for s in stems]
    columns = {
        "stem": stems,
        "record_tag": [e.tag for e in rows],
        "shard_identity": [e.shard_identity for e in rows],
        "rows": [e.rows for e in rows],
        "row_groups": [list(e.row_groups) if e.row_groups is not None else None for e in rows],
        "codebook_fingerprint": [e.codebook_fingerprint for e in rows],
    }
    table = pa.table(list(columns.values()), schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=BATCH)
    write_atomic(index_url(output, k), buf.getvalue())
    fs, _ = fsspec.core.url_to_fs(output)
    for old in older:
        if old < k:
            with contextlib.suppress(FileNotFoundError):  # another run's rewrite may have taken it
                fs.rm(fsspec.core.url_to_fs(index_url(output, old))[1])


@dataclass
class Commits:
    """The committed shards of DIR: stem -> Entry, from the index where its entries hold, else the records."""

    output: str
    entries: dict[str, Entry]
    generation: int  # the newest index generation seen (-1: none)
    stale: bool  # the index does not say exactly what the records say: rewrite it
    records_read: int = 0  # commit records read (the rest came from the index)


def load_commits(
    output: str, listing: Listing | None = None, index: dict[str, Entry] | None = None, threads: int = 16
) -> Commits:
    """The committed shards of `output`: one LIST of `_manifest/` and one index read (unless given), and
    a read of each record the index does not hold as it is now (see the module doc)."""
    listing = listing or list_manifest(output)
    index = newest_index(output, listing) if index is None else index
    entries, unread = {}, []
    for stem, tag in listing.tags.items():
        e = index.get(stem)
        if e is not None and e.tag == tag:
            entries[stem] = e
        else:
            unread.append(stem)
    if unread:
        with ThreadPoolExecutor(threads) as pool:  # overlap the reads: one request each
            records = pool.map(lambda s: _read_record(output, s), unread)
            for stem, record in zip(unread, records, strict=True):
                entries[stem] = entry_of(record, listing.tags[stem])
    # (no record and no index: nothing to index, and no empty index written into a fresh DIR)
    stale = bool(unread) or len(entries) != len(index) or (not listing.indexes and bool(entries))
    generation = listing.indexes[0] if listing.indexes else -1
    return Commits(output, entries, generation, stale, len(unread))


def newest_index(output: str, listing: Listing) -> dict[str, Entry]:
    """The entries of the newest readable index generation ({} when none reads): an older one is only
    less complete, and its entries are checked against the records like any."""
    for k in listing.indexes:
        index = read_index(output, k)
        if index is not None:
            return index
    return {}


def _read_record(output: str, stem: str) -> dict:
    fs, path = fsspec.core.url_to_fs(join(output, MANIFEST_DIR, f"{stem}.json"))
    return json.loads(cat_whole(fs, path))  # one GET


class CommitIndex:
    """Keeps DIR's index current while a run commits shards: `add` each commit record as it arrives,
    `flush` at the end. A rewrite lists `_manifest/` once for the tags of the records it indexes."""

    def __init__(self, commits: Commits, every: int = REWRITE_EVERY) -> None:
        self.commits = commits
        self.every = every
        self.pending: dict[str, Entry] = {}  # records this run committed, not yet indexed
        self.rewrites = 0
        self.error: str | None = None  # why the last rewrite failed (the records stay the truth)

    def add(self, record: dict) -> None:
        self.pending[record["stem"]] = entry_of(record)
        if self.due():
            self.try_flush()

    def try_flush(self) -> bool:
        """flush(), a failure kept in `error` instead of raised: a run must not fail for its cache."""
        try:
            return self.flush()
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
            return False

    def due(self) -> bool:
        # at least a tenth of the index between rewrites keeps their bytes at ~11x the final index's in all,
        # however many shards; a resume after a kill reads at most that many records individually
        return len(self.pending) >= max(self.every, len(self.commits.entries) // 10)

    def flush(self) -> bool:
        """Rewrite the index if it is behind the records; whether it did."""
        if not self.pending and not self.commits.stale:
            return False
        listing = list_manifest(self.commits.output)
        known = self.commits.entries
        merged = {}
        for stem, tag in listing.tags.items():
            if stem in self.pending:
                merged[stem] = Entry(tag, *_fields(self.pending[stem]))
            elif stem in known and known[stem].tag == tag:
                merged[stem] = known[stem]
            # else: a record this driver never saw (an actor's it did not hear from): read at the next load
        k = max([self.commits.generation, *listing.indexes]) + 1
        write_index(self.commits.output, merged, k, listing.indexes)
        self.commits.entries, self.commits.generation = merged, k
        self.commits.stale = len(merged) != len(listing.tags)
        self.pending.clear()
        self.rewrites += 1
        return True


def _fields(e: Entry) -> tuple:
    return e.shard_identity, e.rows, e.row_groups, e.codebook_fingerprint


def indexed_token_files(directory: str) -> list[tuple[str, Entry]] | None:
    """(token file path, entry) of each committed shard of a tokenize output directory that has a
    readable commit index, sorted by path, with paths as `fs` spells them (no protocol); None for anything
    else (a file, a glob, a directory without an index, or whose index cannot be read), which readers list
    and open file by file. One LIST of `_manifest/` and one index read, plus the records the index lacks."""
    if any(c in directory for c in "*?["):
        return None
    listing = list_manifest(directory)
    index = newest_index(directory, listing)
    if not index:
        return None
    commits = load_commits(directory, listing, index)
    fs, path = fsspec.core.url_to_fs(directory)
    files = [(posixpath.join(path.rstrip("/"), f"{stem}.parquet"), e) for stem, e in commits.entries.items()]
    return sorted(files)
