"""A resumable output directory: what lets a job killed at any moment be started again into the same DIR.

`DIR/<plan file>` pins what the job writes there (a model, a listing, settings); a rerun compares its own
plan with it field by field and refuses one that differs, a field an older record lacks taking the value
it implied. `DIR/<record dir>/<name>.json` is a unit's commit record, written only once the unit's output
is in place: a unit with a record is finished, so a rerun redoes exactly the others. A DIR holding files
but no plan record of the job is someone else's and is refused (files a job did not write are never
overwritten), and a killed run's temporary files are removed, once the plan check has passed, before new
writers start. Every record is written atomically (gq.storage). The tokenize job (pipeline.tokens.records),
make_shards (pipeline.pack.folder_shards) and training (pipeline.train.run) each name their own files.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from gq.storage import is_temporary
from pipeline.io import join, read_json, remove_temporaries, write_atomic


class PlanMismatch(ValueError):
    """The output directory holds the plan record of another plan."""


def with_implied(previous: dict, current: dict, implied: dict) -> dict:
    """`previous` with the value `implied` gives each field that an older record lacks and `current` has."""
    return previous | {k: v for k, v in implied.items() if k in current and k not in previous}


def differing(
    previous: dict, current: dict, fields: Iterable[str] | None = None, implied: dict | None = None
) -> list[str]:
    """The fields (of `fields`, else of `current`, in order) whose values differ between the two records,
    a field the older one lacks taking its `implied` value."""
    previous = with_implied(previous, current, implied or {})
    return [k for k in (current if fields is None else fields) if previous.get(k) != current.get(k)]


def check_plan(
    previous: dict | None,
    current: dict,
    message: str,
    *,
    fields: Iterable[str] | None = None,
    implied: dict | None = None,
    limit: int | None = None,
    brief: Callable[[object], str] = repr,
    error: type[ValueError] = PlanMismatch,
) -> None:
    """Raise `error` with `message` (its `{detail}`: `field: before != now; ...` for the first `limit`
    differing fields) when `current` is not the plan recorded in `previous` (None: no record, nothing to
    compare)."""
    if previous is None:
        return
    previous = with_implied(previous, current, implied or {})
    diffs = differing(previous, current, fields)
    if diffs:
        shown = diffs[:limit] if limit else diffs
        detail = "; ".join(f"{k}: {brief(previous.get(k))} != {brief(current.get(k))}" for k in shown)
        raise error(message.format(detail=detail))


def listed(names: list[str], limit: int = 3) -> str:
    """The first names of a listing for a one-line message: `a, b, c, ...`."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def write_json(url: str, document: dict, end: str = "", **dump) -> None:
    """`document` as JSON (json.dumps options `dump`, indent 1 unless given; then `end`), atomically."""
    write_atomic(url, (json.dumps(document, **({"indent": 1} | dump)) + end).encode())


@dataclass(frozen=True)
class ResumableDir:
    """An output directory and the names of its plan record and commit records."""

    url: str  # DIR: local or any fsspec URL
    plan_file: str  # the plan record's name in DIR
    record_dir: str | None = None  # the commit records' folder in DIR (None: the job commits no units)

    @property
    def plan_url(self) -> str:
        return join(self.url, self.plan_file)

    def read_plan(self) -> dict | None:
        """The recorded plan, or None when there is none."""
        return read_json(self.plan_url)

    def write_plan(self, plan: dict, end: str = "", **dump) -> None:
        write_json(self.plan_url, plan, end, **dump)

    def record_url(self, name: str) -> str:
        """The URL of unit `name`'s commit record."""
        return join(self.url, self._records(), f"{name}.json")

    def read_record(self, name: str) -> dict | None:
        """Unit `name`'s commit record, or None when the unit is not committed."""
        return read_json(self.record_url(name))

    def write_record(self, name: str, record: dict, **dump) -> None:
        """Commit unit `name` (only once its output is in place)."""
        write_json(self.record_url(name), record, **dump)

    def committed(self) -> set[str]:
        """The names of the units whose commit record exists."""
        fs, path = fsspec.core.url_to_fs(join(self.url, self._records()))
        fs.invalidate_cache()  # object-store listings are cached per filesystem instance
        if not fs.exists(path):
            return set()
        names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
        return {n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")}

    def foreign_entries(self) -> list[str]:
        """Names in DIR when DIR holds something but no plan record of ours (else []): files we did not
        write. A killed first run's half-written plan record (a temporary file) is not foreign."""
        fs, path = fsspec.core.url_to_fs(self.url)
        fs.invalidate_cache()
        # a DIR of ours is told by its plan record alone: listing it would read every output's name (one
        # LIST page per 1,000 on an object store) on every resume
        if fs.exists(posixpath.join(path, self.plan_file)) or not fs.isdir(path):
            return []
        names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
        return [] if self.plan_file in names else [n for n in names if not is_temporary(n)]

    def clear_temporaries(self) -> list[str]:
        """Delete the temporary files that writers killed mid-write left in DIR and its record folder; the
        names deleted. Call it only once the plan check has passed (DIR is this job's) and before this
        run's writers start. Local DIRs only: on an object store a file is one PUT, never seen half done."""
        fs, path = fsspec.core.url_to_fs(self.url)
        if not isinstance(fs, LocalFileSystem):
            return []
        removed = remove_temporaries(path)
        if self.record_dir is not None:
            removed += remove_temporaries(posixpath.join(path, self.record_dir))
        return removed

    def _records(self) -> str:
        if self.record_dir is None:
            raise ValueError(f"{self.url}: this directory keeps no commit records")
        return self.record_dir
