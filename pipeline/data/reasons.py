"""Every reason an input is skipped or noted, defined once, and the one way to count and print them.

The strings are part of the output contract: they appear in token files' commit records, in the jobs'
summaries and reports, and in docs/BAD_INPUT.md; never change one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

# A sample the tar reader (pipeline/data/tar_reader.py) or the grouping into samples
# (pipeline/data/samples.py) drops: no row.
TAR_TRUNCATED = "tar truncated"  # the archive is cut or damaged inside this sample (or after it)
DUPLICATE = "duplicate key"  # a key seen earlier in the shard: the first one is kept
MEMBER_TOO_LARGE = "member too large"  # a member over --max-member-bytes: streamed past, never read

# A sample whose image cannot become a row (pipeline/data/decode.py and jpeg_checks.py).
TRUNCATED = "truncated image"  # the image bytes end early
CORRUPT = "corrupt image"  # the image bytes are damaged or inconsistent
EMPTY = "empty member"  # a zero-byte image member
NOT_IMAGE = "not an image"  # an image-named member whose bytes are no image format we read
NO_IMAGE = "no image member"  # no member named or looking like an image
TOO_SMALL = "too small"  # shorter side below --min-side
ASPECT = "aspect ratio"  # longer / shorter side above --max-aspect
TOO_MANY_PIXELS = "too many pixels"  # width * height above --max-pixels (decompression bombs)

# Every reason a sample is skipped (a Skip, no row), in the order the docs list them.
REASONS = (
    TRUNCATED,
    CORRUPT,
    EMPTY,
    NOT_IMAGE,
    NO_IMAGE,
    DUPLICATE,
    TOO_SMALL,
    ASPECT,
    TOO_MANY_PIXELS,
    TAR_TRUNCATED,
    MEMBER_TOO_LARGE,
)

# A whole-shard event (a Skip with key "" and index -1): missing, not a tar, bad compression, I/O.
SHARD_UNREADABLE = "shard unreadable"

# Something odd about a sample that still becomes a row (a Note).
LINK_MEMBER = "link member"  # a symlink or hardlink member, not followed
EXTRA_IMAGE = "extra image member"  # a second image member (.jpg and .png): the preferred one is used
BAD_LABEL = "unparsable label"  # a .cls that is not an int64 integer: the row's label is null
INVALID_UTF8 = "invalid UTF-8"  # a kept member (--keep) that is not UTF-8: its column is null
INVALID_JSON = "invalid JSON"  # also a JSON text nested too deep or with a number too long to parse
UNREADABLE = "unreadable member"  # anything else reading a kept member raised (MemoryError, ...)

# Every reason a row is noted (a Note on a kept row).
NOTES = (
    LINK_MEMBER,
    EXTRA_IMAGE,
    BAD_LABEL,
    INVALID_UTF8,
    INVALID_JSON,
    UNREADABLE,
)

# A source file make_shards (pipeline/pack/) does not pack; EMPTY and NOT_IMAGE above apply there too.
MISSING = "missing file"  # no such file (a stale list line, a file deleted since the listing)
NOT_REGULAR = "not a regular file"  # a FIFO, device, socket or directory: never read
TOO_LARGE = "file too large"  # larger than --max-file-bytes: never read whole
NOT_LISTED = "not in the labels file"  # an image the labels file does not name
OUTSIDE_CLASSES = "outside the class folders"  # a file beside the class folders
IN_SUBFOLDER = "in a subfolder of a flat folder"
BAD_LIST_LINE = "bad list line"
DUPLICATE_LINE = "duplicate list line"  # the same file (and label) on an earlier line: packed once
LINK_LOOP = "directory link loop"  # a directory link to one of its own ancestors (not followed)

# Every reason make_shards skips a source file.
FILE_REASONS = (
    MISSING,
    NOT_REGULAR,
    TOO_LARGE,
    EMPTY,
    NOT_IMAGE,
    NOT_LISTED,
    OUTSIDE_CLASSES,
    IN_SUBFOLDER,
    BAD_LIST_LINE,
    DUPLICATE_LINE,
    LINK_LOOP,
)


def count_by_reason(items: Iterable) -> dict[str, int]:
    """reason -> how many of `items` have it, sorted by reason. An item is a dict with a "reason" key (a
    record's skip) or an object with a `reason` attribute (`Skip`, `Note`)."""
    counts = Counter(item["reason"] if isinstance(item, Mapping) else item.reason for item in items)
    return dict(sorted(counts.items()))


def format_by_reason(counts: Mapping[str, int]) -> str:
    """` (reason: n, reason: n)` sorted by reason, to follow a total on a summary line; "" for none."""
    if not counts:
        return ""
    return f" ({', '.join(f'{reason}: {n}' for reason, n in sorted(counts.items()))})"
