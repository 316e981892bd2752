"""One training step of the GQ-VAE with TDC, with no Ray: the autoencoder step, then the TDC multipliers,
then the discriminator step when the GAN is on. `train/loop.py` runs it on every Ray Train worker."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import gq
from gq.discriminator import PatchDiscriminator
from gq.losses import (
    LossConfig,
    adaptive_weight,
    gan_active,
    generator_loss,
    hinge_d_loss,
    load_perceptual,
    reconstruction_loss,
)
from gq.tdc import KLStats

ADAM_BETAS = (0.5, 0.9)  # latent diffusion's autoencoder (and taming's) Adam betas, both optimizers
SCALARS = ("loss", "rec", "l1", "l2", "kl_loss", "g_loss", "d_weight", "d_loss")  # what a step returns


@dataclass
class Trainee:
    """What one worker trains: the model, the discriminator, their optimizers and the noise generator.
    `model_step` / `disc_step` are the modules the steps call (DistributedDataParallel wrappers, or the
    modules themselves in a single process)."""

    model: gq.GQVAE
    disc: PatchDiscriminator
    ae_opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer
    noise: torch.Generator
    perceptual: torch.nn.Module | None = None
    model_step: torch.nn.Module | None = None
    disc_step: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        self.model_step = self.model_step or self.model
        self.disc_step = self.disc_step or self.disc


def build_trainee(
    config: gq.ModelConfig,
    loss: LossConfig,
    lr: float,
    seed: int,
    device: torch.device,
    rank: int = 0,
    init: str | None = None,
) -> Trainee:
    """Seeded initial weights (the same on every worker), or `init`'s (a checkpoint of the same network);
    Adam for both, a per-rank noise generator."""
    torch.manual_seed(seed)
    model = gq.GQVAE(config)
    if init:
        model.load_state_dict(gq.load(init).state_dict(), strict=True)
    model = model.to(device)
    disc = PatchDiscriminator(loss.disc_channels, loss.disc_layers).to(device)
    perceptual = load_perceptual(loss.perceptual_weights).to(device) if loss.perceptual_weights else None
    return Trainee(
        model=model,
        disc=disc,
        ae_opt=torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS),
        disc_opt=torch.optim.Adam(disc.parameters(), lr=loss.disc_lr or lr, betas=ADAM_BETAS),
        noise=torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank),
        perceptual=perceptual,
    )


def train_step(t: Trainee, images: torch.Tensor, step: int, loss: LossConfig) -> tuple[torch.Tensor, KLStats]:
    """One optimizer step of the autoencoder (reconstruction + KL term, + the adaptive hinge GAN loss once
    `step` reaches `disc_start`), one TDC multiplier update from the batch's all-reduced KL statistics,
    then one discriminator step when the GAN is on. The SCALARS as a float64 CPU tensor, and the KL
    statistics."""
    out = t.model_step(images, generator=t.noise)
    terms = reconstruction_loss(images, out.recon, loss, t.perceptual)
    total = terms["rec"] + out.kl_loss
    gan = gan_active(step, loss)
    zero = torch.zeros((), device=images.device)
    g_loss = d_weight = d_loss = zero
    if gan:
        t.disc.requires_grad_(False)  # the generator's loss trains the decoder only
        g_loss = generator_loss(t.disc(out.recon))
        last_layer = t.model.decoder.conv_out.weight
        d_weight = adaptive_weight(
            terms["rec"], g_loss, last_layer, loss.disc_weight, loss.adaptive_weight_max
        )
        total = total + d_weight * g_loss
        t.disc.requires_grad_(True)
    t.ae_opt.zero_grad(set_to_none=True)
    total.backward()
    t.ae_opt.step()
    kl = t.model.tdc.update(out.kl_stats)  # once per autoencoder step, statistics of all workers
    if gan:
        real, fake = t.disc_step(torch.cat([images, out.recon.detach()])).chunk(2)
        d_loss = hinge_d_loss(real, fake)
        t.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        t.disc_opt.step()
    scalars = [total, terms["rec"], terms["l1"], terms["l2"], out.kl_loss, g_loss, d_weight, d_loss]
    return torch.stack([s.detach().double() for s in scalars]).cpu(), kl  # .cpu() waits for the device
