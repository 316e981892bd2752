"""Training batches for one data-parallel worker, from WebDataset shards, resumable at the exact sample.

Each epoch the shard list is shuffled with a seed of (seed, epoch), and worker `rank` of `world` takes the
shards `rank::world` of that order: no two workers read the same shard in an epoch, and together they read
all of them. A worker reads its shards in order, samples in shard order, decodes each with a random crop and
flip drawn from a generator seeded by (seed, epoch, shard, sample) (so crops do not depend on threads or on
where a run was resumed), and stacks `batch_size` good images into a float batch. Bad samples are skipped
and counted by reason; they never stop training.

`DataPosition` (epoch, shard index in this worker's list, samples consumed in that shard) says where the
next batch starts; a new `TrainBatches` given a saved position continues with the very next sample.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.data.decode import DEFAULT_LIMITS, Decoded, DecodeLimits, decode_sample
from pipeline.data.preprocess import to_model_input
from pipeline.data.reasons import SHARD_UNREADABLE
from pipeline.data.samples import Sample, Skip
from pipeline.data.shards import open_shard
from pipeline.data.stages import ordered_map, shard_samples

MAX_EXAMPLES = 20  # skipped samples kept (key, reason, detail) for the logs


@dataclass(frozen=True)
class DataPosition:
    """Where a worker's next batch starts: `sample` items of shard number `shard` (in this worker's list for
    `epoch`) are already consumed, skipped ones included."""

    epoch: int = 0
    shard: int = 0
    sample: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataPosition:
        return cls(epoch=int(data["epoch"]), shard=int(data["shard"]), sample=int(data["sample"]))


def epoch_order(n: int, *, epoch: int, seed: int) -> list[int]:
    """The shard indices in the (deterministic) shuffled order of an epoch."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]


def worker_shards(shards: list[str], *, rank: int, world: int, epoch: int, seed: int) -> list[int]:
    """Indices into `shards` that worker `rank` of `world` reads in `epoch`, in reading order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    return epoch_order(len(shards), epoch=epoch, seed=seed)[rank::world]


def sample_rng(seed: int, epoch: int, shard: int, index: int) -> np.random.Generator:
    """The crop-and-flip generator of one sample (`shard` is its index in the full shard list)."""
    return np.random.default_rng([seed, epoch, shard, index])


class TrainBatches:
    """Endless iterator of float (batch_size, 3, image_size, image_size) batches in [-1, 1] for one worker.

    >>> batches = TrainBatches(shards, batch_size=16, image_size=256, rank=r, world=w, seed=0)
    >>> x = next(batches); saved = batches.position     # ... later, after a restart:
    >>> batches = TrainBatches(shards, ..., position=saved)  # continues with the next sample
    """

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        image_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        limits: DecodeLimits = DEFAULT_LIMITS,
        position: DataPosition | None = None,
        threads: int = 2,
        opener: Callable = open_shard,
        max_consecutive_skips: int = 10_000,
    ) -> None:
        if len(shards) < world:
            raise ValueError(
                f"{len(shards)} shards for {world} workers: every worker needs at least one shard"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shards = list(shards)
        self.batch_size = batch_size
        self.image_size = image_size
        self.rank, self.world, self.seed = rank, world, seed
        self.limits = limits
        self.position = position or DataPosition()  # where the next batch starts
        self.skipped: collections.Counter[str] = collections.Counter()  # reason -> count
        self.examples: list[tuple[str, str, str]] = []  # the first skipped (key, reason, detail)
        self.decoded = 0  # images that went into batches
        self.opener = opener
        self.max_consecutive_skips = max_consecutive_skips
        self.threads = threads if threads > 1 else 0  # 0 or 1: decode inline
        self._items: Iterator[tuple[Decoded | Skip, DataPosition]] | None = None

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> torch.Tensor:
        return to_model_input(self.next_images())

    def next_images(self) -> list[np.ndarray]:
        """The next batch as uint8 (image_size, image_size, 3) images; advances `position`."""
        if self._items is None:
            # the decode stage every reader uses; it reads a few items ahead, but `position` only moves
            # with the items consumed, so it stays exact for a checkpoint taken between batches
            window = 4 * max(self.threads, 1)
            self._items = ordered_map(self._decode, self._raw_items(self.position), self.threads, window)
        images: list[np.ndarray] = []
        failures = 0
        while len(images) < self.batch_size:
            result, self.position = next(self._items)
            if isinstance(result, Decoded):
                images.append(result.image)
                failures = 0
                continue
            self._count(result)
            failures += 1
            if failures > self.max_consecutive_skips:
                raise RuntimeError(
                    f"worker {self.rank}: {failures} samples in a row could not be used "
                    f"(skipped so far: {dict(self.skipped)}); is this image data?"
                )
        self.decoded += len(images)
        return images

    def _decode(
        self, entry: tuple[Sample | Skip, np.random.Generator | None, DataPosition]
    ) -> tuple[Decoded | Skip, DataPosition]:
        """(the decoded image or the skip, the position after this item)."""
        item, rng, after = entry
        if isinstance(item, Skip):
            return item, after
        return decode_sample(item, image_size=self.image_size, limits=self.limits, train_rng=rng), after

    def _count(self, skip: Skip) -> None:
        self.skipped[skip.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((skip.key, skip.reason, skip.detail))

    def _raw_items(
        self, start: DataPosition
    ) -> Iterator[tuple[Sample | Skip, np.random.Generator | None, DataPosition]]:
        """(item, its crop generator, position after it) for every item from `start` on, epoch after epoch."""
        epoch, first_shard, first_sample = start.epoch, start.shard, start.sample
        while True:
            mine = worker_shards(self.shards, rank=self.rank, world=self.world, epoch=epoch, seed=self.seed)
            samples_this_epoch = 0
            for s in range(first_shard, len(mine)):
                url = self.shards[mine[s]]
                skip_first = first_sample if s == first_shard else 0
                samples = shard_samples(
                    url, max_member_bytes=self.limits.max_member_bytes, on_error="skip", opener=self.opener
                )
                for i, item in enumerate(samples):
                    if isinstance(item, Skip) and item.reason == SHARD_UNREADABLE:
                        self._count(item)  # missing shard, network: counted, the next shard is read
                    elif i >= skip_first:
                        samples_this_epoch += isinstance(item, Sample)
                        rng = sample_rng(self.seed, epoch, mine[s], i) if isinstance(item, Sample) else None
                        yield item, rng, DataPosition(epoch, s, i + 1)
            if first_shard == 0 and first_sample == 0 and samples_this_epoch == 0:
                raise RuntimeError(
                    f"worker {self.rank}: a whole epoch over its {len(mine)} shards gave no sample "
                    f"(skipped: {dict(self.skipped)})"
                )
            epoch, first_shard, first_sample = epoch + 1, 0, 0

    def close(self) -> None:
        """Stop the decode threads (read-ahead work is cancelled)."""
        if self._items is not None:
            self._items.close()
            self._items = None
