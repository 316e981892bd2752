"""The ViT backbone: the official ViT's own outputs (tests/fixtures/official-gq/official-vit-a.*) are the
oracle; its export is bit for bit; the paper preset is the official BSQ-ViT-B; its image size is fixed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import gq
from gq.checkpoint import CheckpointError
from gq.official import (
    from_official,
    load_official_state,
    model_config_from_official,
    read_config,
    to_official_config,
    to_official_state,
)
from kernels.reference import direct_scores, score_scale

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "official-gq"
CKPT, YAML = str(FIXTURE / "official-vit-a.ckpt"), str(FIXTURE / "official-vit-a.yaml")
TOL = 1e-3  # float32 in another order than the official code; the bound


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURE / "official-vit-a.expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def model():
    return from_official(CKPT, YAML)


@pytest.fixture(scope="module")
def official_state():
    return torch.load(CKPT, weights_only=True)["state_dict"]


def test_config_translation(model):
    c = model.config
    assert c.network == gq.ViTConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4)
    assert (c.quantizer.codebook.size, c.quantizer.codebook.dim, c.quantizer.groups) == (1024, 4, 4)
    assert c.quantizer.layout == "interleaved" and c.latent_channels == 16 and model.downsample == 8
    assert gq.ModelConfig.from_dict(c.to_dict()) == c  # a saved ViT config rebuilds as a ViT


def test_encoder_output_matches_official(model, expected):
    with torch.no_grad():
        mu, logvar = model.encoder(expected["images"])  # (B, C, 4, 4), raw (before our logvar clamp)
    official = expected["encoder_output"]  # (B, L, 2C), L row-major over the 4x4 grid
    b, n, c2 = official.shape
    assert mu.shape == (b, c2 // 2, 4, 4)
    ours = torch.cat([mu, logvar], 1).flatten(2).transpose(1, 2)
    assert (ours - official).abs().max() <= TOL


def test_tokens_match_official_up_to_float32_near_ties(model, expected):
    tokens = model.tokenize(expected["images"])  # (B, h, w, G)
    official = expected["indices"].reshape(tokens.shape)  # the official (B, L, G), L = h * w row-major
    differ = tokens != official
    if differ.any():  # each disagreement must be a near-tie of the float64 scores
        mu, logvar = model.encode(expected["images"])
        g, d = model.config.quantizer.groups, model.config.quantizer.codebook.dim
        mu_g = gq.split_groups(mu, g, "interleaved")[differ].reshape(-1, d)
        lv_g = gq.split_groups(logvar, g, "interleaved")[differ].reshape(-1, d)
        codes = model.quantizer.codes
        ours, theirs = codes[tokens[differ]], codes[official[differ]]
        gap = direct_scores(mu_g, lv_g, ours, "posterior", 1.0) - direct_scores(
            mu_g, lv_g, theirs, "posterior", 1.0
        )
        scale = score_scale(mu_g, lv_g, ours, "posterior", 1.0) + lv_g.double().abs().sum(1) + 2 * d
        assert (gap >= 0).all() and (gap <= 64 * np.finfo(np.float32).eps * scale).all()
    assert differ.float().mean() < 0.01


def test_decoders_match_official(model, expected):
    tokens = expected["indices"].reshape(2, 4, 4, 4)
    assert (model.detokenize(tokens) - expected["decoded_gq"].clamp(-1, 1)).abs().max() <= TOL
    assert (model.reconstruct(expected["images"]) - expected["decoded_mu"].clamp(-1, 1)).abs().max() <= TOL


def test_export_gives_back_the_official_tensors_bit_for_bit(model, official_state):
    back = to_official_state(model)
    theirs = {k: v for k, v in official_state.items() if k.startswith(("encoder.", "decoder."))}
    assert back.keys() == theirs.keys()
    for k, v in theirs.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    config = to_official_config(model)
    assert model_config_from_official(config) == model.config
    params = config["model"]["params"]
    assert params["encoder_config"]["target"] == "pit.modules.vit.TransformerEncoder"
    assert params["decoder_config"] == {
        "target": "pit.modules.vit.TransformerDecoder", "params": "${model.params.encoder_config.params}",
    }  # fmt: skip
    assert params["regularizer_config"]["params"]["format"] == "blc"
    fixture = read_config(YAML)["model"]["params"]["encoder_config"]["params"]
    assert params["encoder_config"]["params"] == fixture


def test_convert_job_round_trip(tmp_path, model, official_state):
    ours, back = tmp_path / "vit.safetensors", tmp_path / "back.ckpt"
    run = [sys.executable, str(REPO / "jobs" / "convert.py")]
    for args in (["from-official", "--checkpoint", CKPT, "--config", YAML, "--output", str(ours)],
                 ["to-official", "--checkpoint", str(ours), "--output", str(back)]):  # fmt: skip
        done = subprocess.run([*run, *args], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
    assert "64 tokens per 32x32 image" in done.stdout  # 4x4 positions x 4 groups, at its own size
    exported = torch.load(back, weights_only=True)["state_dict"]
    for k, v in official_state.items():
        if k.startswith(("encoder.", "decoder.")):
            assert torch.equal(exported.pop(k), v), k
    assert not exported
    config = yaml.safe_load((tmp_path / "back.yaml").read_text())
    assert model_config_from_official(config) == model.config


@pytest.mark.slow  # 175M parameters built twice
def test_paper_vit_preset_is_the_official_bsqvit_and_round_trips():
    torch.manual_seed(0)
    model = gq.GQVAE(gq.model_config("paper-vit-f8c16", 0.25))
    encoder = sum(p.numel() for p in model.encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert (encoder, decoder) == (86_016_032, 88_809_408)  # counted from the official code
    config = to_official_config(model)
    enc = config["model"]["params"]["encoder_config"]["params"]
    assert (enc["image_size"], enc["patch_size"], enc["width"], enc["layers"], enc["heads"]) == (
        256,
        8,
        768,
        12,
        12,
    )
    state = to_official_state(model)
    again = gq.GQVAE(model_config_from_official(config))
    load_official_state(again, state)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_another_image_size_is_a_one_line_error(model):
    with pytest.raises(ValueError, match=r"takes 32x32 images only.*got 64x64"):
        model.tokenize(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_size 64"):
        from pipeline.train.config import TrainSettings

        TrainSettings.of(preset="paper-vit-f8c16", data="d", output="o", image_size=64)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: p["encoder_config"]["params"].update(mask_type="causal"), "params.mask_type"),
        (lambda p: p["encoder_config"]["params"].update(num_frames=4), "params.num_frames"),
        (lambda p: p["encoder_config"]["params"].update(rope=True), "params.rope"),
        (lambda p: p["regularizer_config"]["params"].update(format="bchw"), "params.format"),
        (lambda p: p["decoder_config"].update(target="pit.modules.unet.Decoder"), "decoder_config.target"),
        (lambda p: p.update(decoder_config={"target": "pit.modules.vit.TransformerDecoder",
                                            "params": {**p["encoder_config"]["params"], "width": 32}}),
         "decoder_config.params.width"),
    ],
)  # fmt: skip
def test_vit_configs_this_version_cannot_build_name_the_field(change, field):
    import copy

    config = copy.deepcopy(read_config(YAML))
    change(config["model"]["params"])
    with pytest.raises(CheckpointError, match=field.replace(".", r"\.")):
        model_config_from_official(config)


def test_tokenize_job_follows_the_vit_size(tmp_path, model):
    """jobs/tokenize.py without --image-size crops to the ViT's 32 px; --image-size 64 is refused (exit 2)."""
    ours = tmp_path / "vit.safetensors"
    gq.save(model, str(ours), model.provenance)
    shard = REPO / "assets" / "samples" / "photos-000000.tar"
    job = [sys.executable, str(REPO / "jobs" / "tokenize.py"), "--input", str(shard), "--checkpoint",
           str(ours), "--batch-size", "4", "--no-progress", "--encoder-precision", "float32"]  # fmt: skip
    bad = subprocess.run([*job, "--output", str(tmp_path / "bad"), "--image-size", "64"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--image-size 64" in bad.stderr and "32x32" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    done = subprocess.run([*job, "--output", str(tmp_path / "t")], capture_output=True, text=True, cwd=REPO,
                          timeout=300, start_new_session=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = pq.read_table(tmp_path / "t" / "photos-000000.parquet")
    assert len(table["tokens"][0]) == 4 * 4 * 4  # (4, 4, G = 4) per 32x32 crop


def test_training_pass_reaches_every_parameter(expected):
    """GQVAE.forward on a ViT: the sampled latent decoded, the TDC term over (B, C, h, w); every parameter
    (positions included) gets a gradient, and the GAN's last layer is the patch projection `conv_out`."""
    model = from_official(CKPT, YAML).train()
    out = model(expected["images"], generator=torch.Generator().manual_seed(0))
    assert out.recon.shape == (2, 3, 32, 32) and out.mu.shape == (2, 16, 4, 4)
    assert out.kl_stats.count.item() == 2 * 4 * 4 * 4
    ((out.recon - expected["images"]).abs().mean() + out.kl_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert model.decoder.conv_out.weight.shape == (3 * 8 * 8, 3072)


def test_evaluate_job_follows_the_vit_size(tmp_path, model, capsys):
    """jobs/evaluate.py without --image-size evaluates at the ViT's 32 px; another size is exit 2."""
    from jobs import evaluate

    ours = tmp_path / "vit.safetensors"
    gq.save(model, str(ours), model.provenance)
    shard = str(REPO / "assets" / "samples" / "photos-000000.tar")
    base = ["--checkpoint", str(ours), "--data", shard, "--no-progress", "--decode-threads", "0"]
    assert evaluate.main([*base, "--output", str(tmp_path / "bad"), "--image-size", "64"]) == 2
    assert "this model takes 32x32 images only" in capsys.readouterr().err
    assert evaluate.main([*base, "--output", str(tmp_path / "r"), "--batch-size", "4"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["images"] == 8 and report["rate"]["bits_per_pixel"] == 64 * 10 / 32**2
