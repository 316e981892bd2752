"""Bash-style brace expansion of a SHARDS pattern, as a lazy sequence: `s3://b/x-{000000..999999}.tar`
is a million URLs that are never all held at once. A planner asks for its length, iterates it (as often
as it likes) or indexes it; each URL is formatted when asked for.

Order and padding follow bash: `{a,b}{1,2}` is a1 a2 b1 b2; `{08..10}` pads to the wider bound when either
bound has a leading zero; `{3..1}` counts down. Duplicates are dropped, the first kept: a pattern whose
URLs come out strictly increasing (zero-padded ranges, sorted lists: the common case) has none and stays
lazy; any other (a repeated alternative, nested braces) is expanded into a list once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class Padded(Sequence[str]):
    """The numbers of a brace range as bash spells them, computed per index."""

    def __init__(self, first: str, last: str) -> None:
        start, stop = int(first), int(last)
        # bash pads to the wider bound when either bound has a leading zero
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (first, last))
        self.width = max(len(first), len(last)) if padded else 0
        step = 1 if stop >= start else -1
        self.numbers = range(start, stop + step, step)

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return str(self.numbers[i]).zfill(self.width)


class BraceShards(Sequence[str]):
    """The URLs of a brace pattern without nested braces: literal parts and alternatives, the last brace
    varying fastest. Iterating and indexing compute each URL from the alternatives' indices."""

    def __init__(self, parts: list[Sequence[str]]) -> None:
        self.parts = parts  # each a sequence of alternatives (a literal part: one)
        self.size = 1
        for p in parts:
            self.size *= len(p)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(i)
        picked = []
        for p in reversed(self.parts):
            i, j = divmod(i, len(p))
            picked.append(p[j])
        return "".join(reversed(picked))

    def __iter__(self) -> Iterator[str]:
        return _walk(self.parts, "")


def _walk(parts: list[Sequence[str]], prefix: str) -> Iterator[str]:
    """The URLs in order, one alternative of each part at a time (itertools.product would first copy
    every part: a range of 10^6 into a tuple of 10^6 strings)."""
    if not parts:
        yield prefix
        return
    for alternative in parts[0]:
        yield from _walk(parts[1:], prefix + alternative)


def has_brace_expression(spec: str) -> bool:
    return any("," in m.group(1) or _RANGE.match(m.group(1)) for m in _BRACE.finditer(spec))


def expand_braces(pattern: str) -> Sequence[str]:
    """The URLs of `pattern`, in bash's order, duplicates dropped (first kept): lazy where that is free."""
    parts = _parts(pattern)
    if parts is not None:
        lazy = BraceShards(parts)
        if strictly_increasing(lazy):
            return lazy
        return list(dict.fromkeys(lazy))
    return list(dict.fromkeys(_expand_eagerly(pattern)))


def strictly_increasing(items: Iterator[str] | Sequence[str]) -> bool:
    """Whether each item sorts after the one before: then no two are equal, known without a set."""
    previous = None
    for item in items:
        if previous is not None and item <= previous:
            return False
        previous = item
    return True


def _parts(pattern: str) -> list[Sequence[str]] | None:
    """Literal parts and alternatives, or None when braces nest (expanded eagerly instead)."""
    parts: list[Sequence[str]] = []
    at = 0
    for m in _BRACE.finditer(pattern):
        alternatives = _alternatives(m.group(1))
        if alternatives is None:
            continue
        parts += [[pattern[at : m.start()]], alternatives]
        at = m.end()
    parts.append([pattern[at:]])
    literal = "".join(p[0] for p in parts if len(p) == 1 and not isinstance(p, Padded))
    if "{" in literal and "}" in literal and has_brace_expression(literal):
        return None
    return parts


def _alternatives(body: str) -> Sequence[str] | None:
    span = _RANGE.match(body)
    if span:
        return Padded(span.group(1), span.group(2))
    if "," in body:
        return body.split(",")
    return None


def _expand_eagerly(pattern: str) -> list[str]:
    """Innermost braces first, for nested patterns such as `{a,{b,c}}`."""
    for match in _BRACE.finditer(pattern):
        alternatives = _alternatives(match.group(1))
        if alternatives is None:
            continue
        head, tail = pattern[: match.start()], pattern[match.end() :]
        out: list[str] = []
        for alternative in alternatives:
            out.extend(_expand_eagerly(head + alternative + tail))
        return out
    return [pattern]
