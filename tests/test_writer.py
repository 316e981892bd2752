"""Token files: schema, metadata, atomic writes, and read-back by independent readers (pyarrow, DuckDB)."""

import json
import os

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.data.tar_reader import DEFAULT_MAX_MEMBER_BYTES
from pipeline.io import join, write_atomic
from pipeline.tokens.records import (
    RunMismatch,
    check_run,
    clear_outputs,
    committed_stems,
    read_run,
    write_commit_record,
    write_run,
)
from pipeline.tokens.writer import parquet_bytes, read_metadata, token_table


def _table(k: int, rows: int = 5, length: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, k, size=(rows, length))
    tokens[0, 0] = k - 1  # the largest index must survive the narrow type
    keys = [f"n01440764_{i:06d}" for i in range(rows)]
    labels = [i if i % 2 else None for i in range(rows)]
    meta = {"codebook_fingerprint": "abc", "token_grid": [2, 2], "groups": 3}
    return token_table(keys, "train-000000", list(range(rows)), labels, tokens, k, meta), tokens


@pytest.mark.parametrize(
    "k, arrow_type", [(65536, pa.uint16()), (65537, pa.uint32()), (1 << 20, pa.uint32())]
)
def test_schema_and_values(tmp_path, k, arrow_type):
    table, tokens = _table(k)
    url = str(tmp_path / "out" / "train-000000.parquet")
    write_atomic(url, parquet_bytes(table))
    back = pq.read_table(url)
    assert back.schema.field("tokens").type == pa.list_(arrow_type, 12)
    assert back.schema.field("index").type == pa.int32()
    assert back.schema.field("label").type == pa.int64()
    np.testing.assert_array_equal(np.stack(back.column("tokens").to_pylist()), tokens)
    assert back.column("label").to_pylist() == [None, 1, None, 3, None]
    assert read_metadata(url)["codebook_fingerprint"] == "abc"
    assert pq.ParquetFile(url).metadata.row_group(0).column(0).compression == "ZSTD"
    assert os.listdir(tmp_path / "out") == ["train-000000.parquet"]  # no temporary left behind


def test_out_of_range_tokens_refused():
    with pytest.raises(ValueError, match="outside"):
        token_table(["a"], "s", [0], [None], np.array([[70000]]), 65536, {})


def test_read_back_by_duckdb_and_pyarrow_dataset(tmp_path):
    for i in range(3):
        table, _ = _table(65536, rows=4, seed=i)
        table = table.set_column(1, "shard", pa.array([f"train-{i:06d}"] * 4))
        write_atomic(str(tmp_path / f"train-{i:06d}.parquet"), parquet_bytes(table))
    dataset = ds.dataset(str(tmp_path), format="parquet")
    assert dataset.count_rows() == 12
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT shard, count(*), max(len(tokens)) FROM read_parquet('{tmp_path}/*.parquet') GROUP BY shard "
        "ORDER BY shard"
    ).fetchall()
    assert rows == [(f"train-{i:06d}", 4, 12) for i in range(3)]
    first = con.execute(
        f"SELECT tokens FROM read_parquet('{tmp_path}/train-000001.parquet') LIMIT 1"
    ).fetchone()
    np.testing.assert_array_equal(
        first[0], np.stack(pq.read_table(tmp_path / "train-000001.parquet")["tokens"].to_pylist())[0]
    )


def test_manifest_and_run_records(tmp_path):
    out = str(tmp_path / "tokens")
    assert committed_stems(out) == set() and read_run(out) is None
    write_commit_record(out, "train-000003", {"rows": 3})
    write_commit_record(out, "train-000001", {"rows": 1})
    assert committed_stems(out) == {"train-000001", "train-000003"}
    run = {
        "model_sha256": "m",
        "codebook_fingerprint": "c",
        "quantizer": {},
        "image_size": 64,
        "preprocessing": {},
    }
    write_run(out, run)
    check_run(read_run(out), dict(run, settings={"actors": 3}))  # throughput settings may differ
    with pytest.raises(RunMismatch, match="model_sha256"):
        check_run(read_run(out), dict(run, model_sha256="other"))
    with pytest.raises(RunMismatch, match="image_size"):
        check_run(read_run(out), dict(run, image_size=128))
    # a record written before max_member_bytes existed resumes under the default, not under another limit
    check_run(read_run(out), dict(run, preprocessing={"max_member_bytes": DEFAULT_MAX_MEMBER_BYTES}))
    with pytest.raises(RunMismatch, match="preprocessing"):
        check_run(read_run(out), dict(run, preprocessing={"max_member_bytes": 1024}))
    write_atomic(join(out, "train-000001.parquet"), b"x")
    (tmp_path / "tokens" / "notes.txt").write_text("user file")
    assert clear_outputs(out) == 4
    assert sorted(os.listdir(out)) == ["_manifest", "notes.txt"]


def test_memory_filesystem_single_put():
    out = "memory://writer-test/tokens"
    table, tokens = _table(65536)
    write_atomic(join(out, "a.parquet"), parquet_bytes(table))
    write_commit_record(out, "a", {"rows": 5})
    assert committed_stems(out) == {"a"}
    with fsspec.open(join(out, "a.parquet"), "rb") as f:
        np.testing.assert_array_equal(np.stack(pq.read_table(f)["tokens"].to_pylist()), tokens)
    assert json.loads(fsspec.open(join(out, "_manifest", "a.json"), "rb").open().read()) == {"rows": 5}
    fsspec.filesystem("memory").rm("/writer-test", recursive=True)
