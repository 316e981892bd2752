"""An image folder packed into WebDataset shards: the plan, the writing, resume and the summary.

`DIR/<prefix>-NNNNNN.tar` holds N samples of the listing (pipeline/pack/image_folder.py) in its order, or
in a seeded shuffle of it: `<key>.<ext>` with the file's bytes as they are (never re-encoded) and
`<key>.cls` when the image has a label. `DIR/_make_shards.json` pins the plan (settings, a fingerprint
of the listing, the files the listing skipped); a rerun with another plan into the same DIR is refused,
and so is a DIR that holds files but no plan record (files this job did not write are never overwritten).
Each shard is written to a temporary name and renamed (one upload on object stores), then its record
`DIR/_make_shards/<shard>.json` (samples, bytes, sha256, skipped files with reasons, and the file -> key
map: each sample's source path, size, sha256, key and label); a shard with its record is finished and
left alone, so a rerun after a kill completes what is missing. A file that cannot be read for a reason
other than its content (pipeline/pack/source_file.py) fails its shard, which gets no record: the job
exits 1 and a rerun completes it. `DIR/classes.json` maps labels to class names. DIR is a resumable
output directory (pipeline.io.resumable) with these names.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from pipeline.cli import option
from pipeline.data.decode import image_format
from pipeline.data.reasons import EMPTY, NOT_IMAGE, count_by_reason, format_by_reason
from pipeline.data.stages import ordered_map
from pipeline.data.tar_reader import DEFAULT_MAX_MEMBER_BYTES
from pipeline.io import join
from pipeline.io.resumable import ResumableDir, check_plan, listed, write_json
from pipeline.pack.image_folder import LAYOUT_CHOICES, FolderItem, FolderListing, list_image_folder
from pipeline.pack.shard_writer import write_shard
from pipeline.pack.source_file import read_source

PLAN_FILE = "_make_shards.json"
NO_PROGRESS = "no progress bar (the summary still prints)"
ADDED_FIELDS = ("classes", "max_file_bytes")  # plan fields that older plan records lack
RECORD_DIR = "_make_shards"
CLASSES_FILE = "classes.json"


@dataclass(frozen=True)
class ShardingSettings:
    """The command line of jobs/make_shards.py."""

    input: str  # FOLDER_OR_LIST: class folders, a flat folder (with --labels) or a path[,label] list file
    output: str  # DIR for <prefix>-NNNNNN.tar (local or any fsspec URL)
    samples_per_shard: int = 1000  # samples in each shard (the last one may hold fewer)
    labels: str | None = None  # labels file of `name label` lines for a flat folder (ImageNet val style)
    layout: str = field(
        default="auto", metadata=option(choices=LAYOUT_CHOICES)
    )  # a folder's layout: flat, classes, or auto (refuses images at the top and below)
    classes: str | None = None  # a previous run's classes.json: class folders take its labels (val as train)
    max_file_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # a larger file is skipped unread (as tokenize's members)
    prefix: str = "shard"  # shard file names: <prefix>-NNNNNN.tar
    shuffle_seed: int | None = None  # shuffle the samples across shards with this seed (default: sorted)
    read_threads: int = 8  # files read at once (an object store wants many)
    progress: bool = field(default=True, metadata=option(negated=True, help=NO_PROGRESS))  # a bar on stderr

    def __post_init__(self) -> None:
        for name in ("samples_per_shard", "read_threads", "max_file_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.prefix or "/" in self.prefix:
            raise ValueError(f"--prefix must be a plain file name prefix, got {self.prefix!r}")
        if self.layout not in LAYOUT_CHOICES:
            raise ValueError(f"--layout must be one of {', '.join(LAYOUT_CHOICES)}, got {self.layout!r}")


@dataclass
class ShardingSummary:
    layout: str = ""
    images: int = 0  # samples in all shards of DIR
    shards: int = 0
    shards_before: int = 0  # finished by an earlier run, left alone
    bytes: int = 0  # shard bytes in DIR
    skipped: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # shards of this run that failed: "<shard>: <error>"
    seconds: float = 0.0
    images_now: int = 0
    bytes_now: int = 0

    def format(self) -> str:
        rate = self.images_now / self.seconds if self.seconds else 0.0
        mb = self.bytes_now / self.seconds / 1e6 if self.seconds else 0.0
        lines = [
            f"make_shards: {self.layout}: {self.images} images in {self.shards} shards, "
            f"{self.bytes / 1e6:.1f} MB ({self.shards_before} shards finished before this run)",
            f"this run: {self.images_now} images in {self.seconds:.1f} s "
            f"({rate:.1f} images/s, {mb:.1f} MB/s)",
            f"skipped files: {len(self.skipped)}{format_by_reason(count_by_reason(self.skipped))}",
        ]
        lines += [f"  {s['reason']}: {s['file']} {s.get('detail', '')}".rstrip() for s in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"  ... {len(self.skipped) - 20} more in {PLAN_FILE} and {RECORD_DIR}/*.json")
        if self.failed:
            lines.append(f"FAILED shards: {len(self.failed)} (not written: run again to complete them)")
            lines += [f"  {f}" for f in self.failed[:20]]
        return "\n".join(lines)


def shards_dir(output: str) -> ResumableDir:
    """DIR as a resumable output directory: its plan record and the shards' records."""
    return ResumableDir(output, PLAN_FILE, RECORD_DIR)


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def plan_shards(settings: ShardingSettings) -> tuple[FolderListing, list[list[FolderItem]], dict]:
    """The listing, its items dealt into shards, and the plan record. Raises ValueError for bad arguments
    or a DIR holding another plan or files of its own, OSError when the input cannot be listed."""
    _check_output(settings.input, settings.output)
    listing = list_image_folder(settings.input, settings.labels, settings.layout, settings.classes)
    if not listing.items:
        raise ValueError(f"--input {settings.input}: no image files found ({listing.layout})")
    items = listing.items
    if settings.shuffle_seed is not None:
        order = np.random.default_rng(settings.shuffle_seed).permutation(len(items))
        items = [items[i] for i in order]
    n = settings.samples_per_shard
    shards = [items[i : i + n] for i in range(0, len(items), n)]
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.url, item.key, item.label]).encode() + b"\n")
    for skip in listing.skipped:
        digest.update(json.dumps(skip, sort_keys=True).encode() + b"\n")
    plan = {
        "input": settings.input,
        "layout": listing.layout,
        "labels": settings.labels,
        "classes": listing.classes,
        "samples_per_shard": n,
        "prefix": settings.prefix,
        "shuffle_seed": settings.shuffle_seed,
        "max_file_bytes": settings.max_file_bytes,
        "images": len(items),
        "shards": len(shards),
        "listing_sha256": digest.hexdigest(),
    }
    # a plan written before a field existed implied today's value for it (the listing digest still tells
    # a listing that differs, e.g. a class folder the older run dropped)
    check_plan(
        shards_dir(settings.output).read_plan(),
        plan,
        f"--output {settings.output} holds shards of another plan ({{detail}}): use a new --output",
        implied={k: plan[k] for k in ADDED_FIELDS},
        limit=3,
        brief=_brief,
    )
    return listing, shards, plan | {"skipped": listing.skipped}


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_output(source: str, out: str) -> None:
    """Refuse an --output that is a file, lies inside the input folder, or holds files but no plan record
    of this job (a user's own `shard-000000.tar` would be overwritten)."""
    fs, path = url_to_fs(out)
    fs.invalidate_cache()
    if fs.isfile(path):
        raise ValueError(f"--output {out} is a file: give a directory")
    local = isinstance(fs, LocalFileSystem) and "://" not in out and "://" not in source
    if local and os.path.isdir(source):
        inside, folder = os.path.realpath(path), os.path.realpath(source)
        if inside == folder or inside.startswith(folder.rstrip("/") + "/"):
            raise ValueError(f"--output {out} lies inside --input {source}: give a directory outside it")
    names = shards_dir(out).foreign_entries()
    if names:
        raise ValueError(
            f"--output {out} is not empty ({listed(names)}) and holds no {PLAN_FILE} of this "
            "job: give a new or empty directory (files this job did not write are never overwritten)"
        )


def make_shards(settings: ShardingSettings) -> ShardingSummary:
    """Plan, then write every unfinished shard; the summary of DIR as it is at the end. A shard that
    fails (an I/O error) is named in `failed` and left for the next run; the others are written."""
    t0 = time.perf_counter()
    listing, shards, plan = plan_shards(settings)
    out = settings.output
    directory = shards_dir(out)
    directory.write_plan(plan, sort_keys=True, ensure_ascii=False)
    if listing.classes is not None:
        classes = {"classes": listing.classes, "label_of": {c: i for i, c in enumerate(listing.classes)}}
        write_json(join(out, CLASSES_FILE), classes, ensure_ascii=False)
    directory.clear_temporaries()
    summary = ShardingSummary(layout=listing.layout, shards=len(shards))
    records = {}
    todo = []
    for number in range(len(shards)):
        record = directory.read_record(shard_name(settings.prefix, number))
        if record is not None:
            records[number] = record
        else:
            todo.append(number)
    summary.shards_before = len(records)
    total = sum(len(shards[i]) for i in todo)
    bar = tqdm(total=total, unit="img", disable=not settings.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for number in todo:
            try:
                record = _write_one(out, settings, number, shards[number], bar)
            except OSError as e:  # no record: the next run writes this shard again
                summary.failed.append(f"{shard_name(settings.prefix, number)}: {type(e).__name__}: {e}")
                continue
            records[number] = record
            summary.images_now += record["samples"]
            summary.bytes_now += record["bytes"]
    finally:
        bar.close()
    summary.skipped = listing.skipped + [s for n in sorted(records) for s in records[n]["skipped"]]
    summary.images = sum(r["samples"] for r in records.values())
    summary.bytes = sum(r["bytes"] for r in records.values())
    summary.seconds = time.perf_counter() - t0
    return summary


def _write_one(out: str, settings: ShardingSettings, number: int, items: list[FolderItem], bar) -> dict:
    name = shard_name(settings.prefix, number)
    skipped: list[dict] = []
    files: list[dict] = []

    def read(item: FolderItem) -> tuple[FolderItem, bytes | tuple[str, str]]:
        return item, read_source(item.url, settings.max_file_bytes)  # I/O errors raise: the shard fails

    def samples() -> Iterator[dict]:
        window = 4 * settings.read_threads
        for item, data in ordered_map(read, items, settings.read_threads, window):
            bar.update(1)
            why = data if isinstance(data, tuple) else _unusable(data)
            if why is not None:
                skipped.append({"file": item.url, "key": item.key, "reason": why[0], "detail": why[1]})
                continue
            files.append(
                {
                    "file": item.url,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "key": item.key,
                    "label": item.label,
                }
            )
            sample = {"__key__": item.key, item.ext: data}
            if item.label is not None:
                sample["cls"] = item.label
            yield sample

    url = join(out, name)
    count = write_shard(url, samples())
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:  # the bytes as stored, read back once
        digest, size = hashlib.sha256(), 0
        while chunk := f.read(16 * 1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    record = {
        "shard": name,
        "samples": count,
        "bytes": size,
        "sha256": digest.hexdigest(),
        "first_key": items[0].key,
        "skipped": skipped,
        "files": files,
    }
    shards_dir(out).write_record(name, record, ensure_ascii=False)
    return record


def _unusable(data: bytes) -> tuple[str, str] | None:
    """(reason, detail) for file bytes that cannot be a sample: empty, or not an image by their content
    (the tokenize job decodes the rest and skips what it cannot decode, with its reasons)."""
    if not data:
        return EMPTY, "0 bytes"
    if image_format(data) is None:
        return NOT_IMAGE, f"{len(data)} bytes starting {data[:8]!r}"
    return None
