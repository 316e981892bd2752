"""The tokenize job's driver: plan the run, feed shards to a pool of tokenizer actors, retry, report.

Shards go through a dynamic queue (an actor asks for the next shard when one finishes), committed shards
are skipped (resume by default), a shard whose actor dies or fails is retried on a fresh actor (one whose
bytes are unreadable fails at once and is left to the next run), and a progress bar shows shards done,
images encoded (reported as they are, inside shards), images/s, ETA and samples skipped.
"""

from __future__ import annotations

import contextlib
import posixpath
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import fsspec
import ray
from fsspec.implementations.local import LocalFileSystem
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

import gq
from pipeline.data.samples import TAR_TRUNCATED, ShardUnreadable
from pipeline.data.shards import expand_shards, identity_mismatch, shard_identity, shard_stem
from pipeline.tokenize.actor import ProgressCounter, tokenizer_actor
from pipeline.tokenize.processor import TokenizeOptions
from pipeline.tokens.records import (
    Provenance,
    check_run,
    clear_outputs,
    committed_stems,
    foreign_entries,
    read_manifest,
    read_run,
    write_run,
)

ON_EXISTING = ("skip", "overwrite")
SHARDS_IN_FLIGHT_PER_ACTOR = 2  # one running, one queued on the actor: no idle gap between shards


@dataclass(frozen=True)
class JobSettings:
    """One tokenize run: the command line of jobs/tokenize.py."""

    input: str  # SHARDS: brace pattern, glob, directory or URL list file
    output: str  # DIR for token files, commit records and the run record
    checkpoint: str  # GQ-VAE checkpoint, local path or fsspec URL
    options: TokenizeOptions = field(default_factory=TokenizeOptions)
    actors: int = 1  # tokenizer actors (models) in the pool
    gpus_per_actor: float = 0.0  # 0: CPU actors
    cpus_per_actor: float | None = None  # default: cluster CPUs / actors for CPU actors, 1 with GPUs
    on_existing: str = "skip"  # "skip": resume, committed shards kept; "overwrite": start DIR afresh
    allow_nonempty_output: bool = False  # write into a DIR that holds files but no run record of ours
    retries: int = 3  # attempts per shard after the first, across actor deaths and errors
    progress: bool = True  # live progress bar on stderr


@dataclass
class JobSummary:
    shards_total: int = 0
    committed_before: int = 0
    committed_now: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # stem -> last error
    rows: int = 0
    encoded: int = 0  # images encoded as reported while shards run (retried shards count again)
    skipped: Counter = field(default_factory=Counter)  # reason -> samples without a row, this run's shards
    notes: Counter = field(default_factory=Counter)  # reason -> notes on rows, this run's shards
    truncated_shards: dict[str, str] = field(default_factory=dict)  # stem -> where it was cut
    retried: int = 0
    actor_restarts: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # until every actor had loaded its model

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def add(self, record: dict) -> None:
        """Count a shard's commit record."""
        self.committed_now += 1
        self.rows += record["rows"]
        self.skipped.update(record["skipped_by_reason"])
        self.notes.update(record.get("notes_by_reason", {}))
        if record["tar_truncated"]:
            events = [e["detail"] for e in record.get("shard_events", [])]
            cut = [s["detail"] for s in record["skipped"] if s["reason"] == TAR_TRUNCATED]
            self.truncated_shards[record["stem"]] = (events + cut + [""])[0]

    def format(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"shards: {self.committed_before + self.committed_now}/{self.shards_total} committed "
            f"({self.committed_before} before this run, {self.committed_now} now, {len(self.failed)} failed)",
            f"images: {self.rows} tokenized in {self.seconds:.1f} s ({rate:.1f} images/s)",
            f"samples skipped: {sum(self.skipped.values())}{_by_reason(self.skipped)}",
        ]
        if self.notes:
            lines.append(f"notes on kept rows: {sum(self.notes.values())}{_by_reason(self.notes)}")
        for stem, where in self.truncated_shards.items():
            lines.append(f"TRUNCATED {stem}: samples after the cut are lost ({where})")
        if self.retried or self.actor_restarts:
            lines.append(f"retries: {self.retried} shard attempts, {self.actor_restarts} actors replaced")
        for stem, err in self.failed.items():
            lines.append(
                f"FAILED {stem}: not committed, its samples are not in the output; rerun to retry ({err})"
            )
        return "\n".join(lines)


def _by_reason(counts: Counter) -> str:
    return f" ({', '.join(f'{r}: {n}' for r, n in sorted(counts.items()))})" if counts else ""


def check_exist(shards: list[str]) -> None:
    """Brace patterns expand without listing: catch a mistyped pattern before any actor starts."""
    fs, _ = fsspec.core.url_to_fs(shards[0])
    # Local stats are cheap, so check all; on an object store one request per shard would not be.
    sample = shards if isinstance(fs, LocalFileSystem) else shards[:1]
    missing = [u for u in sample if not fs.exists(fsspec.core.url_to_fs(u)[1])]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"input shards not found: {', '.join(missing[:3])}{more}")


def check_paths(checkpoint: str, output: str) -> None:
    """One-line errors for a checkpoint that is a directory and an output that is a file or under one."""
    fs, path = fsspec.core.url_to_fs(checkpoint)
    if fs.isdir(path):
        raise ValueError(f"--checkpoint {checkpoint} is a directory: give the .safetensors file")
    fs, path = fsspec.core.url_to_fs(output)
    path = path.rstrip("/")
    at = path
    while at and not fs.isdir(at):
        if fs.isfile(at):
            where = "is a file" if at == path else f"lies under the file {at}"
            raise ValueError(f"--output {output} {where}: give a directory")
        if posixpath.dirname(at) == at:
            break
        at = posixpath.dirname(at)


def check_committed(output: str, shards: list[str]) -> None:
    """Refuse to resume when a committed shard's record describes another shard than the input shard of
    that name now (another directory, or the file changed): skipping it would lose the new one's samples."""
    done = committed_stems(output)
    resumed = [u for u in shards if shard_stem(u) in done]

    def mismatch(url: str) -> str | None:
        return identity_mismatch(read_manifest(output, shard_stem(url)), url, shard_identity(url))

    with ThreadPoolExecutor(16) as pool:  # one record read and one stat per shard: overlap them
        found = [(u, why) for u, why in zip(resumed, pool.map(mismatch, resumed), strict=True) if why]
    if found:
        url, why = found[0]
        raise ValueError(
            f"{len(found)} committed shard(s) are not the input shards of the same name now, e.g. "
            f"{shard_stem(url)} ({why}): use a new --output, or --on-existing overwrite to redo them"
        )


def plan(settings: JobSettings) -> tuple[list[str], dict]:
    """Validate the settings; the shard URLs and the run record. Raises ValueError for bad arguments."""
    if settings.on_existing not in ON_EXISTING:
        raise ValueError(f"--on-existing must be one of {ON_EXISTING}")
    if settings.actors < 1:
        raise ValueError("--actors must be >= 1")
    check_paths(settings.checkpoint, settings.output)
    shards = expand_shards(settings.input)
    check_exist(shards)
    foreign = foreign_entries(settings.output)
    if foreign and not settings.allow_nonempty_output:
        more = ", ..." if len(foreign) > 3 else ""
        raise ValueError(
            f"--output {settings.output} is not empty ({', '.join(foreign[:3])}{more}) and holds no run "
            "record of this tool: give a new or empty directory, or --allow-nonempty-output to write beside "
            "those files (they are never deleted)"
        )
    if settings.on_existing == "skip":
        check_committed(settings.output, shards)
    stems = Counter(shard_stem(s) for s in shards)
    clashes = [s for s, n in stems.items() if n > 1]
    if clashes:
        raise ValueError(f"shards with the same name would write the same token file: {clashes[:5]}")
    opts = settings.options
    model = gq.describe(settings.checkpoint)
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
    """Refuse to mix runs (unless overwrite), clear DIR for overwrite, write the run record."""
    if settings.on_existing == "overwrite":
        clear_outputs(settings.output)
    else:
        check_run(read_run(settings.output), run)
    write_run(settings.output, run)


def run_job(settings: JobSettings, shards: list[str], run: dict) -> JobSummary:
    """Tokenize every uncommitted shard on a pool of actors (Ray must be initialised)."""
    t0 = time.perf_counter()
    summary = JobSummary(shards_total=len(shards))
    done = committed_stems(settings.output)
    todo = deque(s for s in shards if shard_stem(s) not in done)
    summary.committed_before = len(shards) - len(todo)
    if not todo:
        summary.seconds = time.perf_counter() - t0
        return summary

    gpus = settings.gpus_per_actor
    cpus = settings.cpus_per_actor
    if cpus is None:
        cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
        cpus = 1.0 if gpus > 0 else max(1.0, float(int(cluster_cpus // settings.actors)))
    actor_cls = tokenizer_actor(cpus, gpus)
    device = "cuda" if gpus > 0 else "cpu"
    n_actors = min(settings.actors, len(todo))

    # Actors report images as they encode them, so that progress moves inside a long shard too.
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()

    def new_actor():
        return actor_cls.remote(
            settings.checkpoint, settings.options, device, max(1, int(cpus)), run["model_sha256"], counter
        )

    actors = [new_actor() for _ in range(n_actors)]
    inflight: dict = {}  # ObjectRef -> (slot, actor handle, url)
    attempts: Counter = Counter()

    def feed(slot: int) -> None:
        while todo and sum(1 for s, _, _ in inflight.values() if s == slot) < SHARDS_IN_FLIGHT_PER_ACTOR:
            url = todo.popleft()
            inflight[actors[slot].process.remote(url, settings.output)] = (slot, actors[slot], url)

    def retry(url: str, err: str) -> None:
        attempts[url] += 1
        if attempts[url] > settings.retries:
            summary.failed[shard_stem(url)] = err
        else:
            summary.retried += 1
            todo.appendleft(url)

    bar = tqdm(
        total=len(shards),
        initial=summary.committed_before,
        unit="shard",
        disable=not settings.progress,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    try:
        with contextlib.suppress(RayActorError):  # an actor that cannot start fails its shards below
            ray.get([a.pid.remote() for a in actors])  # the actors are up, their models loaded
        summary.startup_seconds = time.perf_counter() - t0
        for slot in range(n_actors):
            feed(slot)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                slot, handle, url = inflight.pop(ref)
                try:
                    record = ray.get(ref)
                except RayActorError as e:
                    # The actor (or its node) died: every shard it held comes back here; replace it once.
                    if actors[slot] is handle:
                        ray.kill(handle, no_restart=True)
                        actors[slot] = new_actor()
                        summary.actor_restarts += 1
                    retry(url, f"actor died: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                except RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    error = f"{type(cause).__name__}: {str(cause).splitlines()[-1][:300]}"
                    if isinstance(cause, ShardUnreadable):  # the bytes are bad: the next run retries it
                        summary.failed[shard_stem(url)] = error
                    else:
                        retry(url, error)
                else:
                    summary.add(record)
                    bar.update(1)
                feed(slot)
            summary.encoded = ray.get(counter.value.remote())
            elapsed = time.perf_counter() - t0
            bar.set_postfix(
                images=summary.encoded,
                img_s=f"{summary.encoded / max(elapsed, 1e-9):.1f}",
                skipped=sum(summary.skipped.values()),
                failed=len(summary.failed),
                refresh=False,
            )
    finally:
        bar.close()
        for a in [*actors, counter]:
            ray.kill(a, no_restart=True)
    summary.seconds = time.perf_counter() - t0
    return summary
