"""The affine prior: measured from data, stored in checkpoints, applied before the search and the decoder."""

import dataclasses
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from shardmaker import make_shard

import gq
from gq.calibration import AggregateMoments, Calibration, denormalize, normalize
from gq.checkpoint import checkpoint_bytes, load_bytes
from gq.diffusers_vae import from_diffusers
from pipeline.data.preprocess import preprocess

diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
SHIFT = torch.tensor([1.0, -2.0, 0.5, 3.0])  # injected per channel
SCALE = torch.tensor([0.5, 2.0, 3.0, 5.5])
CONFIG = dict(
    block_out_channels=[32, 64], latent_channels=4, norm_num_groups=16, layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
)  # fmt: skip


def sd_like_vae(seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**CONFIG).eval()
    with torch.no_grad():
        vae.quant_conv.bias[4:] -= 4.0  # posteriors of a trained-looking spread
    return vae


def inject(vae):
    """The same model under the prior N(SHIFT + SCALE * m, (SCALE * s)^2): mu -> SCALE mu + SHIFT,
    sigma -> SCALE sigma after the encoder, and the inverse map before the decoder (both 1x1 convs)."""
    with torch.no_grad():
        q, p = vae.quant_conv, vae.post_quant_conv
        q.weight[:4] *= SCALE.view(4, 1, 1, 1)
        q.bias[:4] = q.bias[:4] * SCALE + SHIFT
        q.bias[4:] += 2 * SCALE.log()
        p.bias -= (p.weight[:, :, 0, 0] * (SHIFT / SCALE)).sum(1)
        p.weight /= SCALE.view(1, 4, 1, 1)
    return vae


def images(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def measured(model: gq.GQVAE, x: torch.Tensor) -> Calibration:
    moments = AggregateMoments(model.config.latent_channels)
    moments.update(*model.encode(x))
    return moments.calibration(len(x))


def test_pure_maps_are_inverse_and_exact_gq_for_the_prior():
    mu, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    shift, scale = SHIFT.view(1, 4, 1, 1), SCALE.view(1, 4, 1, 1)
    m, lv = normalize(mu, logvar, shift, scale)
    torch.testing.assert_close(denormalize(m, shift, scale), mu)
    torch.testing.assert_close(lv.exp(), logvar.exp() / scale**2)
    with pytest.raises(ValueError, match="scales finite and > 0"):
        Calibration((0.0,), (0.0,))


def test_moments_equal_an_independent_computation(tmp_path):
    vae = sd_like_vae()
    vae.save_pretrained(str(tmp_path / "vae"))
    model = from_diffusers(str(tmp_path / "vae"))
    x = images()
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    mu, var = dist.mean.double().numpy(), dist.var.double().numpy()
    shift = mu.mean(axis=(0, 2, 3))
    scale = np.sqrt((mu**2 + var).mean(axis=(0, 2, 3)) - shift**2)
    cal = measured(model, x)
    np.testing.assert_allclose(cal.shift, shift, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cal.scale, scale, rtol=1e-4)


def test_calibration_recovers_an_injected_shift_and_scale(tmp_path):
    vae = sd_like_vae()
    vae.save_pretrained(str(tmp_path / "plain"))
    inject(sd_like_vae()).save_pretrained(str(tmp_path / "shifted"))
    plain = from_diffusers(str(tmp_path / "plain"), codebook_bits=12)
    shifted = from_diffusers(str(tmp_path / "shifted"), codebook_bits=12)
    x = images()
    a, b = measured(plain, x), measured(shifted, x)
    torch.testing.assert_close(
        torch.tensor(b.shift), SCALE * torch.tensor(a.shift) + SHIFT, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(torch.tensor(b.scale), SCALE * torch.tensor(a.scale), rtol=1e-4, atol=0)
    plain, shifted = plain.with_calibration(a), shifted.with_calibration(b)
    for model in (plain, shifted):  # the N(0, 1)-space posterior: mean 0, variance 1 per channel
        again = measured(model, x)
        np.testing.assert_allclose(again.shift, 0.0, atol=1e-4)
        np.testing.assert_allclose(again.scale, 1.0, rtol=1e-4)
    for p, s in zip(plain.encode(x), shifted.encode(x)):  # the same model: the same calibrated posterior
        assert (p - s).abs().max() <= 1e-4
    tokens = plain.tokenize(x)
    assert (shifted.tokenize(x) != tokens).float().mean() < 0.02
    assert (shifted.detokenize(tokens) - plain.detokenize(tokens)).abs().max() <= 1e-4
    with torch.no_grad():  # the continuous VAE is untouched by the prior
        reference = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    assert (plain.reconstruct(x) - reference).abs().max() <= 1e-4
    z = gq.dequantize(tokens, plain.quantizer.codes, "interleaved")
    shift_t, scale_t = a.tensors()
    with torch.no_grad():  # the code goes to the decoder as shift + scale * code
        reference = vae.decode(shift_t + scale_t * z).sample.clamp(-1, 1)
    assert (plain.detokenize(tokens) - reference).abs().max() <= 1e-4


def _run(job: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / job), *args],
        capture_output=True, text=True, cwd=REPO, timeout=600, start_new_session=True,
    )  # fmt: skip


@pytest.mark.slow
def test_calibrated_conversion_round_trips_through_load_and_the_tokenize_job(tmp_path):
    sd_like_vae().save_pretrained(str(tmp_path / "vae"))
    shard = tmp_path / "shards" / "cal-000000.tar"
    shard.parent.mkdir()
    make_shard(str(shard), 6, seed=5, size=(72, 96))
    out = tmp_path / "sd-gq.safetensors"
    done = _run("convert.py", "from-diffusers", "--vae", str(tmp_path / "vae"), "--calibrate", str(shard),
                "--calibrate-images", "5", "--image-size", "64", "--codebook-bits", "12",
                "--output", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = gq.load(str(out))
    with tarfile.open(shard) as tar:  # an independent read of the same images
        jpegs = {m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    keys = sorted(jpegs)
    x = np.stack([preprocess(np.asarray(Image.open(io.BytesIO(jpegs[k])).convert("RGB")), 64) for k in keys])
    raw = from_diffusers(str(tmp_path / "vae"), codebook_bits=12)
    expected = measured(raw, torch.from_numpy(x[:5]))
    assert loaded.config.calibration.images == 5 and loaded.provenance["calibration"]["images"] == 5
    np.testing.assert_allclose(loaded.config.calibration.shift, expected.shift, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.config.calibration.scale, expected.scale, rtol=1e-5)
    again = tmp_path / "again.safetensors"  # recalibrating measures the raw posterior: the same prior
    done = _run("convert.py", "calibrate", "--checkpoint", str(out), "--calibrate", str(shard),
                "--calibrate-images", "5", "--image-size", "64", "--output", str(again))  # fmt: skip
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(gq.load(str(again)).config.calibration.scale, expected.scale, rtol=1e-5)
    tokens_dir = tmp_path / "tokens"
    done = _run("tokenize.py", "--input", str(shard), "--output", str(tokens_dir), "--checkpoint", str(out),
                "--image-size", "64", "--batch-size", "3", "--no-progress",
                "--encoder-precision", "float32")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = pq.read_table(tokens_dir / "cal-000000.parquet")
    assert table["key"].to_pylist() == keys
    tokens = loaded.tokenize(torch.from_numpy(x))
    got = np.stack(table["tokens"].to_pylist()).reshape(tokens.shape)
    np.testing.assert_array_equal(got, tokens.numpy())


def test_calibration_round_trips_through_a_checkpoint_and_the_official_export_refuses_it():
    config = gq.model_config("small-f8c16", 0.25)
    network = dataclasses.replace(config.network, mid_attention=False)  # an official-shaped network
    cal = Calibration(tuple(SHIFT.tolist()) * 4, tuple(SCALE.tolist()) * 4, images=7)
    model = gq.GQVAE(dataclasses.replace(config, network=network, calibration=cal))
    back = load_bytes(checkpoint_bytes(model))
    assert back.config.calibration == cal and back.config == model.config
    x = images(2, 32)
    assert torch.equal(back.tokenize(x), model.tokenize(x))
    with pytest.raises(gq.CheckpointError, match="no calibrated prior"):
        gq.to_official_config(model)
    quant = gq.GQVAE(dataclasses.replace(config, network=dataclasses.replace(network, quant_conv=True)))
    with pytest.raises(gq.CheckpointError, match="no quant_conv"):
        gq.to_official_config(quant)
