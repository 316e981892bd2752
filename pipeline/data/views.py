"""Augmented views of an image for tokenizing (LlamaGen's convention for class-conditional AR training).

- "center": the one preprocessing (pipeline/data/preprocess.py): shorter side to `size`, center crop;
- "flip": that center crop and its mirror (LlamaGen's `torch.flip(x, dims=[-1])`);
- "tencrop": shorter side to int(TENCROP_SCALE * size), center crop of that square, then torchvision's
  `TenCrop(size)`: the four corners and the center, then the same five of the mirrored square (LlamaGen's
  `--ten-crop`, crop range 1.1).

A view's number is its position in VIEW_SETS[name]; the token files carry it in the `view` column.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.preprocess import preprocess

TENCROP_SCALE = 1.1  # LlamaGen's crop_range: the square the ten crops are cut from, relative to size
_FIVE = ("top left", "top right", "bottom left", "bottom right", "center")
VIEW_SETS = {
    "center": ("center",),
    "flip": ("center", "center mirrored"),
    "tencrop": _FIVE + tuple(f"{name} of the mirror" for name in _FIVE),
}


def describe(views: str) -> str:
    """The views as recorded in the preprocessing of token files and run records."""
    if views == "center":
        return "center"
    if views == "flip":
        return "center, and the center mirrored"
    side = f"int({TENCROP_SCALE} * image_size)"
    return f"ten-crop: shorter side to {side}, center square of that, its 4 corners + center, and mirrored"


def crop_views(
    image: np.ndarray, size: int, views: str, source_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (V, size, size, 3), the views of VIEW_SETS[views] in order."""
    if views == "center":
        return preprocess(image, size, source_shape)[None]
    if views == "flip":
        crop = preprocess(image, size, source_shape)
        return np.stack([crop, crop[:, ::-1]])
    if views != "tencrop":
        raise ValueError(f"views must be one of {tuple(VIEW_SETS)}, got {views!r}")
    square = preprocess(image, int(size * TENCROP_SCALE), source_shape)
    return np.stack(_five(square, size) + _five(square[:, ::-1], size))


def _five(square: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision's five_crop: corners, then the center (top/left rounded as torchvision rounds)."""
    h, w = square.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    at = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return [square[y : y + size, x : x + size] for y, x in at]
