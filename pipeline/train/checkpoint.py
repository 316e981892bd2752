"""Training checkpoints on Ray Train: what each worker saves and restores, and how a restart finds the latest.

A checkpoint is `DIR/ray_train/step-{N:08d}/`: `trainer.pt` (model with the TDC multipliers, both
optimizers, the discriminator, the step; loaded with `weights_only=True`), `rank-{r}.json` (each worker's
data position, skip counts and noise RNG) and `checkpoint.json` (step, world size, size of trainer.pt).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import gq
from pipeline.train.data import DataPosition, TrainBatches
from pipeline.train.step import Trainee

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's checkpoint list in that directory


@dataclass
class TrainState:
    """The run's counters, saved in every checkpoint and advanced once per step."""

    step: int = 0  # optimizer steps done
    images: int = 0  # training images seen, over all workers

    def advance(self, images: int) -> None:
        self.step += 1
        self.images += images

    @classmethod
    def of(cls, trainer: dict) -> TrainState:
        """The counters of a loaded `trainer.pt`."""
        return cls(step=int(trainer["step"]), images=int(trainer["images"]))


@dataclass(frozen=True)
class Resumed:
    """What a worker restores from a checkpoint besides the weights: the counters, its data position and
    its skip counts."""

    state: TrainState
    position: DataPosition
    skipped: dict


def prepare_resume(experiment: Path) -> str | None:
    """Make a restart resume. Returns None when Ray Train's own checkpoint list (in `experiment`) is usable
    or there is nothing to resume; else moves that list aside and returns the newest complete checkpoint
    directory found on disk (or None)."""
    snapshot = experiment / SNAPSHOT
    if snapshot.exists():
        problem = snapshot_problem(snapshot, experiment)
        if problem is None:
            return None
        aside = snapshot.with_name(f"{SNAPSHOT}.unusable-{int(time.time())}")
        os.replace(snapshot, aside)
        print(f"[gq-train] Ray Train's checkpoint list is unusable ({problem}); moved to {aside.name}")
    latest = latest_complete_checkpoint(experiment)
    if latest is not None:
        print(f"[gq-train] resuming from {latest}")
    return str(latest) if latest else None


def snapshot_problem(snapshot: Path, experiment: Path) -> str | None:
    """Why Ray Train could not load this checkpoint list, or None."""
    import ray

    try:
        state = json.loads(snapshot.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not readable JSON: {e}"
    if not isinstance(state, dict):
        return "not a checkpoint list"
    if state.get("ray_version") != ray.__version__:
        return f"written by Ray {state.get('ray_version')}, this is Ray {ray.__version__}"
    for result in state.get("checkpoint_results", []):
        name = result.get("checkpoint_dir_name", "") if isinstance(result, dict) else ""
        if not name or not (experiment / name).is_dir():
            return f"lists a missing checkpoint {name!r}"
    return None


def latest_checkpoint(experiment: Path) -> Path | None:
    """The checkpoint a restart would resume from: the latest in Ray Train's list when that list is usable,
    else the newest complete one on disk."""
    snapshot = experiment / SNAPSHOT
    if snapshot.exists() and snapshot_problem(snapshot, experiment) is None:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        if latest and checkpoint_complete(experiment / latest["checkpoint_dir_name"]):
            return experiment / latest["checkpoint_dir_name"]
    return latest_complete_checkpoint(experiment)


def latest_complete_checkpoint(experiment: Path) -> Path | None:
    """The `step-*` directory with the highest step whose files are all present and whole."""
    if not experiment.is_dir():
        return None
    for path in sorted(experiment.glob("step-*"), reverse=True):
        if checkpoint_complete(path):
            return path
    return None


def checkpoint_complete(path: Path) -> bool:
    """All files of a checkpoint are there: trainer.pt at its recorded size and every rank's JSON."""
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
        if (path / "trainer.pt").stat().st_size != meta["trainer_bytes"]:
            return False
        for rank in range(meta["world_size"]):
            json.loads((path / f"rank-{rank}.json").read_text())
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def save_checkpoint(
    t: Trainee,
    state: TrainState,
    *,
    batches: TrainBatches,
    rank: int,
    world: int,
    settings_record: dict,
    metrics: dict,
) -> None:
    """Every worker writes its files into one Ray Train checkpoint `step-{N:08d}` (merged in storage)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="gq-ckpt-") as tmp:
        path = Path(tmp)
        if rank == 0:
            write_trainer(path, t, state, world, settings_record)
        rank_state = {
            "rank": rank,
            "world_size": world,
            "step": state.step,
            "position": batches.position.to_dict(),
            "skipped": dict(batches.skipped),
            "noise_rng": base64.b64encode(t.noise.get_state().cpu().numpy().tobytes()).decode("ascii"),
        }
        (path / f"rank-{rank}.json").write_text(json.dumps(rank_state))
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"step": state.step}
        ray.train.report(
            report,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step-{state.step:08d}",
        )


def write_trainer(path: Path, t: Trainee, state: TrainState, world: int, settings_record: dict) -> None:
    """Rank 0's part of a checkpoint: `trainer.pt`, then `checkpoint.json` (it records trainer.pt's size)."""
    trainer = {
        "model": t.model.state_dict(),  # includes the TDC multipliers (float64 buffers)
        "disc": t.disc.state_dict(),
        "ae_opt": t.ae_opt.state_dict(),
        "disc_opt": t.disc_opt.state_dict(),
        "step": state.step,
        "images": state.images,
    }
    torch.save(trainer, path / "trainer.pt")
    meta = {
        "step": state.step,
        "world_size": world,
        "trainer_bytes": (path / "trainer.pt").stat().st_size,
        "settings": settings_record,
    }
    (path / "checkpoint.json").write_text(json.dumps(meta, indent=2))


def restore(path: Path, t: Trainee, *, rank: int, world: int) -> Resumed:
    """Load a checkpoint directory into the trainee; its counters, this worker's data position and skips."""
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    t.model.load_state_dict(trainer["model"])
    t.disc.load_state_dict(trainer["disc"])
    t.ae_opt.load_state_dict(trainer["ae_opt"])
    t.disc_opt.load_state_dict(trainer["disc_opt"])
    state = TrainState.of(trainer)
    mine = path / f"rank-{rank}.json"
    saved = json.loads(mine.read_text()) if mine.exists() else None
    if saved is not None and saved["world_size"] == world:
        raw = np.frombuffer(base64.b64decode(saved["noise_rng"]), dtype=np.uint8)
        t.noise.set_state(torch.from_numpy(raw.copy()))
        return Resumed(state, DataPosition.from_dict(saved["position"]), saved["skipped"])
    # another worker count: the per-worker positions do not map; start the next epoch of the new split
    first = json.loads((path / "rank-0.json").read_text())
    epoch = DataPosition.from_dict(first["position"]).epoch + 1
    made_by = first["world_size"]
    say(f"[gq-train] rank {rank}: checkpoint made by {made_by} workers, now {world}: data from epoch {epoch}")
    return Resumed(state, DataPosition(epoch=epoch), {})


def export(model: gq.GQVAE, out: Path, state: TrainState, provenance: dict, *, keep_step: bool) -> None:
    """The inference checkpoint DIR/model.safetensors (and model-step{N}.safetensors)."""
    provenance = provenance | {"steps": state.step, "images_seen": state.images}
    gq.save(model, str(out / "model.safetensors"), provenance)
    if keep_step:
        gq.save(model, str(out / f"model-step{state.step}.safetensors"), provenance)


def reexport(model: gq.GQVAE, out: Path, state: TrainState, provenance: dict) -> None:
    """A run already at max_steps: write DIR/model.safetensors again from its final checkpoint."""
    export(model, out, state, provenance, keep_step=False)
    say(f"[gq-train] {out} is already trained to step {state.step}; re-exported model.safetensors")


def say(text: str) -> None:
    """One console line. Not `print`: Ray Train V2 patches print in workers and shows each line twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
