"""The GQ-VAE: a Gaussian VAE (conv UNet or ViT) whose posterior is turned into tokens by Gaussian Quant.

`tokenize` / `detokenize` are the tokenizer pair; `reconstruct` decodes the posterior mean (the continuous
VAE); `forward` is the training pass (decode of the reparameterised sample, plus the TDC or KL term).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from gq.calibration import Calibration, denormalize, normalize
from gq.networks import Decoder, Encoder, NetworkConfig
from gq.quantizer import GaussianQuantizer, QuantizerConfig, clamp_logvar
from gq.tdc import KLStats, TargetDivergenceConstraint, TDCConfig
from gq.vit import BACKBONE as VIT
from gq.vit import ViTConfig, ViTDecoder, ViTEncoder

CONFIG_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a GQ-VAE; saved into every checkpoint and token file."""

    network: NetworkConfig | ViTConfig  # encoder/decoder shape: the conv UNet, or the ViT
    quantizer: QuantizerConfig  # codebook recipe, groups, layout, rule, beta
    tdc: TDCConfig  # the KL term used in training (TDC or the plain-KL ablation)
    preset: str = ""  # the PRESETS name the network came from ("" for a custom one), for people reading
    version: int = CONFIG_VERSION  # bumped when a saved config needs upgrading to be built
    calibration: Calibration | None = None  # an affine prior N(shift, scale^2) per channel (None: N(0, 1))

    def __post_init__(self) -> None:
        if self.tdc.groups != self.quantizer.groups or self.tdc.layout != self.quantizer.layout:
            raise ValueError("the TDC groups/layout must equal the quantizer's")
        if self.calibration is not None and self.calibration.channels != self.latent_channels:
            raise ValueError(
                f"calibration has {self.calibration.channels} channels, the latent {self.latent_channels}"
            )

    @property
    def latent_channels(self) -> int:
        return self.quantizer.channels

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "preset": self.preset,
            "network": self.network.to_dict(),
            "quantizer": self.quantizer.to_dict(),
            "tdc": self.tdc.to_dict(),
        } | ({"calibration": self.calibration.to_dict()} if self.calibration else {})

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        version = data.get("version")
        if version != CONFIG_VERSION:
            raise ValueError(f"model config version {version!r}; this gq builds version {CONFIG_VERSION}")
        return cls(
            network=network_from_dict(data["network"]),
            quantizer=QuantizerConfig.from_dict(data["quantizer"]),
            tdc=TDCConfig.from_dict(data["tdc"]),
            preset=data.get("preset", ""),
            version=version,
            calibration=Calibration.from_dict(data["calibration"]) if data.get("calibration") else None,
        )


def network_from_dict(data: dict) -> NetworkConfig | ViTConfig:
    """A saved network config: a ViT's says `backbone: vit`; a UNet's (every older file) has no backbone."""
    return ViTConfig.from_dict(data) if data.get("backbone") == VIT else NetworkConfig.from_dict(data)


def fixed_image_size(config: ModelConfig) -> int | None:
    """The one image side the model takes (a ViT's learned positions fix it); None: any multiple of f."""
    return config.network.image_size if isinstance(config.network, ViTConfig) else None


@dataclass(frozen=True)
class ModelIdentity:
    """What a checkpoint is, without its weights: what token files and run records cite."""

    model_sha256: str | None  # sha256 of the checkpoint file (None for a model never saved or loaded)
    codebook_fingerprint: str  # sha256 of the float32 codebook bytes
    config: ModelConfig


@dataclass
class VAEOutput:
    """What one training forward returns."""

    recon: torch.Tensor  # (B, 3, H, W) decoded from the sampled latent
    mu: torch.Tensor  # (B, C, h, w)
    logvar: torch.Tensor  # (B, C, h, w), clamped
    kl_loss: torch.Tensor  # scalar: the TDC (or plain-KL) term, already weighted
    kl_stats: KLStats  # per-group KL statistics of this batch, for `tdc.update`


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]; float (B, 3, H, W) passes through."""
    if images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B, H, W, 3), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if not images.dtype.is_floating_point or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 (B, H, W, 3) or float (B, 3, H, W), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    return images


class GQVAE(nn.Module):
    """Gaussian VAE + Gaussian Quant. Build with `GQVAE(config)` or `gq.load(path)`.

    >>> tokens = model.tokenize(images)      # uint8 (B, H, W, 3) -> (B, H/8, W/8, groups) int64
    >>> images_hat = model.detokenize(tokens)  # -> float (B, 3, H, W) in [-1, 1]
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config.latent_channels
        vit = isinstance(config.network, ViTConfig)
        self.encoder = (ViTEncoder if vit else Encoder)(config.network, c)
        self.decoder = (ViTDecoder if vit else Decoder)(config.network, c)
        self.quantizer = GaussianQuantizer.from_config(config.quantizer)
        self.tdc = TargetDivergenceConstraint(config.tdc)
        self.calibrated = config.calibration is not None
        if self.calibrated:  # rebuilt from the config on load, never saved as tensors
            shift, scale = config.calibration.tensors()
            self.register_buffer("prior_shift", shift, persistent=False)
            self.register_buffer("prior_scale", scale, persistent=False)
        self.checkpoint_sha256: str | None = None  # sha256 of the file loaded (token files cite it)
        self.provenance: dict = {}  # training provenance read from that file

    @property
    def downsample(self) -> int:
        return self.config.network.downsample

    @property
    def codebook_fingerprint(self) -> str:
        return self.quantizer.fingerprint

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.checkpoint_sha256, self.codebook_fingerprint, self.config)

    @property
    def device(self) -> torch.device:
        return self.quantizer.codes.device

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float_images(images.to(self.device))
        f = self.downsample
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")
        return x

    def encode(
        self, images: torch.Tensor, autocast: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> posterior (mu, logvar), each (B, C, H/f, W/f) float32; logvar clamped to LOGVAR_RANGE.
        With a calibration, the posterior is the one under N(0, 1) (`gq.calibration.normalize`).

        autocast: run the encoder under torch.autocast in this dtype (torch.bfloat16 for speed on
        tensor cores); the posterior comes back in float32 either way, so the search is unchanged.
        """
        x = self._input(images)
        if autocast is None:
            mu, logvar = self.encoder(x)
        else:
            with torch.autocast(device_type=x.device.type, dtype=autocast):
                mu, logvar = self.encoder(x)
            mu, logvar = mu.float(), logvar.float()
        if self.calibrated:
            return normalize(mu, clamp_logvar(logvar), self.prior_shift, self.prior_scale)
        return mu, clamp_logvar(logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, h, w) (calibrated: of the N(0, 1) space) -> images (B, 3, h*f, w*f), unclamped."""
        if self.calibrated:
            z = denormalize(z, self.prior_shift, self.prior_scale)
        return self.decoder(z)

    def with_calibration(self, calibration: Calibration | None) -> GQVAE:
        """The same network and weights under another prior (None: N(0, 1)); a new model on this device."""
        model = GQVAE(replace(self.config, calibration=calibration)).to(self.device)
        model.load_state_dict(self.state_dict(), strict=True)
        model.checkpoint_sha256, model.provenance = self.checkpoint_sha256, dict(self.provenance)
        return model.train(self.training)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor, autocast: torch.dtype | None = None) -> torch.Tensor:
        """Images -> tokens (B, H/f, W/f, groups) int64; `autocast` as in `encode`."""
        mu, logvar = self.encode(images, autocast)
        return self.quantizer.quantize(mu, logvar)

    @torch.no_grad()
    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w, groups) -> images (B, 3, h*f, w*f) in [-1, 1]."""
        return self.decode(self.quantizer.dequantize(tokens)).clamp_(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The continuous VAE: decode the posterior mean, (B, 3, H, W) in [-1, 1]."""
        mu, _ = self.encode(images)
        return self.decode(mu).clamp_(-1.0, 1.0)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        """Training pass: decode mu + sigma * eps; the KL term as configured (TDC or plain KL)."""
        mu, logvar = self.encode(images)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        kl_loss, stats = self.tdc(mu, logvar)
        return VAEOutput(recon=self.decode(z), mu=mu, logvar=logvar, kl_loss=kl_loss, kl_stats=stats)
