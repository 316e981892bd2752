"""Ordered, bounded read-ahead: map a function over an iterator in a thread pool, `window` items in flight."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, window: int) -> Iterator[R]:
    """Yield fn(item) in input order; at most `window` items are read and not yet consumed (bounded memory).

    Decoding (PIL) and resizing release the GIL, so threads overlap them with the model's forward pass.
    """
    if threads <= 0:
        yield from map(fn, items)
        return
    window = max(window, 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
