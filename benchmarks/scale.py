"""Scale by simulation (issue 15): the tokenize driver over thousands of tiny shards (one 64x64 JPEG each).

Run: `PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--local 2000 20000] [--s3 2000] [--json out.json]`

For each size: a fresh run (2 CPU actors of 1 CPU each, embedded Ray), then a resume with every shard
committed. Each run is a child process (`--drive`), so the driver's peak memory (VmHWM) is its own. Per run:
- driver overhead per shard: (run wall time - actor start-up - the actors' busy time / actors) / shards,
  where busy time is what the commit records say each shard took in its actor (read, decode, encode,
  write); the driver's CPU time per shard (all its threads, Ray's included) beside it;
- the resume: planning (listing the commit records, checking each committed shard's identity) to the end;
- on the S3 test server (moto on 127.0.0.1, behind tests/faultproxy.py as a counting proxy without faults):
  the requests of the resume, LIST calls apart.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

ACTORS = 2


def tiny_jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def make_shards(directory: Path, n: int) -> None:
    """n shards of one sample each (a 64x64 JPEG and a label), as plain tars."""
    directory.mkdir(parents=True, exist_ok=True)
    jpeg = tiny_jpeg(0)
    for i in range(n):
        with tarfile.open(directory / f"tiny-{i:07d}.tar", "w") as tar:
            for name, data in ((f"{i:07d}.jpg", jpeg), (f"{i:07d}.cls", str(i % 10).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def drive(inp: str, out: str, ckpt: str) -> dict:
    """One run of the job's driver in this process (as jobs/tokenize.py runs it); what it measured."""
    import ray

    from pipeline.memory import peak_rss_mib
    from pipeline.tokenize.driver import JobSettings, plan, prepare_output, run_job
    from pipeline.tokenize.processor import TokenizeOptions
    from pipeline.tokens.records import committed_stems, read_manifest

    settings = JobSettings(
        input=inp, output=out, checkpoint=ckpt, actors=ACTORS, cpus_per_actor=1, progress=False,
        options=TokenizeOptions(image_size=64, batch_size=1, encoder_precision="float32"),
    )  # fmt: skip
    rss0 = peak_rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    shards, run = plan(settings)
    prepare_output(settings, run)
    t_plan = time.perf_counter() - t0
    ray.init(num_cpus=ACTORS, include_dashboard=False, object_store_memory=100 * 2**20)
    t_ray = time.perf_counter() - t0 - t_plan
    t1, c1 = time.perf_counter(), time.process_time()
    summary = run_job(settings, shards, run)
    t_run, c_run = time.perf_counter() - t1, time.process_time() - c1
    ray.shutdown()
    total = time.perf_counter() - t0
    peak = peak_rss_mib()
    busy = 0.0
    if summary.committed_now:
        stems = sorted(committed_stems(out))
        for stem in stems:
            s = read_manifest(out, stem)["seconds"]
            busy += s.get("total", 0.0) + s.get("write", 0.0)
    n = max(summary.committed_now, 1)
    overhead = (t_run - summary.startup_seconds - busy / ACTORS) / n
    return {
        "shards": len(shards), "committed_now": summary.committed_now,
        "committed_before": summary.committed_before, "failed": len(summary.failed),
        "plan_s": round(t_plan, 2), "ray_init_s": round(t_ray, 2), "run_job_s": round(t_run, 2),
        "startup_s": round(summary.startup_seconds, 2), "total_s": round(total, 2),
        "actor_busy_s": round(busy, 2), "driver_overhead_ms_per_shard": round(1000 * overhead, 2),
        "driver_cpu_ms_per_shard": round(1000 * c_run / n, 2),
        "driver_cpu_total_s": round(time.process_time() - c0, 2),
        "driver_peak_rss_mib": peak, "driver_rss_before_mib": rss0,
    }  # fmt: skip


def child(inp: str, out: str, ckpt: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--drive", inp, out, ckpt]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=7200)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def checkpoint(directory: Path) -> str:
    import torch

    import gq

    torch.manual_seed(0)
    path = directory / "small.safetensors"
    gq.save(gq.GQVAE(gq.model_config("small-f8c16", 0.25)), str(path))
    return str(path)


def local_runs(work: Path, ckpt: str, n: int) -> dict:
    shards = work / f"shards-{n}"
    t = time.perf_counter()
    make_shards(shards, n)
    made = time.perf_counter() - t
    out = str(work / f"tokens-{n}")
    fresh = child(str(shards), out, ckpt)
    resume = child(str(shards), out, ckpt)
    return {"make_shards_s": round(made, 1), "fresh": fresh, "resume": resume}


def s3_runs(work: Path, ckpt: str, n: int) -> dict:
    import fsspec
    from faultproxy import FaultProxy
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    port = server._server.server_port
    proxy = FaultProxy(port, rate=0)  # counts requests, injects nothing
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ |= env | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    child_env = os.environ | env | {"AWS_ENDPOINT_URL": proxy.url, "FSSPEC_S3_ENDPOINT_URL": proxy.url}
    try:
        fs = fsspec.filesystem("s3", endpoint_url=f"http://127.0.0.1:{port}")
        fs.mkdir("bench")
        local = work / f"s3-shards-{n}"
        make_shards(local, n)
        t = time.perf_counter()
        fs.put(f"{local}/", "bench/shards/", recursive=True)
        uploaded = time.perf_counter() - t
        inp = f"s3://bench/shards/tiny-{{0000000..{n - 1:07d}}}.tar"
        fresh = child(inp, "s3://bench/tokens", ckpt, child_env)
        before = dict(proxy.counts)
        resume = child(inp, "s3://bench/tokens", ckpt, child_env)
        resume["requests"] = {k: v - before.get(k, 0) for k, v in proxy.counts.items()}
        return {"upload_s": round(uploaded, 1), "fresh": fresh, "resume": resume}
    finally:
        proxy.stop()
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", type=int, nargs="*", default=[2000, 20000], help="shard counts on local disk")
    p.add_argument("--s3", type=int, nargs="*", default=[2000], help="shard counts on the S3 test server")
    p.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--drive", nargs=3, metavar=("INPUT", "OUTPUT", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.drive:
        print(json.dumps(drive(*args.drive)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="gq-scale-"))
    ckpt = checkpoint(work)
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "runs": {}}
    for n in args.local:
        results["runs"][f"local-{n}"] = local_runs(work, ckpt, n)
        print(json.dumps({f"local-{n}": results["runs"][f"local-{n}"]}), flush=True)
    for n in args.s3:
        results["runs"][f"s3-{n}"] = s3_runs(work, ckpt, n)
        print(json.dumps({f"s3-{n}": results["runs"][f"s3-{n}"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
