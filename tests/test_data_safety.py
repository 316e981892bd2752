"""Nothing lost, nothing wrongly kept (issue 12), without Ray: the output directory's safety (overwrite,
foreign files, shard identity on resume), one-line argument errors, shard failures, the summary's counts,
progress inside a shard, and the memory bound of a compressed multi-GiB member."""

import json
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from shardmaker import make_shard, shard_samples

from jobs import tokenize
from pipeline.data import stages as stages_module
from pipeline.data.samples import MEMBER_TOO_LARGE, TAR_TRUNCATED, ShardUnreadable, iter_samples
from pipeline.pack.shard_writer import write_shard
from pipeline.tokenize.plan import plan, prepare_output
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions
from pipeline.tokenize.settings import JobSettings
from pipeline.tokenize.summary import JobSummary
from pipeline.tokens.records import commit_record_url, read_commit_record

REPO = Path(__file__).resolve().parents[1]
OPTS = TokenizeOptions(image_size=64, batch_size=4, decode_threads=0)


def settings(inp, out, ckpt, **kw):
    return JobSettings(input=str(inp), output=str(out), checkpoint=ckpt, options=OPTS, progress=False, **kw)


def tokenize_main(capsys, *argv):
    """jobs/tokenize.py's main in-process (argument errors answer before Ray starts): (exit code, stderr)."""
    code = tokenize.main(["--image-size", "64", "--no-progress", *map(str, argv)])
    return code, capsys.readouterr().err


@pytest.fixture
def worker(small_checkpoint):
    return ShardTokenizer(small_checkpoint, OPTS)


def test_overwrite_deletes_only_what_runs_recorded(tmp_path, small_checkpoint, worker):
    shard = tmp_path / "in" / "train-000000.tar"
    make_shard(str(shard), 3, seed=1)
    out = tmp_path / "tokens"
    first = settings(shard, out, small_checkpoint)
    prepare_output(first, plan(first)[1])
    worker.process(str(shard), str(out))
    theirs = {"notes.parquet": b"a user's own table", "README.txt": b"mine", "sub/keep.parquet": b"x"}
    for name, data in theirs.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    again = settings(shard, out, small_checkpoint, on_existing="overwrite")
    _, run = plan(again)
    ours = {"_run.json", "train-000000.parquet", "_manifest/train-000000.json"}
    assert all((out / p).exists() for p in ours)
    prepare_output(again, run)
    assert {n: (out / n).read_bytes() for n in theirs} == theirs  # untouched
    assert (
        not (out / "train-000000.parquet").exists() and not (out / "_manifest" / "train-000000.json").exists()
    )
    assert json.loads((out / "_run.json").read_text())["settings"]["on_existing"] == "overwrite"


def test_nonempty_output_without_our_run_record_is_refused(tmp_path, small_checkpoint, capsys):
    shard = tmp_path / "train-000000.tar"
    make_shard(str(shard), 2, seed=2)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.parquet").write_bytes(b"someone's data")
    for mode in ("skip", "overwrite"):
        code, err = tokenize_main(capsys, "--input", shard, "--output", out, "--checkpoint", small_checkpoint,
                                  "--on-existing", mode)  # fmt: skip
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "holiday.parquet" in err and "--allow-nonempty-output" in err
    assert (out / "holiday.parquet").read_bytes() == b"someone's data"
    allowed = settings(shard, out, small_checkpoint, on_existing="overwrite", allow_nonempty_output=True)
    prepare_output(allowed, plan(allowed)[1])
    assert sorted(p.name for p in out.iterdir()) == ["_run.json", "holiday.parquet"]


def test_resume_refuses_a_committed_stem_that_names_another_shard(tmp_path, small_checkpoint, worker):
    a, b = tmp_path / "a" / "train-000000.tar", tmp_path / "b" / "train-000000.tar"
    make_shard(str(a), 3, seed=3)
    make_shard(str(b), 4, seed=4, start_key=50)
    out = tmp_path / "tokens"
    s = settings(a, out, small_checkpoint)
    prepare_output(s, plan(s)[1])
    record = worker.process(str(a), str(out))
    assert record["shard_identity"] == {"url": str(a), "size": a.stat().st_size, "mtime": a.stat().st_mtime}
    assert plan(s)[0] == [str(a)]  # the same shard resumes

    with pytest.raises(ValueError, match=f"train-000000 .*url '{a}' != '{b}'"):
        plan(settings(b, out, small_checkpoint))  # same stem, another directory: refused, not skipped
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))  # rewritten in place
    with pytest.raises(ValueError, match="mtime"):
        plan(s)
    assert len(plan(settings(a, out, small_checkpoint, on_existing="overwrite"))[0]) == 1

    # a commit record written before records carried an identity is compared by URL
    old = {k: v for k, v in record.items() if k != "shard_identity"}
    Path(commit_record_url(str(out), "train-000000")).write_text(json.dumps(old))
    assert plan(s)[0] == [str(a)]
    with pytest.raises(ValueError, match="url"):
        plan(settings(b, out, small_checkpoint))


def test_bad_paths_are_one_line_errors(tmp_path, small_checkpoint, capsys):
    shard = tmp_path / "train-000000.tar"
    make_shard(str(shard), 1, seed=5)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (tmp_path / "out", tmp_path, "is a directory"),  # the checkpoint
        (a_file, small_checkpoint, "is a file"),
        (a_file / "sub" / "out", small_checkpoint, f"lies under the file {a_file}"),
    ]
    for out, ckpt, message in cases:
        code, err = tokenize_main(capsys, "--input", shard, "--output", out, "--checkpoint", ckpt)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "x"


def gzip_with_bad_crc(path, samples):
    write_shard(str(path), samples)
    data = path.read_bytes()
    path.write_bytes(data[:-8] + bytes([data[-8] ^ 1]) + data[-7:])


@pytest.mark.parametrize("case", ["html", "zero_byte", "bad_gzip", "gzip_crc"])
def test_unreadable_shards_fail_and_are_not_committed(tmp_path, worker, case):
    out = tmp_path / "tokens"
    path = tmp_path / ("shard.tar.gz" if "gzip" in case else "shard.tar")
    if case == "html":
        path.write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n" * 20)
    elif case == "zero_byte":
        path.write_bytes(b"")
    elif case == "bad_gzip":
        path.write_bytes(b"\x1f\x8b\x08\x00garbage" * 100)
    else:
        gzip_with_bad_crc(path, shard_samples(3, seed=6))
    with pytest.raises(ShardUnreadable):
        worker.process(str(path), str(out))
    assert not (out / "_manifest").exists() and not (out / "shard.parquet").exists()


def test_summary_counts_samples_by_reason_and_names_truncated_shards(tmp_path, worker):
    shard = tmp_path / "train-000000.tar"
    write_shard(str(shard), shard_samples(4, seed=7) + [{"__key__": "bad", "jpg": b"<html>"}])
    with tarfile.open(shard) as tar:
        cut_at = tar.getmember(shard_samples(4, seed=7)[2]["__key__"] + ".jpg").offset  # a header boundary
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(shard.read_bytes()[:cut_at])
    summary = JobSummary(shards_total=2)
    for path in (shard, cut):
        summary.add(worker.process(str(path), str(tmp_path / "tokens")))
    record = read_commit_record(str(tmp_path / "tokens"), "cut-000000")
    # the cut shard: sample 0 a row, sample 1 (its members may continue past the cut) a truncation skip
    assert record["rows"] == 1 and record["skipped_by_reason"] == {TAR_TRUNCATED: 1}
    assert summary.rows == 4 + 1
    assert dict(summary.skipped) == {"not an image": 1, TAR_TRUNCATED: 1}  # samples, not shard events
    text = summary.format()
    assert "samples skipped: 2 (not an image: 1, tar truncated: 1)" in text
    assert "TRUNCATED cut-000000: samples after the cut are lost" in text
    assert "TRUNCATED train-000000" not in text
    summary.failed["html-000000"] = "ShardUnreadable: not a tar archive"
    assert summary.exit_code == 1 and "FAILED html-000000: not committed" in summary.format()


def test_progress_is_reported_batch_by_batch_inside_a_shard(tmp_path, worker, monkeypatch):
    shard = tmp_path / "train-000000.tar"
    make_shard(str(shard), 10, seed=8)
    read = []  # samples the tokenizer has read from the tar so far

    def counting(stream, **kw):
        for item in iter_samples(stream, **kw):
            read.append(item.key)
            yield item

    monkeypatch.setattr(stages_module, "iter_samples", counting)
    calls = []
    result = worker.tokenize_shard(str(shard), progress=lambda n: calls.append((n, len(read))))
    assert [n for n, _ in calls] == [4, 4, 2] and len(result.keys) == 10
    assert calls[0][1] < 10  # the first report came while the shard was still being read


def zero_bomb_shard(path: Path, size: int) -> list[str]:
    """A .tar.gz (9 MB for 2 GiB) of two good samples, one whose .jpg is `size` zero bytes, one more good
    one. Written by streaming the tar through zlib: the big member never exists in memory here either."""
    good = shard_samples(3, seed=9)
    deflate = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip container; level 1: twice as fast as 9 here
    with open(path, "wb") as f:

        def member(name, data=None, length=None):
            info = tarfile.TarInfo(name)
            info.size = len(data) if data is not None else length
            f.write(deflate.compress(info.tobuf(tarfile.PAX_FORMAT)))
            if data is not None:
                f.write(deflate.compress(data + bytes(-len(data) % 512)))
                return
            zeros = bytes(16 * 1024 * 1024)
            for start in range(0, length, len(zeros)):
                f.write(deflate.compress(zeros[: min(len(zeros), length - start)]))
            f.write(deflate.compress(bytes(-length % 512)))

        for sample in good[:2]:
            member(sample["__key__"] + ".jpg", sample["jpg"])
        member("bomb.jpg", length=size)
        member("bomb.cls", b"1")
        member(good[2]["__key__"] + ".jpg", good[2]["jpg"])
        f.write(deflate.compress(bytes(1024)) + deflate.flush())
    return [s["__key__"] for s in good]


# the whole process: torch, the model, the shard (334-350 MiB measured here; 4.46 GB before the limit)
PEAK_RSS_BOUND_MIB = 512


def test_compressed_multi_gib_member_is_skipped_within_a_memory_bound(tmp_path, small_checkpoint):
    shard = tmp_path / "bomb-000000.tar.gz"
    keys = zero_bomb_shard(shard, 2 * 1024**3)
    assert shard.stat().st_size < 16 * 1024**2
    script = (
        "import json, sys\n"
        "from pipeline.memory import peak_rss_mib\n"
        "from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions\n"
        "w = ShardTokenizer(sys.argv[2], TokenizeOptions(image_size=64, batch_size=4, decode_threads=0))\n"
        "r = w.tokenize_shard(sys.argv[1])\n"
        "print(json.dumps({'keys': r.keys, 'skipped': r.skipped, 'peak': peak_rss_mib()}))\n"
    )
    cmd = [sys.executable, "-c", script, str(shard), small_checkpoint]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["keys"] == keys  # the rest of the shard goes on
    assert [(s["key"], s["index"], s["reason"]) for s in got["skipped"]] == [("bomb", 2, MEMBER_TOO_LARGE)]
    assert f"{2 * 1024**3} bytes > {64 * 1024**2}" in got["skipped"][0]["detail"]
    print(f"peak RSS with a 2 GiB member: {got['peak']} MiB")
    assert got["peak"] < PEAK_RSS_BOUND_MIB
