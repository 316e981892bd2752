"""jobs/tokenize.py end to end on a real local Ray: tokens, resume, refusal, kills, and an S3 object store."""

import contextlib
import gzip
import io
import json
import os
import posixpath
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from processes import kill_marked
from shardmaker import (
    bad_input_samples,
    big_header_over_small_data,
    cut_tar,
    damaged,
    jpeg_bytes,
    make_shard,
    member_offsets,
    photo_like,
    png_bytes,
    real_jpegs,
)

import gq
from pipeline.data.reasons import BAD_LABEL, CORRUPT, EXTRA_IMAGE, LINK_MEMBER, MEMBER_TOO_LARGE, NO_IMAGE
from pipeline.pack.shard_writer import write_shard
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
MARKER = "GQ_TEST_JOB"
pytestmark = pytest.mark.slow


def job_cmd(inp, out, ckpt, *extra):
    return [
        sys.executable, str(REPO / "jobs" / "tokenize.py"), "--input", str(inp), "--output", str(out),
        "--checkpoint", str(ckpt), "--image-size", str(SIZE), "--batch-size", "4", "--no-progress",
        "--encoder-precision", "float32", *extra,  # the in-process reference is float32 on every CPU
    ]  # fmt: skip


def run(cmd, env=None, timeout=240):
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )


def reference(shards, ckpt, size=SIZE):
    """Tokens of an uninterrupted in-process run: stem -> (keys, tokens)."""
    worker = ShardTokenizer(ckpt, TokenizeOptions(image_size=size, batch_size=4))
    out = {}
    for s in shards:
        r = worker.tokenize_shard(str(s))
        out[r.stem] = (r.keys, r.tokens)
    return out


def assert_tokens_match(out_dir, expected):
    committed = sorted(p.stem for p in (Path(out_dir) / "_manifest").glob("*.json"))
    assert committed == sorted(expected)
    for stem, (keys, tokens) in expected.items():
        table = pq.read_table(Path(out_dir) / f"{stem}.parquet")
        assert table["key"].to_pylist() == keys, stem  # every sample exactly once, in shard order
        np.testing.assert_array_equal(np.stack(table["tokens"].to_pylist()).reshape(len(keys), -1), tokens)


def wait_for_commits(out_dir, n, proc, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        d = Path(out_dir) / "_manifest"
        found = sorted(d.glob("*.json")) if d.exists() else []
        if len(found) >= n:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"job ended before {n} commits: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for commits")


def start_job(cmd):
    """Start the job in its own session, its environment marked so kill_job can find every process of it."""
    token = uuid.uuid4().hex
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, MARKER: token}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    proc.marker = f"{MARKER}={token}"
    return proc


def kill_job(proc, timeout=30):
    """SIGKILL the driver's process group and every process it started, and wait until all are gone.

    Ray actors run in sessions of their own, so a group kill alone leaves an actor alive for a moment,
    long enough to commit the shard it was on after the test has counted the commits.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout)
    kill_marked(proc.marker, timeout)


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    paths = []
    for i in range(3):
        make_shard(str(d / f"train-{i:06d}.tar"), 6, seed=10 + i, start_key=100 * i)
        paths.append(d / f"train-{i:06d}.tar")
    samples, _ = bad_input_samples()
    write_shard(str(d / "train-000003.tar.zst"), samples)
    paths.append(d / "train-000003.tar.zst")
    return paths


def test_job_tokens_resume_refusal_overwrite(tmp_path, shards, small_checkpoint):
    out = tmp_path / "tokens"
    spec = str(shards[0].parent)  # a directory of shards (.tar and .tar.zst)
    res = run(job_cmd(spec, out, small_checkpoint, "--actors", "2", "--cpus-per-actor", "1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4/4 committed" in res.stdout
    expected = reference(shards, small_checkpoint)
    assert_tokens_match(out, expected)
    # Independent readers see every row.
    total = sum(len(k) for k, _ in expected.values())
    assert ds.dataset(str(out), format="parquet").count_rows() == total
    got = duckdb.connect().execute(
        f"SELECT count(*), count(DISTINCT key) FROM read_parquet('{out}/*.parquet')"
    )
    assert got.fetchone() == (total, total)
    run_record = json.loads((out / "_run.json").read_text())
    assert run_record["model_sha256"] == gq.describe(small_checkpoint).model_sha256
    bad = json.loads((out / "_manifest" / "train-000003.json").read_text())
    assert bad["skipped"] and all(s["reason"] for s in bad["skipped"])

    # Resume: nothing left to do, files untouched.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    res = run(job_cmd(spec, out, small_checkpoint))
    assert res.returncode == 0 and "4 before this run, 0 now" in res.stdout, res.stdout + res.stderr[-2000:]
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.glob("*.parquet")}

    # A different model into the same DIR is refused (exit 2) unless --on-existing overwrite.
    torch.manual_seed(7)
    other = str(tmp_path / "other.safetensors")
    gq.save(gq.GQVAE(gq.model_config("small-f8c16", 0.25)), other)
    res = run(job_cmd(spec, out, other))
    assert res.returncode == 2 and "model_sha256" in res.stderr
    res = run(job_cmd(spec, out, other, "--on-existing", "overwrite"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_tokens_match(out, reference(shards, other))


def test_bad_arguments_exit_2(tmp_path, small_checkpoint):
    res = run(job_cmd(tmp_path / "nothing-{0..3}.tar", tmp_path / "o", small_checkpoint))
    assert res.returncode == 2 and "error" in res.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    make_shard(str(tmp_path / "a.tar"), 1, seed=0)
    res = run(job_cmd(tmp_path / "a.tar", tmp_path / "o", junk))
    assert res.returncode == 2 and "not a safetensors file" in res.stderr
    res = run(job_cmd(tmp_path / "a.tar", tmp_path / "o", small_checkpoint, "--batch-size", "0"))
    assert res.returncode == 2


@pytest.fixture
def many_shards(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(16):
        make_shard(str(d / f"part-{i:06d}.tar"), 12, seed=100 + i, start_key=1000 * i)
    return sorted(d.glob("*.tar"))


def test_sigkill_driver_then_resume(tmp_path, many_shards, small_checkpoint):
    out = tmp_path / "tokens"
    cmd = job_cmd(many_shards[0].parent, out, small_checkpoint, "--image-size", "128")
    proc = start_job(cmd)
    try:
        wait_for_commits(out, 2, proc)
    finally:
        kill_job(proc)
    committed = len(list((out / "_manifest").glob("*.json")))
    assert committed < len(many_shards), (
        "the job finished before the kill; the test needs more work per shard"
    )
    # what a writer killed mid-write leaves (the kill lands there now and then): the rerun removes it
    for stale in (
        out / f".part-000015.parquet.{uuid.uuid4().hex}.tmp",
        out / "_manifest" / f".x.{uuid.uuid4().hex}.tmp",
    ):
        stale.write_bytes(b"PAR1")
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{committed} before this run" in res.stdout
    assert_tokens_match(out, reference(many_shards, small_checkpoint, size=128))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_sigkill_actor_is_replaced(tmp_path, many_shards, small_checkpoint):
    out = tmp_path / "tokens"
    cmd = job_cmd(many_shards[0].parent, out, small_checkpoint, "--image-size", "128")
    proc = start_job(cmd)
    try:
        first = wait_for_commits(out, 1, proc)[0]
        killed = json.loads(first.read_text())["worker"]["pid"]
        os.kill(killed, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        kill_job(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert "actors replaced" in stdout and "16/16 committed" in stdout
    pids = {json.loads(p.read_text())["worker"]["pid"] for p in (out / "_manifest").glob("*.json")}
    # one replacement did the rest; the killed actor's own commits may all have been redone by it (killed
    # after committing but before the driver heard, a shard is retried and its commit rewritten)
    assert len(pids - {killed}) == 1
    assert_tokens_match(out, reference(many_shards, small_checkpoint, size=128))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_env(monkeypatch):
    """A moto S3 server on 127.0.0.1 and the environment that points fsspec/boto at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        # moto keeps its buckets in process-wide state, which the next test's server would start with
        urllib.request.urlopen(
            urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST")
        )
        server.stop()


def test_object_store_input_and_output(tmp_path, s3_env, small_checkpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("gq-test")
    local = []
    for i in range(2):
        p = tmp_path / f"train-{i:06d}.tar.gz"
        make_shard(str(p), 5, seed=30 + i, start_key=10 * i)
        fs.put(str(p), f"gq-test/shards/{p.name}")
        local.append(p)
    fs.put(small_checkpoint, "gq-test/model.safetensors")
    res = run(
        job_cmd("s3://gq-test/shards/train-{000000..000001}.tar.gz", "s3://gq-test/tokens",
                "s3://gq-test/model.safetensors"),
        env=os.environ.copy(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("gq-test/tokens"))
    assert names == ["_manifest", "_run.json", "train-000000.parquet", "train-000001.parquet"]
    expected = reference(local, small_checkpoint)
    for stem, (keys, tokens) in expected.items():
        with fs.open(f"gq-test/tokens/{stem}.parquet", "rb") as f:
            table = pq.read_table(f)
        assert table["key"].to_pylist() == keys
        np.testing.assert_array_equal(np.stack(table["tokens"].to_pylist()), tokens)


def test_shard_failing_after_retries_is_named_and_exit_1(tmp_path, small_checkpoint):
    """The driver in-process on a local Ray: a shard that cannot be read fails after its retries."""
    import ray

    from pipeline.tokenize.driver import run_job
    from pipeline.tokenize.plan import plan, prepare_output, uncommitted
    from pipeline.tokenize.settings import JobSettings
    from pipeline.tokens.index import load_commits
    from pipeline.tokens.records import read_failed

    good = tmp_path / "good.tar"
    make_shard(str(good), 3, seed=40)
    settings = JobSettings(
        input=str(good), output=str(tmp_path / "out"), checkpoint=small_checkpoint,
        options=TokenizeOptions(image_size=SIZE, batch_size=4), retries=1, progress=False,
    )  # fmt: skip
    shards, run = plan(settings)
    prepare_output(settings, run)
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        junk = tmp_path / "junk.tar"
        junk.write_text("<html>not a tar</html>" * 30)
        summary = run_job(settings, [*shards, str(tmp_path / "vanished.tar"), str(junk)], run)
    finally:
        ray.shutdown()
    # the vanished shard is retried once; the junk one fails at once (its bytes would not change)
    assert summary.exit_code == 1 and summary.committed_now == 1 and summary.retried == 1
    assert sorted(summary.failed) == ["junk", "vanished"]
    assert "FileNotFoundError" in summary.failed["vanished"]
    junk_error = summary.failed["junk"]
    assert junk_error.startswith("ShardUnreadable: ") and "not a tar archive" in junk_error
    assert "FAILED vanished" in summary.format() and "FAILED junk" in summary.format()
    # all failures in DIR/_failed.json (URL, error, attempts), and a rerun would do exactly those
    failed = {f["stem"]: f for f in read_failed(settings.output)}
    assert failed["vanished"]["attempts"] == 2 and failed["junk"]["attempts"] == 1
    assert failed["junk"]["url"] == str(junk) and failed["junk"]["error"] == junk_error
    assert f"each listed in {settings.output}/_failed.json" in summary.format()
    assert list(
        uncommitted([*shards, str(tmp_path / "vanished.tar"), str(junk)], load_commits(settings.output))
    ) == [str(tmp_path / "vanished.tar"), str(junk)]
    assert summary.encoded == summary.rows == 3  # reported by the actor batch by batch


def test_actor_that_cannot_be_placed_stops_within_the_wait(tmp_path, small_checkpoint):
    """GPU actors asked of a Ray without GPUs (a GPU cluster at full allocation looks the same to the job):
    no actor is ever placed, and the run stops after --actor-wait with what it asked and what Ray has."""
    import ray

    from pipeline.tokenize.driver import run_job
    from pipeline.tokenize.plan import plan, prepare_output
    from pipeline.tokenize.settings import JobSettings

    make_shard(str(tmp_path / "one.tar"), 2, seed=41)
    settings = JobSettings(
        input=str(tmp_path / "one.tar"), output=str(tmp_path / "out"), checkpoint=small_checkpoint,
        options=TokenizeOptions(image_size=SIZE), gpus_per_actor=1, actor_wait=1, progress=False,
    )  # fmt: skip
    shards, run = plan(settings)
    prepare_output(settings, run)
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False)
    try:
        summary = run_job(settings, shards, run)
    finally:
        ray.shutdown()
    assert summary.exit_code == 1 and summary.committed_now == 0 and not summary.failed
    waited, _, reason = summary.stopped.partition(" s (--actor-wait 1 s): ")
    assert int(waited.removeprefix("no tokenizer actor alive and none placed in ")) >= 1, summary.stopped
    assert (
        reason
        == "each asks for CPU 1, GPU 1; the cluster has CPU 1 free of 1, GPU 0 free of 0 on 1 live node(s)"
    )
    text = summary.format()
    assert "actors: started on 0 node(s), 0 of 1 running at the end; 1 never placed (no room)" in text
    assert "STOPPED no tokenizer actor" in text and "1 shard(s) left to do: a rerun completes them" in text


def test_model_that_fails_to_load_fails_its_shards_with_the_reason(tmp_path, small_checkpoint):
    """An actor loads its model ahead of its first shard; a load that fails (here: the checkpoint is not
    the one recorded for the run) fails each shard with that error, not with a dead actor's."""
    import ray

    from pipeline.tokenize.driver import run_job
    from pipeline.tokenize.plan import plan, prepare_output
    from pipeline.tokenize.settings import JobSettings

    make_shard(str(tmp_path / "one.tar"), 2, seed=42)
    settings = JobSettings(
        input=str(tmp_path / "one.tar"), output=str(tmp_path / "out"), checkpoint=small_checkpoint,
        options=TokenizeOptions(image_size=SIZE), retries=1, progress=False,
    )  # fmt: skip
    shards, run = plan(settings)
    prepare_output(settings, run)
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        summary = run_job(settings, shards, run | {"model_sha256": "0" * 64})
    finally:
        ray.shutdown()
    assert summary.exit_code == 1 and summary.committed_now == 0 and summary.retried == 1
    assert summary.failed == {"one": f"ValueError: {small_checkpoint} changed during the run (sha256 differs "
                              "from the run record)"}  # fmt: skip
    assert not summary.lost_actors and summary.actors_at_end == 1


def wds_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name by the WebDataset rule, written here independently of pipeline/."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    if base.startswith((".", "__")) or not (stem and dot and ext):
        return None
    return (f"{directory}/{stem}" if directory else stem), ext


def count_samples(path: Path) -> int:
    """Samples in a shard counted with Python's tarfile (members before any cut): runs of consecutive file
    or link members sharing a key (an extension seen again starts a new run), directories ignored."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    elif path.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    runs, key, exts = 0, None, set()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in tar:
            split = None if member.isdir() else wds_key(member.name)
            if split is None:
                continue
            if split[0] != key or split[1] in exts:
                runs, key, exts = runs + 1, split[0], set()
            exts.add(split[1])
    return runs


def odd_shard(path: Path) -> dict[str, tuple[str | None, str | None]]:
    """A .tar.gz made with tarfile holding links, two images in one sample, an unparsable label, a 2 MB pax
    header, a member over the size limit and damaged real JPEGs; key -> (skip reason, note reason)."""
    photo = jpeg_bytes(photo_like(20, 96, 128))
    real = real_jpegs()
    members = [
        ("linked.jpg", photo), ("linked.png", "symlink:linked.jpg"),
        ("onlylink.jpg", "hardlink:linked.jpg"),
        ("two_images.jpg", photo), ("two_images.png", png_bytes(photo_like(21, 96, 128))),
        ("bad_label.jpg", photo), ("bad_label.cls", b"n01440764"),
        ("big_pax.jpg", photo, {"SCHILY.xattr.user.blob": "x" * 2_000_000}),
        ("too_big.jpg", photo), ("too_big.npy", bytes(400_000)),
        ("cut_jpeg.jpg", damaged(real[0], "cut_reterminated")),
        ("big_header.jpg", big_header_over_small_data()),
        ("no_huffman.jpg", damaged(real[1], "no_huffman_tables")),
        ("spurious_marker.jpg", damaged(real[2], "spurious_marker")),
        ("after.jpg", real[3]), ("after.cls", b"7"),
    ]  # fmt: skip
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data, *pax in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                kind, target = data.split(":")
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = target
                tar.addfile(info)
                continue
            info.size, info.pax_headers = len(data), pax[0] if pax else {}
            tar.addfile(info, io.BytesIO(data))
    return {
        "linked": (None, LINK_MEMBER), "onlylink": (NO_IMAGE, None), "two_images": (None, EXTRA_IMAGE),
        "bad_label": (None, BAD_LABEL), "big_pax": (None, None), "too_big": (MEMBER_TOO_LARGE, None),
        "cut_jpeg": (CORRUPT, None), "big_header": (CORRUPT, None), "no_huffman": (CORRUPT, None),
        "spurious_marker": (CORRUPT, None), "after": (None, None),
    }  # fmt: skip


def test_mixed_bad_shards_every_sample_accounted(tmp_path, small_checkpoint):
    d = tmp_path / "shards"
    d.mkdir()
    make_shard(str(d / "good-000000.tar"), 5, seed=50)
    samples, bad_expected = bad_input_samples()
    write_shard(str(d / "bad-000001.tar"), samples)
    odd_expected = odd_shard(d / "odd-000002.tar.gz")
    make_shard(str(d / "cut-000003.tar"), 4, seed=51)
    cut_at = member_offsets(str(d / "cut-000003.tar"))[4][1]  # the header of the third sample's .jpg
    cut_tar(str(d / "cut-000003.tar"), cut_at)
    (d / "html-000004.tar").write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>\n" * 20)
    (d / "empty-000005.tar").write_bytes(b"")
    make_shard(str(d / "crc-000006.tar.gz"), 3, seed=52)
    crc = (d / "crc-000006.tar.gz").read_bytes()
    (d / "crc-000006.tar.gz").write_bytes(crc[:-8] + bytes([crc[-8] ^ 1]) + crc[-7:])
    failing = {"html-000004", "empty-000005", "crc-000006"}

    out = tmp_path / "tokens"
    cmd = job_cmd(d, out, small_checkpoint, "--max-member-bytes", "300000", "--retries", "0")
    res = run(cmd)
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    assert "4/7 committed" in res.stdout
    assert {
        line.split()[1].rstrip(":") for line in res.stdout.splitlines() if line.startswith("FAILED")
    } == failing
    assert "TRUNCATED cut-000003: samples after the cut are lost" in res.stdout

    records = {p.stem: json.loads(p.read_text()) for p in (out / "_manifest").glob("*.json")}
    assert set(records) == {"good-000000", "bad-000001", "odd-000002", "cut-000003"}
    skipped_total = 0
    for stem, record in records.items():
        table = pq.read_table(out / f"{stem}.parquet")
        shard = next(d.glob(f"{stem}.tar*"))
        # every sample a row or a recorded skip, against an independent count of the tar's members
        assert table.num_rows + len(record["skipped"]) == count_samples(shard), stem
        assert table.num_rows == record["rows"]
        skipped_total += len(record["skipped"])
    assert f"samples skipped: {skipped_total} (" in res.stdout

    def outcomes(stem):
        record = records[stem]
        rows = pq.read_table(out / f"{stem}.parquet").to_pydict()
        skips = {s["key"]: s["reason"] for s in record["skipped"]}
        notes = {n["key"]: n["reason"] for n in record["notes"]}
        return rows, skips, notes

    rows, skips, notes = outcomes("odd-000002")
    assert {k: (skips.get(k), notes.get(k)) for k in odd_expected} == odd_expected
    assert rows["key"] == [k for k, (skip, _) in odd_expected.items() if skip is None]
    assert dict(zip(rows["key"], rows["label"], strict=True))["bad_label"] is None
    assert dict(zip(rows["key"], rows["label"], strict=True))["after"] == 7
    rows, skips, _ = outcomes("bad-000001")
    assert skips == {k: r for k, r in bad_expected.items() if r is not None}

    # a rerun retries exactly the failed shards (they were never committed) and still names them
    res = run(cmd)
    assert res.returncode == 1 and "4 before this run, 0 now, 3 failed" in res.stdout, res.stdout
    assert all(f"FAILED {stem}" in res.stdout for stem in failing)
