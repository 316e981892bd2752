"""Training losses: hinge GAN values, reconstruction sums, the discriminator's shape, the adaptive weight, the
optional perceptual term, and PSNR / codebook-usage metrics."""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gq.discriminator import PatchDiscriminator
from gq.losses import (
    LPIPSVGG,
    LossConfig,
    PerceptualWeightsError,
    adaptive_weight,
    gan_active,
    generator_loss,
    hinge_d_loss,
    load_perceptual,
    reconstruction_loss,
)
from gq.metrics import codebook_usage, psnr, to_uint8


def test_hinge_loss_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2     -> mean 1
    assert math.isclose(float(hinge_d_loss(real, fake)), 0.5 * (5 / 6 + 1), rel_tol=1e-6)
    assert float(hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0))) == 0.0
    assert math.isclose(float(generator_loss(fake)), 1 / 3, rel_tol=1e-6)


def test_reconstruction_l1_l2_against_manual():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    terms = reconstruction_loss(x, y, LossConfig())
    manual_l1 = sum(float((y[i] - x[i]).abs().sum()) for i in range(3)) / 3
    assert math.isclose(float(terms["rec"]), manual_l1, rel_tol=1e-5)
    assert math.isclose(float(terms["l1"]), float((y - x).abs().mean()), rel_tol=1e-6)
    assert "perceptual" not in terms

    terms = reconstruction_loss(x, y, LossConfig(l1_weight=0.5, l2_weight=2.0))
    manual_l2 = sum(float((y[i] - x[i]).square().sum()) for i in range(3)) / 3
    assert math.isclose(float(terms["rec"]), 0.5 * manual_l1 + 2.0 * manual_l2, rel_tol=1e-5)


def test_loss_config_validation_and_round_trip():
    config = LossConfig(l2_weight=0.5, disc_start=10)
    assert LossConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        LossConfig.from_dict({"l1_weight": 1.0, "bogus": 2})
    with pytest.raises(ValueError):
        LossConfig(l1_weight=0.0, l2_weight=0.0)
    assert not gan_active(9, config) and gan_active(10, config)


@pytest.mark.parametrize(("size", "layers", "patches"), [(64, 3, 6), (32, 3, 2), (64, 2, 14)])
def test_discriminator_output_shape(size, layers, patches):
    disc = PatchDiscriminator(channels=16, layers=layers)
    out = disc(torch.zeros(2, 3, size, size))
    assert out.shape == (2, 1, patches, patches)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())


def test_adaptive_weight_finite_and_matches_norm_ratio():
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    recon = last(h)
    rec = recon.abs().sum()
    g = -(recon * 0.1).mean()
    w = adaptive_weight(rec, g, last.weight, scale=0.75)
    assert w.requires_grad is False and torch.isfinite(w) and float(w) > 0
    gr = torch.autograd.grad(rec, last.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last.weight, retain_graph=True)[0].norm()
    assert math.isclose(float(w), 0.75 * float(gr / (gg + 1e-4)), rel_tol=1e-5)
    # a generator loss with zero gradient hits the clamp, not inf
    w0 = adaptive_weight(rec, (recon * 0).sum(), last.weight, scale=1.0, max_weight=1e4)
    assert float(w0) == 1e4
    (rec + w * g).backward()  # the graph is still there for the real backward


def test_perceptual_absent_means_no_term():
    config = LossConfig()
    assert config.perceptual_weights is None
    x = torch.zeros(1, 3, 8, 8)
    assert set(reconstruction_loss(x, x, config)) == {"rec", "l1", "l2"}


def test_perceptual_path_missing_is_a_clear_error(tmp_path):
    with pytest.raises(PerceptualWeightsError, match="no such file"):
        load_perceptual(tmp_path / "vgg.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(PerceptualWeightsError, match="TorchScript"):
        load_perceptual(junk)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong))
    with pytest.raises(PerceptualWeightsError, match="LPIPS"):
        load_perceptual(wrong)


def test_perceptual_from_lpips_safetensors(tmp_path):
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in LPIPSVGG().state_dict().items()}
    # as lpips.LPIPS(net="vgg").state_dict() spells the heads: both lin{k} and lins.{k}
    state.update({f"lins.{k}.model.1.weight": state[f"lin{k}.model.1.weight"].clone() for k in range(5)})
    for k in range(5):
        state[f"lin{k}.model.1.weight"].abs_()
        state[f"lins.{k}.model.1.weight"] = state[f"lin{k}.model.1.weight"].clone()
    path = tmp_path / "lpips_vgg.safetensors"
    save_file(state, str(path))
    net = load_perceptual(path)
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_()
    terms = reconstruction_loss(x, y, LossConfig(perceptual_weights=str(path)), perceptual=net)
    assert float(terms["perceptual"]) > 0
    terms["rec"].backward()
    assert torch.isfinite(y.grad).all()
    same = reconstruction_loss(x, x, LossConfig(perceptual_weights=str(path)), perceptual=net)
    assert float(same["perceptual"]) == 0.0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_perceptual_from_torchscript(tmp_path):
    class Dist(nn.Module):
        def forward(self, a, b):
            return (a - b).square().mean((1, 2, 3))

    path = tmp_path / "dist.pt"
    torch.jit.script(Dist()).save(str(path))
    net = load_perceptual(path)
    x, y = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    terms = reconstruction_loss(x, y, LossConfig(l1_weight=0.0, perceptual_weights=str(path)), perceptual=net)
    assert math.isclose(float(terms["perceptual"]), 1.0) and math.isclose(float(terms["rec"]), 3 * 64)


def test_psnr_on_uint8():
    a = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 10  # mse = 100 / 48
    values = psnr(a, b)
    assert math.isclose(float(values[0]), 10 * math.log10(255**2 / (100 / 48)), rel_tol=1e-9)
    assert math.isinf(float(values[1]))
    # floats are clamped and rounded first: -1 -> 0, 1 -> 255, out-of-range clamps
    f = torch.full((1, 3, 2, 2), 1.5)
    assert torch.equal(to_uint8(f), torch.full((1, 2, 2, 3), 255, dtype=torch.uint8))
    assert torch.equal(to_uint8(torch.full((1, 3, 1, 1), -0.999)), torch.zeros(1, 1, 1, 3, dtype=torch.uint8))


def test_codebook_usage():
    tokens = torch.tensor([[0, 1], [1, 3]])
    stats = codebook_usage(tokens, 8)
    assert stats["used"] == 3 and stats["usage"] == 3 / 8
    p = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    assert math.isclose(stats["perplexity"], math.exp(float(-(p * p.log()).sum())), rel_tol=1e-9)
    assert codebook_usage(torch.arange(16), 16)["perplexity"] == pytest.approx(16)
