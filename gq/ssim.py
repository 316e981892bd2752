"""SSIM (structural similarity) of RGB images on uint8 pixels, in PyTorch.

Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to structural similarity",
IEEE TIP 2004. As in their reference code and in `skimage.metrics.structural_similarity(..., data_range=255,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1)`: an 11 x 11 Gaussian window
of sigma 1.5 (normalised), K1 = 0.01, K2 = 0.03, statistics where the window lies wholly inside the image
("valid"), averaged over the map, then over the three channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gq.metrics import to_uint8

WINDOW = 11  # taps of the Gaussian window: radius 5 = int(3.5 * sigma + 0.5), as skimage/scipy truncate it
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_window(
    size: int = WINDOW, sigma: float = SIGMA, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The normalised 1-D Gaussian of `size` taps (the 2-D window is its outer product)."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(
    reference: torch.Tensor,
    estimate: torch.Tensor,
    *,
    data_range: float = 255.0,
    window: int = WINDOW,
    sigma: float = SIGMA,
) -> torch.Tensor:
    """SSIM of every image, (B,) float64, on uint8 pixels; identical images give exactly 1.

    Either argument may be uint8 (B, H, W, 3) or float (B, 3, H, W) in [-1, 1]; floats are clamped and rounded
    to uint8 first (as `gq.metrics.psnr` does). Images must be at least `window` pixels on each side.
    Computed in float64 on the images' device.
    """
    a, b = to_uint8(reference), to_uint8(estimate)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    n, h, w, c = a.shape
    if min(h, w) < window:
        raise ValueError(f"SSIM needs images of at least {window} x {window} pixels, got {h} x {w}")
    x = a.permute(0, 3, 1, 2).reshape(n * c, 1, h, w).double()
    y = b.to(a.device).permute(0, 3, 1, 2).reshape(n * c, 1, h, w).double()
    g = gaussian_window(window, sigma).to(x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable "valid" Gaussian filter
        return F.conv2d(F.conv2d(t, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    per_channel = (numerator / denominator).flatten(1).mean(1)
    return per_channel.view(n, c).mean(1)
