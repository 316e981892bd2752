"""What a tokenize run did: shards committed and failed, rows, skips by reason, retries; its exit code."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline.data.reasons import TAR_TRUNCATED, format_by_reason
from pipeline.data.shards import shard_stem

FAILED_NAMED = 20  # failed shards named in the summary; all of them are in the failure file


@dataclass
class JobSummary:
    shards_total: int = 0
    committed_before: int = 0
    committed_now: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # stem -> last error
    failed_at: dict[str, tuple[str, int]] = field(default_factory=dict)  # stem -> (URL, attempts)
    failed_file: str = ""  # where the run lists its failed shards (DIR/_failed.json)
    rows: int = 0
    encoded: int = 0  # images encoded as reported while shards run (retried shards count again)
    skipped: Counter = field(default_factory=Counter)  # reason -> samples without a row, this run's shards
    notes: Counter = field(default_factory=Counter)  # reason -> notes on rows, this run's shards
    truncated_shards: dict[str, str] = field(default_factory=dict)  # stem -> where it was cut
    retried: int = 0
    retried_shards: dict[str, str] = field(default_factory=dict)  # stem -> error of its last failed attempt
    actor_restarts: int = 0
    actor_nodes: int = 0  # nodes the first actors ran on
    actors_asked: int = 0  # actors the pool keeps asking for (--actors, at most one per shard to do)
    actors_at_end: int = 0  # actors placed and alive when the run ended
    replacement_waits: list[float] = field(default_factory=list)  # seconds each placed replacement waited
    actors_waiting: list[float] = field(default_factory=list)  # seconds each actor unplaced at the end waited
    stopped: str = ""  # why the run stopped with shards left to do (no actor alive, none placed in time)
    lost_actors: list[str] = field(default_factory=list)  # actor, node, pid and why, for each that died
    seconds: float = 0.0
    startup_seconds: float = 0.0  # until every actor had loaded its model

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.stopped else 0

    def fail(self, url: str, error: str, attempts: int) -> None:
        """A shard given up on: not committed, its samples not in the output."""
        self.failed[shard_stem(url)] = error
        self.failed_at[shard_stem(url)] = (url, attempts)

    def failure_list(self) -> list[dict]:
        """The failed shards as the failure file lists them: URL, stem, last error, attempts made."""
        out = []
        for stem, error in self.failed.items():
            url, attempts = self.failed_at.get(stem, (stem, 1))
            out.append({"url": url, "stem": stem, "error": error, "attempts": attempts})
        return out

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
            f"rows: {self.rows} tokenized in {self.seconds:.1f} s ({rate:.1f} rows/s; "
            "one row per view of an image)",
            f"samples skipped: {sum(self.skipped.values())}{format_by_reason(self.skipped)}",
        ]
        if self.actors_asked:
            lines.append(self._actors())
        if self.notes:
            lines.append(f"notes on kept rows: {sum(self.notes.values())}{format_by_reason(self.notes)}")
        for stem, where in self.truncated_shards.items():
            lines.append(f"TRUNCATED {stem}: samples after the cut are lost ({where})")
        if self.retried or self.actor_restarts:
            lines.append(f"retries: {self.retried} shard attempts, {self.actor_restarts} actors replaced")
        lines += _capped("LOST", self.lost_actors)
        lines += _capped("RETRIED", [f"{stem} ({err})" for stem, err in self.retried_shards.items()])
        failed = [
            f"{stem}: not committed, its samples are not in the output ({err})"
            for stem, err in self.failed.items()
        ]
        lines += _capped("FAILED", failed, FAILED_NAMED)
        if failed:
            where = f" in {self.failed_file}" if self.failed_file else ""
            lines.append(
                f"failed shards: {len(failed)}, each listed{where} (url, error, attempts); "
                "a rerun retries them and the other uncommitted shards"
            )
        if self.stopped:
            left = self.shards_total - self.committed_before - self.committed_now - len(self.failed)
            lines.append(f"STOPPED {self.stopped}; {left} shard(s) left to do: a rerun completes them")
        return "\n".join(lines)

    def _actors(self) -> str:
        """`actors: started on N node(s), M of K running at the end` and how long replacements waited."""
        placed, unplaced = self.replacement_waits, self.actors_waiting
        line = f"actors: started on {self.actor_nodes} node(s), {self.actors_at_end} of {self.actors_asked} "
        line += "running at the end"
        if placed:
            line += f"; {len(placed)} replacement(s) placed after {_seconds(placed)}"
        if unplaced:
            line += f"; {len(unplaced)} never placed (no room), waited {_seconds(unplaced)}"
        return line


def _capped(tag: str, items: list[str], most: int = 20) -> list[str]:
    """One line per item, at most `most` (a run over 10^6 shards can retry thousands)."""
    lines = [f"{tag} {item}" for item in items[:most]]
    if len(items) > most:
        lines.append(f"{tag} ... and {len(items) - most} more")
    return lines


def _seconds(waits: list[float]) -> str:
    least, most = f"{min(waits):.1f}", f"{max(waits):.1f}"
    return f"{most} s" if least == most else f"{least}-{most} s"
