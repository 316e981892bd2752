"""A token directory written by the code before the pipeline/ layout resumes, reads back and matches."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from shardmaker import make_shard

from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "tokens-before-layout"
SHARD = REPO / "assets" / "samples" / "photos-000000.tar"
DEMO = REPO / "assets" / "demo" / "gq-small-f8c16-0.25bpp-tdc.safetensors"
pytestmark = pytest.mark.slow


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_old_directory_resumes_reads_back_and_tokens_are_bit_identical(tmp_path):
    tokens, inputs = tmp_path / "tokens", tmp_path / "in"
    shutil.copytree(FIXTURE, tokens, ignore=shutil.ignore_patterns("README.md"))
    inputs.mkdir()
    # the same shard as when the directory was written: same bytes, and its recorded URL and mtime here
    record_path = tokens / "_manifest" / "photos-000000.json"
    record = json.loads(record_path.read_text())
    shard = inputs / "photos-000000.tar"
    shutil.copyfile(SHARD, shard)
    os.utime(shard, (record["shard_identity"]["mtime"],) * 2)
    record["shard"] = record["shard_identity"]["url"] = str(shard)
    record_path.write_text(json.dumps(record))
    make_shard(str(inputs / "extra-000000.tar"), 3, seed=5)
    old_file = _sha256(tokens / "photos-000000.parquet")

    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "tokenize.py"), "--input", str(inputs), "--output", str(tokens),
         "--checkpoint", str(DEMO), "--image-size", "64", "--batch-size", "4", "--no-progress",
         "--encoder-precision", "float32"],
        capture_output=True, text=True, cwd=REPO, timeout=300, start_new_session=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2/2 committed (1 before this run, 1 now" in done.stdout
    assert _sha256(tokens / "photos-000000.parquet") == old_file  # resumed, not redone

    # the resumed run writes the old columns (no width/height), so every reader sees one schema
    assert (
        pq.read_schema(tokens / "extra-000000.parquet").names
        == pq.read_schema(FIXTURE / "photos-000000.parquet").names
    )
    table = ds.dataset(str(tokens), format="parquet").to_table()  # both generations read back as one
    assert sorted(set(table["shard"].to_pylist())) == ["extra-000000", "photos-000000"]
    assert table.num_rows == 8 + 3

    fresh = ShardTokenizer(str(DEMO), TokenizeOptions(image_size=64, batch_size=4)).tokenize_shard(str(SHARD))
    old = pq.read_table(FIXTURE / "photos-000000.parquet")
    assert old["key"].to_pylist() == fresh.keys
    np.testing.assert_array_equal(np.stack(old["tokens"].to_pylist()), fresh.tokens)
