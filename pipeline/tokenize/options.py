"""How images become tokens: `TokenizeOptions`, the tokenize job's preprocessing and throughput settings,
whose fields are also its command-line options (pipeline/cli.py), and `settle_options`, which decides what the
command line leaves to the model, the actors' device and the run being resumed.

Everything here except the throughput knobs is pinned in the run record (`_run.json`), so a resume cannot
mix preprocessing. `image_size=None`, `decode_threads=None` and `encoder_precision="auto"` are the command
line's "decide for me"; `settle_options` replaces them with what a run records, never `auto`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import gq
from gq.model import fixed_image_size
from pipeline.cli import NO_OPTION, option
from pipeline.data import gpu_decode
from pipeline.data.decode import DRAFT_MARGIN, DecodeLimits
from pipeline.data.extras import check_keep
from pipeline.data.views import VIEW_SETS
from pipeline.data.views import describe as describe_views
from pipeline.tokenize.precision import CHOICES as PRECISION_CHOICES
from pipeline.tokenize.precision import resolve_encoder_precision

# Precisions whose tokens depend on which images share an encoder batch: bf16 kernels block their
# reductions by batch (on the AVX512-BF16 dev CPU 16 of 80 images had a token differ between batches of 5
# and 10, 0.23% of the tokens; float32 2 tokens of 81,920: benchmarks/batch_invariance.py). Their batch
# size is recorded in the preprocessing, so a resume cannot mix batch compositions either.
BATCH_DEPENDENT = ("bfloat16",)
JPEG_DECODERS = ("pil", "pil-draft", "nvjpeg")
DEFAULT_IMAGE_SIZE = 256


def default_decode_threads(gpu: bool) -> int:
    """A CPU actor's model already uses every core it has, so one thread (decode overlapping encode) is
    enough there; a GPU actor wants several."""
    return 4 if gpu else 1


@dataclass(frozen=True)
class TokenizeOptions:
    """How images are read, preprocessed and encoded (pinned in the run record, but the throughput knobs)."""

    image_size: int | None = None  # shorter side resized to this, center crop (default: a ViT's own, or 256)
    limits: DecodeLimits = field(default_factory=DecodeLimits)  # which images are skipped, and why
    batch_size: int = 32  # images per forward pass (pinned with a bfloat16 encoder: BATCH_DEPENDENT)
    decode_threads: int | None = None  # image decoding threads per actor (default: 1 on CPU, 4 on GPU actors)
    prefetch_batches: int = field(default=2, metadata=NO_OPTION)  # decoded batches ahead of the model
    encoder_precision: str = field(
        default="float32", metadata=option(choices=PRECISION_CHOICES, default="auto", type=None)
    )  # auto: bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else float32; bfloat16: autocast
    jpeg_decoder: str = field(
        default="pil", metadata=option(choices=JPEG_DECODERS, type=None)
    )  # pil-draft: big JPEGs decoded at 1/2-1/8 scale (~2.3x, pixels differ a little); nvjpeg: on the GPU
    keep: tuple[str, ...] = field(
        default=(), metadata=option(type=None, default="")
    )  # member extensions kept as columns, comma-separated (txt,json); invalid ones: null and a note
    views: str = field(
        default="center", metadata=option(choices=tuple(VIEW_SETS), type=None)
    )  # rows per sample: center (1), flip (+ mirror: 2), tencrop (10); a `view` column numbers them
    source_size: bool = field(default=True, metadata=NO_OPTION)  # width/height columns (False: older dirs)

    def __post_init__(self) -> None:
        keep = self.keep.split(",") if isinstance(self.keep, str) else self.keep
        object.__setattr__(self, "keep", check_keep(tuple(e for e in keep if e.strip())))
        for name in ("image_size", "batch_size", "prefetch_batches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.decode_threads is not None and self.decode_threads < 0:
            raise ValueError(f"--decode-threads must be >= 0, got {self.decode_threads}")
        choices = {"views": VIEW_SETS, "encoder_precision": PRECISION_CHOICES, "jpeg_decoder": JPEG_DECODERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {tuple(allowed)}")
        if self.views != "center" and self.jpeg_decoder == "nvjpeg":
            raise ValueError("--views flip and tencrop crop on the CPU: use --jpeg-decoder pil or pil-draft")

    def preprocessing(self) -> dict:
        """The preprocessing as recorded in token files and run records; with a bfloat16 encoder also the
        batch size: an image's bf16 tokens depend on the images sharing its batch (BATCH_DEPENDENT)."""
        if self.image_size is None or self.encoder_precision == "auto":
            raise ValueError("settle_options(...) decides the image size and the encoder precision first")
        resize = "shorter side to image_size, PIL bicubic (antialiased)"
        if self.jpeg_decoder == "pil-draft":
            draft = f"JPEGs decoded at 1/2-1/8 scale (shorter side >= {DRAFT_MARGIN}x image_size)"
            resize = f"{draft}, then {resize}"
        return {
            "resize": gpu_decode.RESIZE if self.jpeg_decoder == "nvjpeg" else resize,
            "jpeg_decoder": self.jpeg_decoder,
            "encoder_precision": self.encoder_precision,
            "crop": describe_views(self.views),
            "views": self.views,
            "view_names": list(VIEW_SETS[self.views]),
            "keep": list(self.keep),
            "source_size": self.source_size,
            "image_size": self.image_size,
            "input": "uint8 RGB; alpha composited on white; EXIF orientation applied",
            **asdict(self.limits),
        } | batch_record(self.encoder_precision, self.batch_size)


def is_settled(options: TokenizeOptions) -> bool:
    """Whether nothing is left for `settle_options` to decide (it would return the options unchanged,
    but for the width/height columns of a resumed directory, which only a run record can tell)."""
    undecided = None in (options.image_size, options.decode_threads) or options.encoder_precision == "auto"
    return not undecided


def settle_options(
    options: TokenizeOptions, model: gq.ModelConfig, *, gpu: bool, recorded: dict | None = None
) -> tuple[TokenizeOptions, str | None]:
    """The options with every "decide for me" decided, and a warning or None: the image size (a ViT's own,
    any other refused with one line; else 256), decode threads (by `gpu`), the encoder precision (`auto`:
    precision.py; a resumed run keeps its `recorded` preprocessing's) and, resuming a directory written
    before width/height columns, none. Idempotent."""
    fixed = fixed_image_size(model)
    size = options.image_size if options.image_size is not None else fixed or DEFAULT_IMAGE_SIZE
    if fixed is not None and size != fixed:
        raise ValueError(
            f"--image-size {size}: this model takes {fixed}x{fixed} images only (a ViT's positional "
            f"embeddings fix its size); use --image-size {fixed}"
        )
    if size % model.network.downsample:
        raise ValueError(f"--image-size must be a multiple of {model.network.downsample}, got {size}")
    recorded = recorded or {}
    precision, warning = resolve_encoder_precision(
        options.encoder_precision, gpu=gpu, recorded=recorded.get("encoder_precision")
    )
    threads = options.decode_threads if options.decode_threads is not None else default_decode_threads(gpu)
    source_size = options.source_size and not (recorded and "source_size" not in recorded)
    settled = dataclasses.replace(
        options, image_size=size, decode_threads=threads, encoder_precision=precision, source_size=source_size
    )
    return settled, warning


def batch_record(precision: str, batch_size: int) -> dict:
    """{"batch_size": n} where `precision` makes tokens depend on the batch (pinned like the rest), else
    {}."""
    return {"batch_size": batch_size} if precision in BATCH_DEPENDENT else {}
