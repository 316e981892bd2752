"""One tokenize run's settings, `JobSettings`, whose fields (and its options' and limits', nested) are the
command line of jobs/tokenize.py (pipeline/cli.py), and `settle`, which decides what the command line
leaves open from the model, the actors and the run being resumed in DIR (tokens/records.py)."""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass, field
from typing import NamedTuple

import fsspec

import gq
from pipeline.cli import option
from pipeline.tokenize.options import TokenizeOptions, settle_options
from pipeline.tokens.records import recorded_preprocessing

ON_EXISTING = ("skip", "overwrite")


@dataclass(frozen=True)
class JobSettings:
    """One tokenize run: the command line of jobs/tokenize.py."""

    input: str = field(metadata=option(type=None))  # SHARDS: brace pattern, glob, directory or .txt URL list
    output: str = field(metadata=option(type=None))  # DIR for <shard>.parquet, _manifest/ and _run.json
    checkpoint: str = field(metadata=option(type=None))  # GQ-VAE .safetensors checkpoint (path or fsspec URL)
    options: TokenizeOptions = field(default_factory=TokenizeOptions)  # how images become tokens
    actors: int = 1  # tokenizer actors (one model each)
    gpus_per_actor: float = 0.0  # GPUs per actor; 0 runs on CPU
    cpus_per_actor: float | None = None  # CPUs per actor (default: all CPUs / actors; 1 beside a GPU)
    on_existing: str = field(
        default="skip", metadata=option(choices=ON_EXISTING, type=None)
    )  # skip: resume, committed shards kept; overwrite: delete what earlier runs recorded in DIR, anew
    allow_nonempty_output: bool = field(
        default=False, metadata=option(action="store_true")
    )  # write into a DIR holding other files but no run record of this tool (they are never deleted)
    retries: int = 3  # attempts per shard after the first, across actor deaths and errors
    actor_wait: float = field(
        default=300.0, metadata=option(metavar="S")
    )  # with no actor alive and none placed within S seconds, stop (exit 1); a rerun completes the rest
    progress: bool = field(default=True, metadata=option(negated=True))  # no progress bar (the summary stays)

    def __post_init__(self) -> None:
        if self.on_existing not in ON_EXISTING:
            raise ValueError(f"--on-existing must be one of {ON_EXISTING}")
        if self.actors < 1:
            raise ValueError(f"--actors must be >= 1, got {self.actors}")
        if self.retries < 0 or self.gpus_per_actor < 0:
            raise ValueError("--retries and --gpus-per-actor must be >= 0")
        if self.cpus_per_actor is not None and not self.cpus_per_actor > 0:
            raise ValueError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if not self.actor_wait > 0:
            raise ValueError(f"--actor-wait must be > 0, got {self.actor_wait}")
        if self.options.jpeg_decoder == "nvjpeg" and self.gpus_per_actor == 0:
            raise ValueError("--jpeg-decoder nvjpeg needs GPU actors (--gpus-per-actor > 0)")


def check_paths(checkpoint: str, output: str) -> None:
    """One-line errors for a checkpoint that is a directory and an output that is a file or under one."""
    fs, path = fsspec.core.url_to_fs(checkpoint)
    if fs.isdir(path):
        raise ValueError(f"--checkpoint {checkpoint} is a directory: give the .safetensors file")
    fs, path = fsspec.core.url_to_fs(output)
    path = path.rstrip("/")
    at = path
    while at:
        try:  # (not isdir: on an object store that lists the whole directory, 10^6 token files)
            kind = fs.info(at)["type"]
        except (FileNotFoundError, NotADirectoryError):
            kind = None
        if kind == "directory":
            break
        if kind == "file":
            where = "is a file" if at == path else f"lies under the file {at}"
            raise ValueError(f"--output {output} {where}: give a directory")
        if posixpath.dirname(at) == at:
            break
        at = posixpath.dirname(at)


class Settled(NamedTuple):
    """What `settle` decided, with the model it read to decide it (planning needs it too)."""

    settings: JobSettings
    warning: str | None
    model: gq.ModelIdentity


def settle(settings: JobSettings, model: gq.ModelIdentity | None = None) -> Settled:
    """The settings with every "decide for me" decided (see options.settle_options), resuming DIR's run
    where there is one; a warning or None; the model's identity (read here unless given: reading it hashes
    the whole checkpoint file). ValueError (one line) for paths or a model that refuse them."""
    check_paths(settings.checkpoint, settings.output)  # before reading either
    model = model or gq.describe(settings.checkpoint)
    recorded = recorded_preprocessing(settings.output) if settings.on_existing == "skip" else {}
    gpu = settings.gpus_per_actor > 0
    options, warning = settle_options(settings.options, model.config, gpu=gpu, recorded=recorded)
    return Settled(dataclasses.replace(settings, options=options), warning, model)
