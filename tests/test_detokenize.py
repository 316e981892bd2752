"""jobs/detokenize.py: PNGs equal the model's decoding of the stored tokens; mismatched models refused."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from shardmaker import make_shard

import gq
from jobs import detokenize
from pipeline.io import write_atomic
from pipeline.tokenize.processor import ShardTokenizer, TokenizeOptions
from pipeline.tokens.detokenizer import key_path
from pipeline.tokens.writer import parquet_bytes, read_metadata, token_table


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, small_checkpoint):
    d = tmp_path_factory.mktemp("detok")
    tokenizer = ShardTokenizer(small_checkpoint, TokenizeOptions(image_size=64, batch_size=4))
    make_shard(str(d / "train-000000.tar"), 5, seed=21)
    make_shard(str(d / "train-000001.tar"), 2, seed=22)
    for stem in ("train-000000", "train-000001"):
        tokenizer.process(str(d / f"{stem}.tar"), str(d / "tokens"))
    return d / "tokens"


def other_checkpoint(path, *, seed: int, codebook_seed: int = 42) -> str:
    torch.manual_seed(seed)
    gq.save(gq.GQVAE(gq.model_config("small-f8c16", 0.25, codebook_seed=codebook_seed)), str(path))
    return str(path)


BATCH = 3


def expected_images(token_file, checkpoint) -> dict[str, np.ndarray]:
    """key -> to_uint8(model.detokenize(tokens)), straight from the Parquet rows, in batches of BATCH rows as
    the job decodes them (a float decoder's output can differ in the last bit between batch shapes, which
    moves a rounded pixel by 1 now and then)."""
    table = pq.read_table(token_file)
    t = torch.from_numpy(np.stack(table["tokens"].to_numpy(zero_copy_only=False)).astype(np.int64))
    model = gq.load(checkpoint)
    images = [gq.metrics.to_uint8(model.detokenize(b.view(len(b), 8, 8, 1))).numpy() for b in t.split(BATCH)]
    return dict(zip(table["key"].to_pylist(), np.concatenate(images)))


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def run(tokens_arg, checkpoint, output, *extra) -> int:
    return detokenize.main(
        [
            "--tokens",
            str(tokens_arg),
            "--checkpoint",
            checkpoint,
            "--output",
            str(output),
            "--no-progress",
            "--batch-size",
            str(BATCH),
            *extra,
        ]
    )


def test_pngs_equal_the_model_decoding(tokens, small_checkpoint, tmp_path):
    assert run(tokens, small_checkpoint, tmp_path / "out") == 0
    for stem in ("train-000000", "train-000001"):
        expected = expected_images(tokens / f"{stem}.parquet", small_checkpoint)
        written = sorted(p.name for p in (tmp_path / "out" / stem).iterdir())
        assert written == sorted(f"{k}.png" for k in expected)
        for key, image in expected.items():
            np.testing.assert_array_equal(read_png(tmp_path / "out" / stem / f"{key}.png"), image)


def test_limit_and_single_file(tokens, small_checkpoint, tmp_path):
    assert run(tokens, small_checkpoint, tmp_path / "out", "--limit", "6") == 0
    assert len(list((tmp_path / "out").rglob("*.png"))) == 6
    assert run(tokens / "train-000001.parquet", small_checkpoint, tmp_path / "one") == 0
    assert [p.parent.name for p in (tmp_path / "one").rglob("*.png")] == ["train-000001"] * 2


def test_another_model_is_refused_unless_allowed(tokens, small_checkpoint, tmp_path, capsys):
    other = other_checkpoint(tmp_path / "other.safetensors", seed=1)
    assert run(tokens, other, tmp_path / "out") == 2
    assert "not this checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert run(tokens, other, tmp_path / "out", "--allow-model-mismatch") == 0
    expected = expected_images(tokens / "train-000001.parquet", other)
    for key, image in expected.items():
        np.testing.assert_array_equal(read_png(tmp_path / "out" / "train-000001" / f"{key}.png"), image)


def test_another_codebook_is_refused_even_when_allowed(tokens, tmp_path, capsys):
    other = other_checkpoint(tmp_path / "cb7.safetensors", seed=0, codebook_seed=7)
    assert run(tokens, other, tmp_path / "out", "--allow-model-mismatch") == 2
    assert "codebook fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_keys_become_safe_paths(tokens, small_checkpoint, tmp_path):
    assert key_path("a/../b c") == "a/_../b_c"
    assert key_path("/abs//x.y") == "abs/x.y" and key_path("..") == "_.." and key_path("") == "_"
    meta = read_metadata(str(tokens / "train-000000.parquet"))
    keys = ["dir/x", "../evil", "a:b", "a?b"]  # the last two sanitise to the same name
    t = np.random.default_rng(0).integers(0, 65536, (4, 64))
    table = token_table(keys, "odd", [0, 1, 2, 3], [None] * 4, t, 65536, meta)
    write_atomic(str(tmp_path / "tok" / "odd.parquet"), parquet_bytes(table))
    assert run(tmp_path / "tok", small_checkpoint, tmp_path / "out") == 0
    found = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert found == ["odd/_../evil.png", "odd/a_b-3.png", "odd/a_b.png", "odd/dir/x.png"]


def test_bad_arguments_exit_2(tmp_path, small_checkpoint):
    assert run(tmp_path / "nothing", small_checkpoint, tmp_path / "out") == 2
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    assert run(tmp_path / "x.parquet", small_checkpoint, tmp_path / "out") == 2
