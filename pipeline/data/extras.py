"""Sample members kept beside the tokens (`--keep txt,json`): one token-file column per extension.

`.txt` (any extension ending in "txt" or "text") becomes a UTF-8 string, `.json` a string holding the JSON
text as it is (checked to parse), any other extension its bytes. A member that is absent gives null; one
that is not valid UTF-8 or not valid JSON (or anything else its reading raises) gives null and a note on
the row (NOTES in pipeline/data/reasons.py), never a failed shard.
Extensions match in any case (".TXT" is kept as "txt").
"""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.data.reasons import INVALID_JSON, INVALID_UTF8, UNREADABLE
from pipeline.data.samples import Note

_DETAIL = 200  # longest exception text kept in a note
# Column names a kept extension cannot take.
RESERVED = ("key", "shard", "index", "label", "tokens", "view", "width", "height")


def check_keep(keep: tuple[str, ...]) -> tuple[str, ...]:
    """The extensions in lower case; ValueError (one line) for an empty, reserved or repeated one."""
    out = tuple(e.strip().lower().lstrip(".") for e in keep)
    for ext in out:
        if not ext or "/" in ext or ext in RESERVED:
            raise ValueError(
                f"--keep {ext!r}: not a member extension that can be a column ({RESERVED} are taken)"
            )
    if len(set(out)) != len(out):
        raise ValueError(f"--keep names an extension twice: {','.join(keep)}")
    return out


def column_type(ext: str) -> pa.DataType:
    return pa.string() if kind(ext) in ("text", "json") else pa.binary()


def kind(ext: str) -> str:
    if ext.endswith(("txt", "text")):
        return "text"
    return "json" if ext.endswith("json") else "bytes"


def extra_values(members: dict[str, bytes], keep: tuple[str, ...]) -> tuple[dict, list[Note]]:
    """The kept members' column values (ext -> str / bytes / None) and notes for those set to null.

    Nothing a member holds can fail the shard: whatever reading one raises (a JSON nested 100,000 deep
    raises RecursionError, a 5,000-digit JSON number ValueError, ...) makes that column null with a note."""
    by_lower = {}
    for ext, data in members.items():
        by_lower.setdefault(ext.lower(), data)
    values: dict = {}
    notes: list[Note] = []
    for ext in keep:
        data = by_lower.get(ext)
        values[ext] = None
        if data is None:
            continue
        try:
            values[ext] = member_value(ext, data)
        except Exception as e:  # the member's own fault, whatever it is: a note, never the shard's failure
            notes.append(Note(_reason(e), _detail(ext, e)))
    return values, notes


def member_value(ext: str, data: bytes) -> str | bytes:
    """A kept member's column value; raises what its content makes the UTF-8 or JSON reader raise."""
    if kind(ext) == "bytes":
        return data
    text = data.decode("utf-8")
    if kind(ext) == "json":
        json.loads(text)
    return text


def _reason(error: Exception) -> str:
    if isinstance(error, UnicodeDecodeError):
        return INVALID_UTF8
    if isinstance(error, (ValueError, RecursionError)):  # JSONDecodeError, too many digits, too deep
        return INVALID_JSON
    return UNREADABLE


def _detail(ext: str, error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    return f".{ext}: {text if len(text) <= _DETAIL else text[: _DETAIL - 3] + '...'}"
