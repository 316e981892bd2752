"""The training job's settings: small frozen component dataclasses under one `TrainSettings`, saved in
DIR/run.json and in every checkpoint.

Each component is one concern (which model, which data, the optimizer, the losses, the workers, the
schedule). `jobs/train_vae.py` turns every component field into an option of the same name, so a field's
end-of-line comment is its documentation and its `--help`. Records written before the split held the
fields flat; `TrainSettings.from_dict` reads both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import gq
from gq.losses import LossConfig
from gq.model import fixed_image_size
from gq.tdc import MODES


def _at_least(obj: object, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(obj, name)}")


@dataclass(frozen=True)
class ModelSettings:
    """What network is trained; a restart may not change these."""

    preset: str = ""  # network preset (gq.PRESETS); leave out with --init
    bpp: float | None = None  # operating point by bits per pixel (f8c16 presets: 0.25, 0.5 or 1.0)
    tokens: int | None = None  # or by tokens per image at the native size (256px: f8 1024, f16 256)
    bits: int | None = None  # and bits per token (K = 2^bits); none: a token per position, K = 2^C
    kl_mode: str = "tdc"  # "tdc", or "kl" for the plain Gaussian-VAE KL (ablation)
    kl_weight: float = 1.0  # weight of the KL term (the released checkpoints: 1.0; the configs: 0.1)
    init: str | None = None  # warm start: a converted .safetensors (network, weights, point, calibration)

    def __post_init__(self) -> None:
        if self.init and (self.preset or (self.bpp, self.tokens, self.bits) != (None, None, None)):
            raise ValueError(
                "give --preset (and an operating point) or --init, not both (--init brings its own)"
            )
        if not self.init:
            gq.operating_point(
                self.preset, self.bpp, self.tokens, self.bits
            )  # ValueError names what is wrong
        if self.kl_mode not in MODES:
            raise ValueError(f"kl_mode must be one of {MODES}, got {self.kl_mode!r}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")

    def model_config(self) -> gq.ModelConfig:
        """The preset at the operating point, or --init's own config with this KL mode and weight."""
        if self.init:
            config = gq.describe(self.init).config
            tdc = dataclasses.replace(config.tdc, mode=self.kl_mode, weight=self.kl_weight)
            return dataclasses.replace(config, tdc=tdc)
        return gq.model_config(
            self.preset,
            self.bpp,
            tokens=self.tokens,
            bits=self.bits,
            kl_mode=self.kl_mode,
            kl_weight=self.kl_weight,
        )


@dataclass(frozen=True)
class DataSettings:
    """The images: training and validation shards, crop size, batch, decoding."""

    data: str  # training SHARDS (brace pattern, glob, directory, .txt list; fsspec URLs)
    val_data: str | None = None  # validation SHARDS (center crops); None: no validation metrics
    image_size: int = 256  # training crops are image_size x image_size (a multiple of f; a ViT: its own size)
    batch_size: int = 16  # images per worker per step (the reference: 16 per GPU)
    val_images: int = 256  # validation images used (the first ones of val_data)
    decode_threads: int = 2  # image-decoding threads per worker

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 and >= 32, got {self.image_size}")
        _at_least(self, 1, "batch_size", "decode_threads")
        _at_least(self, 0, "val_images")


@dataclass(frozen=True)
class OptimSettings:
    """The autoencoder's optimizer and how long it runs."""

    max_steps: int = 1000  # autoencoder optimizer steps in total (a restart continues up to this)
    lr: float = 1e-4  # Adam learning rate of the autoencoder (the reference's)

    def __post_init__(self) -> None:
        _at_least(self, 0, "max_steps")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class ScalingSettings:
    """The Ray Train worker group and how many of its failures a run survives."""

    workers: int = 1  # data-parallel Ray Train workers
    gpu: bool = False  # one GPU per worker (NCCL); else CPU (gloo)
    cpus_per_worker: int = 1  # CPUs reserved per worker, and its torch threads on CPU
    max_failures: int = 0  # Ray Train restarts from the last checkpoint on a lost worker/node; -1: unlimited
    worker_wait: float = 300.0  # seconds a (re)start of the worker group may wait for room; then exit 1

    def __post_init__(self) -> None:
        _at_least(self, 1, "workers", "cpus_per_worker")
        _at_least(self, -1, "max_failures")
        if not self.worker_wait > 0:
            raise ValueError(f"worker_wait must be > 0, got {self.worker_wait}")


@dataclass(frozen=True)
class ScheduleSettings:
    """When the run logs, validates, exports and checkpoints."""

    checkpoint_every: int = 500  # steps between Ray Train checkpoints (one is also made at max_steps)
    keep_checkpoints: int = 2  # Ray Train checkpoints kept on disk
    val_every: int = 1000  # steps between validations and model exports (also at the end)
    log_every: int = 10  # steps between metric lines (metrics.jsonl and the console)
    keep_step_exports: bool = True  # also write DIR/model-step{N}.safetensors at each validation

    def __post_init__(self) -> None:
        _at_least(self, 1, "checkpoint_every", "keep_checkpoints", "val_every", "log_every")


# The components, by the name of the TrainSettings field that holds each.
COMPONENTS = {
    "model": ModelSettings,
    "inputs": DataSettings,
    "optim": OptimSettings,
    "loss": LossConfig,
    "scaling": ScalingSettings,
    "schedule": ScheduleSettings,
}


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run is started with; saved in DIR/run.json and in every checkpoint."""

    output: str  # DIR: a local or shared-filesystem directory; holds metrics, checkpoints and the model
    model: ModelSettings
    inputs: DataSettings
    optim: OptimSettings = field(default_factory=OptimSettings)
    loss: LossConfig = field(default_factory=LossConfig)  # reconstruction, perceptual and GAN losses
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    seed: int = 0  # model init, data order, crops and noise

    def __post_init__(self) -> None:
        config, size = self.model_config(), self.inputs.image_size
        fixed, f = fixed_image_size(config), config.network.downsample
        if fixed is not None and size != fixed:
            raise ValueError(f"{self.model.preset} takes {fixed}x{fixed} images only, got image_size {size}")
        if size % f:
            raise ValueError(f"image_size {size} is not a multiple of {self.model.preset}'s downsampling {f}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainSettings:
        """From `to_dict`'s nesting, or from the flat record of runs written before the components."""
        if "model" not in data:
            return cls.of(**data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        parts = {name: _component(kind, data[name]) for name, kind in COMPONENTS.items() if name in data}
        return cls(**(data | parts))

    @classmethod
    def of(cls, **flat) -> TrainSettings:
        """From flat keyword values (`preset=`, `data=`, `batch_size=`, ...): each goes to its component."""
        parts = {}
        for name, kind in COMPONENTS.items():
            if name == "loss":
                continue
            mine = {f.name for f in dataclasses.fields(kind)}
            parts[name] = kind(**{k: flat.pop(k) for k in list(flat) if k in mine})
        loss = flat.pop("loss", LossConfig())
        parts["loss"] = _component(LossConfig, loss)
        unknown = set(flat) - {"output", "seed"}
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        return cls(**flat, **parts)

    def model_config(self) -> gq.ModelConfig:
        return self.model.model_config()


def _component(kind: type, value):
    if isinstance(value, kind):
        return value
    if kind is LossConfig:
        return LossConfig.from_dict(value)
    unknown = set(value) - {f.name for f in dataclasses.fields(kind)}
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields {sorted(unknown)}")
    return kind(**value)
