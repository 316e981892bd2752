"""The shard processor without Ray: tokens equal the model's own, metadata complete, bad input accounted."""

import hashlib
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from shardmaker import bad_input_samples, make_shard

import gq
from pipeline.data.decode import DecodeLimits, decode_image, decode_image_and_shape
from pipeline.data.preprocess import preprocess
from pipeline.data.stages import ordered_map
from pipeline.pack.shard_writer import write_shard
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions
from pipeline.tokens.records import read_commit_record
from pipeline.tokens.writer import read_metadata

OPTS = TokenizeOptions(image_size=64, batch_size=4, decode_threads=2)


def reference_tokens(tar_path, checkpoint, image_size=64, batch_size=4, draft_side=None):
    """Independent path: tarfile + decode_image + preprocess, then the model, batch by batch."""
    images, keys = [], []
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".jpg"):
                keys.append(m.name[: -len(".jpg")])
                image, shape = decode_image_and_shape(tar.extractfile(m).read(), draft_side=draft_side)
                images.append(preprocess(image, image_size, shape))
    model = gq.load(checkpoint)
    out = [
        model.tokenize(torch.from_numpy(np.stack(images[i : i + batch_size]))).reshape(-1, 64).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return keys, np.concatenate(out)


def test_ordered_map_keeps_order_and_bounds_reads():
    read = []

    def items():
        for i in range(50):
            read.append(i)
            yield i

    it = ordered_map(lambda x: x * x, items(), threads=3, window=5)
    assert next(it) == 0
    assert len(read) <= 5  # never more than the window read ahead of the consumer
    assert list(it) == [i * i for i in range(1, 50)]
    assert list(ordered_map(str, range(4), threads=0, window=1)) == ["0", "1", "2", "3"]


def test_tokens_equal_model_tokenize(tmp_path, small_checkpoint):
    shard = tmp_path / "train-000000.tar"
    keys = make_shard(str(shard), 10, seed=1, size=(96, 128))
    record = ShardTokenizer(small_checkpoint, OPTS).process(str(shard), str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out" / "train-000000.parquet")
    ref_keys, ref_tokens = reference_tokens(shard, small_checkpoint)
    assert table["key"].to_pylist() == keys == ref_keys
    assert table["index"].to_pylist() == list(range(10))
    assert table["shard"].to_pylist() == ["train-000000"] * 10
    assert all(isinstance(v, int) for v in table["label"].to_pylist())
    np.testing.assert_array_equal(np.stack(table["tokens"].to_pylist()), ref_tokens)
    assert record["rows"] == 10 and record["skipped"] == [] and not record["tar_truncated"]
    assert read_commit_record(str(tmp_path / "out"), "train-000000") == json.loads(json.dumps(record))


def test_pil_draft_tokens_are_the_model_on_draft_decoded_images(tmp_path, small_checkpoint):
    shard = tmp_path / "big.tar"
    keys = make_shard(str(shard), 6, seed=3, size=(600, 900))
    opts = TokenizeOptions(image_size=64, batch_size=4, decode_threads=2, jpeg_decoder="pil-draft")
    ShardTokenizer(small_checkpoint, opts).process(str(shard), str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out" / "big.parquet")
    ref_keys, ref_tokens = reference_tokens(shard, small_checkpoint, draft_side=128)  # 2 x 64: 1/4 scale
    assert table["key"].to_pylist() == keys == ref_keys
    np.testing.assert_array_equal(np.stack(table["tokens"].to_pylist()), ref_tokens)
    _, full_tokens = reference_tokens(shard, small_checkpoint)
    assert not np.array_equal(ref_tokens, full_tokens)  # the option changed the pixels the model saw
    preprocessing = read_metadata(str(tmp_path / "out" / "big.parquet"))["preprocessing"]
    assert preprocessing["jpeg_decoder"] == "pil-draft" and "1/2-1/8 scale" in preprocessing["resize"]


def test_metadata_is_complete(tmp_path, small_checkpoint):
    shard = tmp_path / "s.tar"
    make_shard(str(shard), 2, seed=2)
    ShardTokenizer(small_checkpoint, OPTS).process(str(shard), str(tmp_path / "out"))
    meta = read_metadata(str(tmp_path / "out" / "s.parquet"))
    with open(small_checkpoint, "rb") as f:
        assert meta["model_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert meta["codebook"] == {"kind": "sobol", "size": 65536, "dim": 16, "seed": 42}
    assert meta["codebook_fingerprint"] == gq.GaussianCodebook(65536, 16, seed=42).fingerprint
    assert (meta["groups"], meta["layout"], meta["rule"], meta["beta"]) == (
        1,
        "interleaved",
        "posterior",
        1.0,
    )
    assert meta["token_grid"] == [8, 8] and meta["tokens_per_image"] == 64 and meta["image_size"] == 64
    assert meta["preprocessing"]["min_side"] == 64 and meta["preprocessing"]["crop"] == "center"
    assert gq.ModelConfig.from_dict(meta["model_config"]) == gq.load(small_checkpoint).config
    assert meta["gq_version"] == gq.__version__


@pytest.mark.parametrize("jpeg_decoder", ["pil", "pil-draft"])
def test_bad_input_every_sample_is_a_row_or_a_reasoned_skip(tmp_path, small_checkpoint, jpeg_decoder):
    samples, expected = bad_input_samples()
    shard = tmp_path / "bad.tar"
    write_shard(str(shard), samples)
    opts = TokenizeOptions(image_size=64, batch_size=4, decode_threads=2, jpeg_decoder=jpeg_decoder)
    record = ShardTokenizer(small_checkpoint, opts).process(str(shard), str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out" / "bad.parquet")
    rows = table["key"].to_pylist()
    skipped = {s["key"]: s["reason"] for s in record["skipped"]}
    for key, reason in expected.items():
        if reason is None:
            assert key in rows, f"{key} should be a row, skipped: {skipped.get(key)}"
        else:
            assert skipped.get(key) == reason, f"{key}: expected skip {reason!r}, got {skipped.get(key)!r}"
    # The duplicate key appears once as a row and once as a skip: every sample is accounted for.
    assert len(rows) + len(record["skipped"]) == len(samples)
    assert len(set(rows)) == len(rows)
    assert record["skipped_by_reason"] == {
        r: sum(1 for s in record["skipped"] if s["reason"] == r) for r in set(skipped.values())
    }


def test_tar_cut_mid_member_keeps_earlier_samples(tmp_path, small_checkpoint):
    shard = tmp_path / "cut.tar"
    keys = make_shard(str(shard), 6, seed=3)
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # Cut inside the 4th sample's image: 3 whole samples survive.
    target = [m for m in members if m.name.endswith(".jpg")][3]
    shard.write_bytes(data[: target.offset_data + target.size // 2])
    record = ShardTokenizer(small_checkpoint, OPTS).process(str(shard), str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out" / "cut.parquet")
    assert table["key"].to_pylist() == keys[:3]
    assert record["tar_truncated"]
    assert "tar truncated" in record["skipped_by_reason"]


def test_uint32_tokens_and_groups(tmp_path):
    torch.manual_seed(1)
    model = gq.GQVAE(gq.model_config("small-f8c16", 1.0, codebook_size=1 << 17))
    ckpt = str(tmp_path / "k17.safetensors")
    gq.save(model, ckpt)
    shard = tmp_path / "g.tar"
    make_shard(str(shard), 3, seed=4)
    ShardTokenizer(ckpt, OPTS).process(str(shard), str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out" / "g.parquet")
    assert table.schema.field("tokens").type == pa.list_(pa.uint32(), 256)
    with tarfile.open(shard) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    x = torch.from_numpy(np.stack([preprocess(decode_image(b), 64) for b in jpgs]))
    expected = gq.load(ckpt).tokenize(x)  # (B, 8, 8, 4): raster order is row, column, group
    np.testing.assert_array_equal(np.stack(table["tokens"].to_pylist()), expected.reshape(3, -1).numpy())


def test_image_size_must_fit_the_model(small_checkpoint):
    with pytest.raises(ValueError, match="multiple of 8"):
        ShardTokenizer(small_checkpoint, TokenizeOptions(image_size=60))


def test_limits_are_options(tmp_path, small_checkpoint):
    shard = tmp_path / "s.tar"
    make_shard(str(shard), 3, seed=5, size=(96, 128))
    opts = TokenizeOptions(image_size=64, batch_size=2, limits=DecodeLimits(min_side=100))
    record = ShardTokenizer(small_checkpoint, opts).process(str(shard), str(tmp_path / "out"))
    assert record["rows"] == 0 and record["skipped_by_reason"] == {"too small": 3}
    assert pq.read_table(tmp_path / "out" / "s.parquet").num_rows == 0
