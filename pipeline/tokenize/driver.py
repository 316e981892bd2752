"""The tokenize job's driver: feed a plan's shards to a pool of tokenizer actors, retry, report.

Shards go through a dynamic queue (an actor asks for the next shard when one finishes), committed shards
are skipped (resume by default), a shard whose actor dies or fails is retried by another actor (one whose
bytes are unreadable fails at once and is left to the next run), and a progress bar shows shards done,
images encoded (reported as they are, inside shards), images/s, ETA and samples skipped. A run left with
no actor, and no room on the cluster for one within `actor_wait`, stops with the rest left to a rerun.
The plan is pipeline.tokenize.plan.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from pipeline.data.samples import ShardUnreadable
from pipeline.data.shards import shard_stem
from pipeline.io import join
from pipeline.tokenize.plan import uncommitted
from pipeline.tokenize.pool import ActorPool, actor_resources
from pipeline.tokenize.settings import JobSettings
from pipeline.tokenize.summary import JobSummary
from pipeline.tokens.index import CommitIndex, load_commits
from pipeline.tokens.records import FAILED_FILE, write_failed


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
