"""Sample keys from file paths: readable, tar-safe and unique within a listing (make_shards' keys).

A key is the relative path without its extension, part by part: ASCII letters, digits, `_` and `-` stay;
other ASCII characters become `_` (a dot would split a WebDataset key); leading `_` are dropped (an empty
part becomes `x`); every non-ASCII character is percent-encoded from its UTF-8 bytes after NFC
normalisation (`café` -> `caf%C3%A9`, `日本` -> `%E6%97%A5%E6%9C%AC`), so names in any script stay
readable and distinct; a `..` part is `%2E%2E`. A key that would repeat an earlier one gets `_1`, `_2`,
... appended. `decode_key` turns the percent-encoded characters back.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata
from urllib.parse import quote, unquote

_ASCII_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_UP = "%2E%2E"


def key_part(part: str) -> str:
    """One path part as a key part (see the module doc)."""
    if part == "..":
        return _UP
    out = []
    for ch in unicodedata.normalize("NFC", part):
        if ord(ch) >= 128:
            out.append(quote(ch, safe=""))
        else:
            out.append(_ASCII_UNSAFE.sub("_", ch))
    return "".join(out).lstrip("_") or "x"


def decode_key(key: str) -> str:
    """The key with its percent-encoded characters decoded (`caf%C3%A9` -> `café`)."""
    return unquote(key)


class KeyMaker:
    """Unique keys for the relative paths of one listing, in the order they are given."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def key(self, relative: str) -> str:
        stem = posixpath.splitext(relative)[0]
        base = "/".join(key_part(p) for p in stem.split("/") if p and p != ".")
        key, n = base or "x", 0
        while key in self.seen:
            n += 1
            key = f"{base}_{n}"
        self.seen.add(key)
        return key
