"""Images/s of the Ray tokenize pipeline (one CPU actor) against a plain in-process loop, same shards/model.

Run: `python benchmarks/pipeline.py [--source DIR] [--shards 20] [--per-shard 32] [--json]`.
The shards are re-packed from `--source` (a folder of WebDataset shards, e.g. the real photos that
benchmarks/build_dev_photos.sh writes) or, without it, from synthetic photo-like JPEGs. Both sides
decode, preprocess, tokenize and write one Parquet file per shard with the same checkpoint. The pipeline
runs in a child process per measurement (`jobs/tokenize.py`'s code path, embedded Ray), so its peak
memory (driver and actor) can be compared between 1 shard and all shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gq  # noqa: E402
from pipeline.data.decode import Decoded, decode_sample  # noqa: E402
from pipeline.data.samples import iter_samples  # noqa: E402
from pipeline.data.shards import expand_shards, open_shard, shard_stem  # noqa: E402
from pipeline.io import write_atomic  # noqa: E402
from pipeline.memory import peak_rss_mib  # noqa: E402
from pipeline.pack.shard_writer import write_shard  # noqa: E402
from pipeline.tokenize.processor import TokenizeOptions  # noqa: E402
from pipeline.tokens.records import read_commit_record  # noqa: E402
from pipeline.tokens.writer import parquet_bytes, token_table  # noqa: E402


def source_images(source: str | None, count: int, seed: int) -> list[tuple[bytes, int]]:
    """(JPEG bytes, label) pairs: from existing shards, or synthetic 500x375 photo-like JPEGs."""
    out: list[tuple[bytes, int]] = []
    if source:
        for url in expand_shards(source):
            with open_shard(url) as stream:
                for s in iter_samples(stream):
                    jpg = next((v for k, v in getattr(s, "members", {}).items() if k.lower() == "jpg"), None)
                    if jpg:
                        out.append((jpg, int(s.members.get("cls", b"0") or 0)))
                    if len(out) == count:
                        return out
        if len(out) < count:
            out = [out[i % len(out)] for i in range(count)]  # reuse photos to reach the count
        return out
    sys.path.insert(0, str(REPO / "tests"))
    from shardmaker import jpeg_bytes, photo_like

    return [(jpeg_bytes(photo_like(seed + i, 375, 500)), i % 1000) for i in range(count)]


def pack_shards(images: list[tuple[bytes, int]], folder: Path, shards: int, per_shard: int) -> list[str]:
    urls = []
    for s in range(shards):
        url = str(folder / f"bench-{s:06d}.tar")
        chunk = images[s * per_shard : (s + 1) * per_shard]
        write_shard(
            url, ({"__key__": f"img_{s:04d}_{i:04d}", "jpg": b, "cls": c} for i, (b, c) in enumerate(chunk))
        )
        urls.append(url)
    return urls


def _tokenize_batch(model: gq.GQVAE, batch: list[Decoded], rows: dict[str, list]) -> None:
    x = torch.from_numpy(np.stack([d.image for d in batch]))
    rows["tokens"].append(model.tokenize(x).reshape(len(batch), -1).numpy())
    for d in batch:
        rows["keys"].append(d.key)
        rows["labels"].append(d.label)
        rows["indices"].append(d.index)


def plain_loop(urls: list[str], checkpoint: str, options: TokenizeOptions, output: Path) -> dict:
    """What a user writes without the pipeline: load, decode, batch, tokenize, write; one thread, in order."""
    t0 = time.perf_counter()
    model = gq.load(checkpoint)
    t_loaded = time.perf_counter()
    meta = {"model_sha256": model.checkpoint_sha256}
    images = 0
    for url in urls:
        rows: dict[str, list] = {"keys": [], "labels": [], "indices": [], "tokens": []}
        batch: list[Decoded] = []
        with open_shard(url) as stream:
            for s in iter_samples(stream):
                d = decode_sample(s, image_size=options.image_size, limits=options.limits)
                if isinstance(d, Decoded):
                    batch.append(d)
                if len(batch) == options.batch_size:
                    _tokenize_batch(model, batch, rows)
                    batch = []
        if batch:
            _tokenize_batch(model, batch, rows)
        tokens = np.concatenate(rows["tokens"])
        table = token_table(
            rows["keys"], shard_stem(url), rows["indices"], rows["labels"], tokens, 65536, meta
        )
        write_atomic(str(output / f"{shard_stem(url)}.parquet"), parquet_bytes(table))
        images += len(rows["keys"])
    end = time.perf_counter()
    return {
        "images": images,
        "seconds": end - t0,
        "images_per_s": images / (end - t0),
        "startup_seconds": t_loaded - t0,
        "images_per_s_after_startup": images / (end - t_loaded),
    }


def pipeline_child(args: argparse.Namespace) -> None:
    """One pipeline measurement (child process): embedded Ray, one CPU actor, all shards."""
    import ray

    from pipeline.tokenize.driver import run_job
    from pipeline.tokenize.plan import plan, prepare_output
    from pipeline.tokenize.settings import JobSettings

    opts = TokenizeOptions(
        image_size=args.image_size, batch_size=args.batch_size, decode_threads=int(args.decode_threads)
    )
    settings = JobSettings(
        input=args.child_input,
        output=args.child_output,
        checkpoint=args.checkpoint,
        options=opts,
        progress=False,
    )
    shards, run = plan(settings)
    prepare_output(settings, run)
    ray.init(include_dashboard=False, num_cpus=os.cpu_count(), logging_level="ERROR", log_to_driver=False)
    try:
        summary = run_job(settings, shards, run)
    finally:
        ray.shutdown()
    records = [read_commit_record(args.child_output, shard_stem(u)) for u in shards]
    actor_peak = max(r["worker"]["peak_rss_mib"] for r in records)
    # The actor's peak after each shard, in commit order: flat after warm-up means no growth with shards.
    series = [r["worker"]["peak_rss_mib"] for r in sorted(records, key=lambda r: r["committed_at"])]
    driver_peak = peak_rss_mib()
    after = summary.seconds - summary.startup_seconds
    print(json.dumps({
        "images": summary.rows, "seconds": summary.seconds, "images_per_s": summary.rows / summary.seconds,
        "startup_seconds": summary.startup_seconds, "images_per_s_after_startup": summary.rows / after,
        "actor_peak_rss_mib": actor_peak, "driver_peak_rss_mib": round(driver_peak, 1), "shards": len(shards),
        "actor_peak_rss_mib_after_each_shard": series,
    }))  # fmt: skip


def run_pipeline(args: argparse.Namespace, input_spec: str, output: Path, decode_threads: int) -> dict:
    cmd = [
        sys.executable, __file__, "--child-input", input_spec, "--child-output", str(output),
        "--checkpoint", args.checkpoint, "--image-size", str(args.image_size),
        "--batch-size", str(args.batch_size), "--decode-threads", str(decode_threads),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--source", default=None, help="shards to take JPEGs from (default: synthetic 500x375 images)"
    )
    p.add_argument("--shards", type=int, default=20, help="shards in the large run")
    p.add_argument("--per-shard", type=int, default=16, help="images per shard")
    p.add_argument("--image-size", type=int, default=256, help="tokenized image size")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--preset", default="small-f8c16", help="model preset (randomly initialised)")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint instead of a random preset")
    p.add_argument(
        "--decode-threads",
        default="1,0,2",
        help="pipeline decode threads to measure; the first is the default",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--child-input", help=argparse.SUPPRESS)
    p.add_argument("--child-output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_input:
        pipeline_child(args)
        return 0
    sweep = [int(x) for x in args.decode_threads.split(",")]
    preset = args.preset if args.checkpoint is None else "given checkpoint"

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="gq-bench-") as tmp:
        tmp = Path(tmp)
        if args.checkpoint is None:
            torch.manual_seed(0)
            args.checkpoint = str(tmp / "model.safetensors")
            gq.save(gq.GQVAE(gq.model_config(args.preset, 0.25)), args.checkpoint)
        images = source_images(args.source, args.shards * args.per_shard, seed=0)
        (tmp / "shards").mkdir()
        urls = pack_shards(images, tmp / "shards", args.shards, args.per_shard)
        opts = TokenizeOptions(image_size=args.image_size, batch_size=args.batch_size)
        # Plain loop before and after the pipeline runs: the two bracket any drift of a shared machine.
        plain = [plain_loop(urls, args.checkpoint, opts, tmp / "plain")]
        ray_runs = {t: run_pipeline(args, str(tmp / "shards"), tmp / f"ray-{t}", t) for t in sweep}
        ray_one = run_pipeline(args, urls[0], tmp / "ray-one", sweep[0])
        plain.append(plain_loop(urls, args.checkpoint, opts, tmp / "plain"))
        for u in urls:  # same tokens both ways, or the comparison would mean nothing
            a = pq.read_table(tmp / "plain" / f"{shard_stem(u)}.parquet")["tokens"]
            for t in sweep:
                b = pq.read_table(tmp / f"ray-{t}" / f"{shard_stem(u)}.parquet")["tokens"]
                assert a.equals(b), f"pipeline tokens differ from the plain loop on {u}"
    best_plain = max(r["images_per_s"] for r in plain)
    default = ray_runs[sweep[0]]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "preset": preset,
        "source": args.source or "synthetic 500x375 JPEG",
        "images": args.shards * args.per_shard,
        "shards": args.shards,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "plain_loop": plain,
        "ray_pipeline": {str(t): r for t, r in ray_runs.items()},
        "ray_pipeline_1_shard": ray_one,
        "ratio_pipeline_vs_best_plain": {str(t): r["images_per_s"] / best_plain for t, r in ray_runs.items()},
        "peak_actor_rss_ratio_all_vs_1": default["actor_peak_rss_mib"] / ray_one["actor_peak_rss_mib"],
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"images: {result['images']} ({args.shards} shards x {args.per_shard}), {result['source']}")
        for i, r in enumerate(plain):
            print(
                f"plain in-process loop, run {i + 1}: {r['images_per_s']:.2f} images/s ({r['seconds']:.1f} s)"
            )
        for t, r in ray_runs.items():
            ratio = r["images_per_s"] / best_plain
            print(
                f"Ray pipeline, 1 actor, {t} decode threads: {r['images_per_s']:.2f} images/s "
                f"({r['seconds']:.1f} s, {r['startup_seconds']:.1f} s of it actor start) = {ratio:.3f}x plain"
            )
        print(
            f"peak RSS, 1 shard vs {args.shards}: actor {ray_one['actor_peak_rss_mib']:.0f} vs "
            f"{default['actor_peak_rss_mib']:.0f} MiB, driver {ray_one['driver_peak_rss_mib']:.0f} vs "
            f"{default['driver_peak_rss_mib']:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
