"""The CPU tokenizer before and after issue 16 (fused C++ search, `--encoder-precision auto`), real photos,
the demo model, all measured in one run.

Run: `python benchmarks/tokenize_cpu.py --source '/tmp/devphotos/{train,val}/shard-000000.tar' --json o.json`
(the photos: `bash benchmarks/build_dev_photos.sh /tmp/devphotos --train-crops 200`, 400 real 256x256
crops). Three parts:
- real posteriors: the demo model's float32 posteriors of every image, searched by the fused kernel: the
  share of queries it cannot certify (they take the float64 finish) and the search's ms per image, fused
  and tiled, beside synthetic posteriors of the same shape (gq.synthetic, KL at log2 K);
- stages: a sequential pass (benchmarks/tokenizer_gpu.py's stage_times: each stage alone) with the seconds
  in decode (1 thread, as a CPU actor), encode, search and write, before (float32 encoder, tiled search)
  and after (auto precision, fused search);
- the job: `jobs/tokenize.py` with one CPU actor on the same shards, before and after, images/s from the
  whole run and from the shard records (Ray start and model load excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from quantize import best_of, cpu_model  # noqa: E402
from tokenizer_gpu import DEMO, source_jpegs, stage_times  # noqa: E402

import gq  # noqa: E402
from gq.quantizer import split_groups  # noqa: E402
from gq.synthetic import posteriors_at_rate  # noqa: E402
from kernels import nearest_code  # noqa: E402
from kernels.certificate import uncertified  # noqa: E402
from kernels.fused_cpu import ENV, kernel_isa, kernel_scores  # noqa: E402
from pipeline.data.decode import Decoded, decode_sample  # noqa: E402
from pipeline.data.samples import Sample  # noqa: E402
from pipeline.data.shards import expand_shards  # noqa: E402
from pipeline.tokenize.precision import resolve_encoder_precision  # noqa: E402
from pipeline.tokenize.processor import AUTOCAST, ShardTokenizer, TokenizeOptions  # noqa: E402
from pipeline.tokens.records import read_commit_record  # noqa: E402

STAGES = ("decode_pil", "encode", "search", "write")


def configurations() -> dict[str, dict]:
    after, _ = resolve_encoder_precision("auto", gpu=False)
    return {
        "before": {"precision": "float32", ENV: "off"},
        "after": {"precision": after, ENV: "auto"},
    }


def real_queries(model: gq.GQVAE, jpegs: list[bytes], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 posteriors of every image as the search sees them: (groups, d) mu and clamped logvar."""
    q = model.config.quantizer
    mus, lvs = [], []
    for b in range(0, len(jpegs), batch):
        samples = [
            Sample(key=f"k{i}", index=i, members={"jpg": d}) for i, d in enumerate(jpegs[b : b + batch])
        ]
        decoded = [decode_sample(s, image_size=256) for s in samples]
        assert all(isinstance(d, Decoded) for d in decoded)
        with torch.no_grad():
            mu, lv = model.encode(torch.from_numpy(np.stack([d.image for d in decoded])))
        d = q.codebook.dim
        mus.append(split_groups(mu, q.groups, q.layout).reshape(-1, d))
        lvs.append(split_groups(lv, q.groups, q.layout).reshape(-1, d))
    return torch.cat(mus), torch.cat(lvs)


def search_on(mu: torch.Tensor, lv: torch.Tensor, codes: torch.Tensor, per_image: int, reps: int) -> dict:
    """Uncertified share and search ms per image (fused, tiled) for these posteriors."""
    isa = kernel_isa("auto")
    best, second, _, err, _ = kernel_scores(mu, lv, codes, "posterior", 1.0, isa=isa)
    rows = uncertified(best, second, err)
    chunk_mu, chunk_lv = mu[: 32 * per_image], lv[: 32 * per_image]  # one batch of 32 images
    images = chunk_mu.shape[0] / per_image
    out = {
        "queries": mu.shape[0],
        "uncertified": int(rows.sum()),
        "uncertified_share": float(rows.double().mean()),
    }
    for backend in ("fused", "tiled"):
        t, median, _ = best_of(lambda b=backend: nearest_code(chunk_mu, chunk_lv, codes, backend=b), reps)
        out[f"{backend}_ms_per_image"] = round(t * 1e3 / images, 2)
        out[f"{backend}_median_ms_per_image"] = round(median * 1e3 / images, 2)
    return out


def stages(jpegs: list[bytes], batch: int) -> dict:
    """Sequential stage seconds, shares and images/s of each configuration, and token agreement."""
    out, tokens = {}, {}
    for name, cfg in configurations().items():
        os.environ[ENV] = cfg[ENV]
        opts = TokenizeOptions(image_size=256, batch_size=batch, encoder_precision=cfg["precision"])
        tok = ShardTokenizer(str(DEMO), opts, device="cpu", threads=torch.get_num_threads())
        autocast = AUTOCAST[cfg["precision"]]
        stage_times(tok, jpegs[:batch], batch, 1, autocast)  # warm-up (and the kernel's build)
        seconds, tokens[name] = stage_times(tok, jpegs, batch, 1, autocast)
        total = sum(seconds[k] for k in STAGES)
        out[name] = {
            **cfg,
            "seconds": {k: round(seconds[k], 3) for k in STAGES},
            "share": {k: round(seconds[k] / total, 3) for k in STAGES},
            "images_per_s_sequential": round(len(jpegs) / total, 2),
        }
    os.environ.pop(ENV, None)
    out["token_agreement"] = float((tokens["before"] == tokens["after"]).mean())
    return out


def job(shards: str, name: str, cfg: dict, folder: Path, batch: int) -> dict:
    """One `jobs/tokenize.py` run with one CPU actor: images/s of the whole run and of its shards."""
    out = folder / name
    cmd = [sys.executable, str(REPO / "jobs/tokenize.py"), "--input", shards, "--output", str(out)]
    cmd += ["--checkpoint", str(DEMO), "--encoder-precision", cfg["precision"], "--no-progress"]
    cmd += ["--batch-size", str(batch), "--actors", "1"]
    env = {**os.environ, "RAY_ADDRESS": "local", ENV: cfg[ENV]}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{name} job failed ({done.returncode}): {done.stderr[-2000:]}")
    wall = time.perf_counter() - start
    records = [read_commit_record(str(out), Path(u).stem) for u in expand_shards(shards)]
    rows = sum(r["rows"] for r in records)
    shard_s = sum(r["seconds"]["total"] + r["seconds"]["write"] for r in records)
    tokens = np.stack(pq.read_table(sorted(out.glob("*.parquet")))["tokens"].to_numpy(zero_copy_only=False))
    return {"images": rows, "wall_s": round(wall, 2), "images_per_s": round(rows / wall, 2),
            "images_per_s_shards": round(rows / shard_s, 2), "tokens": tokens}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="WebDataset shards of real photos")
    p.add_argument("--images", type=int, default=400, help="images for the posteriors and the stage pass")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each search")
    p.add_argument("--no-job", action="store_true", help="skip the two jobs/tokenize.py runs")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    jpegs = source_jpegs(args.source, args.images)
    model = gq.load(str(DEMO))
    codes = model.quantizer.codes
    per_image = (256 // model.downsample) ** 2 * model.config.quantizer.groups
    mu, lv = real_queries(model, jpegs, args.batch_size)
    synthetic = posteriors_at_rate(
        mu.shape[0], mu.shape[1], np.log2(codes.shape[0]), torch.Generator().manual_seed(0)
    )
    result = {
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads, kernel ISA {kernel_isa('auto')}",
        "torch": torch.__version__,
        "images": len(jpegs),
        "real_posteriors": search_on(mu, lv, codes, per_image, args.reps),
        "synthetic_posteriors": search_on(*synthetic, codes, per_image, args.reps),
        "stages": stages(jpegs, args.batch_size),
    }
    print(json.dumps(result, indent=2), flush=True)
    if not args.no_job:
        with tempfile.TemporaryDirectory(prefix="gq-tokenize-cpu-") as tmp:
            shards = Path(tmp) / "shards"  # copies with distinct names (both sources may be shard-000000)
            shards.mkdir()
            for i, url in enumerate(expand_shards(args.source)):
                shutil.copyfile(url, shards / f"photos-{i:06d}.tar")
            runs = {
                n: job(str(shards), n, c, Path(tmp), args.batch_size) for n, c in configurations().items()
            }
        same = float((runs["before"].pop("tokens") == runs["after"].pop("tokens")).mean())
        before, after = runs["before"], runs["after"]
        result["job"] = {
            **runs,
            "speedup": round(after["images_per_s"] / before["images_per_s"], 2),
            "speedup_shards": round(after["images_per_s_shards"] / before["images_per_s_shards"], 2),
            "token_agreement": same,
        }
        print(json.dumps(result["job"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
