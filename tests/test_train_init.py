"""Warm start: `jobs/train_vae.py --init` fine-tunes a converted diffusers VAE with TDC, same network."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from shardmaker import make_shard

import gq
from gq.calibration import Calibration
from pipeline.train.config import ModelSettings
from pipeline.train.step import build_trainee

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(
    block_out_channels=[16, 32], latent_channels=4, norm_num_groups=8, layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
)  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    """A tiny random diffusers VAE, converted (d = 2, K = 2^8) with a calibration, as our checkpoint."""
    root = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**CONFIG).save_pretrained(str(root / "vae"))
    calibration = Calibration((0.1, -0.2, 0.0, 0.3), (1.5, 0.8, 1.0, 2.0))
    model = gq.from_diffusers(str(root / "vae"), group_dim=2, codebook_bits=8, calibration=calibration)
    path = str(root / "converted.safetensors")
    gq.save(model, path, model.provenance)
    return path


def test_settings_take_the_network_from_init(converted):
    source = gq.load(converted)
    settings = ModelSettings(init=converted, kl_weight=0.5)
    config = settings.model_config()
    assert config.network == source.config.network and config.quantizer == source.config.quantizer
    assert config.calibration == source.config.calibration and config.tdc.weight == 0.5
    trainee = build_trainee(config, gq.losses.LossConfig(), 1e-4, 0, torch.device("cpu"), init=converted)
    for key, value in source.state_dict().items():
        assert torch.equal(trainee.model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="not both"):
        ModelSettings(preset="small-f8c16", init=converted)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelSettings()


@pytest.mark.slow
def test_job_fine_tunes_a_converted_diffusers_vae(converted, tmp_path):
    data = tmp_path / "shards"
    for i in range(2):
        make_shard(str(data / f"train-{i:03d}.tar"), 6, seed=i, start_key=10 * i)
    out = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="gqi", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = os.environ | {"RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp, "TMPDIR": ray_tmp}
    args = ["--init", converted, "--data", str(data), "--output", str(out), "--batch-size", "2",
            "--image-size", "64", "--max-steps", "4", "--checkpoint-every", "4", "--val-every", "4",
            "--lr", "1e-3"]  # fmt: skip
    try:
        done = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_vae.py"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    source, tuned = gq.load(converted), gq.load(str(out / "model.safetensors"))
    assert tuned.config.network == source.config.network and tuned.config.quantizer == source.config.quantizer
    assert tuned.config.calibration == source.config.calibration
    assert tuned.provenance["steps"] == 4
    assert tuned.provenance["init_sha256"] == hashlib.sha256(Path(converted).read_bytes()).hexdigest()
    before, after = source.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    assert not torch.equal(before["encoder.conv_in.weight"], after["encoder.conv_in.weight"])  # it trained
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_vae.py"), "--init",
                          str(tmp_path / "none"), "--data", str(data), "--output", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "--init" in bad.stderr
