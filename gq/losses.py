"""Training losses of the GQ-VAE besides the KL term: reconstruction (L1, optional L2 and perceptual) and the
PatchGAN hinge loss with taming's adaptive generator weight.

Scale follows latent diffusion's `LPIPSWithDiscriminator`: the reconstruction loss is summed over the pixels
of an image and averaged over the batch, the same reduction as the TDC term (summed over latent positions,
averaged over the batch), so their balance matches the reference. LDM's learned output log-variance is left
out (it starts at 0, where it changes nothing). Every function is pure; nothing switches on `self.training`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossConfig:
    """Weights and schedule of the autoencoder and discriminator losses; saved into the run config."""

    l1_weight: float = 1.0  # weight of sum |x - x_hat| per image (the reference's only pixel loss)
    l2_weight: float = 0.0  # weight of sum (x - x_hat)^2 per image (off by default)
    perceptual_weights: str | None = None  # local TorchScript or safetensors LPIPS-VGG file; None: no term
    perceptual_weight: float = 1.0  # weight of the perceptual distance, added per pixel as LDM does
    disc_start: int = 20001  # first step with the GAN loss (the reference's 20001); before it, no GAN at all
    disc_weight: float = 0.75  # scale of the adaptive generator weight (taming's discriminator_weight)
    disc_channels: int = 64  # width of the discriminator's first layer (taming's ndf)
    disc_layers: int = 3  # stride-2 conv layers of the discriminator (taming's n_layers)
    disc_lr: float | None = None  # Adam learning rate of the discriminator; None: the autoencoder's
    adaptive_weight_max: float = 1e4  # clamp of the adaptive weight (taming's)

    def __post_init__(self) -> None:
        for name in ("l1_weight", "l2_weight", "perceptual_weight", "disc_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.l1_weight == 0 and self.l2_weight == 0 and self.perceptual_weights is None:
            raise ValueError("no reconstruction loss: set l1_weight, l2_weight or perceptual_weights")
        if self.disc_start < 0 or self.disc_layers < 1 or self.disc_channels < 1:
            raise ValueError("disc_start must be >= 0, disc_layers and disc_channels >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LossConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown loss config fields {sorted(unknown)}")
        return cls(**data)


def reconstruction_loss(
    images: torch.Tensor,
    recon: torch.Tensor,
    config: LossConfig,
    perceptual: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The reconstruction terms of a batch: `rec` (the weighted loss, per-image sum averaged over the batch)
    and, for logs, `l1` and `l2` (per-pixel means) and `perceptual` (mean distance) when used."""
    batch = images.shape[0]
    diff = recon - images
    abs_diff = diff.abs()
    terms = {"l1": abs_diff.mean().detach(), "l2": diff.square().mean().detach()}
    rec = config.l1_weight * abs_diff.sum() / batch
    if config.l2_weight:
        rec = rec + config.l2_weight * diff.square().sum() / batch
    if perceptual is not None:
        distance = perceptual_distance(perceptual, images, recon)  # (B,)
        pixels = images[0].numel()  # LDM adds the per-image distance to every pixel's loss, then sums
        rec = rec + config.perceptual_weight * pixels * distance.mean()
        terms["perceptual"] = distance.mean().detach()
    terms["rec"] = rec
    return terms


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """taming's discriminator hinge loss: (mean relu(1 - real) + mean relu(1 + fake)) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: -mean(D(x_hat))."""
    return -logits_fake.mean()


def gan_active(step: int, config: LossConfig) -> bool:
    """Whether step `step` (1-based count of autoencoder steps) trains with the GAN loss."""
    return step >= config.disc_start


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    scale: float = 0.75,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """taming's adaptive GAN weight: |grad rec| / (|grad g| + 1e-4) at the decoder's last layer, clamped to
    [0, max_weight], detached, times `scale`. Keeps the graph for the backward pass that follows."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * scale


# --- perceptual distance (optional, from local weights only) ---------------------------------------------


class PerceptualWeightsError(ValueError):
    """The perceptual-loss weights file is missing or is not a loadable LPIPS network."""


def perceptual_distance(network: nn.Module, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image distance (B,) from a perceptual network called as `network(images, recon)`."""
    out = network(images, recon)
    return out.reshape(out.shape[0], -1).mean(1)


_VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))  # channels per slice


class LPIPSVGG(nn.Module):
    """LPIPS with a VGG16 trunk, laid out so its state_dict keys equal those of `lpips.LPIPS(net="vgg")`
    (`net.slice{1..5}.{i}.weight`, `lin{0..4}.model.1.weight`, `scaling_layer.shift/scale`). Images in
    [-1, 1]; returns (B, 1, 1, 1) distances. Dropout of the linear heads is left out (evaluation form)."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.scaling_layer.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.net = nn.Module()
        index, c_in = 0, 3
        for s, widths in enumerate(_VGG16, start=1):
            slice_ = nn.Sequential()
            if s > 1:
                slice_.add_module(str(index), nn.MaxPool2d(2, 2))
                index += 1
            for c_out in widths:
                slice_.add_module(str(index), nn.Conv2d(c_in, c_out, 3, padding=1))
                slice_.add_module(str(index + 1), nn.ReLU())
                index, c_in = index + 2, c_out
            setattr(self.net, f"slice{s}", slice_)
        for k, widths in enumerate(_VGG16):
            setattr(self, f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(
                nn.Identity(), nn.Conv2d(widths[-1], 1, 1, bias=False)
            )

    def forward(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        shift, scale = self.scaling_layer.shift, self.scaling_layer.scale
        a, b = (images - shift) / scale, (recon - shift) / scale
        total = 0.0
        for k in range(len(_VGG16)):
            layer = getattr(self.net, f"slice{k + 1}")
            a, b = layer(a), layer(b)
            fa = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
            fb = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((fa - fb).square()).mean((2, 3), keepdim=True)
        return total


def load_perceptual(path: str | Path) -> nn.Module:
    """A frozen perceptual network from a LOCAL file; nothing is downloaded.

    - `.safetensors`: the weights of `lpips.LPIPS(net="vgg")` (its state_dict, VGG trunk included);
    - anything else: a TorchScript module called as `module(images, recon)` on [-1, 1] images, returning one
      distance per image.
    Raises `PerceptualWeightsError` naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise PerceptualWeightsError(f"perceptual weights {str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise PerceptualWeightsError(
                f"perceptual weights {str(path)!r}: not a safetensors file ({e})"
            ) from None
        for key in list(tensors):  # lpips registers its heads twice: as lin{k} and in the list lins.{k}
            if key.startswith("lins."):
                k, rest = key[len("lins.") :].split(".", 1)
                tensors.setdefault(f"lin{k}.{rest}", tensors[key])
                del tensors[key]
        network = LPIPSVGG()
        expected = network.state_dict()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise PerceptualWeightsError(
                f"perceptual weights {str(path)!r}: not an LPIPS-VGG state dict (missing {missing[:4]}...)"
            )
        wrong = [k for k in expected if tuple(tensors[k].shape) != tuple(expected[k].shape)]
        if wrong:
            raise PerceptualWeightsError(f"perceptual weights {str(path)!r}: wrong shapes for {wrong[:4]}")
        network.load_state_dict({k: tensors[k] for k in expected})
    else:
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; a given file still loads
                warnings.simplefilter("ignore", DeprecationWarning)
                network = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise PerceptualWeightsError(
                f"perceptual weights {str(path)!r}: neither .safetensors nor a TorchScript module ({e})"
            ) from None
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network
