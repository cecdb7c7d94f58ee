"""Rectified-flow training objective and Euler sampler with the SD3 shifted schedule.

Conventions (docs/reference-facts.md, T2I-3.2 and T2I-5): `x_t = (1 - sigma) x0 + sigma eps`,
sigma = 1 is pure noise, the network predicts the velocity `v = eps - x0` and is conditioned on
`t = 1000 sigma`.

Three choices differ from the reference on purpose (each names the reference defect it fixes):

* Every random draw takes an explicit `torch.Generator`. The trainer seeds one per
  (seed, rank, step), so ranks draw different (t, eps) (the reference drew the same on all ranks,
  T2I-D3) and a resumed run repeats the same draws.
* The training sigma table is indexed directly with `i = floor(1000 u)` instead of a per-sample
  Python search for the timestep (T2I-D22).
* Noising, targets, the loss and the sampler's latents are float32 whatever the caller's autocast
  or the model's output dtype (T2I-D5 and T2I-D6).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from common.randomness import Generators, randn

if TYPE_CHECKING:
    from fusedit.config import TrainConfig

# The names diffusers' SD3 helpers understand. "logit_normal" and "mode" shape the timestep density
# (loss weight 1); "sigma_sqrt" and "cosmap" weight the loss (uniform density); "none" is neither.
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")

# model_fn(x, timesteps) -> velocity. See `euler_sample` for the batch layout under guidance.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def training_sigma_table(scheduler: FlowMatchEulerDiscreteScheduler) -> torch.Tensor:
    """The (num_train_timesteps,) float32 sigma table of a freshly built scheduler, sigma[0] = 1.

    Rebuilt from the config because `set_timesteps` (used for sampling) overwrites
    `scheduler.sigmas` in place; the training table must not depend on whether someone sampled.
    """
    fresh = type(scheduler).from_config(scheduler.config)
    return fresh.sigmas.to(torch.float32).clone()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so a per-sample scalar broadcasts over `like`'s trailing axes."""
    return values.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.ndim - 1)))


class FlowMatching:
    """Draws training sigmas, noises latents and computes the (weighted) velocity loss.

    `weighting_scheme` follows diffusers' SD3 trainer: "logit_normal" (the reference's choice,
    u = sigmoid(N(logit_mean, logit_std))), "mode" (with `mode_scale`), or "sigma_sqrt" /
    "cosmap" / "none" (uniform u, those loss weights). `precondition_outputs=True` compares the
    implied clean sample `x_t - sigma v_hat` to `x0` instead of `v_hat` to `eps - x0`.
    """

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        precondition_outputs: bool = False,
    ) -> None:
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
        self.scheduler = scheduler
        self.weighting_scheme = weighting_scheme
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.precondition_outputs = precondition_outputs
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.sigma_table = training_sigma_table(scheduler)

    def sample_sigmas(
        self,
        batch_size: int,
        generator: Generators,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """(B,) float32 training sigmas: u from the density, then `sigma_table[floor(N u)]`.

        Drawn on the generator's device (so a CPU generator gives identical draws whatever
        accelerator trains), returned on `device` (default: that same device). A list of B CPU
        generators draws sample i's sigma from generator i (see `common.randomness`).
        """
        if isinstance(generator, Sequence):
            if len(generator) != batch_size:
                raise ValueError(f"{len(generator)} per-sample generators for a batch of {batch_size}")
            draw_device = torch.device("cpu")
            u = torch.cat([self._density(1, draw_device, g) for g in generator])
        else:
            draw_device = generator.device if generator is not None else torch.device("cpu")
            u = self._density(batch_size, draw_device, generator)
        n = self.num_train_timesteps
        index = (u * n).floor().long().clamp_(0, n - 1)
        sigmas = self.sigma_table.to(draw_device)[index]
        return sigmas.to(device if device is not None else draw_device)

    def _density(self, batch_size: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        return compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=device,
            generator=generator,
        )

    def timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The DiT's conditioning value for a sigma: `1000 sigma` (float, not rounded)."""
        return sigmas.to(torch.float32) * self.num_train_timesteps

    @staticmethod
    def sample_noise(x0: torch.Tensor, generator: Generators) -> torch.Tensor:
        """float32 N(0, I) shaped like `x0`, drawn on the generator's device (row i from generator i
        for a per-sample list), returned on x0's."""
        return randn(x0.shape, generator, x0.device)

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma eps, in float32."""
        s = _per_sample(sigmas, x0)
        return (1.0 - s) * x0.float() + s * noise.float()

    def per_sample_loss(
        self,
        pred: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        x_t: torch.Tensor,
        sigmas: torch.Tensor,
    ) -> torch.Tensor:
        """(B,) float32: weighted squared error averaged over each sample's elements."""
        pred = pred.float()
        if self.precondition_outputs:
            pred = x_t.float() - _per_sample(sigmas, pred) * pred
            target = x0.float()
        else:
            target = noise.float() - x0.float()
        weight = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas.to(pred.device, torch.float32))
        squared = _per_sample(weight, pred) * (pred - target) ** 2
        return squared.reshape(pred.shape[0], -1).mean(dim=1)

    def loss(
        self,
        pred: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        x_t: torch.Tensor,
        sigmas: torch.Tensor,
    ) -> torch.Tensor:
        """Scalar float32 loss: mean over (C, H, W) per sample, then over the batch."""
        return self.per_sample_loss(pred, x0, noise, x_t, sigmas).mean()

    def training_loss(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        text: torch.Tensor,
        mask: torch.Tensor,
        generators: Generators,
        dtype: torch.dtype,
        pooled_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The text-to-image step's loss on one micro-batch: the trainer's and the benchmark's one definition.

        Sigmas and noise come from the per-sample ``generators`` (common.randomness), so the draws
        do not depend on how the global batch is split; the model sees ``dtype`` inputs and the
        timestep ``1000 sigma``; the loss is computed in float32. ``pooled_text``: a "fuse-dit-clip"
        FuseDiT's pooled CLIP embeddings, passed on by keyword (other models take none).
        """
        sigmas = self.sample_sigmas(x0.shape[0], generator=generators, device=x0.device)
        noise = self.sample_noise(x0, generators)
        x_t = self.add_noise(x0, noise, sigmas)
        if text.is_floating_point():  # encoder features; a FuseDiT takes token ids and runs its LLM itself
            text = text.to(dtype)
        extra = {} if pooled_text is None else {"pooled_text": pooled_text.to(dtype)}
        pred = model(x_t.to(dtype), (sigmas * 1000.0).to(dtype), text, mask, **extra)
        return self.loss(pred.float(), x0, noise, x_t, sigmas)


def sampling_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, num_inference_steps: int) -> torch.Tensor:
    """(steps + 1,) float32 inference sigmas, from 1.0 down to a terminal 0.

    Exactly the reference pipeline's schedule (T2I-5): diffusers' `set_timesteps`,
    which spaces timesteps linearly between the shifted training extremes and shifts again. Run on
    a copy so the caller's scheduler keeps its training table.
    """
    inference = copy.deepcopy(scheduler)
    inference.set_timesteps(num_inference_steps, device="cpu")
    return inference.sigmas.to(torch.float32).clone()


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    guidance_scale: float = 1.0,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Integrate the flow ODE from `sigmas[0]` to `sigmas[-1]` with Euler steps; float32 throughout.

    Contract of `model_fn(x, timesteps) -> velocity` (any dtype; cast to float32 here):
    * `guidance_scale > 1` (CFG): `x` is (2B, ...) laid out [uncond; cond] and `timesteps` is
      doubled the same way, so the caller must have built its text batch as [negative; positive];
    * otherwise: `x` is the (B, ...) latents and the text batch is the positive prompts only.
    `timesteps` is float32 `num_train_timesteps * sigma`, one per row. Guidance is
    `v_u + g (v_c - v_u)`; `guidance_scale <= 1` disables it, as in the reference pipeline (for
    g = 1 that is the same velocity at half the cost). The caller decides the text doubling from
    the same `guidance_scale > 1` test, so no flag is passed.
    """
    x = latents.float()
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    use_cfg = guidance_scale > 1.0
    for k in range(len(sigmas) - 1):
        t = (sigmas[k] * num_train_timesteps).repeat(x.shape[0])
        if use_cfg:
            v_uncond, v_cond = model_fn(torch.cat([x, x]), torch.cat([t, t])).float().chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            v = model_fn(x, t).float()
        x = x + (sigmas[k + 1] - sigmas[k]) * v
    return x


def schedule_shift(cfg: TrainConfig, latent_numel: int | None = None) -> float:
    """The sigma shift: ``noise_scheduler.shift``, scaled by sqrt(latent_numel / shift_base_dim) when that is set.

    The dimension rule wide latents need: the more numbers a latent has, the more of its signal
    survives a given sigma, so the schedule must spend more time at high noise (docs/tokenizers.md).
    ``shift_base_dim`` is the latent size the fixed ``shift`` is meant for; a latent with k times
    as many numbers gets sqrt(k) times the shift. The RAE recipe is shift 1 at 4096 (an RAE's
    768 x 16 x 16 at 256 px: 6.93). The result transforms sigma exactly as a fixed shift does
    (``s' = a s / (1 + (a - 1) s)``). ``latent_numel`` is C * h * w of the DiT's latent at
    ``data.resolution``.
    """
    ns = cfg.noise_scheduler
    if ns.shift_base_dim is None:
        return float(ns.shift)
    if not latent_numel:
        raise ValueError("noise_scheduler.shift_base_dim needs the latent's size (C * h * w) to derive the shift")
    return float(ns.shift) * math.sqrt(latent_numel / ns.shift_base_dim)


def build_scheduler(cfg: TrainConfig, latent_numel: int | None = None):
    """The flow-matching scheduler; ``latent_numel`` (C * h * w) is needed only for a shift by dimension."""
    ns = cfg.noise_scheduler
    if ns.pretrained_model_name_or_path:
        return FlowMatchEulerDiscreteScheduler.from_pretrained(ns.pretrained_model_name_or_path, subfolder=ns.subfolder)
    shift = schedule_shift(cfg, latent_numel)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=ns.num_train_timesteps, shift=shift)
