"""Training metrics: per-step windows averaged over the workers, per-rank values, skip counts, the
metrics.jsonl log (rank 0) and the console progress."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import gq
from pipeline.data.reasons import REASONS, SHARD_UNREADABLE
from pipeline.memory import peak_rss_mib
from pipeline.train.checkpoint import say
from pipeline.train.step import SCALARS

SKIP_REASONS = (*REASONS, SHARD_UNREADABLE, "other")


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
