"""The README's "Reading tokens for training" block, run as written on real token files; what each
reader (our TokenDataset, Ray Data, Hugging Face datasets, Polars, DuckDB, the flat export) hands back is
compared with the tokens written."""

import json
import re
import shlex
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
# The layout "From an image folder to a token dataset" builds (test_readme_layout_is_the_one_read checks
# it against that section's commands): tokens/train, two views a sample, labels, more than the README's
# 64-row slices and a shard whose every sample was skipped (a file of 0 rows); tokens/laion, one file
# with the captions and JSON kept.
TRAIN = {"train-000000": 35, "train-000001": 23, "train-000002": 0}  # samples: rows = 2x
LAION_ROWS = 70
OFFSET, BOS, EOS = 3, 1, 2  # the README's arguments
OUTPUTS = {"tokens/train": ["--views", "flip"], "tokens/laion": ["--keep", "txt,json"]}

pytestmark = pytest.mark.slow


def section(heading: str) -> str:
    return README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def readme_block(heading: str, kind: str = "python") -> str:
    return re.search(rf"```{kind}\n(.*?)```", section(heading), re.S).group(1)


CAPTIONS = ["a cat", "", "café, 猫 🐱", None, "two\nlines"]  # None: missing or not UTF-8


def laion_columns(n: int) -> dict:
    """The columns after `tokens` of a `--keep txt,json` run: width, height, txt, json (row values)."""
    return {
        pa.field("width", pa.int32()): [300 + 53 * (i % 7) for i in range(n)],
        pa.field("height", pa.int32()): [256 + i for i in range(n)],
        pa.field("txt", pa.string()): [CAPTIONS[i % len(CAPTIONS)] for i in range(n)],
        pa.field("json", pa.string()): [
            None if i % 6 == 5 else json.dumps({"url": f"u{i}"}) for i in range(n)
        ],
    }


def metadata(**preprocessing) -> dict:
    return {
        "codebook": {"kind": "sobol", "size": K, "dim": 16, "seed": 42},
        "codebook_fingerprint": "f" * 64,
        "groups": 1,
        "layout": "interleaved",
        "token_grid": list(GRID),
        "tokens_per_image": LENGTH,
        "model_sha256": "0" * 64,
        "preprocessing": {"source_size": True, **preprocessing},
    }


def write_file(folder: Path, stem: str, keys, index, labels, tokens, meta, extra) -> None:
    table = token_table(keys, stem, index, labels, tokens, K, meta, extra)
    write_atomic(str(folder / f"{stem}.parquet"), parquet_bytes(table, row_group_size=16))


def write_token_dirs(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """tokens/train and tokens/laion as the tokenize job writes them; every row's tokens in file order."""
    rng = np.random.default_rng(0)
    train = []
    meta = metadata(views="flip", view_names=["center", "center mirrored"], keep=[])
    for stem, n in TRAIN.items():
        tokens = rng.integers(0, K, (2 * n, LENGTH))
        tokens[:1, :2] = (0, K - 1)  # both ends of uint16
        keys = [f"{stem}/{i:04d}" for i in range(n) for _ in (0, 1)]
        index = [i for i in range(n) for _ in (0, 1)]
        extra = {pa.field("view", pa.int8(), nullable=False): [0, 1] * n,
                 pa.field("width", pa.int32()): [320] * 2 * n,
                 pa.field("height", pa.int32()): [256] * 2 * n}  # fmt: skip
        write_file(
            directory / "tokens" / "train", stem, keys, index, [i % 5 for i in index], tokens, meta, extra
        )
        train.append(tokens)
    laion = rng.integers(0, K, (LAION_ROWS, LENGTH))
    keys = [f"{i:09d}" for i in range(LAION_ROWS)]
    meta = metadata(views="center", view_names=["center"], keep=["txt", "json"])
    extra = laion_columns(LAION_ROWS)
    write_file(directory / "tokens" / "laion", "00000", keys, list(range(LAION_ROWS)), [None] * LAION_ROWS,
               laion, meta, extra)  # fmt: skip
    for name in ("train", "laion"):
        (directory / "tokens" / name / "_manifest").mkdir()
    return np.concatenate(train), laion


def test_readme_layout_is_the_one_read():
    """The folders the reading snippets name are the ones the section before writes, with the views and
    kept members this test's files have (a snippet reading `tokens/` would find no token file there)."""
    outputs = {}
    for line in (
        readme_block("From an image folder to a token dataset", "bash").replace("\\\n", " ").splitlines()
    ):
        argv = shlex.split(line.split("#", 1)[0])
        if argv[1:2] == ["jobs/tokenize.py"]:
            outputs[argv[argv.index("--output") + 1]] = argv
    assert sorted(outputs) == sorted(OUTPUTS)
    for output, option in OUTPUTS.items():
        assert " ".join(option) in " ".join(outputs[output])
    for heading in ("Reading tokens for training", "From an image folder to a token dataset"):
        read = re.findall(r"[\"']((?:tokens|flat)/[^\"']*)", readme_block(heading))
        assert read and all(p.split("/")[:2] in (["tokens", "train"], ["tokens", "laion"], ["flat", "train"])
                            for p in read), read  # fmt: skip


def as_sorted_rows(a: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(map(tuple, np.asarray(a).tolist()))


def test_readme_reading_block_runs_and_every_reader_returns_the_written_tokens(tmp_path, monkeypatch):
    expected, laion = write_token_dirs(tmp_path)
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

    columns = {f.name: v for f, v in laion_columns(LAION_ROWS).items()}  # every laion row, in file order
    ray_rows = sorted((r["width"], repr(r["txt"])) for r in namespace["ray_rows"])  # any block order
    assert ray_rows == sorted(zip(columns["width"], map(repr, columns["txt"])))

    # TokenDataset with the kept columns, batched by the block's collate
    batches = list(namespace["caption_batches"])
    assert [len(b) for b in batches] == [64, LAION_ROWS - 64]
    items = [item for b in batches for item in b]
    assert [(d["txt"], d["width"], d["height"]) for d in items] == list(
        zip(columns["txt"], columns["width"], columns["height"])
    )
    np.testing.assert_array_equal(np.stack([d["tokens"].numpy() for d in items]), laion)

    # Hugging Face datasets: the first 64 rows, in file order, as int64
    first = namespace["first"]
    assert isinstance(first, torch.Tensor) and first.dtype == torch.int64
    np.testing.assert_array_equal(first.numpy(), expected[:64])
    assert len(namespace["hf_ds"]) == len(expected)
    assert namespace["hf_captions"] == columns["txt"][:64]

    # Polars: (rows, 1024) uint16 in file order
    array = namespace["array"]
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, laion)
    large = [i for i, w in enumerate(columns["width"]) if w >= 512]
    assert namespace["large"]["txt"].to_list() == [columns["txt"][i] for i in large]
    assert namespace["large"]["json"].to_list() == [columns["json"][i] for i in large]

    # DuckDB: the rows per shard, and the captioned rows
    assert namespace["per_shard"] == [(stem, 2 * n) for stem, n in TRAIN.items() if n]
    keys = [f"{i:09d}" for i in range(LAION_ROWS)]
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


def test_readme_tokenizing_shards_block_reads_its_own_output(tmp_path, monkeypatch):
    """ "Tokenizing shards" writes `--output tokens/` and reads `tokens/` back: run on such a folder."""
    expected, _ = write_token_dirs(tmp_path / "built")
    (tmp_path / "tokens").mkdir()
    for path in (tmp_path / "built" / "tokens" / "train").glob("*.parquet"):
        path.rename(tmp_path / "tokens" / path.name)
    monkeypatch.chdir(tmp_path)
    code = readme_block("Tokenizing shards")
    assert code.count("\n") == 4  # two reads, kept as expressions: assign them to check their values
    namespace: dict = {}
    code = code.replace("\nds.dataset", "\ntable = ds.dataset").replace("\nduckdb.sql", "\nrows = duckdb.sql")
    exec(compile(code, str(README), "exec"), namespace)
    assert as_sorted_rows(
        np.stack(namespace["table"]["tokens"].to_numpy(zero_copy_only=False))
    ) == as_sorted_rows(expected)
    assert len(namespace["rows"].fetchall()) == 5
