"""Grouping a streamed tar into WebDataset samples; every odd member is reported, never lost or raised.

The tar reader is our own (on top of `tarfile.TarInfo.frombuf`): `tarfile` in stream mode silently stops
at a corrupt header or at an archive cut between members, which would lose samples without a record.
Memory is bounded by options, not by the input: a member is read into memory only when it is at most
`max_member_bytes` (larger ones are streamed past and their sample skipped), and a pax extended header of
any size is parsed record by record, keeping only the records we use (at most `PAX_KEEP` bytes each).
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

# Reasons a sample is skipped or noted here; pipeline/data/decode.py lists every reason (REASONS, NOTES).
TAR_TRUNCATED = "tar truncated"
DUPLICATE = "duplicate key"
MEMBER_TOO_LARGE = "member too large"
LINK_MEMBER = "link member"  # a note: a symlink or hardlink member, not followed
SHARD_UNREADABLE = "shard unreadable"  # a whole-shard event: missing, not a tar, bad compression, I/O

DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024
BLOCK = 512
_CHUNK = 16 * 1024 * 1024  # read members in pieces, so a corrupt size field cannot allocate beyond the data
_MAX_LONG_NAME = 1024 * 1024  # a GNU long name is read whole; a longer one is taken as a corrupt archive
PAX_KEEP = 64 * 1024  # longest pax record kept (path, size); a longer path is taken as a corrupt archive
_PAX_WANTED = (b"path", b"size")
_PAX_PIECE = 64 * 1024
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_LINKS = (tarfile.SYMTYPE, tarfile.LNKTYPE)
_META_TYPES = {
    tarfile.XHDTYPE: "pax header",
    tarfile.XGLTYPE: "pax global header",
    tarfile.GNUTYPE_LONGNAME: "GNU long-name header",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link header",
}
# Errors of a damaged compressed stream (EOFError: cut short, the rest are integrity failures); other
# OSErrors (network, disk) propagate so that the shard is retried.
_INTEGRITY_ERRORS = (zlib.error, gzip.BadGzipFile, zstandard.ZstdError)
_PAX_RECORD = re.compile(rb"(\d{1,20}) ")


class ShardUnreadable(OSError):
    """The shard as a whole cannot be read: not a tar, empty, unreadable compression, or a compressed
    stream that fails its integrity check. The shard is not committed (retried on a rerun)."""


@dataclass
class Note:
    """Something about a sample that did not stop it from becoming a row (or from its own skip)."""

    reason: str
    detail: str = ""


@dataclass
class Sample:
    """One WebDataset sample: the members sharing a key, by extension ("jpg", "JPEG", "cls", ...)."""

    key: str
    index: int  # position in the shard, counting every group of members, skipped ones included
    members: dict[str, bytes] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)


@dataclass
class Skip:
    """A sample (or, with key "" and index -1, a whole-shard event) that produced no row, and why."""

    key: str
    index: int
    reason: str
    detail: str = ""


@dataclass
class _Member:
    """A tar member as the reader hands it over: its data, or (data None) why it was not read."""

    name: str
    data: bytes | None
    reason: str = ""
    detail: str = ""


def iter_samples(
    stream: BinaryIO, *, shard: str = "", max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[Sample | Skip]:
    """The samples of a tar stream, in order, as `Sample` or `Skip`.

    Members are grouped by the WebDataset rule: key = path up to the first dot of the basename, extension =
    the rest; consecutive members with one key form a sample. A key seen again later (or an extension
    repeated inside a group) starts a new group that is skipped as "duplicate key"; the first is kept.
    Directories, extension-less names and hidden / resource-fork files (basename starting with "." or
    "__", anything under __MACOSX/) are ignored. A symlink or hardlink member is not followed: it is a
    "link member" note on its sample. A member larger than `max_member_bytes` is streamed past unread and
    its sample skipped as "member too large".

    A damaged archive (cut mid-member or between members, no end-of-archive block, corrupt header) keeps
    every sample completed before the damage. The group in progress at the cut may be missing members, so
    it becomes a "tar truncated" Skip; when no sample carries the truncation (nothing in progress, or it
    was a duplicate), a final `Skip("", -1, "tar truncated", detail)` records it.

    Raises ShardUnreadable when the shard as a whole is bad: empty, not a tar (no tar header at its
    start), unreadable compression, or a compressed stream failing its integrity check (gzip CRC, zstd
    checksum or corrupt block; a compressed stream is read to its end so that the check runs), since
    then no sample of it can be trusted. Other I/O errors propagate too, so that the caller can retry.
    """
    reader = _TarReader(stream, max_member_bytes)
    seen: dict[str, int] = {}
    group: Sample | None = None
    first_index = -1  # index of the first group with the current key (< group.index: a duplicate)
    next_index = 0
    for member in reader.members():
        split = _split_name(member.name)
        if split is None:
            continue
        key, ext = split
        if group is None or key != group.key or ext in group.members:
            if group is not None:
                yield _finish(group, first_index)
            first_index = seen.setdefault(key, next_index)
            group = Sample(key=key, index=next_index)
            next_index += 1
        if member.data is None:
            group.notes.append(Note(member.reason, f"{member.name}: {member.detail}"))
        else:
            group.members[ext] = member.data
    if reader.fatal is not None:
        raise ShardUnreadable(_detail(shard, reader.fatal))
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
    if first_index != group.index:
        return Skip(group.key, group.index, DUPLICATE, f"first occurrence at index {first_index}")
    too_large = [n.detail for n in group.notes if n.reason == MEMBER_TOO_LARGE]
    if too_large:
        return Skip(group.key, group.index, MEMBER_TOO_LARGE, "; ".join(too_large))
    return group


def readable(name: str) -> str:
    """A member name as valid UTF-8 text: bytes that are not UTF-8 (read as surrogates) become `\\xNN`
    escapes, so that the key can be written (a lone surrogate fails the shard's Parquet and JSON writes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
    """The members of a streamed tar, stopping at the first damage and saying what it was.

    After `members()` is exhausted: `fatal` is a message when the shard as a whole is unreadable (see
    `iter_samples`), else `error` is None for a well-terminated archive or says where it was cut or
    damaged; `cut_member` names the member whose data was cut short, if the damage was inside one;
    `complete` says the end-of-archive block was reached (an error then concerns what follows it).
    """

    def __init__(self, stream: BinaryIO, max_member_bytes: int) -> None:
        self.stream = stream
        self.max_member_bytes = max_member_bytes
        self.offset = 0
        self.error: str | None = None
        self.fatal: str | None = None
        self.cut_member: str | None = None
        self.complete = False  # an end-of-archive block was read
        self.headers = 0  # tar headers parsed
        # a compressed stream is checked by its decompressor: read it to the end so that the check runs
        self.compressed = isinstance(stream, (gzip.GzipFile, zstandard.ZstdDecompressionReader))

    def members(self) -> Iterator[_Member]:
        yield from self._members()
        if self.fatal is None and self.compressed:
            self._drain()
        if self.fatal is None and self.error is not None and not self.headers:
            # no tar header before the damage: not a tar (an HTML page saved as shard.tar), or empty
            self.fatal = f"not a tar archive ({self.error})" if self.offset else "empty file (0 bytes)"

    def _members(self) -> Iterator[_Member]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            header_offset = self.offset
            block = self._read(BLOCK)
            if block is None:
                return
            if not block:
                self.error = self._no_end(header_offset)
                return
            if len(block) < BLOCK:
                self.error = f"cut inside a header at byte {header_offset}"
                return
            if block.count(0) == BLOCK:
                self.complete = True  # end-of-archive (a lone zero block is accepted, as tarfile does)
                return
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except (tarfile.HeaderError, ValueError, UnicodeError) as e:
                self.error = f"corrupt tar header at byte {header_offset} ({e})"
                return
            self.headers += 1
            size = info.size
            if info.type in _REGULAR and "size" in pax:
                size = int(pax["size"]) if pax["size"].isdigit() else -1
            name = readable(pax.get("path") or long_name or info.name)
            if size < 0:
                self.error = f"corrupt tar header at byte {header_offset} (size {size})"
                return
            if info.type in _META_TYPES:
                meta = self._read_meta(info.type, size, header_offset)
                if meta is None or not self._skip_padding(size):
                    return
                if info.type == tarfile.XHDTYPE:
                    pax = meta
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = meta
                continue
            long_name, pax = None, {}
            if info.type in _REGULAR and size <= self.max_member_bytes:
                data = self._read_member(size, name)
                if data is None:
                    return
                yield _Member(name, data)
            else:
                # links, directories, devices, oversized members: streamed past, never held in memory
                if self._read_member(size, name, keep=False) is None:
                    return
                if info.type in _LINKS:
                    kind = "symlink" if info.type == tarfile.SYMTYPE else "hardlink"
                    yield _Member(name, None, LINK_MEMBER, f"{kind} to {info.linkname!r}, not followed")
                elif info.type in _REGULAR:
                    limit = self.max_member_bytes
                    yield _Member(
                        name, None, MEMBER_TOO_LARGE, f"{size} bytes > {limit} (--max-member-bytes)"
                    )
            if not self._skip_padding(size):
                return

    def _read_meta(self, kind: bytes, size: int, offset: int) -> dict[str, str] | str | None:
        """A metadata member's content: the kept pax records (dict), a GNU long name (str), or {} for the
        rest (read past); None when the archive ends or is damaged inside it."""
        if kind == tarfile.XHDTYPE:
            return self._read_pax(size)
        if kind != tarfile.GNUTYPE_LONGNAME:
            return None if self._read_member(size, _META_TYPES[kind], keep=False) is None else {}
        if size > _MAX_LONG_NAME:
            self.error = f"corrupt tar header at byte {offset} (GNU long name of {size} bytes)"
            return None
        data = self._read_member(size, _META_TYPES[kind])
        return None if data is None else data.rstrip(b"\0").decode("utf-8", "surrogateescape")

    def _read_pax(self, size: int) -> dict[str, str] | None:
        """The path and size records of a pax extended header of any size, parsed piece by piece: memory
        stays within PAX_KEEP plus one piece whatever the header's size (big xattrs, comments); records
        we do not use are read past. Malformed tails are ignored, as tarfile does."""
        piece = _Pieces(self, size)
        records: dict[str, str] = {}
        while piece.fill(1):
            piece.fill(24)
            match = _PAX_RECORD.match(piece.buf)
            length = int(match.group(1)) if match else 0
            if length <= (match.end() if match else 0):
                break
            piece.fill(min(length, match.end() + 64))
            key, eq, _ = piece.buf[match.end() : length].partition(b"=")
            if eq and key in _PAX_WANTED:
                if length > PAX_KEEP:
                    self.error = f"pax {key.decode()} record of {length} bytes (longest kept: {PAX_KEEP})"
                    return None
                if not piece.fill(length):
                    break
                value = piece.buf[match.end() + len(key) + 1 : length - 1]
                records[key.decode()] = value.decode("utf-8", "surrogateescape")
            if not piece.drop(length):
                break
        return records if piece.drop(piece.left + len(piece.buf)) else None

    def _drain(self) -> None:
        """Read what follows the archive to the end of the (compressed) stream, piece by piece, so that a
        gzip CRC or zstd checksum failure anywhere in it is noticed; the data is discarded."""
        error = self.error
        while self._read(1024 * 1024):
            pass
        if self.fatal is None and self.error is not error:
            self.error = f"after the end of the archive: {self.error}" if self.complete else error

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
        """Up to n bytes (fewer only at the end of the stream); None when the compressed stream is damaged:
        cut short (`error`) or failing its integrity check (`fatal`)."""
        parts = []
        got = 0
        try:
            while got < n:
                chunk = self.stream.read(n - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        except EOFError as e:
            self.error = f"compressed stream cut after byte {self.offset + got} ({e})"
            return None
        except _INTEGRITY_ERRORS as e:
            where = f"after byte {self.offset + got}" if self.offset + got else "at its start"
            self.fatal = f"compressed stream corrupt {where} ({type(e).__name__}: {e})"
            return None
        self.offset += got
        return b"".join(parts)


class _Pieces:
    """A member's data read piece by piece into a small buffer (for parsing pax headers of any size)."""

    def __init__(self, reader: _TarReader, size: int) -> None:
        self.reader = reader
        self.left = size  # bytes of the member not read yet
        self.buf = b""
        self.ok = True  # False once the archive ended or was damaged inside the member

    def fill(self, n: int) -> bool:
        """Read until `buf` holds n bytes; False when the member has fewer left."""
        while len(self.buf) < n and self.left and self.ok:
            chunk = self._next(min(self.left, _PAX_PIECE))
            self.buf += chunk
        return len(self.buf) >= n

    def drop(self, n: int) -> bool:
        """Discard the next n bytes (buffered ones first); False when the archive ended or was damaged."""
        buffered = min(n, len(self.buf))
        self.buf = self.buf[buffered:]
        n -= buffered
        while n and self.left and self.ok:
            n -= len(self._next(min(n, self.left, _PAX_PIECE)))
        return self.ok

    def _next(self, want: int) -> bytes:
        chunk = self.reader._read(want)
        if chunk is None or len(chunk) < want:
            if chunk is not None:
                self.reader.error = f"cut inside a pax header (read {len(chunk)} of {want} bytes)"
            self.ok = False
            return b""
        self.left -= len(chunk)
        return chunk
