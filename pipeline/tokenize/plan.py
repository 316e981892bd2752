"""Planning a tokenize run: the shard list (lazy for a brace pattern), checked against the output directory
and its commits, and the run record. Every check walks the shard list without copying it, so that a plan
of 10^6 shards holds per shard only the commit index's entries of the committed ones.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict

import fsspec
from fsspec.implementations.local import LocalFileSystem

import gq
from pipeline.data.braces import strictly_increasing
from pipeline.data.listing import identities, identity_mismatch
from pipeline.data.shards import expand_shards_listed, shard_stem
from pipeline.tokenize.options import is_settled
from pipeline.tokenize.settings import JobSettings, check_paths, settle
from pipeline.tokens.index import Commits, load_commits
from pipeline.tokens.records import (
    Provenance,
    check_run,
    clear_outputs,
    clear_temporaries,
    foreign_entries,
    read_run,
    write_run,
)


def check_exist(shards: Sequence[str]) -> None:
    """Brace patterns expand without listing: catch a mistyped pattern before any actor starts."""
    fs, _ = fsspec.core.url_to_fs(shards[0])
    # Local stats are cheap, so check all; on an object store one request per shard would not be.
    sample = shards if isinstance(fs, LocalFileSystem) else shards[:1]
    missing, first = 0, []
    for u in sample:
        # (a plain path needs no filesystem resolved per shard, ~40 us each; lexists, as the local fs.exists)
        if not (os.path.lexists(u) if "://" not in u else fs.exists(fsspec.core.url_to_fs(u)[1])):
            missing += 1
            first += [u] if len(first) < 3 else []
    if missing:
        more = f" and {missing - 3} more" if missing > 3 else ""
        raise ValueError(f"input shards not found: {', '.join(first)}{more}")


def check_stems(shards: Sequence[str]) -> None:
    """Two shards of one name would write one token file. Stems in increasing order (a brace range, a
    sorted listing) are distinct without a set of 10^6 of them; any other order is counted."""
    if strictly_increasing(shard_stem(s) for s in shards):
        return
    stems = Counter(shard_stem(s) for s in shards)
    clashes = [s for s, n in stems.items() if n > 1]
    if clashes:
        raise ValueError(f"shards with the same name would write the same token file: {clashes[:5]}")


class PlannedShards(Sequence[str]):
    """The shard URLs of a plan (a lazy sequence for a brace pattern), carrying the commits read while
    planning (run_job takes them from here rather than listing DIR again; a plain list makes it load
    them)."""

    def __init__(self, urls: Sequence[str], commits: Commits | None = None) -> None:
        self.urls, self.commits = urls, commits

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i):
        return self.urls[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.urls)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    __hash__ = None


def check_committed(output: str, shards: Sequence[str], listed: Mapping[str, tuple]) -> Commits:
    """The commits of DIR; refuse to resume when a committed shard's record describes another shard than
    the input shard of that name now (another directory, or the file changed): skipping it would lose the
    new one's samples. The records come from the commit index, the inputs' identities from listings read
    beside the shard list (`listed`: those the expansion listed already)."""
    commits = load_commits(output)
    entries = commits.entries
    if not entries:
        return commits

    def resumed() -> Iterator[str]:
        return (u for u in shards if shard_stem(u) in entries)

    per_directory = Counter(posixpath.dirname(u) for u in resumed())
    found, first = 0, None
    for url, now in identities(resumed(), per_directory, listed):
        why = identity_mismatch({"shard_identity": entries[shard_stem(url)].pinned}, url, now)
        if why:
            found += 1
            first = first or (url, why)
    if first:
        url, why = first
        raise ValueError(
            f"{found} committed shard(s) are not the input shards of the same name now, e.g. "
            f"{shard_stem(url)} ({why}): use a new --output, or --on-existing overwrite to redo them"
        )
    return commits


def plan(settings: JobSettings, model: gq.ModelIdentity | None = None) -> tuple[PlannedShards, dict]:
    """Validate the settings against the paths and the model (`model`: its identity, when the caller has
    read it with `settle`, which checked the paths); the shard URLs and the run record. Settings with
    something left undecided are settled here (`settle`); the job passes settled ones. Raises ValueError
    for bad arguments."""
    if model is None:
        check_paths(settings.checkpoint, settings.output)
    urls, listed = expand_shards_listed(settings.input)
    shards = PlannedShards(urls)
    check_exist(urls)
    foreign = foreign_entries(settings.output)
    if foreign and not settings.allow_nonempty_output:
        more = ", ..." if len(foreign) > 3 else ""
        raise ValueError(
            f"--output {settings.output} is not empty ({', '.join(foreign[:3])}{more}) and holds no run "
            "record of this tool: give a new or empty directory, or --allow-nonempty-output to write beside "
            "those files (they are never deleted)"
        )
    check_stems(urls)
    if settings.on_existing == "skip":
        shards.commits = check_committed(settings.output, urls, listed)
    model = model or gq.describe(settings.checkpoint)
    if not is_settled(settings.options):
        settings = settle(settings, model).settings
    opts = settings.options
    provenance = Provenance(model, settings.checkpoint, opts.image_size, opts.preprocessing())
    run = provenance.run_record() | {
        "input": settings.input,
        "shards": len(shards),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("options",)}
        | {"batch_size": opts.batch_size, "decode_threads": opts.decode_threads},
        "started_at": time.time(),
    }
    return shards, run


def prepare_output(settings: JobSettings, run: dict) -> None:
    """Refuse to mix runs (unless overwrite), clear DIR for overwrite, remove temporary files that a killed
    run left, write the run record."""
    if settings.on_existing == "overwrite":
        clear_outputs(settings.output)
    else:
        check_run(read_run(settings.output), run)
    clear_temporaries(settings.output)  # only once the DIR is known to be this run's
    write_run(settings.output, run)


def uncommitted(shards: Iterable[str], commits: Commits) -> Iterator[str]:
    """The shards a run does: those without a commit record (never run, failed, or their record deleted)."""
    return (s for s in shards if shard_stem(s) not in commits.entries)
