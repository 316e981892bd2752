"""The data path as plain generator stages over plain values, composed by every reader of images:

    batched(decoded(shard_samples(url), decode, threads), n)

`shard_samples` yields a shard's `Sample`s, `decoded` turns each into a `Decoded` (or a `Skip`) in a
bounded thread pool with the order kept, `batched` groups the `Decoded` ones. A `Skip` (a sample that
gives no row, or with index -1 an event of the whole shard) is a value: every stage passes it on, in
order, for the consumer to record. What to do when a shard cannot be read at all is an argument.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pipeline.data.decode import Decoded
from pipeline.data.reasons import SHARD_UNREADABLE
from pipeline.data.samples import Sample, Skip, iter_samples
from pipeline.data.shards import open_shard
from pipeline.data.tar_reader import DEFAULT_MAX_MEMBER_BYTES

T = TypeVar("T")
R = TypeVar("R")

ON_ERROR = ("raise", "skip")


def shard_samples(
    url: str,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    on_error: str = "raise",
    opener: Callable = open_shard,
) -> Iterator[Sample | Skip]:
    """The samples of one shard, in order (see `iter_samples`), bad ones as Skips.

    on_error: for a shard that cannot be opened or read at all (an OSError, ShardUnreadable included),
    "raise" lets it propagate (the tokenize job retries or fails the shard); "skip" ends the shard with a
    `Skip("", -1, SHARD_UNREADABLE, ...)` after the samples read before the error."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    try:
        with opener(url) as stream:
            yield from iter_samples(stream, shard=url, max_member_bytes=max_member_bytes)
    except OSError as e:
        if on_error == "raise":
            raise
        yield Skip(key="", index=-1, reason=SHARD_UNREADABLE, detail=f"{url}: {e}")


def decoded(
    items: Iterable[Sample | Skip],
    decode: Callable[[Sample], Decoded | Skip],
    threads: int = 1,
    window: int | None = None,
) -> Iterator[Decoded | Skip]:
    """`decode` each Sample in `threads` threads (0: inline), in input order, at most `window` items read
    ahead (default 4 per thread); Skips pass through."""

    def one(item: Sample | Skip) -> Decoded | Skip:
        return item if isinstance(item, Skip) else decode(item)

    return ordered_map(one, items, threads, window or 4 * max(threads, 1))


def is_row(item: object) -> bool:
    return not isinstance(item, Skip)


def batched(items: Iterable[T], n: int, row: Callable[[T], bool] = is_row) -> Iterator[list[T] | T]:
    """Lists of `n` row items (the last one shorter); the others (Skips) pass through as they come.
    `row` tells them apart for items that carry more than a Decoded or a Skip (e.g. (shard, item))."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    batch: list[T] = []
    for item in items:
        if not row(item):
            yield item
            continue
        batch.append(item)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def first_rows(items: Iterable[T], n: int | None, row: Callable[[T], bool] = is_row) -> Iterator[T]:
    """The items up to the `n`-th row item (all of them for None): nothing after it is read, so no skip
    found past the limit is reported."""
    if n is None:
        yield from items
        return
    if n <= 0:
        return
    rows = 0
    for item in items:
        yield item
        rows += row(item)
        if rows >= n:
            return


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
