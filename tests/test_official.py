"""Official GQ checkpoints: the official code's own outputs (tests/fixtures/official-gq) are the oracle."""

import copy
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

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
from kernels.reference import direct_scores, reference_search, score_scale
from pipeline.data.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "official-gq"
CKPT, YAML = str(FIXTURE / "official-a.ckpt"), str(FIXTURE / "official-a.yaml")
TOL = 1e-3  # float32 in another order than the official code; the bound


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURE / "official-a.expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def model():
    return from_official(CKPT, YAML)


@pytest.fixture(scope="module")
def official_state():
    return torch.load(CKPT, weights_only=True)["state_dict"]


def test_config_translation(model, expected):
    c = model.config
    official = json.loads(expected["config"])
    assert c.network.attn_levels == (2,) and not c.network.mid_attention  # 16 = 64 / 2^2, by `resolution`
    assert (c.quantizer.codebook.size, c.quantizer.codebook.dim, c.quantizer.groups) == (1024, 4, 4)
    assert c.quantizer.codebook.seed == 42 and c.quantizer.codebook.kind == "sobol"
    assert c.quantizer.layout == "interleaved" and c.quantizer.rule == "posterior" and c.quantizer.beta == 1.0
    assert c.latent_channels == official["encoder_config"]["params"]["z_channels"]
    assert c.tdc.weight == 0.1 and c.tdc.target_bits == 10.0
    assert not model.training


def test_encoder_output_matches_official(model, expected):
    with torch.no_grad():
        mu, logvar = model.encoder(expected["images"])  # raw, before our logvar clamp
    mu_ref, logvar_ref = expected["encoder_output"].chunk(2, dim=1)
    assert (mu - mu_ref).abs().max() <= TOL
    assert (logvar - logvar_ref).abs().max() <= TOL


def test_tokens_match_official_up_to_float32_near_ties(model, expected):
    tokens = model.tokenize(expected["images"])  # (B, h, w, G)
    official = expected["indices"].permute(0, 2, 3, 1)  # the official (B, G, h, w)
    assert tokens.shape == official.shape
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
    tokens = expected["indices"].permute(0, 2, 3, 1)
    assert (model.detokenize(tokens) - expected["decoded_gq"].clamp(-1, 1)).abs().max() <= TOL
    assert (model.reconstruct(expected["images"]) - expected["decoded_mu"].clamp(-1, 1)).abs().max() <= TOL


def test_export_gives_back_the_official_tensors_bit_for_bit(model, official_state):
    back = to_official_state(model)
    theirs = {k: v for k, v in official_state.items() if k.startswith(("encoder.", "decoder."))}
    assert back.keys() == theirs.keys()  # the same names (a set: load_state_dict needs no order)
    for k, v in theirs.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_converted_checkpoint_and_official_export_through_the_job(tmp_path, model, official_state, expected):
    ours = tmp_path / "a.safetensors"
    run = [sys.executable, str(REPO / "jobs" / "convert.py")]
    done = subprocess.run(
        [*run, "from-official", "--checkpoint", CKPT, "--config", YAML, "--output", str(ours)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = gq.load(str(ours))
    assert loaded.config == model.config
    prov = loaded.provenance["official"]
    assert prov["source_sha256"] == model.provenance["official"]["source_sha256"]
    assert prov["ignored_keys"] == sorted(k for k in official_state if k.startswith("loss."))
    assert "optimizer_states" in prov["ignored_entries"] and prov["config"]["params"]["encoder_config"]
    assert torch.equal(loaded.tokenize(expected["images"]), model.tokenize(expected["images"]))
    back = tmp_path / "back.ckpt"
    done = subprocess.run([*run, "to-official", "--checkpoint", str(ours), "--output", str(back)],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    exported = torch.load(back, weights_only=True)["state_dict"]
    for k, v in official_state.items():
        if k.startswith(("encoder.", "decoder.")):
            assert torch.equal(exported.pop(k), v), k
    assert not exported
    config = yaml.safe_load((tmp_path / "back.yaml").read_text())
    assert config["model"]["params"]["decoder_config"]["params"] == "${model.params.encoder_config.params}"
    assert model_config_from_official(config) == model.config
    again = subprocess.run([*run, "to-official", "--checkpoint", str(ours), "--output", str(back)],
                           capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert again.returncode == 2 and "exists" in again.stderr  # never replaces a file unless --force


def test_paper_preset_is_the_official_sd3unet():
    torch.manual_seed(0)
    model = gq.GQVAE(gq.model_config("paper-f8c16", 0.25))
    encoder = sum(p.numel() for p in model.encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert (encoder, decoder) == (35_325_856, 51_648_771)  # counted from the official code
    state = to_official_state(model)
    attention = sorted({k.rsplit(".", 2)[0] for k in state if ".attn." in k})
    assert attention == [  # after every block of the lowest (32x32) level, none in the middle
        "decoder.up.3.attn.0", "decoder.up.3.attn.1", "decoder.up.3.attn.2",
        "encoder.down.3.attn.0", "encoder.down.3.attn.1",
    ]  # fmt: skip
    assert not any(".mid.attn" in k for k in state)
    config = to_official_config(model)
    assert config["model"]["params"]["encoder_config"]["params"]["attn_resolutions"] == [32]
    assert config["model"]["params"]["regularizer_config"]["params"]["group"] == 16
    again = gq.GQVAE(model_config_from_official(config))
    load_official_state(again, state)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


class Payload:
    """What a hostile checkpoint can carry: unpickling it runs code that writes a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


class Callback:
    """A Lightning-style callback object: harmless, but weights_only refuses it."""

    def __init__(self):
        self.state = {"best": 1.0}


def test_unsafe_pickle_is_never_run(tmp_path, expected):
    marker = tmp_path / "pwned"
    ckpt = torch.load(CKPT, weights_only=True)
    ckpt["callbacks"] = {"payload": Payload(marker), "checkpoint": Callback()}
    ckpt["hyper_parameters"] = {"lr": np.float64(1e-4)}
    path = tmp_path / "foreign.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(Exception):  # noqa: B017 (weights_only refuses it whole, whatever its error class)
        torch.load(path, weights_only=True)
    model = from_official(str(path), YAML)
    assert not marker.exists()
    skipped = model.provenance["official"]["skipped_pickle_globals"]
    assert any(s.endswith(".exec") for s in skipped) and any("Callback" in s for s in skipped)
    assert torch.equal(model.tokenize(expected["images"]), expected["indices"].permute(0, 2, 3, 1))


def _convert_error(tmp_path, ckpt, config) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "convert.py"), "from-official", "--checkpoint", str(ckpt),
         "--config", str(config), "--output", str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert not (tmp_path / "out.safetensors").exists()
    return lines[0]


def test_truncated_checkpoint_and_missing_field_are_one_line_errors(tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(Path(CKPT).read_bytes()[: 1 << 20])
    assert "damaged or not a PyTorch checkpoint" in _convert_error(tmp_path, cut, YAML)
    config = yaml.safe_load(Path(YAML).read_text())
    del config["model"]["params"]["encoder_config"]["params"]["ch"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    assert "model.params.encoder_config.params.ch" in _convert_error(tmp_path, CKPT, bad)
    assert "is a directory" in _convert_error(tmp_path, tmp_path, YAML)


def _edited(change) -> dict:
    config = copy.deepcopy(read_config(YAML))
    change(config["model"]["params"])
    return config


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: p["encoder_config"].update(target="pit.modules.vit.ViTEncoder"), "encoder_config.target"),
        (lambda p: p["regularizer_config"].update(target="pit.bsq.B"), "regularizer_config.target"),
        (lambda p: p.update(latent_stats=True), "model.params.latent_stats"),
        (lambda p: p["encoder_config"]["params"].update(padding_mode="reflect"), "params.padding_mode"),
        (lambda p: p["regularizer_config"]["params"].update(format="blc"), "params.format"),
        (lambda p: p["regularizer_config"]["params"].update(group=5), "group"),
        (lambda p: p.update(decoder_config={"target": "pit.modules.unet.Decoder",
                                            "params": {**p["encoder_config"]["params"], "ch": 64}}),
         "decoder_config.params.ch"),
    ],
)  # fmt: skip
def test_configs_this_version_cannot_build_name_the_field(change, field):
    with pytest.raises(CheckpointError, match=field.replace(".", r"\.")):
        model_config_from_official(_edited(change))


def test_checkpoint_of_another_network_is_refused_with_the_tensor():
    def wider(params):
        for part in ("encoder_config", "decoder_config"):
            params[part]["params"]["ch"] = 64

    config = _edited(wider)
    with pytest.raises(
        CheckpointError, match=r"ch = 64 does not match the checkpoint \(encoder\.conv_in\.weight"
    ):
        from_official(CKPT, config)


def test_regularizer2_groups_channels_contiguously(expected):
    def gq2(params):
        params["regularizer_config"] = {
            "target": "pit.quantization.gaussian.GaussianQuantRegularizer2",
            "params": {"dim": 4, "codebook_size": 1024, "backend": "cuda"},
        }

    model = from_official(CKPT, _edited(gq2))
    assert model.config.quantizer.layout == "contiguous" and model.config.quantizer.groups == 4
    tokens = model.tokenize(expected["images"])
    mu, logvar = model.encode(expected["images"])
    # the official quant_vq: channels-last, then groups of `dim` consecutive channels
    mu_q = mu.permute(0, 2, 3, 1).reshape(-1, 4)
    lv_q = logvar.permute(0, 2, 3, 1).reshape(-1, 4)
    ref, _ = reference_search(mu_q, lv_q, model.quantizer.codes)
    assert torch.equal(tokens.reshape(-1), ref)
    config = to_official_config(model)
    assert config["model"]["params"]["regularizer_config"]["params"]["dim"] == 4
    assert model_config_from_official(config) == model.config


def test_tokenize_job_runs_the_converted_model(tmp_path, model):
    """convert, then jobs/tokenize.py over a real-photo shard: tokens equal model.tokenize in-process."""
    ours = tmp_path / "a.safetensors"
    gq.save(model, str(ours), model.provenance)
    shard = REPO / "assets" / "samples" / "photos-000000.tar"
    out = tmp_path / "tokens"
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "tokenize.py"), "--input", str(shard), "--output", str(out),
         "--checkpoint", str(ours), "--image-size", "64", "--batch-size", "4", "--no-progress",
         "--encoder-precision", "float32"],
        capture_output=True, text=True, cwd=REPO, timeout=300, start_new_session=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = pq.read_table(out / "photos-000000.parquet")
    with tarfile.open(shard) as tar:  # an independent read of the same images
        jpegs = {m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    keys = table["key"].to_pylist()
    assert keys == sorted(jpegs)
    images = [preprocess(np.asarray(Image.open(io.BytesIO(jpegs[k])).convert("RGB")), 64) for k in keys]
    tokens = model.tokenize(torch.from_numpy(np.stack(images)))
    got = np.stack(table["tokens"].to_pylist()).reshape(tokens.shape)
    np.testing.assert_array_equal(got, tokens.numpy())


def test_tensors_outside_the_tokenizer_are_listed_and_stray_ones_refused(official_state):
    model = gq.GQVAE(model_config_from_official(YAML))
    extra = dict(official_state) | {"model_ema.decay": torch.tensor(0.999)}
    ignored = load_official_state(model, extra)
    assert "model_ema.decay" in ignored and all(k.startswith(("loss.", "model_ema.")) for k in ignored)
    with pytest.raises(
        CheckpointError, match=r"unexpected tensors \['encoder\.down\.0\.attn\.0\.q\.weight'\]"
    ):
        load_official_state(model, dict(official_state) | {"encoder.down.0.attn.0.q.weight": torch.zeros(1)})
    missing = {k: v for k, v in official_state.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointError, match=r"missing tensors \['decoder\.conv_out\.bias'\]"):
        load_official_state(model, missing)
