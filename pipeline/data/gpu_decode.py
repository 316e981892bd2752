"""Batched JPEG decoding on the GPU (nvJPEG through torchvision.io.decode_jpeg), with the resize and
center crop done by torch on the device: the tokenizer's `jpeg_decoder="nvjpeg"` option.

Only JPEGs the GPU decodes the way the CPU path would are sent there: RGB or grayscale, no EXIF
rotation, within the decode limits (checked from the header, as on the CPU). Everything else, and
any JPEG nvJPEG refuses, goes through the CPU decoder, so skips keep their CPU reasons.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from pipeline.data.decode import (
    EXIF_ORIENTATION,
    DecodeLimits,
    check_size,
    find_image,
    label_of,
    notes_of,
)
from pipeline.data.preprocess import resized_shape
from pipeline.data.samples import Note, Rejected, Sample

RESIZE = "shorter side to image_size, torch bicubic antialias on the GPU (nvJPEG decode)"


@dataclass
class EncodedJpeg:
    """A sample whose JPEG waits for the batched GPU decoder; `sample` is kept for the CPU fallback."""

    key: str
    index: int
    label: int | None
    data: bytes
    sample: Sample
    notes: list[Note]
    size: tuple[int, int] | None = None  # (height, width) declared in the header (no EXIF rotation here)
    extras: dict = field(default_factory=dict)  # kept members' column values (pipeline/data/extras.py)


def nvjpeg_available() -> bool:
    """torchvision with a CUDA device: what `jpeg_decoder="nvjpeg"` needs."""
    try:
        import torchvision.io  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def screen(sample: Sample, limits: DecodeLimits) -> EncodedJpeg | None:
    """An EncodedJpeg when the sample's image can take the GPU path, else None (the CPU path)."""
    try:
        ext, data = find_image(sample.members)
    except Rejected:
        return None
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            mode, (width, height) = image.mode, image.size
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:
        return None  # the CPU decoder names what is wrong
    if mode not in ("RGB", "L") or orientation != 1:
        return None  # CMYK/YCCK and rotated images: the CPU path converts them
    try:
        check_size(width, height, limits)
    except Rejected:
        return None
    label = label_of(sample.members)
    return EncodedJpeg(sample.key, sample.index, label, data, sample, notes_of(sample, ext), (height, width))


def resize_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (size, size, 3): shorter side to `size` (bicubic, antialiased, the
    geometry of pipeline.data.preprocess), then the center crop."""
    _, height, width = image.shape
    if min(height, width) == size:
        resized = image
    else:
        x = torch.nn.functional.interpolate(
            image[None].float(),
            size=resized_shape(height, width, size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        resized = x[0].round_().clamp_(0, 255).to(torch.uint8)
    top, left = (resized.shape[1] - size) // 2, (resized.shape[2] - size) // 2
    return resized[:, top : top + size, left : left + size].permute(1, 2, 0)


def torchvision_decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """nvJPEG batch decode to uint8 (3, H, W) RGB tensors on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


class GpuJpegDecoder:
    """Decodes a batch of EncodedJpeg into uint8 (b, size, size, 3) on `device`.

    `decode` turns a list of JPEG byte strings into (3, H, W) uint8 tensors; torchvision's nvJPEG by
    default (the tests pass a PIL stand-in). A batch it refuses is retried image by image, and the
    images that still fail are returned for the CPU decoder.
    """

    def __init__(
        self,
        size: int,
        device: torch.device,
        decode: Callable[[list[bytes], torch.device], list[torch.Tensor]] = torchvision_decode,
    ) -> None:
        self.size = size
        self.device = torch.device(device)
        self.decode = decode

    def __call__(self, items: list[EncodedJpeg]) -> tuple[dict[int, torch.Tensor], list[int]]:
        """({position: (size, size, 3) uint8}, positions that need the CPU decoder)."""
        if not items:
            return {}, []
        try:
            images = dict(enumerate(self.decode([it.data for it in items], self.device)))
        except Exception:
            images = {}
            for i, it in enumerate(items):
                try:
                    images[i] = self.decode([it.data], self.device)[0]
                except Exception:
                    continue
        done, failed = {}, []
        for i in range(len(items)):
            image = images.get(i)
            if image is None or image.dim() != 3 or image.shape[0] != 3:
                failed.append(i)
            else:
                done[i] = resize_crop(image, self.size)
        return done, failed
