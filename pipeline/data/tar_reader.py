"""Reading a streamed tar member by member: every damage is stopped at and said, never lost or raised.

The reader is our own (on top of `tarfile.TarInfo.frombuf`): `tarfile` in stream mode silently stops at a
corrupt header or at an archive cut between members, which would lose samples without a record. Memory
is bounded by options, not by the input: a member is read into memory only when it is at most
`max_member_bytes` (larger ones are streamed past and reported), and a pax extended header of any size is
parsed record by record, keeping only the records we use (at most `PAX_KEEP` bytes each).
pipeline/data/samples.py groups the members into samples.
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from pipeline.data.reasons import LINK_MEMBER, MEMBER_TOO_LARGE

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


@dataclass
class Member:
    """A tar member as the reader hands it over: its data, or (data None) why it was not read."""

    name: str
    data: bytes | None
    reason: str = ""
    detail: str = ""


def readable(name: str) -> str:
    """A member name as valid UTF-8 text: bytes that are not UTF-8 (read as surrogates) become `\\xNN`
    escapes, so that the key can be written (a lone surrogate fails the shard's Parquet and JSON writes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class TarReader:
    """The members of a streamed tar, stopping at the first damage and saying what it was.

    After `members()` is exhausted: `fatal` is a message when the shard as a whole is unreadable (empty,
    not a tar, unreadable compression, a failed integrity check), else `error` is None for a
    well-terminated archive or says where it was cut or damaged; `cut_member` names the member whose data
    was cut short, if the damage was inside one; `complete` says the end-of-archive block was reached (an
    error then concerns what follows it).
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

    def members(self) -> Iterator[Member]:
        """Each member in order, until the end-of-archive block or the first damage."""
        yield from self._members()
        if self.fatal is None and self.compressed:
            self._drain()
        if self.fatal is None and self.error is not None and not self.headers:
            # no tar header before the damage: not a tar (an HTML page saved as shard.tar), or empty
            self.fatal = f"not a tar archive ({self.error})" if self.offset else "empty file (0 bytes)"

    def _members(self) -> Iterator[Member]:
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
                yield Member(name, data)
            else:
                # links, directories, devices, oversized members: streamed past, never held in memory
                if self._read_member(size, name, keep=False) is None:
                    return
                if info.type in _LINKS:
                    kind = "symlink" if info.type == tarfile.SYMTYPE else "hardlink"
                    yield Member(name, None, LINK_MEMBER, f"{kind} to {info.linkname!r}, not followed")
                elif info.type in _REGULAR:
                    limit = self.max_member_bytes
                    yield Member(name, None, MEMBER_TOO_LARGE, f"{size} bytes > {limit} (--max-member-bytes)")
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

    def __init__(self, reader: TarReader, size: int) -> None:
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
