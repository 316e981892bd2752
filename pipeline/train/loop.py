"""Training the GQ-VAE with TDC on Ray Train: `run_training(TrainSettings(...))` (settings: config.py).

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
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import gq
from gq.losses import (
    gan_active,
    load_perceptual,
)
from pipeline import ROOT
from pipeline.data.decode import REASONS
from pipeline.data.samples import SHARD_UNREADABLE
from pipeline.data.shards import expand_shards
from pipeline.memory import peak_rss_mib
from pipeline.train.checkpoint import (
    export,
    latest_checkpoint,
    prepare_resume,
    restore,
    save_checkpoint,
    say,
)
from pipeline.train.config import TrainSettings
from pipeline.train.data import DataPosition, TrainBatches
from pipeline.train.step import SCALARS, Trainee, build_trainee, train_step
from pipeline.train.validation import format_val, load_val_images, validate

EXPERIMENT = "ray_train"  # Ray Train's run name: its storage is DIR/ray_train
MODEL_KEYS = ("preset", "bpp", "kl_mode")  # settings a restart may not change
SKIP_REASONS = (*REASONS, SHARD_UNREADABLE, "other")


@dataclass
class TrainResult:
    """What `run_training` returns."""

    step: int  # steps done in total
    output: str  # DIR
    model: str  # path of the exported inference checkpoint
    metrics: dict  # the last metrics reported by rank 0
    checkpoint: str | None  # path of the latest Ray Train checkpoint


# --- driver side -------------------------------------------------------------------------------------------


def run_training(settings: TrainSettings) -> TrainResult:
    """Train, or resume, on the Ray cluster `ray.init` connected to; a finished run is only re-exported."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    finished = export_finished(settings)
    if finished is not None:
        return finished
    out = Path(settings.output).expanduser().resolve()
    settings = dataclasses.replace(settings, output=str(out))
    shards = expand_shards(settings.data)
    if len(shards) < settings.workers:
        raise ValueError(f"{len(shards)} training shards for {settings.workers} workers: need one per worker")
    val_shards = expand_shards(settings.val_data) if settings.val_data else []
    if settings.loss.perceptual_weights:
        load_perceptual(settings.loss.perceptual_weights)  # fail here, with a clear error, not in a worker
    commit = git_commit()
    out.mkdir(parents=True, exist_ok=True)
    write_run_json(out, settings, commit)
    resume_from = prepare_resume(out / EXPERIMENT)

    resources = {"CPU": settings.cpus_per_worker} | ({"GPU": 1} if settings.gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "settings": settings.to_dict(),
            "shards": shards,
            "val_shards": val_shards,
            "provenance": run_provenance(settings, commit),
            "resume_from": resume_from,
        },
        torch_config=TorchConfig(backend="nccl" if settings.gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers, use_gpu=settings.gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
        ),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return TrainResult(
        step=int(metrics.get("step", 0)),
        output=str(out),
        model=str(out / "model.safetensors"),
        metrics=metrics,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
    )


def export_finished(settings: TrainSettings) -> TrainResult | None:
    """When DIR's latest checkpoint is at or past `max_steps`, write DIR/model.safetensors from it again
    (no Ray needed) and return the result; else None."""
    out = Path(settings.output).expanduser().resolve()
    path = latest_checkpoint(out / EXPERIMENT)
    if path is None:
        return None
    meta = json.loads((path / "checkpoint.json").read_text())
    if meta["step"] < settings.max_steps:
        return None
    settings = dataclasses.replace(settings, output=str(out))
    commit = git_commit()
    write_run_json(out, settings, commit)  # refuses another preset / bpp / KL mode
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    model = gq.GQVAE(settings.model_config())
    model.load_state_dict(trainer["model"])
    state = {"step": int(trainer["step"]), "images": int(trainer["images"])}
    export(model, out, state, run_provenance(settings, commit), keep_step=False)
    say(f"[gq-train] {out} is already trained to step {state['step']}; re-exported model.safetensors")
    return TrainResult(
        state["step"], str(out), str(out / "model.safetensors"), {"step": state["step"]}, str(path)
    )


def run_provenance(settings: TrainSettings, commit: str | None) -> dict:
    """The training provenance written into every exported inference checkpoint (steps are added then)."""
    s = settings
    return {
        "data": s.data,
        "val_data": s.val_data,
        "preset": s.preset,
        "bpp": s.bpp,
        "kl_mode": s.kl_mode,
        "kl_weight": s.kl_weight,
        "image_size": s.image_size,
        "git_commit": commit,
        "settings": s.to_dict(),
    }


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
    path = out / "run.json"
    starts = []
    if path.exists():
        previous = json.loads(path.read_text())
        before = previous["settings"]
        changed = [k for k in MODEL_KEYS if before.get(k) != getattr(settings, k)]
        if changed:
            was = ", ".join(f"{k}={before.get(k)!r}" for k in changed)
            raise ValueError(f"{out} holds a run with {was}; use another --output to train a different model")
        starts = previous.get("starts", [])
    starts.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": commit})
    record = {
        "settings": settings.to_dict(),
        "model_config": settings.model_config().to_dict(),
        "starts": starts,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


# --- worker side -------------------------------------------------------------------------------------------


def resume(
    t: Trainee, resume_from: str | None, log: MetricsLog, rank: int, world: int
) -> tuple[dict, DataPosition, dict]:
    """Load Ray Train's checkpoint (else `resume_from`, the newest complete one on disk) into `t`; the
    step counters, this worker's data position and skip counts (fresh ones when there is none)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    parts = (t.model, t.disc, t.ae_opt, t.disc_opt, t.noise, rank, world)
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            state, position, skipped = restore(Path(path), *parts)
        source = checkpoint.path
    elif resume_from:
        state, position, skipped = restore(Path(resume_from), *parts)
        source = resume_from
    else:
        return {"step": 0, "images": 0}, DataPosition(), {}
    first = next(iter(t.ae_opt.state.values()), {})
    record = {"event": "resume", "step": state["step"], "from": str(source), "position": position.to_dict()}
    log.write(record | tdc_values(t.model) | {"adam_step": float(first.get("step", 0))})
    return state, position, skipped


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function (also callable in a bare process with world size 1)."""
    import ray.train
    import ray.train.torch

    s = TrainSettings.from_dict(config["settings"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(s.cpus_per_worker)
    out = Path(s.output)
    log = MetricsLog(out / "metrics.jsonl", rank == 0)

    t = build_trainee(s.model_config(), s.loss, s.lr, s.seed, device, rank)  # DDP also broadcasts rank 0's

    state, position, skipped = resume(t, config.get("resume_from"), log, rank, world)
    prov = config["provenance"]

    if state["step"] >= s.max_steps:  # nothing left to train: re-export and finish
        if rank == 0:
            export(t.model, out, state, prov, keep_step=False)
            say(f"[gq-train] {out} is already trained to step {state['step']}; re-exported model.safetensors")
        ray.train.report({"step": state["step"], "images_seen": state["images"], "done": 1})
        return

    if world > 1:
        ids = [device] if device.type == "cuda" else None  # no buffer sync per forward: fixed codebook
        ddp = torch.nn.parallel.DistributedDataParallel
        t.model_step = ddp(t.model, device_ids=ids, forward_sync_buffers=False)
        t.disc_step = ddp(t.disc, device_ids=ids, forward_sync_buffers=False)
    batches = TrainBatches(
        config["shards"],
        batch_size=s.batch_size,
        image_size=s.image_size,
        rank=rank,
        world=world,
        seed=s.seed,
        position=position,
        threads=s.decode_threads,
    )
    batches.skipped.update(skipped)
    val_images = load_val_images(config["val_shards"], s) if rank == 0 and config["val_shards"] else None
    try:
        run_steps(t, s, batches, state, log, val_images, prov, rank, world)
    finally:
        batches.close()


def run_steps(
    t: Trainee,
    s: TrainSettings,
    batches: TrainBatches,
    state: dict,
    log: MetricsLog,
    val_images: torch.Tensor | None,
    prov: dict,
    rank: int,
    world: int,
) -> None:
    """Train from `state["step"]` to `max_steps`: a step, then the metric lines, validation and export
    (rank 0), and checkpoints on their schedules."""
    out, device = Path(s.output), t.model.device
    progress = Progress(rank == 0, state["step"], s.max_steps)
    window = Window()
    metrics: dict = {}
    step = state["step"]
    try:
        while step < s.max_steps:
            step += 1
            start = time.perf_counter()
            images = next(batches).to(device, non_blocking=True)
            values, kl = train_step(t, images, step, s.loss)
            state["step"], state["images"] = step, state["images"] + s.batch_size * world
            window.add(values, time.perf_counter() - start, s.batch_size * world)
            last = step == s.max_steps
            if step % s.log_every == 0 or last:
                gan = gan_active(step, s.loss)
                metrics = window.reduce(step, state["images"], batches.position.epoch, gan)
                metrics |= t.model.tdc.log_dict(kl) | gather_ranks(t.model, world)
                metrics |= {"skipped": reduce_skips(batches.skipped, device, world)}
                log.write(metrics)
                progress.update(step, metrics)
                window = Window()
            if (step % s.val_every == 0 or last) and rank == 0:
                val = validate(t.model, val_images, s) if val_images is not None else {}
                if val:
                    log.write({"event": "val", "step": step} | val)
                    progress.note(f"validation at step {step}: " + format_val(val))
                export(t.model, out, state, prov | {"val": val}, keep_step=s.keep_step_exports)
            if step % s.checkpoint_every == 0 or last:
                parts = (t.model, t.disc, t.ae_opt, t.disc_opt, t.noise, batches, rank, world, s, metrics)
                save_checkpoint(step, state, *parts)
    finally:
        progress.close()


# --- metrics -----------------------------------------------------------------------------------------------


class Window:
    """Per-step losses and times since the last metric line."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(SCALARS), dtype=torch.float64)
        self.steps = 0
        self.seconds = 0.0
        self.images = 0

    def add(self, values: torch.Tensor, seconds: float, images: int) -> None:
        self.sums += values
        self.steps += 1
        self.seconds += seconds
        self.images += images

    def reduce(self, step: int, images_seen: int, epoch: int, gan: bool) -> dict:
        """Window means averaged over the workers (a collective: every worker calls it)."""
        values = self.sums / max(self.steps, 1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            values = values.to(device_of_backend())
            dist.all_reduce(values)
            values = values.cpu() / dist.get_world_size()
        record = {"step": step, "epoch": epoch, "images_seen": images_seen, "gan": gan}
        record |= {name: float(v) for name, v in zip(SCALARS, values)}
        record["images_per_s"] = self.images / self.seconds if self.seconds else 0.0
        return record


def device_of_backend() -> torch.device:
    """Where collectives want their tensors: CUDA for NCCL, CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tdc_values(model: gq.GQVAE) -> dict:
    tdc = model.tdc
    return {
        "lam": float(tdc.lam),
        "lam_min": float(tdc.lam_min),
        "lam_max": float(tdc.lam_max),
        "tdc_updates": int(tdc.updates),
    }


def gather_ranks(model: gq.GQVAE, world: int) -> dict:
    """Per-worker values (a collective): `tdc_by_rank` [lam, lam_min, lam_max, updates] (they must be equal;
    the tests check) and `peak_rss_mib_by_rank` (resident-memory high-water mark of each worker process)."""
    tdc = model.tdc
    rss_mib = peak_rss_mib()
    mine = torch.stack([tdc.lam, tdc.lam_min, tdc.lam_max, tdc.updates.double()]).double().cpu()
    mine = torch.cat([mine, torch.tensor([rss_mib], dtype=torch.float64)])
    every = [mine]
    if world > 1:
        mine = mine.to(device_of_backend())
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
    rows = [t.cpu().tolist() for t in every]
    return {"tdc_by_rank": [r[:4] for r in rows], "peak_rss_mib_by_rank": [round(r[4], 1) for r in rows]}


def reduce_skips(skipped: dict, device: torch.device, world: int) -> dict[str, int]:
    """Skip counts by reason, summed over the workers."""
    counts = torch.zeros(len(SKIP_REASONS), dtype=torch.float64)
    for reason, n in skipped.items():
        counts[SKIP_REASONS.index(reason) if reason in SKIP_REASONS else -1] += n
    if world > 1:
        counts = counts.to(device_of_backend())
        dist.all_reduce(counts)
    return {r: int(n) for r, n in zip(SKIP_REASONS, counts.cpu().tolist()) if n}


class MetricsLog:
    """Appends JSON lines to DIR/metrics.jsonl (rank 0 only); a line cut by a kill is ended first."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists() and path.stat().st_size:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record | {"time": round(time.time(), 3)}) + "\n")


class Progress:
    """A tqdm bar on rank 0 when stdout is a terminal, else one printed line per logged step."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.last = start

    def update(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        text = (
            f"loss {m['loss']:.4g} rec {m['rec']:.4g} (L1 {m['l1']:.4f}) kl {m['kl_loss']:.4g} | "
            f"KL bits {m['kl_bits_mean']:.2f} [{m['kl_bits_min']:.2f}, {m['kl_bits_max']:.2f}] "
            f"target {m['kl_bits_target']:.0f} | lam {m['lam']:.4g} [{m['lam_min']:.3g}, {m['lam_max']:.3g}]"
            + (f" | G {m['g_loss']:.3g} w {m['d_weight']:.3g} D {m['d_loss']:.3g}" if m["gan"] else "")
            + f" | {m['images_per_s']:.1f} img/s"
        )
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix_str(text, refresh=False)
        else:
            say(f"[gq-train] step {step}: {text}")
        self.last = step

    def note(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else say)(f"[gq-train] {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
