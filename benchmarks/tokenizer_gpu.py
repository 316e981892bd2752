"""Images/s of the whole tokenizer on one GPU (small and paper presets, batch 64), with the time in
decode, encode, search and write, so the bottleneck is named; float32 vs bf16 autocast encoders
(tokens compared), PIL vs nvJPEG decoding. No Ray: `ShardTokenizer` is what each actor runs.

Run on a CUDA machine: `python benchmarks/tokenizer_gpu.py [--source SHARDS] [--json out.json]`.
Images: the JPEGs of `--source` (WebDataset shards of real photos), else the 8 bundled photo crops of
assets/samples, repeated to `--images`. Stage times come from a sequential pass (each stage alone,
synchronised); images/s from `ShardTokenizer.process`, where decoding overlaps the model.
`--smoke` runs every path at a tiny size on the CPU so the script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gq  # noqa: E402
from pipeline.data import gpu_decode  # noqa: E402
from pipeline.data.decode import Decoded, decode_sample  # noqa: E402
from pipeline.data.samples import Sample, iter_samples  # noqa: E402
from pipeline.data.shards import expand_shards, open_shard  # noqa: E402
from pipeline.pack.shard_writer import write_shard  # noqa: E402
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions  # noqa: E402
from pipeline.tokens.writer import parquet_bytes, token_table  # noqa: E402

DEMO = REPO / "assets/demo/gq-small-f8c16-0.25bpp-tdc.safetensors"
SAMPLES = REPO / "assets/samples/photos-000000.tar"


def source_jpegs(source: str | None, count: int) -> list[bytes]:
    out: list[bytes] = []
    for url in expand_shards(source or str(SAMPLES)):
        with open_shard(url) as stream:
            for s in iter_samples(stream):
                jpg = next(
                    (v for k, v in getattr(s, "members", {}).items() if k.lower() in ("jpg", "jpeg")), None
                )
                if jpg:
                    out.append(jpg)
                if len(out) == count:
                    return out
    return [out[i % len(out)] for i in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def checkpoint_for(preset: str, folder: Path) -> str:
    if preset == "small-f8c16":
        return str(DEMO)  # the trained demo model
    torch.manual_seed(0)
    path = folder / f"{preset}-random.safetensors"
    gq.save(gq.GQVAE(gq.model_config(preset, 0.25)), str(path), provenance={"note": "random init, benchmark"})
    return str(path)


def stage_times(tok: ShardTokenizer, jpegs: list[bytes], batch: int, threads: int, autocast) -> dict:
    """Seconds per stage over all images, each stage run alone and synchronised."""
    size, device, model = tok.options.image_size, tok.device, tok.model
    samples = [Sample(key=f"k{i:06d}", index=i, members={"jpg": d}) for i, d in enumerate(jpegs)]
    with ThreadPoolExecutor(threads) as pool:
        t, decoded = timed(
            lambda: list(pool.map(lambda s: decode_sample(s, image_size=size), samples)), device
        )
    assert all(isinstance(d, Decoded) for d in decoded)
    out = {"decode_pil": t, "decode_threads": threads}
    images = torch.from_numpy(np.stack([d.image for d in decoded]))
    if device.type == "cuda" and gpu_decode.nvjpeg_available():
        dec = gpu_decode.GpuJpegDecoder(size, device)
        items = [gpu_decode.EncodedJpeg(s.key, s.index, None, s.members["jpg"], s, []) for s in samples]
        out["decode_nvjpeg"] = sum(
            timed(lambda b=b: dec(items[b : b + batch]), device)[0] for b in range(0, len(items), batch)
        )
    encode = search = h2d = 0.0
    tokens = []
    for b in range(0, len(images), batch):
        dt, x = timed(lambda b=b: images[b : b + batch].to(device), device)
        h2d += dt
        dt, (mu, lv) = timed(lambda x=x: model.encode(x, autocast), device)
        encode += dt
        dt, idx = timed(lambda mu=mu, lv=lv: model.quantizer.quantize(mu, lv), device)
        search += dt
        tokens.append(idx.reshape(len(x), -1).cpu().numpy())
    tokens = np.concatenate(tokens)
    meta = tok.file_metadata()
    keys = [s.key for s in samples]

    def write():
        k = model.config.quantizer.codebook.size
        return parquet_bytes(
            token_table(keys, "bench", list(range(len(keys))), [None] * len(keys), tokens, k, meta)
        )

    out.update({"host_to_device": h2d, "encode": encode, "search": search, "write": timed(write, device)[0]})
    return out, tokens


def end_to_end(tok: ShardTokenizer, shard: str, folder: Path, reps: int) -> float:
    """Images/s of ShardTokenizer.process (decode overlapping the model, Parquet written)."""
    rates = []
    for r in range(reps + 1):  # the first is a warm-up
        t = time.perf_counter()
        record = tok.process(shard, str(folder / f"out{r}"))
        if r:
            rates.append(record["rows"] / (time.perf_counter() - t))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="WebDataset shards of photos (default: the bundled 8 crops)")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--decode-threads", type=int, default=16)
    p.add_argument("--presets", nargs="*", default=["small-f8c16", "paper-f8c16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU: tests the script, measures nothing"
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch_size, args.decode_threads, args.presets, args.reps = (
            8,
            4,
            2,
            ["small-f8c16"],
            1,
        )
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    else:
        p.error("needs a CUDA GPU (or --smoke)")

    jpegs = source_jpegs(args.source, args.images)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shard = str(folder / "bench-000000.tar")
        write_shard(shard, ({"__key__": f"img_{i:06d}", "jpg": d} for i, d in enumerate(jpegs)))
        for preset in args.presets:
            ckpt = checkpoint_for(preset, folder)
            fp32_tokens = None
            for precision in ("float32", "bfloat16"):
                decoders = ["pil"] + (
                    ["nvjpeg"] if device.type == "cuda" and gpu_decode.nvjpeg_available() else []
                )
                for decoder in decoders:
                    opts = TokenizeOptions(
                        image_size=256,
                        batch_size=args.batch_size,
                        decode_threads=args.decode_threads,
                        encoder_precision=precision,
                        jpeg_decoder=decoder,
                    )
                    tok = ShardTokenizer(ckpt, opts, device=str(device))
                    row = {"preset": preset, "encoder": precision, "jpeg_decoder": decoder}
                    if decoder == "pil":
                        autocast = torch.bfloat16 if precision == "bfloat16" else None
                        stage_times(
                            tok, jpegs[: args.batch_size], args.batch_size, args.decode_threads, autocast
                        )
                        stages, tokens = stage_times(
                            tok, jpegs, args.batch_size, args.decode_threads, autocast
                        )
                        row["stage_seconds"] = stages
                        total = stages["decode_pil"] + stages["host_to_device"] + stages["encode"]
                        total += stages["search"] + stages["write"]
                        row["stage_share"] = {
                            k: stages[k] / total
                            for k in ("decode_pil", "host_to_device", "encode", "search", "write")
                        }
                        row["bottleneck"] = max(row["stage_share"], key=row["stage_share"].get)
                        if precision == "float32":
                            fp32_tokens = tokens
                        else:
                            row["token_agreement_with_float32"] = float((tokens == fp32_tokens).mean())
                    row["images_per_s"] = end_to_end(
                        tok, shard, folder / f"{preset}-{precision}-{decoder}", args.reps
                    )
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    del tok
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "images": args.images,
        "batch_size": args.batch_size,
        "rows": results,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}, {args.images} images of 256x256, batch {args.batch_size}")
    print(
        "| preset | encoder | decoder | images/s | decode | h2d | encode | search | write "
        "| bottleneck | tokens = fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        share = r.get("stage_share", {})
        cells = " | ".join(
            f"{100 * share[k]:.0f}%" if k in share else ""
            for k in ("decode_pil", "host_to_device", "encode", "search", "write")
        )
        agree = r.get("token_agreement_with_float32")
        print(
            f"| {r['preset']} | {r['encoder']} | {r['jpeg_decoder']} | {r['images_per_s']:.0f} | {cells} | "
            f"{r.get('bottleneck', '')} | {'' if agree is None else f'{100 * agree:.2f}%'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
