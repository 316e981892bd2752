"""Each Ray Train worker's training loop: resume from the checkpoint Ray Train hands over, then step,
log, validate, export and checkpoint on the schedule until `max_steps` (the driver's side: run.py)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gq.losses import gan_active
from pipeline.train.checkpoint import Resumed, TrainState, export, reexport, restore, save_checkpoint
from pipeline.train.config import TrainSettings
from pipeline.train.data import DataPosition, TrainBatches
from pipeline.train.metrics import MetricsLog, Progress, Window, gather_ranks, reduce_skips, tdc_values
from pipeline.train.step import Trainee, build_trainee, train_step
from pipeline.train.validation import format_val, load_val_images, validate


def resume(t: Trainee, resume_from: str | None, log: MetricsLog, rank: int, world: int) -> Resumed:
    """Load Ray Train's checkpoint (else `resume_from`, the newest complete one on disk) into `t`; the
    counters, this worker's data position and skip counts (fresh ones when there is none)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            resumed = restore(Path(path), t, rank=rank, world=world)
        source = checkpoint.path
    elif resume_from:
        resumed = restore(Path(resume_from), t, rank=rank, world=world)
        source = resume_from
    else:
        return Resumed(TrainState(), DataPosition(), {})
    first = next(iter(t.ae_opt.state.values()), {})
    position = resumed.position.to_dict()
    record = {"event": "resume", "step": resumed.state.step, "from": str(source), "position": position}
    log.write(record | tdc_values(t.model) | {"adam_step": float(first.get("step", 0))})
    return resumed


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function (also callable in a bare process with world size 1)."""
    import ray.train
    import ray.train.torch

    s = TrainSettings.from_dict(config["settings"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(s.scaling.cpus_per_worker)
    out = Path(s.output)
    log = MetricsLog(out / "metrics.jsonl", rank == 0)

    t = build_trainee(s.model_config(), s.loss, s.optim.lr, s.seed, device, rank, init=s.model.init)

    resumed = resume(t, config.get("resume_from"), log, rank, world)
    state, prov = resumed.state, config["provenance"]

    if state.step >= s.optim.max_steps:  # nothing left to train: re-export and finish
        if rank == 0:
            reexport(t.model, out, state, prov)
        ray.train.report({"step": state.step, "images_seen": state.images, "done": 1})
        return

    if world > 1:
        ids = [device] if device.type == "cuda" else None  # no buffer sync per forward: fixed codebook
        ddp = torch.nn.parallel.DistributedDataParallel
        t.model_step = ddp(t.model, device_ids=ids, forward_sync_buffers=False)
        t.disc_step = ddp(t.disc, device_ids=ids, forward_sync_buffers=False)
    batches = TrainBatches(
        config["shards"],
        batch_size=s.inputs.batch_size,
        image_size=s.inputs.image_size,
        rank=rank,
        world=world,
        seed=s.seed,
        position=resumed.position,
        threads=s.inputs.decode_threads,
    )
    batches.skipped.update(resumed.skipped)
    val_images = load_val_images(config["val_shards"], s) if rank == 0 and config["val_shards"] else None
    try:
        run_steps(t, s, batches, state, log, val_images, prov, rank, world)
    finally:
        batches.close()


def run_steps(
    t: Trainee,
    s: TrainSettings,
    batches: TrainBatches,
    state: TrainState,
    log: MetricsLog,
    val_images: torch.Tensor | None,
    prov: dict,
    rank: int,
    world: int,
) -> None:
    """Train from `state.step` to `max_steps`: a step, then the metric lines, validation and export
    (rank 0), and checkpoints on their schedules."""
    out, device = Path(s.output), t.model.device
    progress = Progress(rank == 0, state.step, s.optim.max_steps)
    window = Window()
    metrics: dict = {}
    per_step = s.inputs.batch_size * world
    try:
        while state.step < s.optim.max_steps:
            step = state.step + 1
            start = time.perf_counter()
            images = next(batches).to(device, non_blocking=True)
            values, kl = train_step(t, images, step, s.loss)
            state.advance(per_step)
            window.add(values, time.perf_counter() - start, per_step)
            last = step == s.optim.max_steps
            if step % s.schedule.log_every == 0 or last:
                gan = gan_active(step, s.loss)
                metrics = window.reduce(step, state.images, batches.position.epoch, gan)
                metrics |= t.model.tdc.log_dict(kl) | gather_ranks(t.model, world)
                metrics |= {"skipped": reduce_skips(batches.skipped, device, world)}
                log.write(metrics)
                progress.update(step, metrics)
                window = Window()
            if (step % s.schedule.val_every == 0 or last) and rank == 0:
                val = validate(t.model, val_images, s) if val_images is not None else {}
                if val:
                    log.write({"event": "val", "step": step} | val)
                    progress.note(f"validation at step {step}: " + format_val(val))
                export(t.model, out, state, prov | {"val": val}, keep_step=s.schedule.keep_step_exports)
            if step % s.schedule.checkpoint_every == 0 or last:
                save_checkpoint(
                    t,
                    state,
                    batches=batches,
                    rank=rank,
                    world=world,
                    settings_record=s.to_dict(),
                    metrics=metrics,
                )
    finally:
        progress.close()
