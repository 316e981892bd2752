"""float32 vs bf16-autocast encoder in the real tokenize job: images/s of each and how many tokens agree;
with `--variants`, the encoder alone in every variant tried for the CPU, natively and on an emulated AVX2 CPU.

Run: `python benchmarks/encoder_precision.py --input SHARDS [--checkpoint CKPT] [--gpus-per-actor 1]`.
Both runs go through `jobs/tokenize.py` (embedded Ray, one actor) into fresh folders, on the same
shards with the same checkpoint (default: the demo model); the token files are then compared row by row.

`--variants`: ms per image of the encoder alone (batch of `--batch-size` images decoded from SHARDS, the
variants interleaved rep by rep, best and median of `--reps`): float32, float32 channels_last (model and
input), float32 torch.compile (inductor; compile time reported apart), bf16 autocast, bf16 channels_last;
then the same in a child process with ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2, which makes
oneDNN and ATen run as on an AVX2 CPU without native bf16 (the CPUs where `auto` picks float32).
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
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets/demo/gq-small-f8c16-0.25bpp-tdc.safetensors"


def tokenize(args: argparse.Namespace, precision: str, output: Path) -> float:
    """Seconds of one `jobs/tokenize.py` run (Ray start included)."""
    cmd = [sys.executable, str(REPO / "jobs/tokenize.py"), "--input", args.input, "--output", str(output)]
    cmd += ["--checkpoint", args.checkpoint, "--encoder-precision", precision, "--no-progress"]
    cmd += ["--batch-size", str(args.batch_size), "--gpus-per-actor", str(args.gpus_per_actor)]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return time.perf_counter() - start


def tokens_of(folder: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(sorted(folder.glob("*.parquet")))
    return table["key"].to_pylist(), np.stack(table["tokens"].to_numpy(zero_copy_only=False))


AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def encoder_variants(args: argparse.Namespace) -> dict:
    """ms per image of the encoder alone in each variant, interleaved; outputs compared with float32."""
    import copy

    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
    from tokenizer_gpu import source_jpegs

    import gq
    from gq.model import to_float_images
    from pipeline.data.decode import decode_sample
    from pipeline.data.samples import Sample

    model = gq.load(args.checkpoint).eval()
    jpegs = source_jpegs(args.input, args.batch_size)
    samples = [Sample(key=f"k{i}", index=i, members={"jpg": d}) for i, d in enumerate(jpegs)]
    x = to_float_images(torch.from_numpy(np.stack([decode_sample(s, image_size=256).image for s in samples])))
    enc = model.encoder
    last = copy.deepcopy(enc).to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)

    def bf16(net, inp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(inp)

    variants = {
        "float32": lambda: enc(x),
        "float32_channels_last": lambda: last(x_last),
        "bfloat16": lambda: bf16(enc, x),
        "bfloat16_channels_last": lambda: bf16(last, x_last),
    }
    out: dict = {
        "isa": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ.get(k) for k in AVX2_ENV},
    }
    with torch.no_grad():
        if args.compile:
            start = time.perf_counter()
            compiled = torch.compile(enc)
            compiled(x)
            out["compile_s"] = round(time.perf_counter() - start, 1)
            variants["float32_compiled"] = lambda: compiled(x)
        reference = enc(x)[0]
        out["max_abs_diff_mu_vs_float32"] = {
            k: float((f()[0].float() - reference).abs().max()) for k, f in variants.items()
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.reps):
            for k, f in variants.items():
                t = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t) * 1e3 / len(jpegs))
    out["ms_per_image"] = {k: {"best": round(min(v), 1), "median": round(sorted(v)[len(v) // 2], 1)}
                           for k, v in times.items()}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="SHARDS, as for jobs/tokenize.py")
    p.add_argument("--checkpoint", default=str(DEMO))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--variants", action="store_true", help="time the encoder variants instead of the jobs")
    p.add_argument("--reps", type=int, default=6, help="--variants: interleaved repetitions")
    p.add_argument("--compile", action="store_true", help="--variants: also torch.compile (about a minute)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.variants:
        result = {"native": encoder_variants(args)}
        if args.child:
            print(json.dumps(result["native"]))
            return 0
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child"]
        done = subprocess.run(
            child, check=True, capture_output=True, text=True, env={**os.environ, **AVX2_ENV}
        )
        result["emulated_avx2"] = json.loads(done.stdout.strip().splitlines()[-1])
        result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="gq-precision-") as tmp:
        seconds = {prec: tokenize(args, prec, Path(tmp) / prec) for prec in ("float32", "bfloat16")}
        (keys32, t32), (keys16, t16) = tokens_of(Path(tmp) / "float32"), tokens_of(Path(tmp) / "bfloat16")
    assert keys32 == keys16, "the two runs tokenized different rows"
    rows = len(keys32)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.backends.cpu.get_cpu_capability()}",
        "checkpoint": args.checkpoint,
        "images": rows,
        "images_per_s": {k: rows / s for k, s in seconds.items()},
        "speedup_bf16": seconds["float32"] / seconds["bfloat16"],
        "token_agreement": float((t32 == t16).mean()),
        "images_with_all_tokens_equal": float((t32 == t16).all(1).mean()),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
