"""The GQ-VAE: shapes for every preset and operating point, the tokenize / detokenize pair, input paths, and
the training forward's KL term against an independent float64 computation."""

import math

import pytest
import torch

import gq
from gq.model import to_float_images

CASES = [(preset, bpp) for preset in ("paper-f8c16", "small-f8c16") for bpp in gq.OPERATING_POINTS]


def side(preset: str) -> int:
    return 32 if preset == "paper-f8c16" else 64  # the paper preset is 84M parameters: keep it small


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {case: gq.GQVAE(gq.model_config(*case)).eval() for case in CASES}


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("case", CASES, ids=[f"{p}-{b}" for p, b in CASES])
def test_shapes(models, case):
    model = models[case]
    dim, groups = gq.OPERATING_POINTS[case[1]]
    s = side(case[0])
    x = images(2, s)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, dim * groups, s // 8, s // 8)
    tokens = model.tokenize(x)
    assert tokens.shape == (2, s // 8, s // 8, groups) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 65536
    for out in (model.detokenize(tokens), model.reconstruct(x)):
        assert out.shape == (2, 3, s, s) and out.dtype == torch.float32
        assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    with torch.no_grad():
        train = model(x, generator=torch.Generator().manual_seed(0))
    assert train.recon.shape == (2, 3, s, s) and train.kl_loss.dim() == 0
    assert train.kl_stats.count.item() == 2 * (s // 8) ** 2 * groups


@pytest.mark.parametrize("bpp", list(gq.OPERATING_POINTS))
def test_tokenize_detokenize_pair(models, bpp):
    model = models[("small-f8c16", bpp)]
    x = images(2, 64, seed=1)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        tokens = model.tokenize(x)
        assert torch.equal(tokens, model.quantizer.quantize(mu, logvar))
        direct = model.decode(model.quantizer.dequantize(tokens)).clamp(-1, 1)
        assert torch.equal(model.detokenize(tokens), direct)
        # the continuous path decodes mu itself
        assert torch.equal(model.reconstruct(x), model.decode(mu).clamp(-1, 1))


def test_uint8_input_equals_float_path(models):
    model = models[("small-f8c16", 0.5)]
    x = images(2, 64, seed=2)
    as_float = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert torch.equal(to_float_images(x), as_float)
    with torch.no_grad():
        assert torch.equal(model.tokenize(x), model.tokenize(as_float))
        for a, b in zip(model.encode(x), model.encode(as_float)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1, 60, 64, 3), (1, 64, 36, 3)])
def test_size_not_multiple_of_8_raises(models, shape):
    model = models[("small-f8c16", 0.25)]
    with pytest.raises(ValueError, match="multiples of 8"):
        model.tokenize(torch.zeros(shape, dtype=torch.uint8))


def test_bad_image_layout_raises(models):
    model = models[("small-f8c16", 0.25)]
    with pytest.raises(ValueError):
        model.tokenize(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))  # uint8 must be channels-last


@pytest.mark.parametrize("bpp", list(gq.OPERATING_POINTS))
@pytest.mark.parametrize("mode", ["tdc", "kl"])
def test_forward_kl_term_matches_float64(bpp, mode):
    torch.manual_seed(3)
    weight = 0.1
    model = gq.GQVAE(gq.model_config("small-f8c16", bpp, kl_mode=mode, kl_weight=weight))
    tdc = model.tdc
    tdc.lam.fill_(1.7)
    tdc.lam_min.fill_(0.3)
    tdc.lam_max.fill_(2.5)
    x = images(3, 64, seed=4)
    with torch.no_grad():
        out = model(x, generator=torch.Generator().manual_seed(0))
        # spread the posteriors so every TDC band is hit
        mu = out.mu.double() * 40.0
        logvar = out.logvar.double()
        loss, _ = tdc(mu.float(), logvar.float())
    dim, groups = gq.OPERATING_POINTS[bpp]
    per_dim = 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar) / math.log(2.0)  # (B, C, h, w), bits
    # interleaved layout: channel c belongs to group c % G
    kappa = torch.stack([per_dim[:, g::groups].sum(1) for g in range(groups)], dim=-1)  # (B, h, w, G)
    target = math.log2(65536)
    if mode == "kl":
        expected = weight * kappa.sum() / 3
    else:
        w = torch.where(kappa > target + 0.5, 2.5, torch.where(kappa < target - 0.5, 0.3, 1.0))
        expected = weight * 1.7 * (w * kappa).sum() / 3
    assert math.isclose(float(loss), float(expected), rel_tol=1e-5)
    # and the term of the real forward, unscaled
    per_dim = 0.5 * (out.mu.double() ** 2 + out.logvar.double().exp() - 1 - out.logvar.double()) / math.log(2)
    kappa = torch.stack([per_dim[:, g::groups].sum(1) for g in range(groups)], dim=-1)
    if mode == "kl":
        expected = weight * kappa.sum() / 3
    else:
        w = torch.where(kappa > target + 0.5, 2.5, torch.where(kappa < target - 0.5, 0.3, 1.0))
        expected = weight * 1.7 * (w * kappa).sum() / 3
    assert math.isclose(float(out.kl_loss), float(expected), rel_tol=1e-5)
    assert math.isclose(float(out.kl_stats.mean), float(kappa.mean()), rel_tol=1e-5)
    assert math.isclose(float(out.kl_stats.max), float(kappa.max()), rel_tol=1e-5)


def test_forward_decodes_the_reparameterised_sample():
    torch.manual_seed(5)
    model = gq.GQVAE(gq.model_config("small-f8c16", 0.25))
    x = images(2, 64, seed=6)
    with torch.no_grad():
        out = model(x, generator=torch.Generator().manual_seed(7))
        eps = torch.randn(out.mu.shape, generator=torch.Generator().manual_seed(7))
        z = out.mu + torch.exp(0.5 * out.logvar) * eps
        assert torch.allclose(out.recon, model.decode(z), atol=1e-5)
        again = model(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out.recon, again.recon)
