"""The one image preprocessing shared by tokenizing, training and evaluation: shorter side to `size`
(antialiased bicubic), then a center crop (or a random crop and flip for training)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from gq.model import to_float_images


def preprocess(image: np.ndarray, size: int, source_shape: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): shorter side resized to `size`, then center crop.

    source_shape: the (height, width) the image has at full scale when it was decoded reduced (JPEG
    draft); the resize then lands on the geometry the full-scale image would have had, so that the crop
    covers the same part of the scene."""
    resized = resize_shorter_side(image, size, source_shape)
    height, width = resized.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return resized[top : top + size, left : left + size].copy()  # fresh, contiguous and writable


def random_crop_flip(
    image: np.ndarray, size: int, rng: np.random.Generator, source_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Training augmentation: shorter side to `size` as in `preprocess`, a random crop along the longer side,
    and a horizontal flip with probability 1/2. Deterministic for a seeded `rng` (two draws per call)."""
    resized = resize_shorter_side(image, size, source_shape)
    height, width = resized.shape[:2]
    offset = int(rng.integers(0, max(height, width) - size + 1))
    flip = bool(rng.random() < 0.5)
    top, left = (offset, 0) if height > width else (0, offset)
    crop = resized[top : top + size, left : left + size]
    return (crop[:, ::-1] if flip else crop).copy()


def resize_shorter_side(
    image: np.ndarray, size: int, source_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Resize uint8 (H, W, 3) so the shorter side is exactly `size`, keeping the aspect ratio (longer side
    rounded) of `source_shape` when given (see `preprocess`), else of the image. Antialiased: PIL's bicubic
    filter widens its support when downscaling, and `reducing_gap=None` keeps it exact (no JPEG-style box
    pre-reduction). An image already at the target shape is returned as is."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    height, width = image.shape[:2]
    source_height, source_width = source_shape or (height, width)
    new_height, new_width = resized_shape(source_height, source_width, size)
    box = None
    if (source_height, source_width) != (height, width):
        # decoded at 1/s (s a power of two) with the size rounded up: the scene spans source / s pixels,
        # a fraction of the last row and column; resizing that box keeps the full decode's geometry
        s = 2 ** round(math.log2(source_height / height))
        box = (0.0, 0.0, source_width / s, source_height / s)
    elif (new_height, new_width) == (height, width):
        return image
    resized = Image.fromarray(image).resize(
        (new_width, new_height), Image.Resampling.BICUBIC, box=box, reducing_gap=None
    )
    return np.array(resized)  # np.asarray of a PIL image is read-only


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side exactly `size` and the aspect ratio kept (longer side
    rounded, never below `size`): the geometry every resize here uses, on the CPU or the GPU."""
    scale = size / min(height, width)
    if height <= width:
        return size, max(size, round(width * scale))
    return max(size, round(height * scale)), size


def to_model_input(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 images (B, H, W, 3) (an array or a list of (H, W, 3)) -> contiguous float32 (B, 3, H, W) in
    [-1, 1]: `gq.model.to_float_images`, the model's own conversion, for numpy batches."""
    batch = np.stack(images) if isinstance(images, (list, tuple)) else np.asarray(images)
    if batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 (B, H, W, 3) images, got {batch.dtype} {batch.shape}")
    if not batch.flags.writeable:  # torch warns on (and must not alias) read-only arrays
        batch = batch.copy()
    return to_float_images(torch.from_numpy(batch)).contiguous()
