"""Integrity checks on encoded image bytes that PIL does not make: a JPEG scan that stops early at a
marker, a scan decoding with a Huffman table nobody defined, and a file missing its format's end marker.

PIL decodes such JPEGs to grey images without an error; here they become "corrupt image" (raised as
`Rejected`). When PIL does fail, `damaged` tells a cut file ("truncated image") from a corrupt one.
"""

from __future__ import annotations

import re

from pipeline.data.reasons import CORRUPT, TRUNCATED
from pipeline.data.samples import Rejected

# JPEG markers read by strict_jpeg
_SOS, _EOI, _DHT, _DRI, _APP2, _PROGRESSIVE = 0xDA, 0xD9, 0xC4, 0xDD, 0xE2, 0xC2
_HUFFMAN_FRAMES = (0xC0, 0xC1, _PROGRESSIVE)  # baseline, extended sequential, progressive
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # ends entropy-coded data (0xff00 is a stuffed byte)
_ANY_MARKER = re.compile(rb"\xff[^\x00]")  # the same without a restart interval: no RSTn belongs there
_LOOKAHEAD = 128  # zero bytes after a scan: libjpeg-turbo reads up to ~114 bytes ahead of what it decodes


def strict_jpeg(data: bytes) -> tuple[bytes, bool]:
    """The bytes to decode a JPEG from, and whether a marker that ended its scan was taken away.

    libjpeg only warns (and PIL ignores its warnings) when a scan's data stops early at a marker: a file cut
    and re-terminated with an end marker, or a 6000x6000 header over 64x64 of data, decodes to a grey
    image. For a single-scan (baseline) JPEG we therefore decode the scan data without the marker that
    follows it, padded with zero bytes (libjpeg reads a little ahead): a complete scan decodes as before,
    a scan that stops early runs out of data and PIL raises "image file is truncated". A scan using a
    Huffman table that no DHT segment defined (libjpeg would silently use its default tables) is corrupt.
    Progressive, multi-scan sequential and multi-picture (MPO) JPEGs are decoded as they are.
    """
    pos, tables, huffman, components, restarts = 2, set(), 0, 0, False
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill byte, parameterless marker
            pos += 1 if marker == 0xFF else 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : end]
        if marker in _HUFFMAN_FRAMES:
            huffman, components = marker, segment[5] if len(segment) > 5 else 0
        elif marker == _DRI:
            restarts = segment[:2] != b"\0\0"
        elif marker == _DHT:
            tables |= _huffman_tables(segment)
        elif marker == _APP2 and segment.startswith(b"MPF\0"):
            return data, False
        elif marker == _SOS:
            missing = _scan_tables(segment, huffman) - tables if huffman else set()
            if missing:
                names = ", ".join(f"{'AC' if c else 'DC'}{i}" for c, i in sorted(missing))
                raise Rejected(CORRUPT, f"missing Huffman table {names} (no DHT defines it)")
            if huffman == _PROGRESSIVE or segment[:1] != bytes([components]):
                return data, False  # progressive, or a sequential JPEG with one scan per component
            stop = (_MARKER if restarts else _ANY_MARKER).search(data, end)
            if stop is None:  # cut: no marker after the scan
                return data + bytes(_LOOKAHEAD), False
            return data[: stop.start()] + bytes(_LOOKAHEAD), True
        elif marker == _EOI:
            break
        pos = end
    return data, False


def _huffman_tables(segment: bytes) -> set[tuple[int, int]]:
    """(class, id) of each table a DHT segment defines (class 0: DC, 1: AC)."""
    out, pos = set(), 0
    while pos + 17 <= len(segment):
        out.add((segment[pos] >> 4, segment[pos] & 15))
        pos += 17 + sum(segment[pos + 1 : pos + 17])
    return out


def _scan_tables(segment: bytes, frame: int) -> set[tuple[int, int]]:
    """(class, id) of the Huffman tables an SOS segment's scan decodes with."""
    count = segment[0] if segment else 0
    if len(segment) < 4 + 2 * count:
        return set()
    start, stop, approximation = segment[1 + 2 * count], segment[2 + 2 * count], segment[3 + 2 * count]
    selectors = segment[2 : 2 + 2 * count : 2]
    progressive_refinement = frame == _PROGRESSIVE and approximation >> 4
    needed = set()
    if start == 0 and not progressive_refinement:
        needed |= {(0, s >> 4) for s in selectors}
    if stop > 0:
        needed |= {(1, s & 15) for s in selectors}
    return needed


def looks_cut(data: bytes, kind: str | None) -> bool:
    """Whether image bytes of format `kind` lack the end their format has (JPEG's EOI, PNG's IEND, the
    RIFF size of a WebP, GIF's trailer): then a decoding error means a cut file, not a corrupt one."""
    tail = data.rstrip(b"\0")[-1024:]
    if kind in ("JPEG", "MPO"):
        return b"\xff\xd9" not in tail
    if kind == "PNG":
        return b"IEND" not in tail[-16:]
    if kind == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    if kind == "GIF":
        return not tail.endswith(b";")
    return False


def damaged(data: bytes, kind: str | None, message: str) -> Rejected:
    """TRUNCATED when PIL says so or the bytes lack their format's end marker, else CORRUPT.

    PIL reports a cut JPEG as "image file is truncated", but a cut WebP as "could not create decoder
    object" and zlib damage in a PNG as "broken data stream", so the end marker decides those.
    """
    if "truncated" in message or looks_cut(data, kind):
        return Rejected(TRUNCATED, message)
    return Rejected(CORRUPT, message)
