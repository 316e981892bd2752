"""Grouping a streamed tar into WebDataset samples; duplicate keys and truncation are reported, not raised.

The tar reader is our own (on top of `tarfile.TarInfo.frombuf`): `tarfile` in stream mode silently stops
at a corrupt header or at an archive cut between members, which would lose samples without a record.
"""

from __future__ import annotations

import gzip
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

TAR_TRUNCATED = "tar truncated"
DUPLICATE = "duplicate key"

BLOCK = 512
_CHUNK = 16 * 1024 * 1024  # read members in pieces, so a corrupt size field cannot allocate beyond the data
_MAX_META = 1024 * 1024
_DRAIN = 1024 * 1024  # pax / GNU long-name headers are tiny; a huge one is a corrupt archive
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_META_TYPES = {
    tarfile.XHDTYPE: "pax header",
    tarfile.XGLTYPE: "pax global header",
    tarfile.GNUTYPE_LONGNAME: "GNU long-name header",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link header",
}
# Errors of a damaged compressed stream; other OSErrors (network, disk) propagate so the shard is retried.
_STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)
_PAX_RECORD = re.compile(rb"(\d+) ")


@dataclass
class Sample:
    """One WebDataset sample: the members sharing a key, by extension ("jpg", "JPEG", "cls", ...)."""

    key: str
    index: int  # position in the shard, counting every group of members, skipped ones included
    members: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Skip:
    """A sample (or, with key "" and index -1, a whole-shard event) that produced no row, and why."""

    key: str
    index: int
    reason: str
    detail: str = ""


def iter_samples(stream: BinaryIO, *, shard: str = "") -> Iterator[Sample | Skip]:
    """The samples of a tar stream, in order, as `Sample` or `Skip`; never raises for bad tar contents.

    Members are grouped by the WebDataset rule: key = path up to the first dot of the basename, extension =
    the rest; consecutive members with one key form a sample. A key seen again later (or an extension
    repeated inside a group) starts a new group that is skipped as "duplicate key"; the first is kept.
    Directories, links, extension-less names and hidden / resource-fork files (basename starting with "."
    or "__", anything under __MACOSX/) are ignored.

    A damaged archive (cut mid-member or between members, no end-of-archive block, corrupt header or
    compressed stream) keeps every sample completed before the damage. The group in progress at the cut
    may be missing members, so it becomes a "tar truncated" Skip; when no sample carries the truncation
    (nothing in progress, or it was a duplicate), a final `Skip("", -1, "tar truncated", detail)` records
    it. A 0-byte shard is a cut archive: it yields only that record. I/O errors of the underlying stream
    other than a damaged gzip/zstd stream propagate, so that the caller can retry the shard.
    """
    reader = _TarReader(stream)
    seen: dict[str, int] = {}
    group: Sample | None = None
    first_index = -1  # index of the first group with the current key (< group.index: a duplicate)
    next_index = 0
    for name, data in reader.members():
        split = _split_name(name)
        if split is None:
            continue
        key, ext = split
        if group is not None and key == group.key and ext not in group.members:
            group.members[ext] = data
            continue
        if group is not None:
            yield _finish(group, first_index)
        first_index = seen.setdefault(key, next_index)
        group = Sample(key=key, index=next_index, members={ext: data})
        next_index += 1
    if reader.error is None or reader.complete:
        if group is not None:
            yield _finish(group, first_index)
        if reader.error is not None:
            yield Skip(key="", index=-1, reason=TAR_TRUNCATED, detail=_detail(shard, reader.error))
        return

    detail = _detail(shard, reader.error)
    carried = False
    cut = _split_name(reader.cut_member) if reader.cut_member else None
    if cut is not None and (group is None or cut[0] != group.key or cut[1] in group.members):
        # the cut member starts a new group, so the one before it is complete
        if group is not None:
            yield _finish(group, first_index)
        group = Sample(key=cut[0], index=next_index)
        first_index = seen.setdefault(cut[0], next_index)
    if group is not None:
        if first_index != group.index:
            yield _finish(group, first_index)
        else:
            yield Skip(key=group.key, index=group.index, reason=TAR_TRUNCATED, detail=detail)
            carried = True
    if not carried:
        yield Skip(key="", index=-1, reason=TAR_TRUNCATED, detail=detail)


def _detail(shard: str, error: str) -> str:
    return f"{shard}: {error}" if shard else error


def _finish(group: Sample, first_index: int) -> Sample | Skip:
    if first_index == group.index:
        return group
    return Skip(group.key, group.index, DUPLICATE, f"first occurrence at index {first_index}")


def _split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member path by the WebDataset rule, or None for a member to ignore."""
    if name.endswith("/"):
        return None
    directory, base = posixpath.split(name)
    if base.startswith((".", "__")) or "__MACOSX" in directory.split("/"):
        return None
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext


class _TarReader:
    """Regular-file members of a streamed tar, stopping at the first damage and saying what it was.

    After `members()` is exhausted, `error` is None for a well-terminated archive, else a message;
    `cut_member` names the member whose data was cut short, if the damage was inside one; `complete` says
    the end-of-archive block was reached (then an error can only concern the compressed stream after it).
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.offset = 0
        self.error: str | None = None
        self.cut_member: str | None = None
        self.complete = False  # an end-of-archive block was read

    def members(self) -> Iterator[tuple[str, bytes]]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            header_offset = self.offset
            block = self._read(BLOCK)
            if block is None:
                return
            if not block:
                self.error = "empty file (0 bytes)" if header_offset == 0 else self._no_end(header_offset)
                return
            if len(block) < BLOCK:
                self.error = f"cut inside a header at byte {header_offset}"
                return
            if block.count(0) == BLOCK:
                # end-of-archive (a lone zero block is accepted, as tarfile does)
                self.complete = True
                self._drain()
                return
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except (tarfile.HeaderError, ValueError, UnicodeError) as e:
                self.error = f"corrupt tar header at byte {header_offset} ({e})"
                return
            size = info.size
            if info.type in _REGULAR and "size" in pax:
                size = int(pax["size"]) if pax["size"].isdigit() else -1
            name = pax.get("path") or long_name or info.name
            if size < 0:
                self.error = f"corrupt tar header at byte {header_offset} (size {size})"
                return
            if info.type in _META_TYPES:
                if size > _MAX_META:
                    self.error = f"corrupt tar header at byte {header_offset} (metadata of {size} bytes)"
                    return
                meta = self._read_member(size, _META_TYPES[info.type])
                if meta is None or not self._skip_padding(size):
                    return
                if info.type == tarfile.XHDTYPE:
                    pax = _parse_pax(meta)
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = meta.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            long_name, pax = None, {}
            if info.type not in _REGULAR:
                # directories, links, devices: no payload worth keeping, but skip any data they declare
                if self._read_member(size, name, keep=False) is None or not self._skip_padding(size):
                    return
                continue
            data = self._read_member(size, name)
            if data is None:
                return
            yield name, data
            if not self._skip_padding(size):
                return

    def _drain(self) -> None:
        """Read what follows the end of the archive (zero padding), so that a gzip / zstd stream cut or
        damaged there is noticed. Bounded: trailing data beyond _DRAIN bytes is not read."""
        left = _DRAIN
        while left > 0:
            chunk = self._read(min(left, 65536))
            if not chunk:
                if self.error is not None:
                    self.error = f"after the end of the archive: {self.error}"
                return
            left -= len(chunk)

    def _no_end(self, offset: int) -> str:
        return f"archive ends at byte {offset} without an end-of-archive block"

    def _read_member(self, size: int, name: str, keep: bool = True) -> bytes | None:
        parts = []
        remaining = size
        while remaining:
            want = min(remaining, _CHUNK)
            chunk = self._read(want)
            if chunk is None:
                self.cut_member = name
                return None
            if keep:
                parts.append(chunk)
            remaining -= len(chunk)
            if len(chunk) < want:
                self.error = f"cut inside member {name!r} (read {size - remaining} of {size} bytes)"
                self.cut_member = name
                return None
        return b"".join(parts)

    def _skip_padding(self, size: int) -> bool:
        padding = -size % BLOCK
        if not padding:
            return True
        block = self._read(padding)
        if block is None:
            return False
        if len(block) < padding:
            self.error = self._no_end(self.offset)
            return False
        return True

    def _read(self, n: int) -> bytes | None:
        """Up to n bytes (fewer only at the end of the stream); None when the compressed stream is damaged."""
        parts = []
        got = 0
        try:
            while got < n:
                chunk = self.stream.read(n - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        except _STREAM_ERRORS as e:
            self.error = f"compressed stream damaged after byte {self.offset + got} ({type(e).__name__}: {e})"
            return None
        self.offset += got
        return b"".join(parts)


def _parse_pax(data: bytes) -> dict[str, str]:
    """The records ("<len> <key>=<value>\\n") of a pax extended header; malformed tails are ignored."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        match = _PAX_RECORD.match(data, pos)
        if not match or int(match.group(1)) <= 0:
            break
        end = pos + int(match.group(1))
        key, eq, value = data[match.end() : end - 1].partition(b"=")
        if eq:
            records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records
