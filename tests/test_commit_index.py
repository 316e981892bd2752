"""The commit index at scale: 5,000 committed tiny shards on moto behind a counting proxy. A resume and a
reader open cost O(N / 1000) requests; a changed input, a deleted record, a record newer than the index
and a corrupt index each behave as without the index; an old directory (no index) resumes and gains one."""

import hashlib
import io
import json
import math
import posixpath
import time
import urllib.request

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultproxy import FaultProxy

import gq
from pipeline.data.listing import identities, shard_identity
from pipeline.tokenize.driver import run_job
from pipeline.tokenize.plan import plan, prepare_output, uncommitted
from pipeline.tokenize.processor import TokenizeOptions
from pipeline.tokenize.settings import JobSettings
from pipeline.tokens.export import export_flat
from pipeline.tokens.files import read_unit, tokens_array
from pipeline.tokens.index import CommitIndex, entry_of, list_manifest, load_commits, read_index, write_index
from pipeline.tokens.reader import TokenDataset
from pipeline.tokens.records import CommitRecord, Provenance, read_run, write_commit_record
from pipeline.tokens.writer import parquet_bytes, row_groups_of, token_table

N = 5000
BUCKET = "gq-index"
SIZE = 64


def settings_for(inp, out, ckpt):
    return JobSettings(
        input=inp, output=out, checkpoint=ckpt, progress=False,
        options=TokenizeOptions(image_size=SIZE, batch_size=4),
    )  # fmt: skip


def token_file(stem, rows, meta, seed):
    """A real token file of `rows` random rows (a tokenize run's schema and metadata)."""
    tokens = np.random.default_rng(seed).integers(0, 2**16, (rows, meta["tokens_per_image"]))
    keys = [f"{stem}/{i}" for i in range(rows)]
    table = token_table(keys, stem, list(range(rows)), [i % 7 for i in range(rows)], tokens, 2**16, meta)
    return parquet_bytes(table), tokens


def commit(stem, url, data, rows, token_bytes, fingerprints):
    """The commit record the job writes for a shard: its identity as S3 gives it (size, ETag = the MD5 of
    a one-part upload, computed here independently of the code under test)."""
    identity = {"url": url, "size": len(data), "etag": hashlib.md5(data).hexdigest()}
    return CommitRecord(
        shard=url, shard_identity=identity, stem=stem, token_file=f"{stem}.parquet",
        token_file_sha256=hashlib.sha256(token_bytes).hexdigest(), rows=rows, skipped=[], notes=[],
        shard_events=[], tar_truncated=False, seconds={"total": 0.0}, worker={}, committed_at=time.time(),
        fingerprints=fingerprints, row_groups=row_groups_of(token_bytes),
    ).to_dict()  # fmt: skip


@pytest.fixture(scope="module")
def moto():
    """A moto S3 server on 127.0.0.1 for this module, a counting proxy in front of it, and the environment
    pointing fsspec at the proxy; yields (the moto backend, to plant fixtures without a request, proxy)."""
    import s3fs
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    proxy = FaultProxy(server._server.server_port, rate=0)  # counts requests, injects nothing
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": proxy.url,
           "FSSPEC_S3_ENDPOINT_URL": proxy.url}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield s3_backends[DEFAULT_ACCOUNT_ID]["aws"], proxy
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            urllib.request.urlopen(urllib.request.Request(f"{proxy.url}/moto-api/reset", method="POST"))
            proxy.stop()
            server.stop()


@pytest.fixture(scope="module")
def store(moto, small_checkpoint):
    """N committed shards on moto, as a run leaves them: inputs, token files (real, of 1-3 rows), commit
    records, the run record and the index. Planted in moto's backend directly (a request each would take
    minutes); the run record and the index through the code that writes them."""
    backend, _ = moto
    fs = fsspec.filesystem("s3")
    fs.mkdir(BUCKET)
    with open(small_checkpoint, "rb") as f:
        backend.put_object(BUCKET, "model.safetensors", f.read())
    inputs = {f"shards/tiny-{i:06d}.tar": f"shard {i} bytes".encode() for i in range(N)}
    for key, data in inputs.items():
        backend.put_object(BUCKET, key, data)
    inp, out = f"s3://{BUCKET}/shards/tiny-{{000000..{N - 1:06d}}}.tar", f"s3://{BUCKET}/tokens"
    settings = settings_for(inp, out, f"s3://{BUCKET}/model.safetensors")
    shards, run = plan(settings)
    prepare_output(settings, run)
    provenance = Provenance(gq.describe(small_checkpoint), settings.checkpoint, SIZE, run["preprocessing"])
    meta, fingerprints = provenance.file_metadata(), provenance.fingerprints()
    records, expected, tags = {}, {}, {}
    for i, url in enumerate(shards):
        stem = f"tiny-{i:06d}"
        data, tokens = token_file(stem, i % 3 + 1, meta, i)
        backend.put_object(BUCKET, f"tokens/{stem}.parquet", data)
        records[stem] = commit(stem, url, inputs[f"shards/{stem}.tar"], i % 3 + 1, data, fingerprints)
        body = json.dumps(records[stem]).encode()
        backend.put_object(BUCKET, f"tokens/_manifest/{stem}.json", body)
        tags[stem] = f"etag:{hashlib.md5(body).hexdigest()}"  # what a LIST shows of a one-part upload
        expected[stem] = tokens
    entries = {stem: entry_of(r, tags[stem]) for stem, r in records.items()}
    write_index(out, entries, 0)  # as a run's closing rewrite writes it (its LIST skipped: tags above)
    return settings, records, expected


def counted(proxy, fn, *args, **kw):
    """fn's result and the requests it made, by kind, as the server side saw them."""
    before = dict(proxy.counts)
    result = fn(*args, **kw)
    return result, {k: v - before.get(k, 0) for k, v in proxy.counts.items() if v != before.get(k, 0)}


def resume(settings):
    """What jobs/tokenize.py does up to and including run_job, with nothing left to run (no Ray needed)."""
    read_run(settings.output)
    shards, run = plan(settings)
    prepare_output(settings, run)
    return shards, run_job(settings, shards, run)


@pytest.mark.slow  # moto serves the 5,000-shard listings at ~1 s per page of 1,000 here
def test_resume_and_reader_open_cost_o_n_over_1000_requests(moto, store):
    _, proxy = moto
    settings, records, expected = store
    (shards, summary), requests = counted(proxy, resume, settings)
    assert summary.committed_before == N and summary.committed_now == 0 and not summary.failed
    assert shards.commits.records_read == 0 and not shards.commits.stale  # all from the index
    assert requests["requests"] <= 2 * math.ceil(N / 1000) + 20, requests

    ds, requests = counted(proxy, TokenDataset, settings.output, seed=0, with_meta=True)
    assert requests["requests"] <= math.ceil(N / 1000) + 20, requests
    assert len(ds.files) == N and ds.num_rows == sum(r["rows"] for r in records.values())
    for unit in (ds.units[0], ds.units[2024], ds.units[-1]):  # what the plan says is what the files hold
        stem = unit.url.rsplit("/", 1)[1][: -len(".parquet")]
        table = read_unit(unit, ["tokens", "shard"])
        assert table.num_rows == unit.rows == records[stem]["rows"]
        np.testing.assert_array_equal(tokens_array(table.column("tokens")), expected[stem])


@pytest.mark.slow
def test_planted_changes_behave_as_without_index(moto, store):
    """Each planted change gives what the records alone say: the index is only trusted where it agrees."""
    _, proxy = moto
    settings, records, _ = store
    fs = fsspec.filesystem("s3")
    out = f"{BUCKET}/tokens"
    rows_before = sum(r["rows"] for r in records.values())

    # a changed input (same name, other bytes): refused as without an index, naming it
    original = fs.cat(f"{BUCKET}/shards/tiny-000017.tar")
    fs.pipe(f"{BUCKET}/shards/tiny-000017.tar", b"other bytes")
    refusal = r"^1 committed shard\(s\) are not the input shards .* tiny-000017 \(size 14 != 11; etag "
    with pytest.raises(ValueError, match=refusal):
        plan(settings)
    fs.pipe(f"{BUCKET}/shards/tiny-000017.tar", original)

    # a commit record newer than the index (the shard redone, 7 rows now): read, used, the index rebuilt
    data, _ = token_file("tiny-000005", 7, store_meta(settings), 99)
    newer = records["tiny-000005"] | {"rows": 7, "row_groups": [7], "committed_at": time.time()}
    fs.pipe(f"{out}/tiny-000005.parquet", data)
    fs.pipe(f"{out}/_manifest/tiny-000005.json", json.dumps(newer).encode())
    shards, summary = resume(settings)
    assert summary.committed_before == N and shards.commits.records_read == 1
    assert list_manifest(settings.output).indexes == [1]  # run_job's closing rewrite; generation 0 gone
    assert read_index(settings.output, 1)["tiny-000005"].row_groups == (7,)
    assert TokenDataset(settings.output).num_rows == rows_before - records["tiny-000005"]["rows"] + 7

    # a deleted commit record: that shard is uncommitted (the run redoes it), the index drops it
    record9 = fs.cat(f"{out}/_manifest/tiny-000009.json")
    fs.rm(f"{out}/_manifest/tiny-000009.json")
    shards, _ = plan(settings)
    assert list(uncommitted(shards, shards.commits)) == [f"s3://{BUCKET}/shards/tiny-000009.tar"]
    assert shards.commits.stale and CommitIndex(shards.commits).flush()  # as run_job's closing rewrite
    rebuilt = read_index(settings.output, 2)
    assert len(rebuilt) == N - 1 and "tiny-000009" not in rebuilt
    fs.pipe(f"{out}/_manifest/tiny-000009.json", record9)

    # a corrupt index: ignored, every record read (as an old directory without one), rebuilt at the end
    fs.pipe(f"{out}/_manifest/_index-000000002.parquet", b"PAR1 not really")
    shards, summary = resume(settings)
    assert summary.committed_before == N and shards.commits.records_read == N
    assert len(read_index(settings.output, 3)) == N and list_manifest(settings.output).indexes == [3]


@pytest.mark.slow
def test_input_identities_come_from_listing_pages_in_any_order(moto, store):
    """Identities read beside the listing, as a resume reads them: URLs in key order cost the pages
    they span (from the first one on), URLs out of order one whole listing; either way each identity is
    what a metadata request for that shard says."""
    _, proxy = moto
    urls = [f"s3://{BUCKET}/shards/tiny-{i:06d}.tar" for i in range(2500, 2600)]
    truth = {u: shard_identity(u) for u in urls[::10]}
    found, requests = counted(proxy, lambda: dict(identities(urls, {posixpath.dirname(urls[0]): 100})))
    assert requests == {"requests": 1, "GET LIST": 1}  # one LIST page: it starts at tiny-002500
    assert all(found[u] == truth[u] for u in truth) and list(found) == urls
    backwards = urls[::-1] + [f"s3://{BUCKET}/shards/tiny-000003.tar"]
    found, requests = counted(proxy, lambda: dict(identities(backwards, {posixpath.dirname(urls[0]): 101})))
    assert requests["requests"] <= math.ceil(N / 1000) + 2, requests  # the first page, then the whole listing
    assert all(found[u] == truth[u] for u in truth) and list(found) == backwards
    assert found[backwards[-1]] == shard_identity(backwards[-1])


def store_meta(settings):
    """The token files' `gq` metadata, read from one of them."""
    return TokenDataset(f"{settings.output}/tiny-000000.parquet").metadata


def local_dir(tmp_path, checkpoint, n=30):
    """n committed shards in a local DIR written by the job's own record writer, and no index (a directory
    from before the index)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(n):
        (inputs / f"s-{i:03d}.tar").write_bytes(f"shard {i}".encode())
    settings = settings_for(str(inputs), str(tmp_path / "out"), checkpoint)
    shards, run = plan(settings)
    prepare_output(settings, run)
    provenance = Provenance(gq.describe(checkpoint), checkpoint, SIZE, run["preprocessing"])
    for i, url in enumerate(shards):
        stem = f"s-{i:03d}"
        data, _ = token_file(stem, 2, provenance.file_metadata(), i)
        (tmp_path / "out" / f"{stem}.parquet").write_bytes(data)
        record = commit(stem, url, b"", 2, data, provenance.fingerprints())
        record["shard_identity"] = shard_identity(url)  # a local file's: size and mtime
        write_commit_record(settings.output, stem, record)
    return settings


def test_old_directory_gains_an_index_and_a_corrupt_one_is_rebuilt(tmp_path, small_checkpoint):
    settings = local_dir(tmp_path, small_checkpoint)
    out = settings.output
    shards, summary = resume(settings)  # no index: every record read, as before the index
    assert summary.committed_before == 30 and shards.commits.records_read == 30
    assert list_manifest(out).indexes == [0]  # ... and the run leaves one
    indexed = load_commits(out)
    assert indexed.records_read == 0 and not indexed.stale and indexed.entries == shards.commits.entries

    index = tmp_path / "out" / "_manifest" / "_index-000000000.parquet"
    other = io.BytesIO()
    pq.write_table(pa.table({"stem": [f"s-{i:03d}" for i in range(30)]}), other)
    for junk in (b"not parquet", index.read_bytes()[:-20], other.getvalue()):
        index.write_bytes(junk)  # unreadable, cut short, or a Parquet file of another schema: not trusted
        commits = load_commits(out)
        assert commits.records_read == 30 and commits.stale and commits.entries == indexed.entries
    shards, _ = resume(settings)
    assert list_manifest(out).indexes == [1] and load_commits(out).records_read == 0  # rebuilt

    # a changed input: the same refusal with the index as without it
    (tmp_path / "in" / "s-004.tar").write_bytes(b"other bytes!")
    with pytest.raises(ValueError) as with_index:
        plan(settings)
    (tmp_path / "out" / "_manifest" / "_index-000000001.parquet").unlink()
    with pytest.raises(ValueError) as without:
        plan(settings)
    assert str(with_index.value) == str(without.value) and "size 7 != 12" in str(without.value)


def test_readers_plan_from_the_index_as_from_the_footers(tmp_path, small_checkpoint):
    settings = local_dir(tmp_path, small_checkpoint, n=12)
    out = settings.output
    resume(settings)  # the index
    assert list_manifest(out).indexes == [0]
    indexed, footers = TokenDataset(out, seed=3), TokenDataset(f"{out}/*.parquet", seed=3)  # glob: no index
    assert indexed.units == footers.units and indexed.metadata == footers.metadata
    assert [t.tolist() for t in indexed] == [t.tolist() for t in footers]
    a = export_flat(out, str(tmp_path / "a"), offset=2, bos=1)
    b = export_flat(f"{out}/*.parquet", str(tmp_path / "b"), offset=2, bos=1)
    assert a == b and (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert a["sequences"] == 24
