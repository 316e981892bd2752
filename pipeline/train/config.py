"""The training job's settings: one frozen dataclass, saved in DIR/run.json and in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import gq
from gq.losses import LossConfig
from gq.tdc import MODES


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run is started with; saved in DIR/run.json and in every checkpoint."""

    preset: str  # network preset (gq.PRESETS)
    data: str  # training SHARDS (brace pattern, glob, directory, .txt list; fsspec URLs)
    output: str  # DIR: a local or shared-filesystem directory; holds metrics, checkpoints and the model
    val_data: str | None = None  # validation SHARDS (center crops); None: no validation metrics
    bpp: float = 0.25  # operating point (gq.OPERATING_POINTS): 0.25, 0.5 or 1.0
    workers: int = 1  # data-parallel Ray Train workers
    gpu: bool = False  # one GPU per worker (NCCL); else CPU (gloo)
    cpus_per_worker: int = 1  # CPUs reserved per worker, and its torch threads on CPU
    max_steps: int = 1000  # autoencoder optimizer steps in total (a restart continues up to this)
    batch_size: int = 16  # images per worker per step (the reference: 16 per GPU)
    lr: float = 1e-4  # Adam learning rate of the autoencoder (the reference's)
    image_size: int = 256  # training crops are image_size x image_size (a multiple of 8)
    kl_mode: str = "tdc"  # "tdc", or "kl" for the plain Gaussian-VAE KL (ablation)
    kl_weight: float = 1.0  # weight of the KL term (the released checkpoints: 1.0; the configs: 0.1)
    loss: LossConfig = field(default_factory=LossConfig)  # reconstruction, perceptual and GAN losses
    checkpoint_every: int = 500  # steps between Ray Train checkpoints (one is also made at max_steps)
    keep_checkpoints: int = 2  # Ray Train checkpoints kept on disk
    max_failures: int = 0  # worker-group failures Ray Train recovers from in-run (from the last checkpoint)
    val_every: int = 1000  # steps between validations and model exports (also at the end)
    val_images: int = 256  # validation images used (the first ones of val_data)
    log_every: int = 10  # steps between metric lines (metrics.jsonl and the console)
    keep_step_exports: bool = True  # also write DIR/model-step{N}.safetensors at each validation
    decode_threads: int = 2  # image-decoding threads per worker
    seed: int = 0  # model init, data order, crops and noise

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            object.__setattr__(self, "loss", LossConfig.from_dict(self.loss))
        if self.preset not in gq.PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(gq.PRESETS)}")
        if self.bpp not in gq.OPERATING_POINTS:
            raise ValueError(
                f"unknown operating point {self.bpp}; choose one of {sorted(gq.OPERATING_POINTS)}"
            )
        if self.kl_mode not in MODES:
            raise ValueError(f"kl_mode must be one of {MODES}, got {self.kl_mode!r}")
        if self.image_size < 32 or self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 and >= 32, got {self.image_size}")
        for name in (
            "workers",
            "cpus_per_worker",
            "batch_size",
            "checkpoint_every",
            "val_every",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.val_images < 0 or self.max_failures < 0 or self.keep_checkpoints < 1:
            raise ValueError("max_steps, val_images and max_failures must be >= 0, keep_checkpoints >= 1")
        if not self.lr > 0 or self.kl_weight < 0:
            raise ValueError(f"lr must be > 0 and kl_weight >= 0, got {self.lr} and {self.kl_weight}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        return cls(**data)

    def model_config(self) -> gq.ModelConfig:
        return gq.model_config(self.preset, self.bpp, kl_mode=self.kl_mode, kl_weight=self.kl_weight)
