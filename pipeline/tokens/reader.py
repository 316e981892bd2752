"""The downstream reader: token Parquet files as a PyTorch `IterableDataset` of token sequences.

Work is split in units of one Parquet row group. Each epoch the unit list is shuffled with (seed, epoch),
the same on every rank and worker, and then dealt out: reader number `rank * num_workers + worker` of
`world_size * num_workers` takes every such-numbered unit of that order, so the readers of all ranks and
DataLoader workers together read every row exactly once per epoch, and no two read the same unit. Rows
are shuffled within their unit with (seed, epoch, unit), and optionally mixed across units through a
shuffle buffer. Only the needed columns are read (pyarrow), from local paths or any fsspec URL.

    from torch.utils.data import DataLoader
    from pipeline.tokens.reader import TokenDataset

    ds = TokenDataset("tokens/", seed=0, offset=3, bos=1, eos=2)   # a directory, glob, file or list of them
    loader = DataLoader(ds, batch_size=64, num_workers=4)          # sequences share one length: default
    for epoch in range(epochs):                                    #   collate stacks them, (64, L + 2)
        ds.set_epoch(epoch)                                        # before iterating: new order per epoch
        for batch in loader:
            ...

With DistributedDataParallel, build the dataset after `torch.distributed.init_process_group` (rank and world
size are read from it then) or pass `rank=` and `world_size=`; every rank iterates its own share. Shares
differ by up to one row group, so ranks may see different numbers of batches: cap steps per epoch (e.g.
`ds.num_rows // (world_size * batch_size)`) where every rank must take the same number of steps. Call
`set_epoch` before each epoch; with `persistent_workers=True` the workers keep the epoch they were started
with, so leave that option off. `with_meta=True` yields dicts {"tokens", "key", "label", "shard", "index",
"view"} (missing labels become `missing_label`); the default collate batches those too. `columns=["txt",
"json", "width", "height", "view"]` (any of them, or of key, label, shard, index) adds those columns to
the dicts: kept members are strings, None where the member was absent or invalid (the default collate
refuses None: pass `collate_fn=list` or your own), width and height ints, view 0 in one-view files. A
column that some file lacks (a run without `--keep txt`) is refused at construction, as are files whose
token shapes differ (64 px and 128 px runs) and bad arguments; a file named twice (`d`, `d/../d`, a
link) is read once.

Files tokenized with several views (`--views flip|tencrop`: rows of a sample adjacent, a `view` column)
are read with `views=`: "all" every row; an int, that view only; "random", one view of each sample per
epoch: the choice depends only on (seed, epoch, shard, index), so every reader agrees on it whatever the
split, and each sample is yielded exactly once per epoch. Over each cycle of V epochs (0..V-1, V..2V-1,
...) a sample's views follow a permutation of its own, so no view repeats within a cycle and consecutive
epochs of a cycle differ. Files without a `view` column have one view (0).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.tokens.dataset_checks import META_COLUMNS, TOKENS, check_arguments, check_columns, check_epoch
from pipeline.tokens.files import (
    TokenFileMismatch,
    check_same_codebook,
    check_same_shape,
    list_token_files,
    open_token_files,
    read_unit,
    tokens_array,
    units_of,
)

__all__ = ["TokenDataset", "TokenFileMismatch", "assign_units", "chosen_views", "list_token_files"]


def assign_units(n: int, *, seed: int, epoch: int, shuffle: bool, reader: int, readers: int) -> list[int]:
    """Indices of the units that reader number `reader` of `readers` reads in `epoch`, in reading order.

    The whole list is ordered first (shuffled with (seed, epoch) when `shuffle`), then dealt round-robin:
    the readers' shares are disjoint and together cover every unit.
    """
    if not 0 <= reader < readers:
        raise ValueError(f"reader {reader} outside 0..{readers - 1}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [int(i) for i in order[reader::readers]]


class TokenDataset(IterableDataset):
    """Token sequences of token Parquet files, split across ranks and DataLoader workers; see the module doc.

    Each item is a (tokens_per_image + [bos] + [eos],) tensor of `dtype` (int64 or int32), every token plus
    `offset` (to place the image vocabulary after text or special tokens); with `with_meta` a dict.
    """

    def __init__(
        self,
        source: str | Sequence[str],
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 0,
        offset: int = 0,
        bos: int | None = None,
        eos: int | None = None,
        dtype: torch.dtype = torch.int64,
        with_meta: bool = False,
        missing_label: int = -1,
        rank: int | None = None,
        world_size: int | None = None,
        views: str | int = "all",
        columns: Sequence[str] = (),
    ) -> None:
        super().__init__()
        columns = check_arguments(
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer=shuffle_buffer,
            offset=offset,
            bos=bos,
            eos=eos,
            dtype=dtype,
            with_meta=with_meta,
            missing_label=missing_label,
            rank=rank,
            world_size=world_size,
            views=views,
            columns=columns,
        )
        if rank is None:
            distributed = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.files = open_token_files(source)
        self.metadata = check_same_codebook(self.files)
        check_same_shape(self.files)
        check_columns(self.files, columns)
        self.columns = columns
        self.units = units_of(self.files)
        self.views = views = views if isinstance(views, str) else int(views)  # a numpy integer too
        self._views_of = {f.url: f.views for f in self.files}
        if isinstance(views, int) and views >= min(f.views for f in self.files):
            f = min(self.files, key=lambda f: f.views)
            raise ValueError(f"views={views}, but {f.url} has {f.views} view(s) per sample")
        self.codebook_size = int(self.metadata["codebook"]["size"])
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.offset, self.bos, self.eos = offset, bos, eos
        self.dtype, self.with_meta, self.missing_label = dtype, with_meta, missing_label
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        top = max([offset + self.codebook_size - 1] + [t for t in (bos, eos) if t is not None])
        if dtype == torch.int32 and top > np.iinfo(np.int32).max:
            raise ValueError(f"token values up to {top} do not fit int32")
        self.vocab_size = top + 1  # ids in [0, vocab_size): offset + K, or beyond when BOS/EOS sit above it

    @property
    def num_rows(self) -> int:
        """Rows of all files (all ranks together)."""
        return sum(u.rows for u in self.units)

    @property
    def num_items(self) -> int:
        """Items one epoch yields over all ranks: rows, or with one view per sample, samples."""
        if self.views == "all":
            return self.num_rows
        return sum(f.rows // f.views for f in self.files)

    @property
    def sequence_length(self) -> int:
        return int(self.metadata["tokens_per_image"]) + (self.bos is not None) + (self.eos is not None)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` (call before iterating; DataLoader workers copy the dataset then)."""
        self.epoch = check_epoch(epoch)

    def units_for(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Indices into `units` that this rank's DataLoader worker `worker` of `num_workers` reads this epoch,
        in reading order."""
        return assign_units(
            len(self.units),
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            reader=self.rank * num_workers + worker,
            readers=self.world_size * num_workers,
        )

    def __iter__(self) -> Iterator[torch.Tensor | dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        items = self._unit_items(worker, num_workers)
        if self.shuffle and self.shuffle_buffer > 0:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
            items = _buffer_shuffle(items, self.shuffle_buffer, rng)
        return items

    def _unit_items(self, worker: int, num_workers: int) -> Iterator[torch.Tensor | dict]:
        for u in self.units_for(worker, num_workers):
            unit = self.units[u]
            views = self._views_of[unit.url]
            table = read_unit(unit, self._read_columns(views))
            rows = self._selected(table, views)
            tokens = self._sequences(tokens_array(table.column(TOKENS))[rows])
            order = range(len(tokens))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch, u]).permutation(len(tokens))
            if not self.with_meta and not self.columns:
                for i in order:
                    yield tokens[i].clone()
                continue
            values = self._row_values(table, rows, views)
            for i in order:
                yield {"tokens": tokens[i].clone(), **{c: v[i] for c, v in values.items()}}

    def _item_columns(self) -> tuple[str, ...]:
        """The columns of each dict item after `tokens`: with_meta's, then `columns` asked for."""
        meta = (*META_COLUMNS, "view") if self.with_meta else ()
        return (*meta, *(c for c in self.columns if c not in meta))

    def _read_columns(self, views: int) -> list[str]:
        """The columns read from a unit: tokens, the items' columns, and what `views` selection needs."""
        wanted = [c for c in self._item_columns() if views > 1 or c != "view"]
        if views > 1:
            wanted += ["view", "shard", "index"]
        return [TOKENS, *dict.fromkeys(wanted)]

    def _row_values(self, table: pa.Table, rows: np.ndarray, views: int) -> dict[str, list]:
        """Each item column's values for the selected rows (view 0 in one-view files; a missing label
        becomes `missing_label`)."""
        values = {}
        for c in self._item_columns():
            if c == "view" and views == 1:
                values[c] = [0] * len(rows)
                continue
            values[c] = table.column(c).take(pa.array(rows)).to_pylist()
            if c == "label":
                values[c] = [self.missing_label if v is None else v for v in values[c]]
        return values

    def _selected(self, table: pa.Table, views: int) -> np.ndarray:
        """The rows of a unit this dataset yields (see `views` in the module doc)."""
        n = table.num_rows
        if self.views == "all" or views == 1:
            return np.arange(n)  # (a view number above 0 was refused for one-view files)
        view = table.column("view").to_numpy()
        if isinstance(self.views, int):
            return np.flatnonzero(view == self.views)
        shards = table.column("shard").to_pylist()
        crc = {s: zlib.crc32(s.encode()) for s in set(shards)}
        chosen = chosen_views(
            seed=self.seed,
            epoch=self.epoch,
            shard=np.array([crc[s] for s in shards], np.uint64),
            index=table.column("index").to_numpy().astype(np.uint64),
            views=views,
        )
        return np.flatnonzero(view == chosen)

    def _sequences(self, tokens: np.ndarray) -> torch.Tensor:
        """(rows, L) uint16/uint32 -> (rows, [BOS] + L + [EOS]) tensor of `dtype`, with the offset added."""
        n = len(tokens)
        parts = []
        if self.bos is not None:
            parts.append(np.full((n, 1), self.bos, np.int64))
        parts.append(tokens.astype(np.int64) + self.offset)
        if self.eos is not None:
            parts.append(np.full((n, 1), self.eos, np.int64))
        out = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return torch.from_numpy(out).to(self.dtype)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 (wrapping arithmetic): a stable hash on every platform."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def chosen_views(seed: int, epoch: int, shard: np.ndarray, index: np.ndarray, views: int) -> np.ndarray:
    """The view `views="random"` yields in `epoch` of each sample (shard hash, index): position epoch % V
    of the sample's own permutation of the V views for cycle epoch // V, from (seed, cycle)."""
    cycle, position = divmod(int(epoch), views)
    with np.errstate(over="ignore"):
        start = _mix(_mix(np.array([seed % 2**64], np.uint64)) ^ np.uint64(cycle))
        h = _mix(_mix(np.repeat(start, len(index)) ^ shard) ^ index)
        keys = _mix(h[:, None] ^ np.arange(1, views + 1, dtype=np.uint64)[None, :])
    return np.argsort(keys, axis=1, kind="stable")[:, position]


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Mix a stream through a buffer of `size` items: each arriving item replaces (and emits) a random one."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        buffer[j], item = item, buffer[j]
        yield item
    order = rng.permutation(len(buffer))
    for j in order:
        yield buffer[j]
