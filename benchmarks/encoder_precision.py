"""float32 vs bf16-autocast encoder in the real tokenize job: images/s of each and how many tokens agree.

Run: `python benchmarks/encoder_precision.py --input SHARDS [--checkpoint CKPT] [--gpus-per-actor 1]`.
Both runs go through `jobs/tokenize.py` (embedded Ray, one actor) into fresh folders, on the same
shards with the same checkpoint (default: the demo model); the token files are then compared row by row.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="SHARDS, as for jobs/tokenize.py")
    p.add_argument("--checkpoint", default=str(DEMO))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
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
