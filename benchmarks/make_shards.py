"""make_shards throughput on a folder of real JPEGs, and what tokenize views cost against the center crop.

Run: `python benchmarks/make_shards.py --images '/tmp/devphotos/train/*.tar' [--count 2000]
[--views-images 64]`.
IMAGES are WebDataset shards (globs allowed; default: the bundled sample shard); their JPEGs are written
as an ImageNet-style class-folder tree (class = the `.cls`; when the shards hold fewer than --count
JPEGs, they repeat under other names), then:

1. make_shards packs the folder (samples of 1000, a fresh output each time; best of --repeat), against
   GNU `tar -cf` of the same folder in the same run (the floor: one sequential pass over the files);
2. the tokenize job's shard processor (`ShardTokenizer.process`, what each actor runs) tokenizes one
   shard of --views-images of those JPEGs with --views center, flip and tencrop (encoder precision as
   the job resolves `auto`), reporting seconds and images encoded per second; tencrop encodes 10x images.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.samples import iter_samples  # noqa: E402
from pipeline.data.shards import open_shard  # noqa: E402
from pipeline.pack.folder_shards import ShardingSettings, make_shards  # noqa: E402
from pipeline.pack.shard_writer import write_shard  # noqa: E402
from pipeline.tokenize.precision import resolve_encoder_precision  # noqa: E402
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions  # noqa: E402

DEMO = REPO / "assets/demo/gq-small-f8c16-0.25bpp-tdc.safetensors"


def jpegs(patterns: list[str], count: int) -> list[tuple[bytes, int]]:
    out = []
    for pattern in patterns:
        for shard in sorted(glob.glob(pattern)):
            with open_shard(shard) as stream:
                for s in iter_samples(stream):
                    if hasattr(s, "members") and "jpg" in s.members:
                        out.append((s.members["jpg"], int(s.members.get("cls", b"0"))))
                        if len(out) >= count:
                            return out
    # fewer JPEGs than asked: the folder repeats them under other names (the packing cost is per file)
    return [out[i % len(out)] for i in range(count)] if out else out


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", default=[str(REPO / "assets/samples/photos-000000.tar")])
    p.add_argument("--count", type=int, default=2000, help="JPEGs in the folder")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--views-images", type=int, default=64, help="JPEGs tokenized per view set")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    images = jpegs(args.images, args.count)
    work = Path(tempfile.mkdtemp(prefix="gqbench-"))
    result: dict = {"cpu": cpu_name(), "cores": os.cpu_count(), "images": len(images)}
    try:
        folder = work / "train"
        for i, (data, cls) in enumerate(images):
            path = folder / f"n{cls:08d}" / f"n{cls:08d}_{i:06d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        total = sum(len(d) for d, _ in images)
        result["megabytes"] = round(total / 1e6, 2)
        ours, floor = [], []
        for r in range(args.repeat):
            t = time.perf_counter()
            settings = ShardingSettings(str(folder), str(work / f"out{r}"), progress=False)
            summary = make_shards(settings)
            ours.append(time.perf_counter() - t)
            assert summary.images == len(images), summary.format()
            t = time.perf_counter()
            subprocess.run(["tar", "-cf", str(work / f"floor{r}.tar"), "-C", str(folder), "."], check=True)
            floor.append(time.perf_counter() - t)
            shutil.rmtree(work / f"out{r}")
            os.remove(work / f"floor{r}.tar")
        best, best_floor = min(ours), min(floor)
        result["make_shards"] = {
            "seconds_best": round(best, 3),
            "seconds_median": round(sorted(ours)[len(ours) // 2], 3),
            "images_per_s": round(len(images) / best, 1),
            "mb_per_s": round(total / 1e6 / best, 1),
            "gnu_tar_seconds_best": round(best_floor, 3),
            "gnu_tar_mb_per_s": round(total / 1e6 / best_floor, 1),
            "ours_over_tar_time": round(best / best_floor, 2),
        }
        print(json.dumps(result["make_shards"]), flush=True)

        if not args.views_images:
            raise SystemExit(print(json.dumps(result, indent=1)))
        shard = work / "views-000000.tar"
        write_shard(
            str(shard),
            [{"__key__": f"{i:06d}", "jpg": d} for i, (d, _) in enumerate(images[: args.views_images])],
        )
        warm = work / "warm-000000.tar"
        write_shard(str(warm), [{"__key__": f"{i:06d}", "jpg": d} for i, (d, _) in enumerate(images[:8])])
        precision, _ = resolve_encoder_precision("auto", gpu=False, recorded=None)
        result["views"] = {"encoder_precision": precision, "image_size": args.image_size}
        for views in ("center", "flip", "tencrop"):
            opts = TokenizeOptions(image_size=args.image_size, views=views, encoder_precision=precision)
            worker = ShardTokenizer(str(DEMO), opts)
            worker.tokenize_shard(str(warm))  # warm-up: threads, allocator, kernels
            t = time.perf_counter()
            record = worker.process(str(shard), str(work / f"tok-{views}"))
            seconds = time.perf_counter() - t
            result["views"][views] = {"seconds": round(seconds, 2), "rows": record["rows"],
                                      "rows_per_s": round(record["rows"] / seconds, 1)}  # fmt: skip
            print(views, json.dumps(result["views"][views]), flush=True)
        center = result["views"]["center"]["seconds"]
        for views in ("flip", "tencrop"):
            result["views"][f"{views}_over_center_time"] = round(
                result["views"][views]["seconds"] / center, 2
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
