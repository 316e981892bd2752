"""Turning a WebDataset sample into a preprocessed RGB image and label, or into a Skip with a reason.

The reasons are in pipeline/data/reasons.py, the JPEG integrity checks in pipeline/data/jpeg_checks.py.
Thread-safe: no global state is changed per call (called from a thread pool), except one warnings filter
set at import (see `_quiet_bomb_warnings`).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.data.jpeg_checks import damaged, strict_jpeg
from pipeline.data.preprocess import preprocess, random_crop_flip
from pipeline.data.reasons import (
    ASPECT,
    BAD_LABEL,
    CORRUPT,
    EMPTY,
    EXTRA_IMAGE,
    NO_IMAGE,
    NOT_IMAGE,
    TOO_MANY_PIXELS,
    TOO_SMALL,
)
from pipeline.data.samples import Note, Rejected, Sample, Skip
from pipeline.data.tar_reader import DEFAULT_MAX_MEMBER_BYTES
from pipeline.data.views import crop_views

# Extensions taken as the image member without looking at content, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "image", "gif", "bmp", "tif", "tiff")

# Only formats a photo corpus holds: PIL would otherwise also identify e.g. EPS (which runs Ghostscript),
# PSD, ICO or FITS bytes as images.
_ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "JPEG2000", "AVIF")
Image.init()
_FORMATS = tuple(f for f in _ALLOWED_FORMATS if f in Image.OPEN)

EXIF_ORIENTATION = 0x0112
_TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# With draft decoding a JPEG's shorter side is kept at least this many times the target size, so that the
# exact antialiased resize still does the last step: on 31 real 1.3-17.9 MP photos the 256 px crops are
# within 52.7 dB PSNR of the full decode's (mean; worst 43.4 dB), against 45.1 (31.5) dB with a margin
# of 1, which would also speed up 600-900 px images (2x) where a margin of 2 leaves them as they are.
DRAFT_MARGIN = 2
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _quiet_bomb_warnings() -> None:
    # We check the declared size against DecodeLimits.max_pixels ourselves before decoding; PIL's own
    # warning (one per distinct size, so it would flood a log) adds nothing. PIL's DecompressionBombError,
    # raised above 2 * Image.MAX_IMAGE_PIXELS (~179 MP), still applies and is reported as too many pixels.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_quiet_bomb_warnings()


@dataclass(frozen=True)
class DecodeLimits:
    """Which images are skipped unread or undecoded: too small, too elongated, too large."""

    min_side: int = 64  # images whose shorter side is below this many pixels are skipped as too small
    max_aspect: float = 4.0  # longer side / shorter side above this is skipped as aspect ratio
    max_pixels: int = 40_000_000  # width * height declared in the header above this is never decoded
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # a tar member larger than this is never read

    def __post_init__(self) -> None:  # spelled as the jobs' options, which are these fields
        for name in ("min_side", "max_aspect", "max_pixels", "max_member_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


DEFAULT_LIMITS = DecodeLimits()


@dataclass
class Decoded:
    """A sample ready for the model: uint8 (image_size, image_size, 3) RGB after preprocessing, or
    (V, image_size, image_size, 3) with several views (pipeline/data/views.py)."""

    key: str
    index: int
    label: int | None
    image: np.ndarray
    notes: list[Note] = field(
        default_factory=list
    )  # what was odd about the sample (see NOTES in pipeline/data/reasons.py)
    size: tuple[int, int] | None = None  # (height, width) of the decoded image, EXIF orientation applied
    extras: dict = field(default_factory=dict)  # kept members' column values (pipeline/data/extras.py)


def decode_sample(
    sample: Sample,
    *,
    image_size: int,
    limits: DecodeLimits = DEFAULT_LIMITS,
    train_rng: np.random.Generator | None = None,
    jpeg_draft: bool = False,
    views: str = "center",
) -> Decoded | Skip:
    """Find, decode and preprocess the sample's image (center crop, or random crop and flip when a training
    `train_rng` is given). Bad data becomes a Skip with its reason; this never raises for bad data.

    jpeg_draft: let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale, keeping the shorter side at least
    DRAFT_MARGIN * image_size (about 2.3x faster on multi-megapixel photos; pixels differ slightly).
    views: other than "center", the image is the (V, S, S, 3) stack of `crop_views` (no training rng)."""
    try:
        ext, data = find_image(sample.members)
        try:
            draft_side = DRAFT_MARGIN * image_size if jpeg_draft else None
            image, full_shape = decode_image_and_shape(data, limits, draft_side=draft_side)
        except Rejected as e:
            raise Rejected(e.reason, f".{ext}: {e.detail}" if e.detail else f".{ext}") from None
    except Rejected as e:
        return e.skip(sample.key, sample.index)
    if train_rng is not None:
        image = random_crop_flip(image, image_size, train_rng, full_shape)
    elif views == "center":
        image = preprocess(image, image_size, full_shape)
    else:
        image = crop_views(image, image_size, views, full_shape)
    label = label_of(sample.members)
    return Decoded(sample.key, sample.index, label, image, notes_of(sample, ext), full_shape)


def find_image(members: dict[str, bytes]) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's image member: the first by IMAGE_EXTENSIONS (any case), else the
    first member whose content starts like an image (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF); a member
    named like an image is returned even when its bytes are bad, so the decoder can say what is wrong."""
    by_lower = {}
    for ext in members:
        by_lower.setdefault(ext.lower(), ext)
    for wanted in IMAGE_EXTENSIONS:
        if wanted in by_lower:
            ext = by_lower[wanted]
            return ext, members[ext]
    for ext, data in members.items():
        if _sniff(data):
            return ext, data
    raise Rejected(NO_IMAGE, f"members: {', '.join(sorted(members)) or 'none'}")


def label_of(members: dict[str, bytes]) -> int | None:
    """The integer class in the `.cls` member (ASCII, whitespace ignored); None when absent, unparsable or
    outside int64 (the label column's type: a larger one would fail the whole shard's write)."""
    for ext, data in members.items():
        if ext.lower() == "cls":
            try:
                label = int(data.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                return None
            return label if -(2**63) <= label < 2**63 else None
    return None


def notes_of(sample: Sample, image_ext: str) -> list[Note]:
    """What is odd about a sample that still becomes a row: the tar reader's notes (links), image members
    besides the one decoded (`image_ext`), a `.cls` that is not an integer (the label is null)."""
    notes = list(sample.notes)
    for ext, data in sample.members.items():
        if ext != image_ext and ext.lower() in IMAGE_EXTENSIONS:
            notes.append(Note(EXTRA_IMAGE, f".{ext} not used (.{image_ext} was)"))
        elif ext.lower() == "cls" and label_of({ext: data}) is None:
            notes.append(Note(BAD_LABEL, f".{ext}: {data[:40]!r}"))
    return notes


def decode_image(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, *, draft_side: int | None = None
) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB with EXIF orientation applied; raises Rejected.

    draft_side: a JPEG is decoded at the smallest of libjpeg's 1/1, 1/2, 1/4, 1/8 scales whose shorter side
    is still >= draft_side (DCT scaling: the skipped detail is never decoded); other formats are unaffected.
    Preprocess such an image with its full-scale shape (`decode_image_and_shape`).

    The declared size is checked before any pixel is decoded: width * height against max_pixels
    (decompression bombs), shorter side against min_side, longer / shorter against max_aspect (the last
    two do not change under the EXIF rotation, so the header size serves). CMYK, grayscale, 16-bit
    (scaled, 65535 -> 255), float (0..1 scaled to 0..255, else clipped to 0..255; NaN or infinity is
    corrupt), palette and alpha images are converted; alpha is composited on white.
    """
    return decode_image_and_shape(data, limits, draft_side=draft_side)[0]


def decode_image_and_shape(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, *, draft_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_image`, and the (height, width) the image has at full scale after EXIF orientation: the
    shape the preprocessing geometry is computed from, which a draft-decoded image no longer has."""
    if not data:
        raise Rejected(EMPTY, "0 bytes")
    source, reterminated = strict_jpeg(data) if data.startswith(b"\xff\xd8") else (data, False)
    try:
        image = Image.open(io.BytesIO(source), formats=_FORMATS)
    except Image.DecompressionBombError as e:
        raise Rejected(TOO_MANY_PIXELS, str(e)) from None
    except UnidentifiedImageError:
        kind = _sniff(data)
        if kind is None:
            raise Rejected(NOT_IMAGE, f"{len(data)} bytes starting {data[:8]!r}") from None
        raise damaged(data, kind, "unreadable header") from None
    except MemoryError:
        raise
    except Exception as e:
        raise damaged(data, _sniff(data), f"{type(e).__name__}: {e}") from None

    with image:
        width, height = image.size
        check_size(width, height, limits)
        try:
            drafted = draft_side is not None and image.format in ("JPEG", "MPO")
            if drafted:
                scale = draft_side / min(width, height)
                image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            orientation = _orientation(image)
            rgb = _to_rgb(_apply_orientation(image, orientation))
            if not drafted:
                return rgb, rgb.shape[:2]
            return rgb, (width, height) if orientation in _TRANSPOSING else (height, width)
        except Image.DecompressionBombError as e:  # a GIF frame larger than the declared screen
            raise Rejected(TOO_MANY_PIXELS, str(e)) from None
        except (MemoryError, Rejected):
            raise
        except Exception as e:
            if reterminated and "truncated" in str(e):
                detail = f"premature end of JPEG data: the scan stops before the declared {width}x{height}"
                raise Rejected(CORRUPT, detail) from None
            raise damaged(data, image.format, f"{type(e).__name__}: {e}") from None


def check_size(width: int, height: int, limits: DecodeLimits) -> None:
    """Raise Rejected when a declared image size breaks the pixel, shorter-side or aspect limits."""
    size = f"{width}x{height}"
    if width * height > limits.max_pixels:
        raise Rejected(TOO_MANY_PIXELS, f"{size} > {limits.max_pixels} pixels")
    shorter, longer = min(width, height), max(width, height)
    if shorter == 0:
        raise Rejected(CORRUPT, f"declared size {size}")
    if shorter < limits.min_side:
        raise Rejected(TOO_SMALL, f"{size}, shorter side < {limits.min_side}")
    if longer / shorter > limits.max_aspect:
        raise Rejected(ASPECT, f"{size}, aspect {longer / shorter:.2f} > {limits.max_aspect}")


def image_format(data: bytes) -> str | None:
    """The image format named by the leading magic bytes ("JPEG", "PNG", ...), or None."""
    return _sniff(data)


def _sniff(data: bytes) -> str | None:
    """The image format named by the leading magic bytes, or None."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    # "BM" alone is too weak (a caption can start with it): also require a known DIB header size
    if head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[4:12] in (b"ftypavif", b"ftypavis"):
        return "AVIF"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    return None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag, 1 (as stored) when absent or unreadable (the pixels are fine then)."""
    try:
        return image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:
        return 1


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit gray: scale 0..65535 to 0..255 (PIL's convert("L") would clip at 255 instead).
        # Mode "I" is taken as 16-bit too: it is how some readers hand over 16-bit PNG and TIFF data.
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return _gray_to_rgb(((values * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        # 32-bit float gray (float TIFF): most writers store 0..1, some 0..255; values all within 0..1 are
        # taken as the former (a 0..255 image that dark is black either way)
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise Rejected(CORRUPT, "non-finite pixel values (float image)")
        scale = 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
        return _gray_to_rgb(np.clip(values * scale, 0, 255).round().astype(np.uint8))
    palette_alpha = mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
    if mode in _ALPHA_MODES or "transparency" in image.info or palette_alpha:
        return _on_white(np.asarray(image.convert("RGBA")))
    if mode != "RGB":
        image = image.convert("RGB")  # CMYK (and YCCK, which PIL opens as CMYK), L, 1, P, YCbCr
    return np.array(image)  # a copy: np.asarray of a PIL image is read-only


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
