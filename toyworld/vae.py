"""The toy world's tiny ``diffusers.AutoencoderKL``: config, fixed-step training, calibration, PSNR."""

from __future__ import annotations

from typing import Any

from common.images import psnr
from toyworld.training import train_fixed_steps


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------
def vae_config(resolution: int) -> dict[str, Any]:
    """Tiny AutoencoderKL: 3 blocks -> spatial factor 4, 4 latent channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": resolution,
        "mid_block_add_attention": False,
    }


def _to_unit(images_uint8) -> Any:
    return images_uint8.float().div(127.5).sub(1.0)


VAE_LR = 2e-3


def train_vae(
    images,
    resolution: int,
    steps: int,
    seed: int,
    progress: bool,
    batch_size: int = 16,
    vae=None,
    desc: str = "toy VAE",
):
    """Train the tiny VAE (or ``vae``, another family's, e.g. FLUX.2's) on uint8 images for ``steps``; returns it.

    Plain MSE (what PSNR measures) converged fastest (L1 + MSE was ~1 dB worse); small batches win
    because what costs is steps, not samples. The KL weight is tiny, as in SD/FLUX VAEs, only to
    keep the posterior honest and the latents bounded. Batches, noise and the learning-rate
    schedule depend only on ``seed`` and the step index (never on the clock).
    """
    import torch
    from diffusers import AutoencoderKL

    if vae is None:
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config(resolution))
    _start_nearly_deterministic(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(seed)

    def loss_at(step: int):
        x = _to_unit(images[torch.randint(len(images), (batch_size,), generator=generator)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / x[0].numel()
        return (recon - x).pow(2).mean() + 1e-4 * kl

    vae.train()
    train_fixed_steps(
        optimizer,
        loss_at,
        steps=steps,
        lr=VAE_LR,
        desc=desc,
        progress=progress,
        clip_params=list(vae.parameters()),
        log_every=20,
    )
    return vae.eval()


def _start_nearly_deterministic(vae, log_variance: float = -6.0) -> None:
    """Start the posterior with a small variance.

    With the default init the posterior std is ~1 while the means are ~0.1, so the decoder sees
    mostly noise and spends most of a short budget just learning to shrink the variance.
    """
    import torch

    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[channels:].fill_(log_variance)


def calibrate_vae(vae, images, seed: int, batch_size: int = 256, channel_images=None) -> dict[str, Any]:
    """Set the latent normalisation constants in the VAE's config from sampled latents.

    * per-channel ``latents_mean`` / ``latents_std`` from posterior samples of ``channel_images``
      (default ``images``; :func:`common.latent_stats.measure_latents`): what the text-to-image
      trainer normalises with (``common.vae_config.normalisation_constants`` prefers them), so its
      latents are zero-mean with unit variance *per channel*. One scalar cannot do that here: the
      toy VAE's channel stds differ by ~4x (channel 2 carries most of the signal), and scalar
      factors gave per-channel stds of 0.47-1.78 after normalisation;
    * FLUX-style scalar ``shift_factor`` (mean) and ``scaling_factor`` (1/std) over all channels
      of ``images``, kept as before: the scorer's round-trip augmentation
      (:func:`toyworld.scorer.vae_round_trip`) perturbs latents in that scale.
    """
    import torch

    from common.latent_stats import measure_latents

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(_to_unit(images[i : i + batch_size])).latent_dist.sample(generator)
                for i in range(0, len(images), batch_size)
            ]
        )
    shift, std = latents.mean().item(), latents.std().item()
    channel_images = images if channel_images is None else channel_images
    mean_c, std_c = measure_latents(vae, channel_images, batch_size=batch_size, seed=seed)
    vae.register_to_config(
        shift_factor=shift,
        scaling_factor=1.0 / std,
        latents_mean=[float(v) for v in mean_c],
        latents_std=[float(v) for v in std_c],
    )
    return {
        "shift_factor": shift,
        "scaling_factor": 1.0 / std,
        "latent_std": std,
        "latents_mean": [float(v) for v in mean_c],
        "latents_std": [float(v) for v in std_c],
        "latents_stats_images": len(channel_images),
    }


def vae_psnr(vae, images, batch_size: int = 256) -> dict[str, float]:
    """Reconstruction PSNR through the posterior mean and through a sample."""
    import torch

    generator = torch.Generator().manual_seed(0)
    mode, sampled = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = _to_unit(images[i : i + batch_size])
            posterior = vae.encode(x).latent_dist
            mode.append(psnr(x, vae.decode(posterior.mode()).sample))
            sampled.append(psnr(x, vae.decode(posterior.sample(generator)).sample))
    return {"psnr_db": torch.cat(mode).mean().item(), "psnr_sampled_db": torch.cat(sampled).mean().item()}
