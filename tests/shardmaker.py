"""Test helper: synthetic photo-like images, WebDataset shards of them, and one sample per bad-input case."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, features

from pipeline.data.reasons import (
    ASPECT,
    CORRUPT,
    DUPLICATE,
    EMPTY,
    NO_IMAGE,
    NOT_IMAGE,
    TOO_MANY_PIXELS,
    TOO_SMALL,
    TRUNCATED,
)
from pipeline.pack.shard_writer import write_shard

HAS_WEBP = features.check("webp")


def photo_like(seed: int, height: int, width: int) -> np.ndarray:
    """A deterministic uint8 (height, width, 3) image with smooth gradients, a few shapes and mild noise,
    so that JPEG compresses it like a photo (not like noise, not like a flat color)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    corners = rng.uniform(20, 235, size=(4, 3)).astype(np.float32)
    image = (
        corners[0] * ((1 - x) * (1 - y))[..., None]
        + corners[1] * (x * (1 - y))[..., None]
        + corners[2] * ((1 - x) * y)[..., None]
        + corners[3] * (x * y)[..., None]
    )
    frequency = rng.uniform(1, 4, size=2)
    image += 12 * np.sin(2 * np.pi * (frequency[0] * x + frequency[1] * y))[..., None]
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0, 1, size=2)
        ry, rx = rng.uniform(0.08, 0.3, size=2)
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        if rng.random() < 0.5:
            mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        else:
            mask = (np.abs(y - cy) <= ry) & (np.abs(x - cx) <= rx)
        image[mask] = 0.3 * image[mask] + 0.7 * color
    image += rng.normal(0, 3, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def _pil(image: np.ndarray | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


def jpeg_bytes(image: np.ndarray | Image.Image, quality: int = 90, **pil_kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="JPEG", quality=quality, **pil_kwargs)
    return buffer.getvalue()


def png_bytes(image: np.ndarray | Image.Image, **pil_kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="PNG", **pil_kwargs)
    return buffer.getvalue()


def webp_bytes(image: np.ndarray | Image.Image, **pil_kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="WEBP", **pil_kwargs)
    return buffer.getvalue()


def imagenet_key(index: int, label: int) -> str:
    """An ImageNet-style key, "n01440764_000123", the synset derived from the label."""
    return f"n{1440764 + 1000 * label:08d}_{index:06d}"


def shard_samples(
    n: int, *, seed: int, size: tuple[int, int] = (96, 128), start_key: int = 0, label: bool = True
) -> list[dict[str, Any]]:
    samples = []
    for i in range(start_key, start_key + n):
        cls = i % 10
        sample: dict[str, Any] = {
            "__key__": imagenet_key(i, cls),
            "jpg": jpeg_bytes(photo_like(seed * 100_003 + i, *size)),
        }
        if label:
            sample["cls"] = cls
        samples.append(sample)
    return samples


def make_shard(
    path_or_url: str,
    n: int,
    *,
    seed: int,
    size: tuple[int, int] = (96, 128),
    start_key: int = 0,
    label: bool = True,
    compression: str | None = None,
) -> list[str]:
    """Write a shard of n photo-like JPEG samples (".jpg" and, with `label`, ".cls" = index % 10) of
    size (height, width); returns the keys in order."""
    samples = shard_samples(n, seed=seed, size=size, start_key=start_key, label=label)
    write_shard(path_or_url, samples, compression=compression)
    return [s["__key__"] for s in samples]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_declaring(width: int, height: int) -> bytes:
    """A structurally valid RGB PNG (good CRCs) whose header declares width x height but holds one row of
    pixel data: opening it is cheap, decoding it would allocate width * height * 3 bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + b"\x80" * 3 * min(width, 64))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


def png_with_bad_pixels(image: np.ndarray) -> bytes:
    """A complete PNG (every chunk and CRC valid, IEND present) whose compressed pixel data is garbage."""
    data = png_bytes(image)
    out, pos = [data[:8]], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            body = body[:2] + bytes((b * 7 + 13) & 0xFF for b in body[2:])
        out.append(png_chunk(kind, body))
        pos += 12 + length
    return b"".join(out)


def exif_rotated_jpeg(height: int = 100, width: int = 200, orientation: int = 6) -> bytes:
    """A JPEG stored height x width with an EXIF orientation tag (6: display rotated 90 degrees clockwise)."""
    image = photo_like(7, height, width)
    image[: height // 4, : width // 4] = (255, 0, 0)  # a red top-left corner, to check where it lands
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(image, quality=95, exif=exif.tobytes())


def bad_input_samples() -> tuple[list[dict[str, Any]], dict[str, str | None]]:
    """One sample per case of the "Bad input" list of docs/BAD_INPUT.md, ready for write_shard, and the
    expected outcome per key: the skip reason, or None for a sample that must become a row.

    The key "dup" is given twice (with another sample between): its entry is the outcome of the later
    occurrence; the first occurrence must be a row.
    """
    photo = photo_like(1, 96, 128)
    good_jpeg = jpeg_bytes(photo)
    red = np.zeros((80, 96, 3), np.uint8)
    red[..., 0] = 255
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (80, 1))
    rgba = np.zeros((80, 96, 4), np.uint8)
    rgba[:, 48:] = (255, 0, 0, 255)  # right half opaque red, left half fully transparent black
    indices = np.zeros((80, 96), np.uint8)
    indices[:, 48:] = 1
    palette = Image.frombytes("P", (96, 80), indices.tobytes())
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)

    cases: list[tuple[str, dict[str, Any], str | None]] = [
        ("good", {"jpg": good_jpeg, "cls": 1}, None),
        ("truncated_jpeg", {"jpg": good_jpeg[: len(good_jpeg) * 6 // 10], "cls": 1}, TRUNCATED),
        ("corrupt_png", {"png": png_with_bad_pixels(photo), "cls": 1}, CORRUPT),
        ("zero_byte", {"jpg": b"", "cls": 1}, EMPTY),
        ("not_image", {"jpg": b"<html>this is not an image</html>", "cls": 1}, NOT_IMAGE),
        ("cmyk", {"jpg": jpeg_bytes(Image.fromarray(red).convert("CMYK")), "cls": 2}, None),
        ("grayscale", {"jpg": jpeg_bytes(photo_like(2, 96, 128)[..., 1]), "cls": 2}, None),
        ("png16", {"png": png_bytes(Image.fromarray(gradient)), "cls": 3}, None),
        ("alpha_png", {"png": png_bytes(rgba), "cls": 3}, None),
        ("palette_transparency", {"png": png_bytes(palette, transparency=0), "cls": 3}, None),
        ("tiny", {"jpg": jpeg_bytes(photo_like(3, 20, 20)), "cls": 4}, TOO_SMALL),
        ("extreme_aspect", {"jpg": jpeg_bytes(photo_like(4, 100, 800)), "cls": 4}, ASPECT),
        ("exif_rotated", {"jpg": exif_rotated_jpeg(), "cls": 5}, None),
        ("no_image", {"cls": 5, "json": {"caption": "a cat"}, "txt": "BMW parked outside"}, NO_IMAGE),
        ("dup", {"jpg": good_jpeg, "cls": 6}, None),  # the first occurrence is kept
        ("between", {"jpg": jpeg_bytes(photo_like(5, 96, 128)), "cls": 6}, None),
        ("dup", {"jpg": jpeg_bytes(photo_like(6, 96, 128)), "cls": 7}, DUPLICATE),
        ("wrong_extension", {"bin": jpeg_bytes(photo_like(8, 96, 128)), "cls": 7}, None),
        ("huge_png", {"png": png_declaring(100_000, 100_000), "cls": 8}, TOO_MANY_PIXELS),
        ("big_png", {"png": png_declaring(8000, 6000), "cls": 8}, TOO_MANY_PIXELS),
        ("upper_jpeg", {"JPEG": jpeg_bytes(photo_like(9, 96, 128)), "cls": 9}, None),
    ]
    if HAS_WEBP:
        cases.append(("webp", {"webp": webp_bytes(photo_like(10, 96, 128), quality=90), "cls": 9}, None))
    samples = [{"__key__": key, **members} for key, members, _ in cases]
    expected = {key: outcome for key, _, outcome in cases}
    return samples, expected


def member_offsets(path: str) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member of an uncompressed tar, to cut at exact places."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def cut_tar(path: str, at: int | float, out: str | None = None) -> str:
    """Copy the first bytes of the file at `path` to `out` (default: cut in place): `at` bytes when an int,
    that fraction of the file when a float. Returns the path written."""
    with open(path, "rb") as f:
        data = f.read()
    size = at if isinstance(at, int) else int(len(data) * at)
    out = out or path
    with open(out, "wb") as f:
        f.write(data[:size])
    assert os.path.getsize(out) == size
    return out


# ---- damaged real JPEGs: libjpeg only warns about them, PIL alone decodes them to grey rows

PHOTOS = Path(__file__).resolve().parents[1] / "assets" / "samples" / "photos-000000.tar"  # real JPEG crops


def real_jpegs() -> list[bytes]:
    with tarfile.open(PHOTOS) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]


def segments(data):
    """(marker, offset, end) of each JPEG segment up to the first scan's header (an independent walk)."""
    out, pos = [], 2
    while data[pos + 1] != 0xDA:
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        out.append((data[pos + 1], pos, end))
        pos = end
    out.append((0xDA, pos, pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]))
    return out


def damaged(data, kind):
    sos_end = segments(data)[-1][2]
    eoi = data.rindex(b"\xff\xd9")
    if kind == "cut_reterminated":  # a third of the scan, then the end marker
        return data[: sos_end + (eoi - sos_end) // 3] + b"\xff\xd9"
    if kind == "spurious_marker":  # bytes flipped in the scan into a marker: the scan stops there
        return data[: sos_end + 200] + b"\xff\xd0\xff\xd9" + data[sos_end + 204 :]
    if kind == "no_huffman_tables":
        return data[:2] + b"".join(data[a:b] for m, a, b in segments(data) if m != 0xC4) + data[sos_end:]
    raise ValueError(kind)


def big_header_over_small_data():
    """A 64x64 JPEG whose header says 6000x6000 (the issue's example): 64x64 of data, then the end marker."""
    data = bytearray(jpeg_bytes(photo_like(3, 64, 64)))
    sof = next(a for m, a, _ in segments(bytes(data)) if m == 0xC0)
    data[sof + 5 : sof + 9] = struct.pack(">HH", 6000, 6000)
    return bytes(data)
