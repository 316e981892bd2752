"""The tokenize job's driver: plan the run, feed shards to a pool of tokenizer actors, retry, report.

Shards go through a dynamic queue (an actor asks for the next shard when one finishes), committed shards
are skipped (resume by default), a shard whose actor dies or fails is retried by another actor (one whose
bytes are unreadable fails at once and is left to the next run), and a progress bar shows shards done,
images encoded (reported as they are, inside shards), images/s, ETA and samples skipped. A run left with
no actor, and no room on the cluster for one within `actor_wait`, stops with the rest left to a rerun.
"""

from __future__ import annotations

import posixpath
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict

import fsspec
import ray
from fsspec.implementations.local import LocalFileSystem
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

import gq
from pipeline.data.braces import strictly_increasing
from pipeline.data.listing import identities, identity_mismatch
from pipeline.data.samples import ShardUnreadable
from pipeline.data.shards import expand_shards_listed, shard_stem
from pipeline.io import join
from pipeline.tokenize.options import is_settled
from pipeline.tokenize.pool import ActorPool, actor_resources
from pipeline.tokenize.settings import JobSettings, check_paths, settle
from pipeline.tokenize.summary import JobSummary
from pipeline.tokens.index import CommitIndex, Commits, load_commits
from pipeline.tokens.records import (
    FAILED_FILE,
    Provenance,
    check_run,
    clear_outputs,
    clear_temporaries,
    foreign_entries,
    read_run,
    write_failed,
    write_run,
)


def check_exist(shards: Sequence[str]) -> None:
    """Brace patterns expand without listing: catch a mistyped pattern before any actor starts."""
    fs, _ = fsspec.core.url_to_fs(shards[0])
    # Local stats are cheap, so check all; on an object store one request per shard would not be.
    sample = shards if isinstance(fs, LocalFileSystem) else shards[:1]
    missing, first = 0, []
    for u in sample:
        if not fs.exists(fsspec.core.url_to_fs(u)[1]):
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


class ShardQueue:
    """The shards left to do: retried ones first, then the plan's uncommitted shards, drawn from it as
    actors ask (a plan of 10^6 shards is not copied into a queue)."""

    def __init__(self, shards: Iterable[str]) -> None:
        self.retries: deque[str] = deque()
        self._rest = iter(shards)
        self._next = next(self._rest, None)

    def __bool__(self) -> bool:
        return bool(self.retries) or self._next is not None

    def popleft(self) -> str:
        if self.retries:
            return self.retries.popleft()
        if self._next is None:
            raise IndexError("no shard left")
        url, self._next = self._next, next(self._rest, None)
        return url

    def appendleft(self, url: str) -> None:
        self.retries.appendleft(url)


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


def run_job(settings: JobSettings, shards: Sequence[str], run: dict) -> JobSummary:
    """Tokenize every uncommitted shard on a pool of actors (Ray must be initialised)."""
    t0 = time.perf_counter()
    summary = JobSummary(shards_total=len(shards), failed_file=join(settings.output, FAILED_FILE))
    index = CommitIndex(getattr(shards, "commits", None) or load_commits(settings.output))
    summary.committed_before = sum(1 for s in shards if shard_stem(s) in index.commits.entries)
    todo = ShardQueue(uncommitted(shards, index.commits))
    if todo:
        cpus = actor_resources(settings.actors, settings.cpus_per_actor, settings.gpus_per_actor)
        pool = ActorPool(
            size=min(settings.actors, len(shards) - summary.committed_before),
            checkpoint=settings.checkpoint,
            options=settings.options,
            output=settings.output,
            sha256=run["model_sha256"],
            cpus=cpus,
            gpus=settings.gpus_per_actor,
        )
        bar = progress_bar(settings.progress, len(shards), summary.committed_before)
        try:
            _drain(pool, todo, settings, summary, bar, t0, index)
        finally:
            bar.close()
            pool.close()
    finish_output(settings.output, index, summary)
    summary.seconds = time.perf_counter() - t0
    return summary


def uncommitted(shards: Iterable[str], commits: Commits) -> Iterator[str]:
    """The shards a run does: those without a commit record (never run, failed, or their record deleted)."""
    return (s for s in shards if shard_stem(s) not in commits.entries)


def finish_output(output: str, index: CommitIndex, summary: JobSummary) -> None:
    """Bring the commit index up to date and write `_failed.json` (or remove a previous run's)."""
    index.try_flush()
    if index.error:
        behind = f"the commit index is behind ({index.error}); the next run rebuilds it"
        print(f"tokenize: warning: {behind}", file=sys.stderr)
    write_failed(output, summary.failure_list())


def progress_bar(enabled: bool, total: int, initial: int) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        unit="shard",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )


def _drain(
    pool: ActorPool,
    todo: ShardQueue,
    settings: JobSettings,
    summary: JobSummary,
    bar: tqdm,
    t0: float,
    index: CommitIndex,
) -> None:
    """Run shards until none is queued or in flight, or the pool stalls; a failed attempt goes back to the
    front of the queue up to `retries` times, except an unreadable shard, which fails at once (its bytes
    will not change). The shards a lost actor held come back at once, for the actors left to take. Each
    commit goes into the commit index."""
    attempts: Counter = Counter()

    def retry(url: str, err: str) -> None:
        attempts[url] += 1
        if attempts[url] > settings.retries:
            summary.fail(url, err, attempts[url])
        else:
            summary.retried += 1
            summary.retried_shards[shard_stem(url)] = err
            todo.appendleft(url)

    pool.feed(todo)
    while pool.inflight or todo:
        if (stalled := pool.stalled(settings.actor_wait)) is not None:
            summary.stopped = stalled
            break
        for attempt in pool.finished():
            try:
                record = ray.get(attempt.ref)
            except RayActorError as e:  # the actor or its node died: every shard it held comes back now
                why = f"{type(e).__name__}: {_actor_death(e)}"
                for url in [attempt.url, *pool.lose(attempt.actor, why)]:
                    retry(url, f"actor died: {why}")
            except RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                error = f"{type(cause).__name__}: {str(cause).splitlines()[-1][:300]}"
                if isinstance(cause, ShardUnreadable):
                    summary.fail(attempt.url, error, attempts[attempt.url] + 1)
                else:
                    retry(attempt.url, error)
            else:
                summary.add(record)
                index.add(record)
                bar.update(1)
        pool.feed(todo)
        _actors(pool, summary, t0)
        elapsed = time.perf_counter() - t0
        bar.set_postfix(
            images=summary.encoded,
            img_s=f"{summary.encoded / max(elapsed, 1e-9):.1f}",
            skipped=sum(summary.skipped.values()),
            failed=len(summary.failed),
            refresh=False,
        )
    _actors(pool, summary, t0)  # as the run ends: actors running, replacements still waiting


def _actors(pool: ActorPool, summary: JobSummary, t0: float) -> None:
    """The pool's state into the summary: actors started, lost, replaced, running and waiting."""
    summary.encoded = pool.images()
    summary.actor_restarts, summary.lost_actors = pool.restarts, pool.lost
    summary.actor_nodes = len(pool.first_nodes)
    summary.actors_asked, summary.actors_at_end = pool.size, pool.alive
    summary.replacement_waits, summary.actors_waiting = pool.replacement_waits, pool.waiting()
    summary.startup_seconds = (pool.ready_at or time.perf_counter()) - t0


def _actor_death(e: RayActorError) -> str:
    """The line of Ray's message that says why the actor died (its node died, its process was killed)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    why = [line for line in lines if "died because" in line or "node" in line.lower()]
    return (why or lines or ["unknown"])[0][:300]
