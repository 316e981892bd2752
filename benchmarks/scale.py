"""Scale by simulation (issue 15): the tokenize driver over thousands of tiny shards (one 64x64 JPEG each).

Run: `PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--local 2000 20000] [--s3 2000] [--json out.json]`
     `... benchmarks/scale.py --local --s3 --committed-local 2000 20000 200000 --committed-s3 2000 20000`

For each size: a fresh run (2 CPU actors of 1 CPU each, embedded Ray), then a resume with every shard
committed. Each run is a child process (`--drive`), so the driver's peak memory (VmHWM) is its own. Per run:
- driver overhead per shard: (run wall time - actor start-up - the actors' busy time / actors) / shards,
  where busy time is what the commit records say each shard took in its actor (read, decode, encode,
  write); the driver's CPU time per shard (all its threads, Ray's included) beside it;
- the resume: planning (listing the commit records, checking each committed shard's identity) to the end;
- on the S3 test server (moto on 127.0.0.1, behind tests/faultproxy.py as a counting proxy without faults):
  the requests of the resume, LIST calls apart.

With --committed-local / --committed-s3 (issue 23) N committed shards are planted instead of tokenized
(tiny input objects; token files that are copies of one 1-row file; commit records as the job writes
them; the run record by the job's planning, the commit index by its writer) and two child processes
measure a resume (with the index, and at the smallest N also without it: an old directory) and a reader
open (`TokenDataset(DIR)`): seconds, driver peak memory, and on moto every request by kind.
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
import urllib.request
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
    from pipeline.tokenize.driver import run_job
    from pipeline.tokenize.plan import plan, prepare_output
    from pipeline.tokenize.processor import TokenizeOptions
    from pipeline.tokenize.settings import JobSettings
    from pipeline.tokens.records import committed_stems, read_commit_record

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
            s = read_commit_record(out, stem)["seconds"]
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


def plant(out: str, inp_dir: str, n: int, ckpt: str, put) -> str:
    """N committed shards (see the module doc) written through `put(url, bytes)`; the SHARDS pattern."""
    import hashlib

    import gq
    from pipeline.tokenize.plan import plan, prepare_output
    from pipeline.tokens.index import CommitIndex, Commits
    from pipeline.tokens.records import CommitRecord, Provenance, commit_record_url, token_url
    from pipeline.tokens.writer import parquet_bytes, row_groups_of, token_table

    inp = f"{inp_dir}/tiny-{{0000000..{n - 1:07d}}}.tar"
    data = {i: f"shard {i}".encode() for i in range(n)}
    for i, d in data.items():
        put(f"{inp_dir}/tiny-{i:07d}.tar", d)
    settings = measure_settings(inp, out, ckpt)
    shards, run = plan(settings)
    prepare_output(settings, run)
    prov = Provenance(gq.describe(ckpt), ckpt, 64, run["preprocessing"])
    meta = prov.file_metadata()
    tokens = np.zeros((1, meta["tokens_per_image"]), np.int64)
    token_bytes = parquet_bytes(token_table(["k"], "tiny", [0], [0], tokens, 2**16, meta))
    index = CommitIndex(Commits(out, {}, -1, stale=True), every=10**12)
    for i, url in enumerate(shards):
        stem = f"tiny-{i:07d}"
        identity = {"url": url, "size": len(data[i])}
        identity |= {"etag": hashlib.md5(data[i]).hexdigest()} if "://" in url else {"mtime": mtime(url)}
        record = CommitRecord(
            shard=url, shard_identity=identity, stem=stem, token_file=token_url(out, stem),
            token_file_sha256=hashlib.sha256(token_bytes).hexdigest(), rows=1, skipped=[], notes=[],
            shard_events=[], tar_truncated=False, seconds={}, worker={}, committed_at=time.time(),
            fingerprints=prov.fingerprints(), row_groups=row_groups_of(token_bytes),
        ).to_dict()  # fmt: skip
        put(token_url(out, stem), token_bytes)
        put(commit_record_url(out, stem), json.dumps(record, indent=1, sort_keys=True).encode())
        index.add(record)
    index.flush()  # as a run's closing rewrite
    return inp


def mtime(path: str) -> float:
    return os.stat(path).st_mtime


def measure_settings(inp: str, out: str, ckpt: str):
    from pipeline.tokenize.processor import TokenizeOptions
    from pipeline.tokenize.settings import JobSettings

    return JobSettings(input=inp, output=out, checkpoint=ckpt, progress=False,
                       options=TokenizeOptions(image_size=64, batch_size=1))  # fmt: skip


def measure(what: str, inp: str, out: str, ckpt: str) -> dict:
    """In a child: a resume with nothing to run (what jobs/tokenize.py does before Ray), or a reader open."""
    from pipeline.memory import peak_rss_mib
    from pipeline.tokenize.driver import run_job
    from pipeline.tokenize.plan import plan, prepare_output
    from pipeline.tokenize.settings import settle
    from pipeline.tokens.reader import TokenDataset

    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    if what == "resume":
        settings, _, model = settle(measure_settings(inp, out, ckpt))  # as jobs/tokenize.py does
        shards, run = plan(settings, model)
        prepare_output(settings, run)
        summary = run_job(settings, shards, run)
        extra = {"committed_before": summary.committed_before, "records_read": shards.commits.records_read}
    else:
        ds = TokenDataset(out)
        extra = {"files": len(ds.files), "rows": ds.num_rows}
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mib": peak_rss_mib(),
            "rss_before_mib": rss0} | extra  # fmt: skip


def measured(proxy, inp: str, out: str, ckpt: str, env: dict | None, old: bool = False) -> dict:
    """Resume (after deleting the index when `old`) and reader open, each in a child process."""
    from pipeline.tokens.index import index_url, list_manifest

    if old:
        for k in list_manifest(out).indexes:
            fs, path = fsspec_fs(index_url(out, k))
            fs.rm(path)
    result = {}
    for what in ("resume", "open"):
        before = dict(proxy.counts) if proxy else {}
        cmd = [sys.executable, __file__, "--measure", what, inp, out, ckpt]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=7200)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        result[what] = json.loads(res.stdout.strip().splitlines()[-1])
        if proxy:
            result[what]["requests"] = {k: v - before.get(k, 0) for k, v in proxy.counts.items()
                                        if v != before.get(k, 0)}  # fmt: skip
        if old:
            break  # (the resume has rebuilt the index: an open now would be the indexed one)
    return result


def fsspec_fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def committed_local(work: Path, ckpt: str, n: int) -> dict:
    root = work / f"committed-{n}"
    (root / "in").mkdir(parents=True, exist_ok=True)

    def put(path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Path(path).write_bytes(data)

    t = time.perf_counter()
    inp = plant(str(root / "out"), str(root / "in"), n, ckpt, put)
    out = {
        "plant_s": round(time.perf_counter() - t, 1),
        "indexed": measured(None, inp, str(root / "out"), ckpt, None),
    }
    if n == min(ARGS.committed_local):
        out["no_index"] = measured(None, inp, str(root / "out"), ckpt, None, old=True)
    return out


def committed_s3(work: Path, ckpt: str, n: int) -> dict:
    import fsspec
    import s3fs
    from faultproxy import FaultProxy
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would talk to the previous server
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    port = server._server.server_port
    proxy = FaultProxy(port, rate=0)
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ |= env | {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    child_env = os.environ | env | {"AWS_ENDPOINT_URL": proxy.url, "FSSPEC_S3_ENDPOINT_URL": proxy.url}
    try:
        fsspec.filesystem("s3").mkdir("bench")
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]

        def put(url: str, data: bytes) -> None:  # straight into moto: a request each would take hours
            backend.put_object("bench", url[len("s3://bench/") :], data)

        put("s3://bench/model.safetensors", Path(ckpt).read_bytes())
        t = time.perf_counter()
        inp = plant("s3://bench/tokens", "s3://bench/shards", n, "s3://bench/model.safetensors", put)
        planted = round(time.perf_counter() - t, 1)
        out = {
            "plant_s": planted,
            "indexed": measured(proxy, inp, "s3://bench/tokens", "s3://bench/model.safetensors", child_env),
        }
        if n == min(ARGS.committed_s3):
            out["no_index"] = measured(
                proxy, inp, "s3://bench/tokens", "s3://bench/model.safetensors", child_env, old=True
            )
        return out
    finally:
        # moto keeps its buckets in process-wide state, which the next size's server would start with
        reset = urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset)
        proxy.stop()
        server.stop()


ARGS = argparse.Namespace()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", type=int, nargs="*", default=[2000, 20000], help="shard counts on local disk")
    p.add_argument("--s3", type=int, nargs="*", default=[2000], help="shard counts on the S3 test server")
    p.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument(
        "--committed-local", type=int, nargs="*", default=[], help="planted committed shards, local"
    )
    p.add_argument("--committed-s3", type=int, nargs="*", default=[], help="planted committed shards, moto")
    p.add_argument("--drive", nargs=3, metavar=("INPUT", "OUTPUT", "CKPT"), help=argparse.SUPPRESS)
    p.add_argument("--measure", nargs=4, metavar=("WHAT", "INPUT", "OUTPUT", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args(namespace=ARGS)
    if args.drive:
        print(json.dumps(drive(*args.drive)))
        return
    if args.measure:
        print(json.dumps(measure(*args.measure)))
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
    for kind, sizes, fn in (
        ("local", args.committed_local, committed_local),
        ("s3", args.committed_s3, committed_s3),
    ):
        for n in sizes:
            results["runs"][f"committed-{kind}-{n}"] = fn(work, ckpt, n)
            print(json.dumps({f"committed-{kind}-{n}": results["runs"][f"committed-{kind}-{n}"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
