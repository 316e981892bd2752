"""Presets and operating points: points named by tokens and bits, the 256-token f16 presets against the
official UNet (parameter counts, conversion both ways bit for bit), and a small f16 model trained by
jobs/train_vae.py, tokenized by jobs/tokenize.py and read back as LM sequences."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shardmaker import make_shard

import gq
from gq.official import load_official_state, model_config_from_official, to_official_config, to_official_state
from gq.presets import describe_point
from pipeline.tokens.reader import TokenDataset
from pipeline.train.config import TrainSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("preset", "point", "dgk", "rate"),
    [
        ("paper-f8c16", {"bpp": 0.5}, (8, 2, 1 << 16), (2048, 16, 0.5)),
        ("paper-f8c16", {"tokens": 4096, "bits": 16}, (4, 4, 1 << 16), (4096, 16, 1.0)),
        ("paper-vit-f8c16", {}, (16, 1, 1 << 16), (1024, 16, 0.25)),
        ("paper-f16c14", {"tokens": 256, "bits": 14}, (14, 1, 1 << 14), (256, 14, 256 * 14 / 65536)),
        ("paper-f16c18", {}, (18, 1, 1 << 18), (256, 18, 256 * 18 / 65536)),
        ("paper-f16c14", {"tokens": 512, "bits": 16}, (7, 2, 1 << 16), (512, 16, 0.125)),
    ],
)
def test_operating_points_by_tokens_and_bits(preset, point, dgk, rate):
    config = gq.model_config(preset, **point)
    q = config.quantizer
    assert (q.codebook.dim, q.groups, q.codebook.size) == dgk
    assert tuple(describe_point(config).values()) == pytest.approx(rate)


@pytest.mark.parametrize(
    ("preset", "point", "message"),
    [
        ("paper-f16c14", {"bpp": 0.25}, "tokens=256, bits=14"),
        ("paper-f16c14", {"tokens": 300}, "256 x a divisor of 14"),
        ("paper-f8c16", {"bpp": 0.25, "tokens": 1024}, "not both"),
        ("paper-f8c16", {"bits": 30}, "1..24"),
        ("nope", {}, "unknown preset"),
    ],
)
def test_bad_operating_points_say_why(preset, point, message):
    with pytest.raises(ValueError, match=message):
        gq.model_config(preset, **point)


def test_training_settings_check_the_point_and_size():
    s = TrainSettings.of(preset="small-f16c14", data="d", output="o", image_size=64)
    assert s.model_config().quantizer.codebook.size == 1 << 14
    with pytest.raises(ValueError, match="multiple of small-f16c14's downsampling 16"):
        TrainSettings.of(preset="small-f16c14", data="d", output="o", image_size=72)
    with pytest.raises(ValueError, match="no 0.5 bpp point"):
        TrainSettings.of(preset="paper-f16c18", data="d", output="o", bpp=0.5)


def test_paper_f16_presets_are_the_official_16x_unet_and_convert_back_bit_for_bit():
    counts = {"paper-f16c14": (47_110_556, 68_164_355), "paper-f16c18": (47_147_428, 68_182_787)}
    for preset, (enc, dec) in counts.items():  # counted from the official pit.modules.unet code
        torch.manual_seed(0)
        model = gq.GQVAE(gq.model_config(preset))
        assert sum(p.numel() for p in model.encoder.parameters()) == enc
        assert sum(p.numel() for p in model.decoder.parameters()) == dec
        config = to_official_config(model)
        params = config["model"]["params"]
        assert params["encoder_config"]["params"]["ch_mult"] == [1, 2, 4, 4, 4]
        assert params["encoder_config"]["params"]["attn_resolutions"] == [32]
        assert (
            params["regularizer_config"]["params"]["group"]
            == params["encoder_config"]["params"]["z_channels"]
        )
        state = to_official_state(model)
        again = gq.GQVAE(model_config_from_official(config))
        assert again.config.quantizer == model.config.quantizer
        load_official_state(again, state)
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
        del model, again, state


def test_small_f16_shapes_and_pair():
    torch.manual_seed(0)
    model = gq.GQVAE(gq.model_config("small-f16c14")).eval()
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    tokens = model.tokenize(x)
    assert tokens.shape == (2, 4, 4, 1) and int(tokens.max()) < 1 << 14
    mu, logvar = model.encode(x)
    assert mu.shape == (2, 14, 4, 4) and torch.equal(tokens, model.quantizer.quantize(mu, logvar))
    with torch.no_grad():
        assert torch.equal(
            model.detokenize(tokens), model.decode(model.quantizer.dequantize(tokens)).clamp(-1, 1)
        )


def _run(script: str, *args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout, start_new_session=True,
    )  # fmt: skip


@pytest.mark.slow
def test_small_f16_trains_tokenizes_and_reads_back(tmp_path):
    """train_vae (64 px, small-f16c14) -> model.safetensors -> tokenize.py -> (4, 4, 1) tokens -> reader."""
    shards = tmp_path / "shards"
    for i in range(2):
        make_shard(str(shards / f"train-{i:03d}.tar"), 8, seed=i, start_key=100 * i)
    ray_tmp = tempfile.mkdtemp(prefix="gqr", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = os.environ | {"RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp, "TMPDIR": ray_tmp}
    try:
        run = tmp_path / "run"
        args = ["--preset", "small-f16c14", "--tokens", "256", "--bits", "14", "--data", str(shards),
                "--output", str(run), "--image-size", "64", "--batch-size", "4", "--max-steps", "3",
                "--val-every", "3", "--checkpoint-every", "3", "--seed", "0"]  # fmt: skip
        trained = _run("train_vae.py", *args, env=env)
        assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    model = gq.load(str(run / "model.safetensors"))
    assert model.config.preset == "small-f16c14" and model.config.quantizer.codebook.size == 1 << 14
    ray_tmp = tempfile.mkdtemp(prefix="gqr", dir="/tmp")
    env = os.environ | {"RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp, "TMPDIR": ray_tmp}
    try:
        done = _run("tokenize.py", "--input", str(shards), "--output", str(tmp_path / "tokens"),
                    "--checkpoint", str(run / "model.safetensors"), "--image-size", "64", "--batch-size", "4",
                    "--no-progress", "--encoder-precision", "float32", env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    table = pq.read_table(tmp_path / "tokens" / "train-000.parquet")
    rows = np.stack(table["tokens"].to_pylist())
    assert rows.shape == (8, 16)  # 4 x 4 positions x 1 group per 64 px image
    ds = TokenDataset(str(tmp_path / "tokens"), shuffle=False, offset=3, bos=1, eos=2, with_meta=True)
    got = {(r["shard"], int(r["index"])): r["tokens"] for r in ds}
    first = got[(table["shard"][0].as_py(), int(table["index"][0].as_py()))]
    assert first.tolist() == [1, *(rows[0] + 3).tolist(), 2]  # BOS, tokens + offset, EOS
    assert len(got) == 16 and all(len(t) == 18 for t in got.values())
