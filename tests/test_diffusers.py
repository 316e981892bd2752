"""Bring your own VAE: diffusers' own AutoencoderKL (random, tiny, built offline) is the oracle."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gq
from gq.checkpoint import CheckpointError
from gq.diffusers_vae import from_diffusers
from kernels.reference import direct_scores, reference_search, score_scale

diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # the bound; float32 in another order than diffusers
BLOCKS = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
VAES = {  # name -> AutoencoderKL config: SD-like (4 ch, quant convs), SD3/FLUX-like (16 ch, none, shift)
    "sd": dict(block_out_channels=[32, 64], latent_channels=4, norm_num_groups=16, layers_per_block=1),
    "flux": dict(block_out_channels=[16, 32], latent_channels=16, norm_num_groups=8, layers_per_block=1,
                 use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611),
    "flux-no-mid-attn": dict(block_out_channels=[16, 32], latent_channels=16, norm_num_groups=8,
                             layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False),
}  # fmt: skip
OPERATING = {
    "sd": {},
    "flux": {"group_dim": 4, "codebook_bits": 10},
    "flux-no-mid-attn": {"group_dim": 8, "codebook_bits": 12},
}


def make_vae(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**BLOCKS, **config).eval()
    with torch.no_grad():  # posteriors of a trained-looking spread: logvar around -4, not ~0
        conv = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
        conv.bias[config["latent_channels"] :] -= 4.0
    return vae


def save_vae(vae, path: Path) -> str:
    vae.save_pretrained(str(path))
    return str(path)


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module", params=sorted(VAES))
def pair(request, tmp_path_factory):
    """(diffusers' VAE, our conversion, the directory, the name)."""
    vae = make_vae(VAES[request.param])
    path = save_vae(vae, tmp_path_factory.mktemp(request.param))
    return vae, from_diffusers(path, **OPERATING[request.param]), path, request.param


def test_posterior_and_reconstruction_equal_diffusers(pair):
    vae, model, _, name = pair
    x = images()
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        reference = vae.decode(dist.mean).sample.clamp(-1, 1)
    mu, logvar = model.encode(x)
    assert (mu - dist.mean).abs().max() <= TOL and (logvar - dist.logvar).abs().max() <= TOL
    assert (model.reconstruct(x) - reference).abs().max() <= TOL
    assert model.config.network.mid_attention == (name != "flux-no-mid-attn")
    assert model.config.network.quant_conv == (name == "sd") == model.config.network.post_quant_conv


def test_tokens_are_the_rule_on_diffusers_posterior_and_detokenize_is_its_decoder(pair):
    vae, model, _, _ = pair
    q = model.config.quantizer
    x = images()
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    tokens = model.tokenize(x)
    mu_g = gq.split_groups(dist.mean, q.groups, q.layout).reshape(-1, q.codebook.dim)
    lv_g = gq.split_groups(dist.logvar, q.groups, q.layout).reshape(-1, q.codebook.dim)
    brute, _ = reference_search(mu_g, lv_g, model.quantizer.codes)  # float64, on diffusers' posterior
    ours = tokens.reshape(-1)
    differ = ours != brute
    if differ.any():  # only near-ties of the float64 scores may go the other way
        codes = model.quantizer.codes
        a, b = codes[ours[differ]], codes[brute[differ]]
        m, lv = mu_g[differ], lv_g[differ]
        gap = direct_scores(m, lv, b, "posterior", 1.0) - direct_scores(m, lv, a, "posterior", 1.0)
        assert (gap.abs() <= 1e-4 * score_scale(m, lv, b, "posterior", 1.0)).all()
    assert differ.float().mean() < 0.02 and len(torch.unique(ours)) > 1
    with torch.no_grad():
        z = gq.dequantize(tokens, model.quantizer.codes, q.layout)
        reference = vae.decode(z).sample.clamp(-1, 1)
    assert (model.detokenize(tokens) - reference).abs().max() <= TOL


def test_provenance_keeps_the_diffusion_conventions(pair):
    _, model, path, name = pair
    prov = model.provenance["diffusers"]
    config = json.loads((Path(path) / "config.json").read_text())
    assert prov["config"] == config and prov["diffusion"]["scaling_factor"] == config["scaling_factor"]
    assert prov["diffusion"]["shift_factor"] == (0.1159 if name == "flux" else None)
    weights = Path(path) / "diffusion_pytorch_model.safetensors"
    import hashlib

    assert (
        prov["source_sha256"] == model.checkpoint_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    )


def test_legacy_attention_names_are_read(tmp_path):
    vae = make_vae(VAES["sd"])
    from safetensors.torch import save_file

    path = save_vae(vae, tmp_path / "vae")
    legacy = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for k, v in vae.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(new, old)
        state[k] = v.contiguous()
    save_file(state, str(Path(path) / "diffusion_pytorch_model.safetensors"))
    x = images()
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    assert (from_diffusers(path).encode(x)[0] - mean).abs().max() <= TOL


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "convert.py"), "from-diffusers", *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_bad_input_is_a_one_line_error(tmp_path):
    vae = make_vae(VAES["sd"])
    good = save_vae(vae, tmp_path / "good")
    out = str(tmp_path / "out.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _one_line_error(_convert("--vae", str(empty), "--output", out))
    error = _one_line_error(_convert("--vae", good, "--group-dim", "3", "--output", out))
    assert "group_dim 3 does not divide" in error
    assert not Path(out).exists()
    # the same errors in-process (each is the one line the job prints)
    for other in ("AutoencoderTiny", "AutoencoderKLQwenImage"):
        wrong = tmp_path / other
        wrong.mkdir()
        (wrong / "config.json").write_text(json.dumps({"_class_name": other, "latent_channels": 4}))
        with pytest.raises(CheckpointError, match=f"_class_name is '{other}'; this version converts only"):
            from_diffusers(str(wrong))
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text((Path(good) / "config.json").read_text())
    data = (Path(good) / "diffusion_pytorch_model.safetensors").read_bytes()
    (cut / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated safetensors"):
        from_diffusers(str(cut))
    (cut / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        from_diffusers(str(cut))


def test_a_network_of_another_shape_names_the_tensor(tmp_path):
    path = save_vae(make_vae(VAES["sd"]), tmp_path / "vae")
    config = json.loads((Path(path) / "config.json").read_text())
    (Path(path) / "config.json").write_text(json.dumps(config | {"layers_per_block": 2}))
    with pytest.raises(CheckpointError, match=r"missing tensors \['decoder\.up_blocks\.0\.resnets\.2"):
        from_diffusers(path)
    (Path(path) / "config.json").write_text(json.dumps(config | {"block_out_channels": [32, 48]}))
    with pytest.raises(CheckpointError, match="block_out_channels"):
        from_diffusers(path)


def test_the_product_never_imports_diffusers():
    for package in ("gq", "pipeline", "jobs", "kernels"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            assert "import diffusers" not in text and "from diffusers" not in text, path


def test_convert_job_output_round_trips_through_load(tmp_path):
    path = save_vae(make_vae(VAES["flux"]), tmp_path / "vae")
    out = tmp_path / "flux.safetensors"
    done = _convert("--vae", path, "--group-dim", "8", "--codebook-bits", "12", "--output", str(out))
    assert done.returncode == 0, done.stderr
    loaded = gq.load(str(out))
    direct = from_diffusers(path, group_dim=8, codebook_bits=12)
    assert loaded.config == direct.config and loaded.config.quantizer.groups == 2
    assert loaded.provenance["diffusers"]["source_sha256"] == direct.checkpoint_sha256
    x = images(seed=3)
    assert torch.equal(loaded.tokenize(x), direct.tokenize(x))
    np.testing.assert_array_equal(loaded.reconstruct(x).numpy(), direct.reconstruct(x).numpy())
