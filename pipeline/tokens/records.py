"""Commit records and run records of an output directory: what makes a job resumable and exactly-once.

A shard is committed when `DIR/_manifest/<stem>.json` exists; it is written only after the shard's Parquet
file is in place, so a job killed at any moment and started again redoes exactly the uncommitted shards.
`DIR/_run.json` pins the model, codebook and preprocessing: a later run with different ones is refused.
`DIR/_failed.json` lists the shards the last run could not commit. The commit index that lets a resume
skip reading every record is pipeline.tokens.index. DIR is a resumable output directory
(pipeline.io.resumable) with these names.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from dataclasses import asdict, dataclass, field

import fsspec

import gq
from pipeline.data.reasons import count_by_reason
from pipeline.data.tar_reader import DEFAULT_MAX_MEMBER_BYTES
from pipeline.io import join, read_json, write_atomic
from pipeline.io.resumable import PlanMismatch, ResumableDir, check_plan, with_implied

MANIFEST_DIR = "_manifest"
RUN_FILE = "_run.json"
FAILED_FILE = "_failed.json"  # the shards the last run could not commit: url, error, attempts
# Run settings that change the tokens: a run into an existing DIR must agree on all of them.
IDENTITY_FIELDS = ("model_sha256", "codebook_fingerprint", "quantizer", "image_size", "preprocessing")


# Preprocessing settings added after run records were first written, with the value an older record
# implies. max_member_bytes: older runs read members of any size, which differs from the default only for
# members over 64 MiB, so an older directory resumes under the default instead of being refused. keep,
# views: older runs kept no members and tokenized the center crop only. source_size: older token files have
# no width and height columns (jobs/tokenize.py resumes such a directory without them, so its files agree).
# batch_size (recorded with a bfloat16 encoder only) is implied by an older record's settings.batch_size.
ADDED_PREPROCESSING = {
    "max_member_bytes": DEFAULT_MAX_MEMBER_BYTES,
    "keep": [],
    "views": "center",
    "view_names": ["center"],
    "source_size": False,
}


@dataclass(frozen=True)
class Provenance:
    """Where tokens come from: the model, its codebook and the preprocessing. The one source of the run
    record's identity, every token file's `gq` metadata and the fingerprints in each commit record."""

    model: gq.ModelIdentity
    checkpoint: str  # the path or URL the job was given
    image_size: int
    preprocessing: dict  # TokenizeOptions.preprocessing()

    def __post_init__(self) -> None:
        f = self.model.config.network.downsample
        if self.image_size % f:
            raise ValueError(f"--image-size must be a multiple of {f}, got {self.image_size}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.model.config.network.downsample
        return side, side

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid
        return h * w * self.model.config.quantizer.groups

    def fingerprints(self) -> dict:
        """What every record cites: the model file and the codebook, and this code's version."""
        m = self.model
        return {
            "model_sha256": m.model_sha256,
            "codebook_fingerprint": m.codebook_fingerprint,
            "gq_version": gq.__version__,
        }

    def run_record(self) -> dict:
        """The run record's provenance (IDENTITY_FIELDS and what explains them); the driver adds the job."""
        return self.fingerprints() | {
            "quantizer": self.model.config.quantizer.to_dict(),
            "image_size": self.image_size,
            "preprocessing": self.preprocessing,
            "model_config": self.model.config.to_dict(),
            "checkpoint": self.checkpoint,
        }

    def file_metadata(self) -> dict:
        """The `gq` key-value metadata of every token file (docs/FORMAT.md)."""
        q = self.model.config.quantizer
        return {k: v for k, v in self.run_record().items() if k != "quantizer"} | {
            "codebook": q.codebook.to_dict(),
            "groups": q.groups,
            "layout": q.layout,
            "rule": q.rule,
            "beta": q.beta,
            "token_grid": list(self.grid),
            "token_order": "raster: row, column, group",
            "tokens_per_image": self.tokens_per_image,
        }


@dataclass
class CommitRecord:
    """`DIR/_manifest/<stem>.json`: a shard is committed when this exists (written after its token file)."""

    shard: str  # the input URL
    shard_identity: dict  # URL, size, ETag or mtime, as read before the shard (resume refuses another)
    stem: str
    token_file: str
    token_file_sha256: str
    rows: int
    skipped: list[dict]  # samples that gave no row: key, index, reason, detail
    notes: list[dict]  # rows kept with something odd about them
    shard_events: list[dict]  # events of the whole shard (index -1), e.g. a cut archive
    tar_truncated: bool
    seconds: dict[str, float]
    worker: dict  # pid, device, peak RSS
    committed_at: float
    fingerprints: dict = field(default_factory=dict)  # Provenance.fingerprints()
    row_groups: list[int] | None = None  # rows per row group of the token file (readers plan from these)

    def to_dict(self) -> dict:
        record = asdict(self)
        fingerprints = record.pop("fingerprints")
        record["skipped_by_reason"] = count_by_reason(self.skipped)
        record["notes_by_reason"] = count_by_reason(self.notes)
        record["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        return record | fingerprints


class RunMismatch(PlanMismatch):
    """The output directory holds tokens from a different model, codebook or preprocessing."""


def token_dir(output: str) -> ResumableDir:
    """DIR as a resumable output directory: its run record and the shards' commit records."""
    return ResumableDir(output, RUN_FILE, MANIFEST_DIR)


def token_url(output: str, stem: str) -> str:
    return join(output, f"{stem}.parquet")


def commit_record_url(output: str, stem: str) -> str:
    return token_dir(output).record_url(stem)


def committed_stems(output: str) -> set[str]:
    """Stems of the shards whose commit record exists."""
    return token_dir(output).committed()


def write_commit_record(output: str, stem: str, record: CommitRecord | dict) -> None:
    record = record.to_dict() if isinstance(record, CommitRecord) else record
    token_dir(output).write_record(stem, record, sort_keys=True)


def read_commit_record(output: str, stem: str) -> dict:
    """Shard `stem`'s commit record; FileNotFoundError when the shard is not committed."""
    record = token_dir(output).read_record(stem)
    if record is None:
        raise FileNotFoundError(commit_record_url(output, stem))
    return record


def read_run(output: str) -> dict | None:
    return token_dir(output).read_plan()


def recorded_preprocessing(output: str) -> dict:
    """The preprocessing of the run recorded in DIR ({} for none, or for a DIR that cannot be read: the
    job reports that when it plans). A resume keeps what it decided (the encoder precision, the width and
    height columns)."""
    try:
        return (read_run(output) or {}).get("preprocessing") or {}
    except (OSError, ValueError):
        return {}


def check_run(previous: dict | None, current: dict) -> None:
    """Raise RunMismatch when `current` would mix tokens with the run recorded in `previous`."""
    if previous is None:
        return
    before, now = previous.get("preprocessing"), current.get("preprocessing")
    if isinstance(before, dict) and isinstance(now, dict):  # an older record: what its absent keys implied
        # (a bf16 run from before batch_size was recorded used its settings' batch size)
        implied = ADDED_PREPROCESSING | {"batch_size": (previous.get("settings") or {}).get("batch_size")}
        previous = previous | {"preprocessing": with_implied(before, now, implied)}
    check_plan(
        previous,
        current,
        "the output directory holds tokens of a different run ({detail}); "
        "use a new --output or --on-existing overwrite",
        fields=IDENTITY_FIELDS,
        error=RunMismatch,
    )


def write_run(output: str, run: dict) -> None:
    token_dir(output).write_plan(run, sort_keys=True)


def write_failed(output: str, failed: list[dict]) -> None:
    """`DIR/_failed.json`: each shard the run could not commit (url, stem, error, attempts), or no file when
    every shard was committed. A rerun retries them (they are uncommitted) with the never-run ones."""
    url = join(output, FAILED_FILE)
    if failed:
        write_atomic(url, json.dumps({"failed": failed}, indent=1).encode())
        return
    fs, path = fsspec.core.url_to_fs(url)
    with contextlib.suppress(FileNotFoundError):  # one DELETE on an object store, absent or not
        fs.rm_file(path)


def read_failed(output: str) -> list[dict]:
    """The failures `_failed.json` records (none when it is absent or unreadable: it only informs)."""
    try:
        return list((read_json(join(output, FAILED_FILE)) or {}).get("failed", []))
    except (OSError, ValueError):
        return []


def foreign_entries(output: str) -> list[str]:
    """Names in DIR when DIR holds something but no run record of ours (else []): files we did not write."""
    return token_dir(output).foreign_entries()


def clear_temporaries(output: str) -> list[str]:
    """Delete the temporary files that writers killed mid-write (a lost driver's actors) left in DIR and
    DIR/_manifest, before a run starts its own writers; the names deleted (local DIRs only)."""
    return token_dir(output).clear_temporaries()


def clear_outputs(output: str) -> int:
    """Delete what earlier runs recorded as theirs in DIR: each committed shard's token file and commit
    record, the commit index, the failure list and the run record. Nothing else (files we did not write
    stay); the count deleted."""
    fs, path = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    if not fs.exists(path):
        return 0
    doomed = []
    for stem in sorted(committed_stems(output)):
        doomed += [token_url(output, stem), commit_record_url(output, stem)]
    doomed += [join(output, RUN_FILE), join(output, FAILED_FILE)]
    doomed = [p for p in (fsspec.core.url_to_fs(u)[1] for u in doomed) if fs.exists(p)]
    manifest = posixpath.join(path, MANIFEST_DIR)
    if fs.exists(manifest):  # the commit index (pipeline.tokens.index), of the records deleted here
        doomed += [p for p in fs.ls(manifest, detail=False) if posixpath.basename(p).startswith("_index-")]
    for p in doomed:
        fs.rm(p)
    return len(doomed)
