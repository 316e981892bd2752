"""Sample members kept beside the tokens (`--keep txt,json`): one token-file column per extension.

`.txt` (any extension ending in "txt" or "text") becomes a UTF-8 string, `.json` a string holding the JSON
text as it is (checked to parse), any other extension its bytes. A member that is absent gives null; one
that is not valid UTF-8 or not valid JSON gives null and a note on the row (NOTES in decode.py).
Extensions match in any case (".TXT" is kept as "txt").
"""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.data.samples import Note

# Notes on a row whose kept member could not be kept (the row stays, the column is null).
INVALID_UTF8 = "invalid UTF-8"
INVALID_JSON = "invalid JSON"
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
    """The kept members' column values (ext -> str / bytes / None) and notes for those set to null."""
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
        if kind(ext) == "bytes":
            values[ext] = data
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            notes.append(Note(INVALID_UTF8, f".{ext}: {e}"))
            continue
        if kind(ext) == "json":
            try:
                json.loads(text)
            except ValueError as e:
                notes.append(Note(INVALID_JSON, f".{ext}: {e}"))
                continue
        values[ext] = text
    return values, notes
