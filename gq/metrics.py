"""Evaluation metrics as small pure functions: PSNR on uint8 images and codebook usage of a token set."""

from __future__ import annotations

import math

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), clamped and rounded; uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected float images (B, 3, H, W), got {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return pixels.round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of every image, (B,), computed on uint8 pixels (peak 255) as image codecs report it.

    Either argument may be uint8 (B, H, W, 3) or float (B, 3, H, W) in [-1, 1]; floats are clamped and
    rounded to uint8 first. An exact copy gives +inf.
    """
    a, b = to_uint8(reference).double(), to_uint8(estimate).double()
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a - b).square().flatten(1).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse)


def codebook_usage(tokens: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """How much of the codebook a set of tokens uses: `usage` (fraction of the K codes that occur at least
    once), `used` (how many), and `perplexity` (exp of the entropy of the code histogram; K at best)."""
    flat = tokens.reshape(-1).long().cpu()
    if flat.numel() == 0:
        return {"usage": 0.0, "used": 0, "perplexity": 0.0}
    counts = torch.bincount(flat, minlength=codebook_size).double()
    p = counts[counts > 0] / flat.numel()
    entropy = float(-(p * p.log()).sum())
    used = int((counts > 0).sum())
    return {"usage": used / codebook_size, "used": used, "perplexity": math.exp(entropy)}


def expected_usage(tokens: int, codebook_size: int) -> float:
    """The fraction of K codes that `tokens` independent uniform draws are expected to hit: 1 - (1 - 1/K)^n.

    The yardstick for `usage` on a small set: 10k images of 256 tokens cover about 1 - e^-39 of K = 2^16,
    but 100 images only about 32%, however good the tokenizer.
    """
    if tokens <= 0:
        return 0.0
    if codebook_size == 1:
        return 1.0
    return -math.expm1(tokens * math.log1p(-1.0 / codebook_size))


def usage_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """Codebook statistics of a code histogram (`counts[k]` = occurrences of code k, length K): `tokens`,
    `used`, `usage` (used / K), `expected_uniform_usage` (`expected_usage` of the same token count),
    `entropy_bits` of the empirical code distribution (log2 K at best) and `perplexity` (2^entropy)."""
    counts = counts.detach().reshape(-1).double().cpu()
    k, n = counts.numel(), float(counts.sum())
    used = int((counts > 0).sum())
    if n == 0:
        entropy = 0.0
    else:
        p = counts[counts > 0] / n
        entropy = float(-(p * p.log2()).sum())
    return {
        "tokens": int(n),
        "used": used,
        "usage": used / k,
        "expected_uniform_usage": expected_usage(int(n), k),
        "entropy_bits": entropy,
        "perplexity": 2.0**entropy if n else 0.0,
    }
