"""Metrics against independent computations: PSNR of known errors, SSIM against a scipy implementation,
codebook statistics of a known histogram, the expected-coverage formula, the KL histogram's percentiles."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from shardmaker import photo_like

from gq.evaluation import KLHistogram
from gq.metrics import codebook_usage, expected_usage, psnr, to_uint8, usage_from_counts
from gq.ssim import ssim


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 (H, W, 3) images as skimage computes it (gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255): scipy's Gaussian filter truncated at 3.5 sigma (11 taps),
    the border of 5 pixels cropped, the map averaged per channel, then over channels."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(3):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        f = lambda t: gaussian_filter(t, sigma=1.5, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())
    return float(np.mean(values))


def noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).round().astype(np.uint8)


def test_psnr_of_a_known_error_pattern():
    ref = np.full((2, 16, 16, 3), 100, np.uint8)
    est = ref.copy()
    checker = (np.indices((16, 16)).sum(0) % 2)[..., None]  # half the pixels
    est[0] = 100 + np.where(checker == 1, 3, -3)  # every pixel off by 3: MSE 9
    est[1] = 100 + 4 * checker  # half the pixels off by 4: MSE 8
    got = psnr(torch.from_numpy(ref), torch.from_numpy(est))
    expected = [10 * math.log10(255**2 / 9), 10 * math.log10(255**2 / 8)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    assert torch.isinf(psnr(torch.from_numpy(ref), torch.from_numpy(ref))).all()


def test_ssim_of_identical_images_is_one():
    images = torch.from_numpy(np.stack([photo_like(s, 40, 56) for s in range(3)]))
    assert torch.equal(ssim(images, images), torch.ones(3, dtype=torch.float64))


def test_ssim_matches_a_scipy_reference():
    rng = np.random.default_rng(0)
    structured = [photo_like(s, 48, 64) for s in range(3)]
    pairs = [(img, noisy(img, sigma, s)) for s, (img, sigma) in enumerate(zip(structured, (3, 10, 40)))]
    pairs.append(
        (rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    )
    pairs.append((structured[0], structured[1]))  # unrelated images
    pairs.append((structured[2], np.zeros_like(structured[2])))  # a flat estimate
    a = torch.from_numpy(np.stack([p[0] for p in pairs]))
    b = torch.from_numpy(np.stack([p[1] for p in pairs]))
    got = ssim(a, b).numpy()
    expected = [reference_ssim(x, y) for x, y in pairs]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    assert got.min() >= -1 and got.max() < 1


def test_ssim_of_float_images_equals_ssim_of_their_uint8_rounding():
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.equal(ssim(x, y), ssim(to_uint8(x), to_uint8(y)))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 10, 10, 3, dtype=torch.uint8), torch.zeros(1, 10, 10, 3, dtype=torch.uint8))


def test_ssim_and_psnr_decrease_with_noise():
    image = photo_like(5, 64, 64)
    ref = torch.from_numpy(np.stack([image] * 4))
    est = torch.from_numpy(np.stack([noisy(image, s, 1) for s in (1, 4, 16, 64)]))
    s, p = ssim(ref, est), psnr(ref, est)
    assert (s.diff() < 0).all() and (p.diff() < 0).all()


def test_codebook_statistics_of_a_known_histogram():
    tokens = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])  # K = 8: p = 1/2, 1/4, 1/8, 1/8
    counts = torch.bincount(tokens, minlength=8)
    stats = usage_from_counts(counts)
    assert stats["tokens"] == 8 and stats["used"] == 4 and stats["usage"] == 0.5
    assert stats["entropy_bits"] == pytest.approx(1.75, abs=1e-12)
    assert stats["perplexity"] == pytest.approx(2**1.75, abs=1e-12)
    assert stats["expected_uniform_usage"] == pytest.approx(1 - (7 / 8) ** 8, abs=1e-12)
    # the same numbers as gq.metrics.codebook_usage, which works in nats on the tokens themselves
    old = codebook_usage(tokens, 8)
    assert old["used"] == stats["used"] and old["perplexity"] == pytest.approx(stats["perplexity"])
    assert usage_from_counts(torch.zeros(8, dtype=torch.int64))["perplexity"] == 0.0


def test_expected_usage_formula():
    assert expected_usage(2, 4) == pytest.approx(7 / 16, abs=1e-15)
    assert expected_usage(0, 65536) == 0.0 and expected_usage(5, 1) == 1.0
    k, n = 65536, 10_000 * 256
    assert expected_usage(n, k) == pytest.approx(1 - math.exp(-n / k), rel=1e-9)  # (1 - 1/K)^n ~ e^(-n/K)
    # a uniform draw of n tokens from K codes covers that fraction on average
    rng = np.random.default_rng(0)
    draws = [len(np.unique(rng.integers(0, 1000, 700))) / 1000 for _ in range(200)]
    assert np.mean(draws) == pytest.approx(expected_usage(700, 1000), abs=0.005)


def test_kl_histogram_statistics_and_percentiles():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.gamma(9, 1.8, 30_000), [0.0, 300.0]]
    )  # spread around 16, one beyond the bins
    hist = KLHistogram(target_bits=16.0, tolerance=0.5)
    for chunk in np.array_split(values, 7):
        hist.update(torch.from_numpy(chunk))
    s = hist.summary()
    assert s["values"] == len(values) and s["min"] == 0.0 and s["max"] == 300.0
    assert s["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert s["above_target"] == int((values > 16).sum())
    assert s["within_band_fraction"] == pytest.approx(np.mean(np.abs(values - 16) <= 0.5))
    for p in (1, 5, 25, 50, 75, 95, 99):
        assert s["percentiles"][f"p{p}"] == pytest.approx(np.percentile(values, p), abs=2 * hist.bin_bits)
