"""A training run of the GQ-VAE with TDC on Ray Train, the driver's side: `run_training(TrainSettings(...))`
(settings: config.py; each worker's loop: loop.py).

One `TorchTrainer` with `workers` data-parallel workers (gloo on CPU, NCCL on GPU). Each step: the training
forward (decode of the reparameterised sample), loss = reconstruction + TDC (+ the adaptive hinge GAN loss
from `disc_start` on), one Adam step, then `tdc.update` once (its statistics are all-reduced, so every
worker holds the same multipliers), then a discriminator step when the GAN is on.

The output directory DIR holds:
- `run.json`: the settings of the run (a restart with another preset, bpp or KL mode is refused);
- `metrics.jsonl`: one JSON line per logged step (rank 0), plus `"event"` lines for resume and validation;
- `model.safetensors` (and `model-step{N}.safetensors`): the inference checkpoint (`gq.load`), written at
  each validation and at the end, with the training provenance;
- `ray_train/`: Ray Train's storage (`RunConfig(storage_path=DIR, name="ray_train")`): checkpoint
  directories `step-{N:08d}/` (`trainer.pt`: model with the TDC multipliers, both optimizers, the
  discriminator, the step; `rank-{r}.json`: each worker's data position, skip counts and noise RNG;
  `checkpoint.json`: step, world size, size of trainer.pt) and Ray's checkpoint list.

Resume: running again with the same DIR continues from the latest checkpoint. Ray Train V2 reloads its
checkpoint list from `ray_train/` and hands the latest checkpoint to the workers (`ray.train.get_checkpoint`).
When that list cannot be used (torn by a kill while being written, written by another Ray version, or
gone), it is moved aside and the newest complete `step-*` directory found on disk is used instead.

Room for the workers: a start or restart of the worker group waits at most `scaling.worker_wait` seconds for
its resources (Ray Train's worker-group start timeout), and is not tried again (its controller retries
would wait forever on a cluster that lost its spare nodes): `run_training` raises `NoRoomForWorkers`,
saying what was asked for and what the cluster has, and the checkpoints stay for a rerun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

import gq
from gq.losses import load_perceptual
from pipeline import ROOT
from pipeline.data.shards import expand_shards
from pipeline.io.resumable import ResumableDir, differing
from pipeline.train.checkpoint import TrainState, latest_checkpoint, prepare_resume, reexport
from pipeline.train.config import ModelSettings, TrainSettings
from pipeline.train.loop import train_loop_per_worker

EXPERIMENT = "ray_train"  # Ray Train's run name: its storage is DIR/ray_train
RUN_FILE = "run.json"  # the run's plan record (pipeline.io.resumable)
MODEL_KEYS = ("preset", "kl_mode", "init")  # ModelSettings fields a restart may not change (nor the point)
# Ray Train's wait for a worker group's placement group (default 60 s, then retried without limit); the
# driver's value is handed on to its controller.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class NoRoomForWorkers(RuntimeError):
    """The worker group could not be (re)started within `scaling.worker_wait`: no room on the cluster."""


@dataclass
class TrainResult:
    """What `run_training` returns."""

    step: int  # steps done in total
    output: str  # DIR
    model: str  # path of the exported inference checkpoint
    metrics: dict  # the last metrics reported by rank 0
    checkpoint: str | None  # path of the latest Ray Train checkpoint


def run_training(
    settings: TrainSettings, session: Callable[[], AbstractContextManager] = contextlib.nullcontext
) -> TrainResult:
    """Train, or resume, on Ray; a finished run is only re-exported, without Ray. `session()` is entered
    around the training only (the jobs pass `startup.ray_session`; the default uses the Ray that
    `ray.init` already connected to)."""
    finished = export_finished(settings)
    if finished is not None:
        return finished
    shards = input_shards(settings)  # before Ray starts
    with session():
        return fit(settings, shards)


def fit(settings: TrainSettings, shards: tuple[list[str], list[str]]) -> TrainResult:
    """Ray Train's TorchTrainer over the settings, on the connected Ray cluster (run_training's body)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(settings.output).expanduser().resolve()
    settings = dataclasses.replace(settings, output=str(out))
    shards, val_shards = shards
    if settings.loss.perceptual_weights:
        load_perceptual(settings.loss.perceptual_weights)  # fail here, with a clear error, not in a worker
    commit = git_commit()
    out.mkdir(parents=True, exist_ok=True)
    write_run_json(out, settings, commit)
    resume_from = prepare_resume(out / EXPERIMENT)

    resources = {"CPU": settings.scaling.cpus_per_worker} | ({"GPU": 1} if settings.scaling.gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "settings": settings.to_dict(),
            "shards": shards,
            "val_shards": val_shards,
            "provenance": run_provenance(settings, commit),
            "resume_from": resume_from,
        },
        torch_config=TorchConfig(backend="nccl" if settings.scaling.gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.scaling.workers, use_gpu=settings.scaling.gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.schedule.keep_checkpoints),
            # a worker group that cannot be placed fails the run: its controller's errors are not retried
            failure_config=ray.train.FailureConfig(
                max_failures=settings.scaling.max_failures, controller_failure_limit=0
            ),
        ),
    )
    result = fit_bounded(trainer, settings, resources)
    metrics = dict(result.metrics or {})
    return TrainResult(
        step=int(metrics.get("step", 0)),
        output=str(out),
        model=str(out / "model.safetensors"),
        metrics=metrics,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
    )


def fit_bounded(trainer, settings: TrainSettings, resources: dict):
    """`trainer.fit()`, its worker group's waits for room bounded by `scaling.worker_wait`."""
    import ray.train
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    try:
        with _environ(START_TIMEOUT_ENV, f"{settings.scaling.worker_wait:g}"):
            return trainer.fit()
    except ray.train.ControllerError as e:
        if isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
            raise NoRoomForWorkers(no_room(settings, resources)) from e
        raise


def no_room(settings: TrainSettings, resources: dict) -> str:
    """What was asked for, what the cluster has, and what is kept."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    asked = ", ".join(f"{k} {v:g}" for k, v in resources.items())
    has = ", ".join(f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g}" for k in resources)
    latest = latest_checkpoint(Path(settings.output) / EXPERIMENT)
    kept = f"the checkpoint {latest.name} is kept" if latest else "no checkpoint was made yet"
    return (
        f"no room for the worker group within {settings.scaling.worker_wait:g} s (--worker-wait): "
        f"{settings.scaling.workers} worker(s) of {asked} asked for; the cluster has {has} on {nodes} "
        f"live node(s); {kept}: rerun with the same --output when there is room"
    )


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """`os.environ[name] = value` for the block (Ray Train reads its settings from the environment)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class InputError(ValueError):
    """The training or validation shards cannot be used (a bad argument: the job exits 2)."""


def input_shards(settings: TrainSettings) -> tuple[list[str], list[str]]:
    """The training and validation shard URLs; InputError when they cannot be used."""
    try:
        shards = expand_shards(settings.inputs.data)
        val_shards = expand_shards(settings.inputs.val_data) if settings.inputs.val_data else []
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from e
    workers = settings.scaling.workers
    if len(shards) < workers:
        raise InputError(f"{len(shards)} training shards for {workers} workers: every worker needs one")
    return shards, val_shards


def export_finished(settings: TrainSettings) -> TrainResult | None:
    """When DIR's latest checkpoint is at or past `max_steps`, write DIR/model.safetensors from it again
    (no Ray needed) and return the result; else None."""
    out = Path(settings.output).expanduser().resolve()
    path = latest_checkpoint(out / EXPERIMENT)
    if path is None:
        return None
    meta = json.loads((path / "checkpoint.json").read_text())
    if meta["step"] < settings.optim.max_steps:
        return None
    settings = dataclasses.replace(settings, output=str(out))
    commit = git_commit()
    write_run_json(out, settings, commit)  # refuses another preset / bpp / KL mode
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    model = gq.GQVAE(settings.model_config())
    model.load_state_dict(trainer["model"])
    state = TrainState.of(trainer)
    reexport(model, out, state, run_provenance(settings, commit))
    return TrainResult(state.step, str(out), str(out / "model.safetensors"), {"step": state.step}, str(path))


def run_provenance(settings: TrainSettings, commit: str | None) -> dict:
    """The training provenance written into every exported inference checkpoint (steps are added then)."""
    m, d = settings.model, settings.inputs
    return {
        "data": d.data,
        "val_data": d.val_data,
        "preset": m.preset,
        "bpp": m.bpp,
        "kl_mode": m.kl_mode,
        "kl_weight": m.kl_weight,
        "image_size": d.image_size,
        "git_commit": commit,
        "settings": settings.to_dict(),
    } | ({"init": m.init, "init_sha256": gq.describe(m.init).model_sha256} if m.init else {})


def git_commit() -> str | None:
    """HEAD of the checkout this code runs from, with "-dirty" when it has uncommitted changes; None if
    there is no git."""
    root = ROOT
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
        return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_json(out: Path, settings: TrainSettings, commit: str | None) -> None:
    """DIR/run.json; refuses a restart that changes what the model is (preset, bpp, KL mode)."""
    directory = ResumableDir(str(out), RUN_FILE)
    previous = directory.read_plan()
    starts = []
    if previous is not None:
        before = TrainSettings.from_dict(previous["settings"]).model  # flat or by component
        was = _model_identity(before)
        changed = differing(was, _model_identity(settings.model))
        shown = [f"{k}={was[k]!r}" for k in changed if k != "quantizer"]
        if "quantizer" in changed:  # bpp=0.25 is tokens=1024: named by what the user gave
            shown += [f"{k}={getattr(before, k)!r}" for k in ("bpp", "tokens", "bits")]
        if shown:
            was = ", ".join(shown)
            raise ValueError(f"{out} holds a run with {was}; use another --output to train a different model")
        starts = previous.get("starts", [])
    directory.clear_temporaries()  # a killed export's; DIR is this run's and nothing writes it yet
    starts.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": commit})
    record = {
        "settings": settings.to_dict(),
        "model_config": settings.model_config().to_dict(),
        "starts": starts,
    }
    directory.write_plan(record, end="\n", indent=2)


def _model_identity(model: ModelSettings) -> dict:
    """What a restart may not change: MODEL_KEYS and the quantizer they and bpp/tokens/bits make."""
    return {k: getattr(model, k) for k in MODEL_KEYS} | {"quantizer": model.model_config().quantizer}
