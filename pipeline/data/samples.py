"""Grouping a streamed tar into WebDataset samples; every odd member is reported, never lost or raised.

The members come from pipeline/data/tar_reader.py, which stops at the first damage and says what it was;
here they become `Sample`s, or `Skip`s saying why a sample gives no row.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from pipeline.data.reasons import DUPLICATE, MEMBER_TOO_LARGE, TAR_TRUNCATED
from pipeline.data.tar_reader import DEFAULT_MAX_MEMBER_BYTES, TarReader


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


class Rejected(Exception):
    """A sample found unusable where its key is not at hand (decoding its image): raised there, and made
    its `Skip` (`.skip(key, index)`) where the sample is known. `reason`: one of pipeline/data/reasons.py."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def skip(self, key: str, index: int) -> Skip:
        return Skip(key=key, index=index, reason=self.reason, detail=self.detail)


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
    reader = TarReader(stream, max_member_bytes)
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
    yield from _cut(reader.cut_member, _detail(shard, reader.error), group, first_index, seen, next_index)


def _cut(
    cut_member: str | None,
    detail: str,
    group: Sample | None,
    first_index: int,
    seen: dict[str, int],
    next_index: int,
) -> Iterator[Sample | Skip]:
    """The end of a damaged archive: the group in progress (or the one the cut member starts) becomes a
    "tar truncated" Skip, unless it is a duplicate; then a whole-shard Skip records the truncation."""
    carried = False
    cut = _split_name(cut_member) if cut_member else None
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
