"""The tokenize job on an S3-compatible store (moto on 127.0.0.1) when things go wrong: the driver killed
mid-run, and a fault-injecting proxy between the job and the store (tests/faultproxy.py)."""

import io
import os
import re
import threading
import time
import urllib.request

import boto3
import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from faultproxy import FAULTS, FaultProxy
from shardmaker import make_shard
from test_tokenize_job import (
    job_cmd,
    kill_job,
    reference,
    run,
    s3_env,  # noqa: F401 (a fixture)
    start_job,
)

pytestmark = pytest.mark.slow
BUCKET = "gq-test"


def upload(tmp_path, small_checkpoint, n, images, seed):
    """n shards of `images` samples each and the checkpoint, in the bucket; the local shard paths."""
    # moto's servers in one process share their state: start from an empty store
    urllib.request.urlopen(urllib.request.Request(f"{os.environ['AWS_ENDPOINT_URL']}/moto-api/reset", b""))
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    fs.mkdir(BUCKET)
    local = []
    for i in range(n):
        p = tmp_path / f"part-{i:06d}.tar"
        make_shard(str(p), images, seed=seed + i, start_key=1000 * i)
        fs.put(str(p), f"{BUCKET}/shards/{p.name}")
        local.append(p)
    fs.put(small_checkpoint, f"{BUCKET}/model.safetensors")
    return local


def s3_cmd(n, *extra):
    shards = f"s3://{BUCKET}/shards/part-{{000000..{n - 1:06d}}}.tar"
    return job_cmd(shards, f"s3://{BUCKET}/tokens", f"s3://{BUCKET}/model.safetensors", *extra)


def listing(fs, prefix):
    fs.invalidate_cache()
    return sorted(p[len(prefix) + 1 :] for p in fs.find(prefix))


def assert_bucket_tokens(fs, expected):
    """Exactly the run's objects under tokens/ (nothing temporary or partial), and their tokens."""
    names = listing(fs, f"{BUCKET}/tokens")
    index = [n for n in names if re.fullmatch(r"_manifest/_index-\d{9}\.parquet", n)]
    assert len(index) == 1, names  # the commit index: one generation, the run's closing rewrite
    stems = sorted(expected)
    assert sorted(set(names) - set(index)) == sorted(
        ["_run.json", *(f"_manifest/{s}.json" for s in stems), *(f"{s}.parquet" for s in stems)]
    )
    for stem, (keys, tokens) in expected.items():
        table = pq.read_table(io.BytesIO(fs.cat(f"{BUCKET}/tokens/{stem}.parquet")))
        assert table["key"].to_pylist() == keys, stem  # every sample exactly once, in shard order
        np.testing.assert_array_equal(np.stack(table["tokens"].to_pylist()), tokens)
    uploads = boto3.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert not uploads  # no unfinished multipart upload left behind either


def test_sigkill_driver_then_resume_on_s3(tmp_path, s3_env, small_checkpoint):  # noqa: F811
    local = upload(tmp_path, small_checkpoint, 6, 8, seed=300)
    fs = fsspec.filesystem("s3")
    cmd = s3_cmd(len(local), "--image-size", "128")
    proc = start_job(cmd)
    try:
        t0 = time.time()
        while not [n for n in listing(fs, f"{BUCKET}/tokens") if n.startswith("_manifest/")]:
            assert proc.poll() is None, proc.communicate()
            assert time.time() - t0 < 180, "timed out waiting for commits"
            time.sleep(0.1)
    finally:
        kill_job(proc)  # the driver and every process it started (actors too), all gone on return
    committed = len([n for n in listing(fs, f"{BUCKET}/tokens") if n.startswith("_manifest/")])
    assert committed < len(local), "the job finished before the kill; the test needs more work per shard"
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{committed} before this run" in res.stdout, res.stdout
    assert_bucket_tokens(fs, reference(local, small_checkpoint, size=128))


def test_faulty_object_store(tmp_path, s3_env, small_checkpoint):  # noqa: F811
    local = upload(tmp_path, small_checkpoint, 6, 6, seed=400)
    expected = reference(local, small_checkpoint)
    direct = fsspec.filesystem("s3")  # the reader below talks to moto directly, not through the proxy
    port = int(s3_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    # 15% of requests fail (each fault kind alike); the token file of part-000002 fails 8 PUTs in a row,
    # more than the client's own retries, so that the job's retry of that shard shows in the summary
    proxy = FaultProxy(port, rate=0.15, fail_first=("PUT", "/tokens/part-000002.parquet", 8))
    seen, errors, stop = {}, [], threading.Event()

    def reader():
        """List the bucket during the run; every Parquet file under a final name must read whole."""
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        while not stop.is_set():
            fs.invalidate_cache()
            for path in fs.glob(f"{BUCKET}/tokens/*.parquet"):
                stem = path.rsplit("/", 1)[1][: -len(".parquet")]
                try:
                    rows = pq.read_table(io.BytesIO(fs.cat(path))).num_rows
                    assert rows == len(expected[stem][0]), f"{stem}: {rows} rows"
                    seen[stem] = seen.get(stem, 0) + 1
                except FileNotFoundError:
                    pass
                except Exception as e:  # a truncated or partial file under the final name
                    errors.append(f"{stem}: {type(e).__name__}: {e}")
            time.sleep(0.05)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    env = {**s3_env, "AWS_ENDPOINT_URL": proxy.url, "FSSPEC_S3_ENDPOINT_URL": proxy.url}
    try:
        res = run(s3_cmd(len(local)), env={**os.environ, **env}, timeout=400)
    finally:
        stop.set()
        thread.join(30)
        proxy.stop()
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert f"{len(local)}/{len(local)} committed" in res.stdout, res.stdout
    assert "RETRIED part-000002 (OSError: [Errno 121] injected fault)" in res.stdout, res.stdout
    assert all(proxy.counts[f] > 0 for f in FAULTS) and proxy.counts["forced"] == 8, proxy.counts
    assert not errors, errors[:5]
    assert seen, "the reader never saw a token file during the run"
    assert_bucket_tokens(direct, expected)
