"""Training throughput of small-f8c16 on CPU with Ray Train: images/s with 1 and 2 data-parallel workers in
the same run (their ratio is the scaling), and each worker's peak resident memory.

Run: `python benchmarks/train.py [--json out.json]` (defaults: 64x64 random crops of 96x128 synthetic
photo-like JPEGs, 8 images per worker per step, 40 steps per configuration, the first 10 not timed).
Configurations, as WORKERSxTHREADS: 1x1 and 2x1 (one torch thread per worker: data-parallel scaling at a
fixed per-worker batch), and 1x2 (one worker using both threads, for comparison). Images/s counts the
training steps only (data loading, forward, backward, both optimizer steps, the TDC update and its
all-reduce), from the step times the trainer logs; Ray startup, checkpoints and validation are excluded.
Peak memory is each worker process's RSS high-water mark (VmHWM: pipeline.memory.peak_rss_mib) at the
end of the run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.pack.shard_writer import write_shard  # noqa: E402
from pipeline.train.config import TrainSettings  # noqa: E402
from pipeline.train.run import run_training  # noqa: E402


def synthetic_jpeg(seed: int, height: int = 96, width: int = 128) -> bytes:
    """A smooth, photo-like JPEG (gradients + a few shapes + noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = rng.uniform(30, 220, 3) + 40 * np.sin(x[..., None] / rng.uniform(5, 30)) * np.cos(
        y[..., None] / 17
    )
    for _ in range(3):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(8, 30)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 4, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_data(root: Path, shards: int, per_shard: int) -> str:
    for s in range(shards):
        samples = [
            {"__key__": f"{s:03d}_{i:05d}", "jpg": synthetic_jpeg(s * 100_000 + i), "cls": i % 10}
            for i in range(per_shard)
        ]
        write_shard(str(root / f"train-{s:03d}.tar"), samples)
    return str(root)


def measure(data: str, out: Path, workers: int, threads: int, args: argparse.Namespace) -> dict:
    settings = TrainSettings.of(
        preset="small-f8c16",
        data=data,
        output=str(out),
        workers=workers,
        cpus_per_worker=threads,
        batch_size=args.batch_size,
        image_size=args.image_size,
        max_steps=args.steps,
        log_every=1,
        checkpoint_every=10**9,  # only the final one
        val_every=10**9,
        keep_step_exports=False,
        seed=0,
    )
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    run_training(settings)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "event" not in m and m["step"] > args.warmup]
    # each line covers one step: images_per_s = global batch / step seconds
    step_s = [args.batch_size * workers / m["images_per_s"] for m in steps]
    total_images = args.batch_size * workers * len(steps)
    return {
        "workers": workers,
        "threads_per_worker": threads,
        "global_batch": args.batch_size * workers,
        "timed_steps": len(steps),
        "images_per_s": total_images / sum(step_s),
        "step_s_median": statistics.median(step_s),
        "step_s_best": min(step_s),
        "peak_rss_mib_by_rank": lines[-1].get("peak_rss_mib_by_rank") if lines else None,
        "wall_s_including_startup": wall,
        "load_average_before": load_before,
    }


def machine() -> dict:
    import ray
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "git_commit": commit.strip() or None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64, help="training crop size")
    p.add_argument("--batch-size", type=int, default=8, help="images per worker per step")
    p.add_argument("--steps", type=int, default=40, help="steps per configuration")
    p.add_argument("--warmup", type=int, default=10, help="first steps not timed")
    p.add_argument("--configs", default="1x1,2x1,1x2", help="WORKERSxTHREADS, comma separated")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]

    import ray

    work = Path(tempfile.mkdtemp(prefix="gq-bench-train-"))
    try:
        data = make_data(work / "data", shards=4, per_shard=64)
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
        results = []
        for workers, threads in configs:
            r = measure(data, work / f"run-{workers}x{threads}", workers, threads, args)
            results.append(r)
            rss = ", ".join(f"{v:.0f}" for v in r["peak_rss_mib_by_rank"] or [])
            print(
                f"{workers} worker(s) x {threads} thread(s): {r['images_per_s']:.1f} images/s "
                f"(median step {r['step_s_median']:.3f} s, batch {r['global_batch']}), peak RSS MiB per "
                f"worker [{rss}]",
                flush=True,
            )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    by = {(r["workers"], r["threads_per_worker"]): r["images_per_s"] for r in results}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "image_size": args.image_size,
        "batch_per_worker": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    if (1, 1) in by and (2, 1) in by:
        report["scaling_2_workers_over_1"] = by[(2, 1)] / by[(1, 1)]
        print(f"2 workers / 1 worker (1 thread each): {report['scaling_2_workers_over_1']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
