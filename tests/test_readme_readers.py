"""The README's "Reading tokens for training" block, run as written on real token files; what each
reader (our TokenDataset, Ray Data, Hugging Face datasets, Polars, DuckDB, the flat export) hands back is
compared with the tokens written."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from pipeline.io import write_atomic
from pipeline.tokens.writer import parquet_bytes, token_table

README = Path(__file__).resolve().parents[1] / "README.md"
K, GRID = 65536, (32, 32)  # 1024 tokens per image, as the README's comments say (256 px, 0.25 bpp)
LENGTH = GRID[0] * GRID[1]
# more than the README's 64-row slices, and a shard whose every sample was skipped (a file of 0 rows)
ROWS = {"train-000000": 70, "train-000001": 45, "train-000002": 0}
OFFSET, BOS, EOS = 3, 1, 2  # the README's arguments

pytestmark = pytest.mark.slow


def readme_block(heading: str) -> str:
    section = README.read_text().split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


CAPTIONS = ["a cat", "", "café, 猫 🐱", None, "two\nlines"]  # None: missing or not UTF-8


def row_columns(n: int, offset: int) -> dict:
    """The columns after `tokens` of a `--keep txt,json` run: width, height, txt, json (row values)."""
    rows = range(offset, offset + n)
    return {
        pa.field("width", pa.int32()): [300 + 53 * (i % 7) for i in rows],
        pa.field("height", pa.int32()): [256 + i for i in rows],
        pa.field("txt", pa.string()): [CAPTIONS[i % len(CAPTIONS)] for i in rows],
        pa.field("json", pa.string()): [None if i % 6 == 5 else json.dumps({"url": f"u{i}"}) for i in rows],
    }


def write_token_dir(directory: Path) -> np.ndarray:
    """Token files as the tokenize job writes them; returns every row's tokens in file order."""
    meta = {
        "codebook": {"kind": "sobol", "size": K, "dim": 16, "seed": 42},
        "codebook_fingerprint": "f" * 64,
        "groups": 1,
        "layout": "interleaved",
        "token_grid": list(GRID),
        "tokens_per_image": LENGTH,
        "model_sha256": "0" * 64,
    }
    rng = np.random.default_rng(0)
    rows = []
    offset = 0
    for stem, n in ROWS.items():
        tokens = rng.integers(0, K, (n, LENGTH))
        tokens[:1, :2] = (0, K - 1)  # both ends of uint16
        keys = [f"{stem}/{i:04d}" for i in range(n)]
        labels = [i % 5 for i in range(n)]
        table = token_table(keys, stem, list(range(n)), labels, tokens, K, meta, row_columns(n, offset))
        offset += n
        write_atomic(str(directory / "tokens" / f"{stem}.parquet"), parquet_bytes(table, row_group_size=16))
        rows.append(tokens)
    (directory / "tokens" / "_manifest").mkdir()
    return np.concatenate(rows)


def as_sorted_rows(a: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(map(tuple, np.asarray(a).tolist()))


def test_readme_reading_block_runs_and_every_reader_returns_the_written_tokens(tmp_path, monkeypatch):
    expected = write_token_dir(tmp_path)
    framed = np.concatenate(
        [np.full((len(expected), 1), BOS), expected + OFFSET, np.full((len(expected), 1), EOS)], axis=1
    )
    monkeypatch.chdir(tmp_path)  # the block uses relative paths
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray Data starts its own cluster, never joins another
    for var in ("HF_HOME", "HF_DATASETS_CACHE"):  # the datasets cache stays inside tmp_path
        monkeypatch.setenv(var, str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    namespace = {"epochs": 2}
    try:
        exec(compile(readme_block("Reading tokens for training"), str(README), "exec"), namespace)

        # TokenDataset: every row once per epoch, framed and shifted as asked
        got = np.stack([t.numpy() for t in namespace["ds"]])
        assert got.dtype == np.int64 and got.shape == (len(expected), LENGTH + 2)
        assert as_sorted_rows(got) == as_sorted_rows(framed)

        # Ray Data: int64 (batch, 1024) tensors (the block's last batch, then all of them), every row once
        last = namespace["batch"]["tokens"]
        assert last.dtype == torch.int64 and last.shape == (len(expected) % 64, LENGTH)
        batches = [
            b["tokens"] for b in namespace["ray_ds"].iter_torch_batches(batch_size=64, dtypes=torch.int64)
        ]
        assert all(b.dtype == torch.int64 and b.shape[1] == LENGTH for b in batches)
        assert as_sorted_rows(torch.cat(batches).numpy()) == as_sorted_rows(expected)
    finally:
        ray.shutdown()

    columns = {f.name: v for f, v in row_columns(len(expected), 0).items()}  # every row, in file order
    ray_rows = sorted((r["width"], repr(r["txt"])) for r in namespace["ray_rows"])  # any block order
    assert ray_rows == sorted(zip(columns["width"], map(repr, columns["txt"])))

    # Hugging Face datasets: the first 64 rows, in file order, as int64
    first = namespace["first"]
    assert isinstance(first, torch.Tensor) and first.dtype == torch.int64
    np.testing.assert_array_equal(first.numpy(), expected[:64])
    assert len(namespace["hf_ds"]) == len(expected)
    assert namespace["hf_captions"] == columns["txt"][:64]

    # Polars: (rows, 1024) uint16 in file order
    array = namespace["array"]
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, expected)
    large = [i for i, w in enumerate(columns["width"]) if w >= 512]
    assert namespace["large"]["txt"].to_list() == [columns["txt"][i] for i in large]
    assert namespace["large"]["json"].to_list() == [columns["json"][i] for i in large]

    # DuckDB: the rows per shard
    assert namespace["per_shard"] == [(stem, n) for stem, n in ROWS.items() if n]
    keys = [f"{stem}/{i:04d}" for stem, n in ROWS.items() for i in range(n)]
    want = [
        (k, t, w, h)
        for k, t, w, h in zip(keys, columns["txt"], columns["width"], columns["height"])
        if t is not None
    ]
    assert namespace["captioned"] == sorted(want)

    # Flat export: sequence i is row i framed, in file order
    tokens, offsets = namespace["tokens"], namespace["offsets"]
    assert len(offsets) == len(expected) + 1
    for i in (0, 1, len(expected) - 1):
        np.testing.assert_array_equal(np.asarray(tokens[offsets[i] : offsets[i + 1]]), framed[i])
    assert offsets[-1] == framed.size
    assert tokens.dtype == np.uint32  # K = 2^16 ids shifted by 3 no longer fit uint16, as the README says
