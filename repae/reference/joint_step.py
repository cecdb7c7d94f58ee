"""The REPA-E joint step as the original ``train_repae.py`` computes it.

Never used for training. It exists so that ``python -m repae.bench`` (and its test) can run the
original *formulation* next to ours (:meth:`repae.train.JointTrainer.train_step`) on the same
weights, batch and random draws, time both, and check that both give the same losses: a speed-up
that computed something else would be worthless.

Written from what the original code does (docs/repae.md and docs/performance.md describe it in
our words; the IDs below are entries of docs/reference-facts.md). What it does the original's way, where ours
differs:

* the SiT forward computes its losses inside itself (BN, interpolant, blocks, projectors,
  per-sample denoising loss, REPA loss) and runs the final layer and unpatchify even in the
  alignment pass, on the block-``encoder_depth`` state (wasted work in that pass); ours stops
  after block ``encoder_depth``;
* the REPA loss is a Python loop over encoders and samples, one normalise / dot / mean per
  sample (the REPA code base's ``proj_loss += mean_flat(...)``); ours is one batched expression;
* the SiT BatchNorm is the module's own train-mode ``BatchNorm2d`` (ours: the global-batch
  moments of :mod:`repae.sync_bn`);
* the VAE loss module: the discriminator's ``requires_grad`` toggled on every
  call, the generator's GAN term on the reconstructions alone with the discriminator in train
  mode (its BatchNorm running statistics are updated too), the discriminator loss from two
  passes (real, fake), LPIPS fed ``2x - 1``, results kept as a dict of detached tensors;
* the discriminator optimiser and its clipping cover every loss-module parameter, the frozen
  LPIPS network included (REPAE-4.4);
* the EMA is a Python loop over named parameters and buffers (REPAE-5.3);
* every logged value is copied to the host every step (REPAE-D13).

The same in both: the modules themselves (VAE, LPIPS, discriminator, SiT blocks, encoders; the
reference's CompVis autoencoder is numerically the diffusers one, REPAE-1.4), the order of the three
updates, AdamW and the clipping norm. Chosen so that both compute the same function:

* the published losses, i.e. ours with ``loss.reference_faithful=true`` (our default fixes change
  the loss values and cannot be checked against this);
* the random draws (posterior noise, time, noise, label dropout) come from the caller's generator
  in our trainer's order, where the original drew them from the global RNG;
* the GAN factor is the caller's schedule (``loss.discriminator_warmup_steps``, ours only; the
  reference is the schedule with no warm-up);
* "unfreezing" the SiT restores the flags it had; REPA's ``requires_grad(model, True)`` helper sets
  it on every parameter, the frozen positional embedding included (docs/reference-facts.md does not record this;
  not reproduced).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Clock = Callable[[str], AbstractContextManager]


def no_clock(name: str) -> AbstractContextManager:
    """The default phase clock: time nothing."""
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ReferenceRecipe:
    """The loss and optimiser numbers of one run (a ``RepaeConfig`` holds them all)."""

    reconstruction_loss: str
    reconstruction_weight: float
    perceptual_weight: float
    kl_weight: float
    discriminator_factor: float
    discriminator_weight: float
    proj_coeff: float
    vae_align_proj_coeff: float
    path_type: str
    weighting: str
    class_dropout_prob: float
    max_grad_norm: float
    ema_decay: float

    @classmethod
    def from_config(cls, cfg: Any) -> ReferenceRecipe:
        """Read the numbers from a ``repae.config.RepaeConfig``; refuse what the original cannot do."""
        loss = cfg.loss
        if loss.adaptive_weight or loss.lecam_weight > 0:
            raise ValueError("the reference formulation has a fixed GAN weight and no LeCam term")
        return cls(
            reconstruction_loss=loss.reconstruction_loss,
            reconstruction_weight=loss.reconstruction_weight,
            perceptual_weight=loss.perceptual_weight,
            kl_weight=loss.kl_weight,
            discriminator_factor=loss.discriminator_factor,
            discriminator_weight=loss.discriminator_weight,
            proj_coeff=loss.proj_coeff,
            vae_align_proj_coeff=loss.vae_align_proj_coeff,
            path_type=loss.path_type,
            weighting=loss.weighting,
            class_dropout_prob=cfg.model.class_dropout_prob,
            max_grad_norm=cfg.trainer.gradient_clipping,
            ema_decay=cfg.ema.decay,
        )


# ------------------------------------------------------------------------------- pure formulas


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every axis but the first (the reference's helper)."""
    return x.mean(dim=list(range(1, x.ndim)))


def interpolant(t: Tensor, path_type: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha, sigma, d_alpha, d_sigma) at t of shape (B,1,1,1) (REPAE-2.7 step 4)."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    angle = t * (math.pi / 2)
    return angle.cos(), angle.sin(), -(math.pi / 2) * angle.sin(), (math.pi / 2) * angle.cos()


def projection_loss(zs: list[Tensor], zs_tilde: list[Tensor]) -> Tensor:
    """-(1/(K B)) sum_k sum_b mean_tokens cos(z, z~), one Python iteration per encoder and sample."""
    proj_loss = zs[0].new_zeros(())
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            proj_loss = proj_loss + (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    return proj_loss / (len(zs) * bsz)


def posterior_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """Per-sample KL to N(0, I): 0.5 * sum over (C, h, w) of mean^2 + var - 1 - logvar (REPAE-1.3)."""
    return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])


def set_requires_grad(params: list[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad = flag


# ------------------------------------------------------------------------------------ the SiT


def sit_forward(
    sit: nn.Module,
    x: Tensor,
    y: Tensor,
    zs: list[Tensor],
    *,
    path_type: str,
    align_only: bool,
    time_input: Tensor,
    noises: Tensor,
    force_drop_ids: Tensor | None = None,
) -> dict[str, Tensor | None]:
    """The reference ``SiT.forward(x, y, zs, loss_kwargs, time_input, noises)`` on our SiT's modules (REPAE-2.7).

    ``x`` is the raw VAE latent (BN runs here, in whatever mode the module is in); the final layer
    runs whether or not ``align_only`` stops the block loop.
    """
    x_n = sit.bn(x)
    t = time_input.view(-1, 1, 1, 1).to(x_n.dtype)
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    model_input = alpha * x_n + sigma * noises
    model_target = d_alpha * x_n + d_sigma * noises
    h = sit.x_embedder(model_input) + sit.pos_embed
    n, tokens, width = h.shape
    c = sit.t_embedder(time_input.flatten()) + sit.y_embedder(y, force_drop_ids)
    zs_tilde: list[Tensor] = []
    for i, block in enumerate(sit.blocks):
        h = block(h, c)
        if i + 1 == sit.encoder_depth:
            zs_tilde = [proj(h.reshape(-1, width)).reshape(n, tokens, -1) for proj in sit.projectors]
            if align_only:
                break
    output = sit.unpatchify(sit.final_layer(h, c))
    denoising = None if align_only else mean_flat((output - model_target) ** 2)
    return {
        "zs_tilde": zs_tilde,
        "model_output": output,
        "denoising_loss": denoising,
        "proj_loss": projection_loss(zs, zs_tilde),
    }


# ------------------------------------------------------------------------------- the VAE loss


class ReferenceVAELoss:
    """``ReconstructionLoss_Single_Stage`` in its generator and discriminator modes (REPAE-4.2, REPAE-4.3)."""

    def __init__(self, module: nn.Module, recipe: ReferenceRecipe) -> None:
        self.module = module  # a repae.losses.VAELoss: its .discriminator and .lpips hold the weights
        self.discriminator = module.discriminator
        self.lpips_metric = None if module.lpips is None else module.lpips.metric
        self.recipe = recipe

    def generator(
        self, x: Tensor, recon: Tensor, posterior: Any, gan_factor: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        r = self.recipe
        x, recon = x.float(), recon.float()
        if r.reconstruction_loss == "l1":
            rec = F.l1_loss(x, recon, reduction="mean")
        else:
            rec = F.mse_loss(x, recon, reduction="mean")
        rec = r.reconstruction_weight * rec / math.exp(0.0)  # the fixed log-variance 0 (REPAE-4.1)
        if self.lpips_metric is not None:
            perc = self.lpips_metric(x, recon, normalize=True).mean()  # [-1, 1] mapped once more: [-3, 1]
        else:
            perc = x.new_zeros(())
        kl = posterior_kl(posterior.mean.float(), posterior.logvar.float())
        kl = torch.sum(kl) / kl.shape[0]
        gan = x.new_zeros(())
        if gan_factor > 0 and r.discriminator_weight > 0:
            set_requires_grad(list(self.discriminator.parameters()), False)
            gan = -torch.mean(self.discriminator(recon))
        d_weight = r.discriminator_weight
        weighted_gan = d_weight * gan_factor * gan
        total = rec + r.perceptual_weight * perc + r.kl_weight * kl + weighted_gan
        logs = {
            "total_loss": total.detach(),
            "reconstruction_loss": rec.detach(),
            "perceptual_loss": (r.perceptual_weight * perc).detach(),
            "kl_loss": (r.kl_weight * kl).detach(),
            "weighted_gan_loss": weighted_gan.detach(),
            "gan_loss": gan.detach(),
        }
        return total, logs

    def discriminator_loss(self, x: Tensor, recon: Tensor, factor: float) -> tuple[Tensor, dict[str, Tensor]]:
        set_requires_grad(list(self.discriminator.parameters()), True)
        real = x.detach().float().requires_grad_(True)
        logits_real = self.discriminator(real)
        logits_fake = self.discriminator(recon.detach().float())
        hinge = 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))
        loss = factor * hinge
        logs = {
            "discriminator_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs


# ------------------------------------------------------------------------------------ the step


class ReferenceEMA:
    """``update_ema``: a Python loop over named parameters, float buffers averaged, others copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].mul_(self.decay).add_(param.data, alpha=1 - self.decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, buf in model.named_buffers():
            if buf.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                ema_buffers[name].mul_(self.decay).add_(buf, alpha=1 - self.decay)
            else:
                ema_buffers[name].copy_(buf)


@dataclass
class StepDraws:
    """This step's random draws, in our trainer's order on one generator."""

    generator: torch.Generator
    gan_factor: float
    disc_factor: float


class ReferenceJointStep:
    """Models, optimisers and EMA of the reference loop, and its step (REPAE-5.2)."""

    def __init__(
        self,
        *,
        vae: nn.Module,
        sit: nn.Module,
        loss_module: nn.Module,
        encoders: list[nn.Module],
        recipe: ReferenceRecipe,
        optimizer_kwargs: dict[str, dict[str, Any]],
        autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.vae, self.sit, self.encoders, self.recipe = vae, sit, encoders, recipe
        self.loss = ReferenceVAELoss(loss_module, recipe)
        self.loss_module = loss_module
        self.autocast = autocast
        self.opt_sit = torch.optim.AdamW(sit.parameters(), **optimizer_kwargs["sit"])
        self.opt_vae = torch.optim.AdamW(vae.parameters(), **optimizer_kwargs["vae"])
        # Every loss-module parameter, the frozen LPIPS network included (REPAE-4.4).
        self.opt_disc = torch.optim.AdamW(loss_module.parameters(), **optimizer_kwargs["disc"])
        self.ema = ReferenceEMA(sit, recipe.ema_decay)
        self.sit_trainable = [p for p in sit.parameters() if p.requires_grad]

    def _clip_and_step(self, opt: torch.optim.Optimizer, params: Iterator[nn.Parameter]) -> Tensor:
        params = [p for p in params if p.grad is not None]
        if self.recipe.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.recipe.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def step(self, images: Tensor, labels: Tensor, draws: StepDraws, clock: Clock = no_clock) -> dict[str, float]:
        """One joint step: VAE, then discriminator, then SiT, then EMA and the per-step logs."""
        g = draws.generator
        with clock("encoders"), torch.no_grad(), self.autocast():
            zs = [enc(images).float() for enc in self.encoders]
        with clock("vae_forward"), self.autocast():
            self.vae.train()
            self.sit.train()
            x = images.float() / 127.5 - 1.0
            posterior, z, recon = self.vae(x, generator=g)
        with clock("draws"):
            t, noise = self._time_and_noise(z, g)
        with clock("vae_step"):
            logs = self._vae_step(x, recon, posterior, z, labels, zs, t, noise, draws.gan_factor)
        with clock("disc_step"):
            logs.update(self._disc_step(x, recon, draws.disc_factor))
        with clock("sit_step"):
            logs.update(self._sit_step(z, labels, zs, t, noise, g))
        with clock("ema"):
            self.ema.update(self.sit)
        with clock("logging"):
            return {k: v.detach().item() for k, v in logs.items()}

    def _time_and_noise(self, z: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        from repae.transport import sample_time

        r = self.recipe
        t = sample_time(z.shape[0], r.weighting, generator=g, device=z.device, path_type=r.path_type)
        noise = torch.randn(z.shape, generator=g, device=z.device, dtype=torch.float32)
        return t, noise

    def _vae_step(self, x, recon, posterior, z, labels, zs, t, noise, gan_factor) -> dict[str, Tensor]:
        r = self.recipe
        set_requires_grad(self.sit_trainable, False)
        self.sit.eval()
        with self.autocast():
            rec_loss, logs = self.loss.generator(x, recon, posterior, gan_factor)
            out = sit_forward(
                self.sit, z, labels, zs, path_type=r.path_type, align_only=True, time_input=t, noises=noise
            )
            vae_loss = rec_loss + r.vae_align_proj_coeff * out["proj_loss"]
        vae_loss.backward()
        norm = self._clip_and_step(self.opt_vae, self.vae.parameters())
        return {**logs, "vae_loss": vae_loss, "vae_align_loss": out["proj_loss"], "grad_norm_vae": norm}

    def _disc_step(self, x, recon, factor) -> dict[str, Tensor]:
        with self.autocast():
            d_loss, logs = self.loss.discriminator_loss(x, recon, factor)
        d_loss.backward()
        norm = self._clip_and_step(self.opt_disc, self.loss_module.parameters())
        return {**logs, "d_loss": d_loss, "grad_norm_disc": norm}

    def _sit_step(self, z, labels, zs, t, noise, g) -> dict[str, Tensor]:
        r = self.recipe
        set_requires_grad(self.sit_trainable, True)
        self.sit.train()
        drop = torch.rand(labels.shape, generator=g, device=labels.device) < r.class_dropout_prob
        with self.autocast():
            out = sit_forward(
                self.sit,
                z.detach(),
                labels,
                zs,
                path_type=r.path_type,
                align_only=False,
                time_input=t,
                noises=noise,
                force_drop_ids=drop,
            )
            denoising = out["denoising_loss"].mean()
            sit_loss = denoising + r.proj_coeff * out["proj_loss"]
        sit_loss.backward()
        norm = self._clip_and_step(self.opt_sit, self.sit.parameters())
        return {"sit_loss": sit_loss, "denoising_loss": denoising, "proj_loss": out["proj_loss"], "grad_norm_sit": norm}
