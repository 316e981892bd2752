"""The downstream reader and the flat exporter, on real token files with several row groups each."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.io import write_atomic
from pipeline.tokens import reader as reader_module
from pipeline.tokens.export import export_flat, open_flat
from pipeline.tokens.reader import TokenDataset, TokenFileMismatch, assign_units, list_token_files
from pipeline.tokens.writer import parquet_bytes, token_table

K, GRID, GROUPS = 65536, (2, 2), 2  # 8 tokens per image
LENGTH = GRID[0] * GRID[1] * GROUPS
ROWS = {"a": 10, "b": 7, "c": 11}  # row groups of 3: 4 + 3 + 4 = 11 work units


def metadata(fingerprint: str = "f" * 64) -> dict:
    return {
        "codebook": {"kind": "sobol", "size": K, "dim": 8, "seed": 42},
        "codebook_fingerprint": fingerprint,
        "groups": GROUPS,
        "layout": "interleaved",
        "token_grid": list(GRID),
        "tokens_per_image": LENGTH,
        "model_sha256": "0" * 64,
    }


def write_tokens(path: str, stem: str, n: int, seed: int, meta: dict) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, K, (n, LENGTH))
    tokens[0, 0] = K - 1  # the largest id, to check dtypes
    keys = [f"{stem}/{i:04d}" for i in range(n)]
    labels = [i % 3 if i % 4 else None for i in range(n)]
    table = token_table(keys, stem, list(range(n)), labels, tokens, K, meta)
    write_atomic(f"{path}/{stem}.parquet", parquet_bytes(table, row_group_size=3))
    return dict(zip(keys, tokens))


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    expected = {}
    for seed, (stem, n) in enumerate(ROWS.items()):
        expected.update(write_tokens(str(d), stem, n, seed, metadata()))
    (d / "_manifest").mkdir()
    (d / "_manifest" / "a.json").write_text("{}")
    (d / "_run.json").write_text("{}")
    return str(d), expected


def keys_and_tokens(items) -> list[tuple[str, list[int]]]:
    return [(item["key"], item["tokens"].tolist()) for item in items]


def test_token_files_are_listed_without_bookkeeping_files(token_dir):
    d, _ = token_dir
    names = [u.rsplit("/", 1)[1] for u in list_token_files(d)]
    assert names == ["a.parquet", "b.parquet", "c.parquet"]
    assert list_token_files(f"{d}/[ab].parquet") == list_token_files(d)[:2]
    assert list_token_files([f"{d}/c.parquet", d]) == list_token_files(d)[2:] + list_token_files(d)[:2]
    assert pq.ParquetFile(f"{d}/a.parquet").num_row_groups == 4
    with pytest.raises(ValueError, match="no such"):
        list_token_files(f"{d}/missing")


def test_every_row_exactly_once_across_2_ranks_and_2_workers(token_dir):
    d, expected = token_dir
    seen = []
    per_rank = []
    for rank in range(2):
        ds = TokenDataset(d, seed=7, with_meta=True, rank=rank, world_size=2)
        ds.set_epoch(3)
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        got = keys_and_tokens(loader)
        per_rank.append({k for k, _ in got})
        seen.extend(got)
    assert len(seen) == sum(ROWS.values())
    assert sorted(k for k, _ in seen) == sorted(expected)
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    for key, tokens in seen:
        assert tokens == expected[key].tolist()


def test_batches_from_a_dataloader(token_dir):
    d, _ = token_dir
    ds = TokenDataset(d, offset=4, bos=1, eos=2, dtype=torch.int32, with_meta=True)
    batch = next(iter(DataLoader(ds, batch_size=5, num_workers=0)))
    assert batch["tokens"].shape == (5, LENGTH + 2) and batch["tokens"].dtype == torch.int32
    assert len(batch["key"]) == 5 and batch["label"].dtype == torch.int64
    assert ds.vocab_size == K + 4 and ds.sequence_length == LENGTH + 2 and ds.num_rows == 28


def test_units_are_dealt_without_overlap_or_gap():
    for readers in (1, 3, 4, 5, 20):
        shares = [
            assign_units(11, seed=1, epoch=2, shuffle=True, reader=r, readers=readers) for r in range(readers)
        ]
        flat = [u for share in shares for u in share]
        assert sorted(flat) == list(range(11))
    assert assign_units(5, seed=0, epoch=0, shuffle=False, reader=1, readers=2) == [1, 3]


def test_order_is_deterministic_per_seed_and_epoch(token_dir):
    d, expected = token_dir

    def order(seed, epoch, buffer=0):
        ds = TokenDataset(d, seed=seed, shuffle_buffer=buffer, with_meta=True)
        ds.set_epoch(epoch)
        return [item["key"] for item in ds]

    first = order(1, 0)
    assert first == order(1, 0)
    assert sorted(first) == sorted(expected)
    for other in (order(2, 0), order(1, 1)):
        assert other != first and sorted(other) == sorted(first)
    buffered = order(1, 0, buffer=8)
    assert buffered == order(1, 0, buffer=8) and buffered != first and sorted(buffered) == sorted(first)
    unshuffled = [item["key"] for item in TokenDataset(d, shuffle=False, with_meta=True)]
    assert unshuffled == list(expected)  # files in order, rows in file order


def test_offset_bos_eos_and_labels(token_dir):
    d, expected = token_dir
    plain = list(TokenDataset(d, shuffle=False))
    assert plain[0].dtype == torch.int64 and plain[0].tolist() == expected["a/0000"].tolist()
    items = list(TokenDataset(d, shuffle=False, offset=10, bos=0, eos=1, with_meta=True, missing_label=-5))
    first = items[0]
    assert first["tokens"].tolist() == [0] + (expected["a/0000"] + 10).tolist() + [1]
    assert first["tokens"].max() == K - 1 + 10
    assert [it["label"] for it in items[:5]] == [-5, 1, 2, 0, -5]
    assert (first["shard"], first["index"]) == ("a", 0)


def test_distributed_rank_is_taken_from_torch_distributed(token_dir, monkeypatch):
    d, _ = token_dir
    monkeypatch.setattr(reader_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(reader_module.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(reader_module.dist, "get_world_size", lambda: 3)
    ds = TokenDataset(d)
    assert (ds.rank, ds.world_size) == (1, 3)
    with pytest.raises(ValueError, match="both"):
        TokenDataset(d, rank=0)


def test_files_of_different_codebooks_are_refused(token_dir, tmp_path):
    d, _ = token_dir
    write_tokens(str(tmp_path), "other", 4, 9, metadata(fingerprint="e" * 64))
    with pytest.raises(TokenFileMismatch, match="different codebooks"):
        TokenDataset([d, str(tmp_path)])
    with pytest.raises(TokenFileMismatch):
        export_flat([d, str(tmp_path)], str(tmp_path / "flat"))


@pytest.mark.parametrize("offset,bos,eos,dtype", [(0, None, None, np.uint16), (3, 0, 1, np.uint32)])
def test_flat_export_round_trip(token_dir, tmp_path, offset, bos, eos, dtype):
    d, expected = token_dir
    info = export_flat(d, str(tmp_path / "flat"), offset=offset, bos=bos, eos=eos)
    tokens, offsets = open_flat(str(tmp_path / "flat"))
    extra = (bos is not None) + (eos is not None)
    assert isinstance(tokens, np.memmap) and tokens.dtype == dtype
    np.testing.assert_array_equal(offsets, np.arange(len(expected) + 1) * (LENGTH + extra))
    for i, want in enumerate(expected.values()):  # files in order, rows in file order
        seq = tokens[offsets[i] : offsets[i + 1]].astype(np.int64)
        head, body = seq[: bos is not None], seq[bos is not None : len(seq) - (eos is not None)]
        np.testing.assert_array_equal(body, want + offset)
        assert head.tolist() == ([bos] if bos is not None else [])
        if eos is not None:
            assert seq[-1] == eos
    sidecar = json.loads((tmp_path / "flat.json").read_text())
    assert sidecar == json.loads(json.dumps(info))
    assert sidecar["sequences"] == len(expected) and sidecar["vocab_size"] == K + offset
    assert [s["rows"] for s in sidecar["sources"]] == list(ROWS.values())
    assert open_flat(str(tmp_path / "flat.idx"))[1].tolist() == offsets.tolist()


def test_flat_index_is_checked(token_dir, tmp_path):
    d, _ = token_dir
    export_flat(d, str(tmp_path / "flat"))
    with open(tmp_path / "flat.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="its index says"):
        open_flat(str(tmp_path / "flat.bin"))


def test_fsspec_urls(tmp_path):
    url = "memory://gq-reader-test/tokens"
    expected = write_tokens(url, "m", 5, 3, metadata())
    files = list_token_files(url)
    assert len(files) == 1 and files[0].startswith("memory://") and files[0].endswith("tokens/m.parquet")
    got = {item["key"]: item["tokens"].tolist() for item in TokenDataset(url, with_meta=True)}
    assert got == {k: v.tolist() for k, v in expected.items()}
    export_flat(url, str(tmp_path / "flat"))
    tokens, offsets = open_flat(str(tmp_path / "flat"))
    np.testing.assert_array_equal(tokens[offsets[1] : offsets[2]], expected["m/0001"])


def write_view_tokens(path: str, stem: str, samples: int, views: str, seed: int) -> dict:
    """A file as `--views` writes it: V adjacent rows per sample, a `view` column; (key, view) -> tokens."""
    import pyarrow as pa

    from pipeline.data.views import VIEW_SETS

    n = len(VIEW_SETS[views])
    tokens = np.random.default_rng(seed).integers(0, K, (samples * n, LENGTH))
    keys = [f"{stem}/{i:04d}" for i in range(samples) for _ in range(n)]
    index = [i for i in range(samples) for _ in range(n)]
    meta = metadata() | {"preprocessing": {"views": views, "view_names": list(VIEW_SETS[views])}}
    extra = {pa.field("view", pa.int8()): list(range(n)) * samples}
    table = token_table(keys, stem, index, [0] * len(keys), tokens, K, meta, extra)
    write_atomic(f"{path}/{stem}.parquet", parquet_bytes(table, row_group_size=7))  # samples straddle groups
    return {(k, v): t for k, v, t in zip(keys, extra[next(iter(extra))], tokens, strict=True)}


def test_random_view_each_sample_once_per_epoch_over_2_ranks_x_2_workers(tmp_path):
    expected = write_view_tokens(str(tmp_path), "t", 9, "tencrop", 0)
    expected |= write_view_tokens(str(tmp_path), "u", 6, "tencrop", 1)
    samples = sorted({k for k, _ in expected})
    choices = []
    for epoch in (0, 1):
        got = []
        for rank in range(2):
            ds = TokenDataset(str(tmp_path), seed=5, with_meta=True, rank=rank, world_size=2, views="random")
            ds.set_epoch(epoch)
            got += [
                (d["key"], d["view"], d["tokens"].tolist())
                for d in DataLoader(ds, batch_size=None, num_workers=2)
            ]
        assert sorted(k for k, _, _ in got) == samples and ds.num_items == len(samples)  # each exactly once
        for key, view, tokens in got:
            assert tokens == expected[(key, view)].tolist()
        choices.append(dict((k, v) for k, v, _ in got))
    assert choices[0] != choices[1]  # another view choice in the next epoch
    assert all(choices[0][k] != choices[1][k] for k in samples)  # a cycle's epochs never repeat a view
    # deterministic from seed and epoch, whatever the split; over a cycle of 10 epochs every view once
    single = TokenDataset(str(tmp_path), seed=5, with_meta=True, views="random")
    seen = {k: [] for k in samples}
    for epoch in range(10):
        single.set_epoch(epoch)
        picked = {d["key"]: d["view"] for d in single}
        if epoch < 2:
            assert picked == choices[epoch]
        for k, v in picked.items():
            seen[k].append(v)
    assert all(sorted(v) == list(range(10)) for v in seen.values())
    other_seed = TokenDataset(str(tmp_path), seed=6, with_meta=True, views="random")
    assert {d["key"]: d["view"] for d in other_seed} != choices[0]


def test_one_view_or_all_and_flat_export_of_a_view(tmp_path):
    expected = write_view_tokens(str(tmp_path), "f", 5, "flip", 3)
    mirrored = TokenDataset(str(tmp_path), shuffle=False, with_meta=True, views=1)
    assert [(d["key"], d["view"]) for d in mirrored] == [(f"f/{i:04d}", 1) for i in range(5)]
    numpy_view = TokenDataset(str(tmp_path), shuffle=False, with_meta=True, views=np.int64(1))
    assert [(d["key"], d["view"]) for d in numpy_view] == [(f"f/{i:04d}", 1) for i in range(5)]
    every = TokenDataset(str(tmp_path), shuffle=False, with_meta=True)
    assert [(d["key"], d["view"]) for d in every] == sorted(expected)
    with pytest.raises(ValueError, match="2 view"):
        TokenDataset(str(tmp_path), views=2)
    info = export_flat(str(tmp_path), str(tmp_path / "flat" / "v1"), view=1)
    tokens, offsets = open_flat(str(tmp_path / "flat" / "v1"))
    assert info["sequences"] == 5 and info["view"] == 1
    for i in range(5):
        np.testing.assert_array_equal(tokens[offsets[i] : offsets[i + 1]], expected[(f"f/{i:04d}", 1)])


def test_token_files_of_different_shapes_are_refused_at_construction(token_dir, tmp_path):
    """A 64 px and a 128 px run of one model: same codebook, 4x the tokens (issue 26, item 11)."""
    d, _ = token_dir
    big = metadata() | {"token_grid": [4, 4], "tokens_per_image": 4 * 4 * GROUPS}
    tokens = np.random.default_rng(0).integers(0, K, (3, 4 * 4 * GROUPS))
    table = token_table(["x/0", "x/1", "x/2"], "x", [0, 1, 2], [None] * 3, tokens, K, big)
    write_atomic(f"{tmp_path}/x.parquet", parquet_bytes(table))
    with pytest.raises(TokenFileMismatch, match="different token shapes") as info:
        TokenDataset([d, str(tmp_path)])
    message = str(info.value)
    assert "\n" not in message and "32 tokens per image (grid 4x4" in message and "8 tokens" in message


def test_a_file_named_twice_is_read_once(token_dir, tmp_path):
    d, expected = token_dir
    name = d.rstrip("/").rsplit("/", 1)[1]
    (tmp_path / "link").symlink_to(d)
    spellings = [d, f"{d}/../{name}", f"{d}/./", str(tmp_path / "link"), f"file://{d}", f"{d}/a.parquet"]
    ds = TokenDataset(spellings, shuffle=False, with_meta=True)
    assert ds.num_rows == len(expected)
    assert sorted(item["key"] for item in ds) == sorted(expected)  # every row once
    assert len(list_token_files(spellings)) == 3


@pytest.mark.parametrize(
    "arguments",
    [{"seed": -5}, {"seed": 1.5}, {"shuffle_buffer": -1}, {"offset": -3}, {"bos": -1}, {"eos": "2"},
     {"shuffle": "yes"}, {"with_meta": 1}, {"missing_label": None}, {"views": -1}, {"views": "mirror"},
     {"dtype": torch.float32}, {"rank": 0}, {"rank": 2, "world_size": 2}, {"rank": 0, "world_size": 0},
     {"columns": "txt"}, {"columns": ["width", "width"]}, {"columns": ["tokens"]}],
)  # fmt: skip
def test_arguments_are_checked_before_any_file_is_read(arguments, tmp_path):
    missing = str(tmp_path / "not-there")  # a bad argument is named even before the files are looked at
    with pytest.raises(ValueError) as info:
        TokenDataset(missing, **arguments)
    message = str(info.value)
    assert "\n" not in message and "no such token file" not in message
    assert any(k in message for k in arguments) or "rank" in message


def test_set_epoch_refuses_what_the_shuffle_cannot_seed(token_dir):
    ds = TokenDataset(token_dir[0], seed=np.int64(3))  # numpy integers are integers
    for epoch in (-1, 0.5, "1", True):
        with pytest.raises(ValueError, match="epoch must be"):
            ds.set_epoch(epoch)
    ds.set_epoch(np.int32(2))
    assert ds.epoch == 2 and len(list(ds)) == sum(ROWS.values())


def test_kept_columns_are_yielded_when_asked(tmp_path):
    """width, height, txt, json (a `--keep txt,json` run with two views) and view, as written; a one-view
    file without them is refused when they are asked for, and has view 0 (issue 26, item 11)."""
    import pyarrow as pa

    samples, views = 6, ("center", "center mirrored")
    meta = metadata() | {"preprocessing": {"views": "flip", "view_names": list(views), "source_size": True,
                                           "keep": ["txt", "json"]}}  # fmt: skip
    keys = [f"k/{i}" for i in range(samples) for _ in views]
    txt = [None if i == 2 else f"caption {i}, café 🐱" for i in range(samples) for _ in views]
    js = [json.dumps({"i": i}) for i in range(samples) for _ in views]
    width = [100 + i for i in range(samples) for _ in views]
    extra = {pa.field("view", pa.int8()): [0, 1] * samples, pa.field("width", pa.int32()): width,
             pa.field("height", pa.int32()): [w + 7 for w in width], pa.field("txt", pa.string()): txt,
             pa.field("json", pa.string()): js}  # fmt: skip
    tokens = np.random.default_rng(1).integers(0, K, (len(keys), LENGTH))
    index = [i for i in range(samples) for _ in views]
    write_atomic(f"{tmp_path}/kept/k.parquet", parquet_bytes(token_table(
        keys, "k", index, [3] * len(keys), tokens, K, meta, extra), row_group_size=5))  # fmt: skip
    columns = ["txt", "json", "width", "height", "view"]
    ds = TokenDataset(str(tmp_path / "kept"), shuffle=False, columns=columns)
    items = list(ds)
    assert [list(item) for item in items[:1]] == [["tokens", *columns]]
    want = list(zip(txt, js, width, [w + 7 for w in width], [0, 1] * samples, strict=True))
    assert [tuple(item[c] for c in columns) for item in items] == want
    np.testing.assert_array_equal(np.stack([item["tokens"].numpy() for item in items]), tokens)
    # one view a sample, with_meta and columns together; the tokens still those of that row
    random = TokenDataset(str(tmp_path / "kept"), seed=2, views="random", with_meta=True, columns=["txt"])
    for item in random:
        row = keys.index(item["key"]) + item["view"]
        assert item["txt"] == txt[row] and item["tokens"].tolist() == tokens[row].tolist()
    # a file from a run without these columns is refused at construction, naming the column
    write_tokens(str(tmp_path / "plain"), "p", 4, 0, metadata())
    with pytest.raises(ValueError, match=r"p.parquet has no \['txt'\] column"):
        TokenDataset([str(tmp_path / "kept"), str(tmp_path / "plain")], columns=["view", "txt"])
    plain = TokenDataset(str(tmp_path / "plain"), shuffle=False, columns=["view", "label"], missing_label=-1)
    assert [(item["view"], item["label"]) for item in plain] == [(0, -1), (0, 1), (0, 2), (0, 0)]
