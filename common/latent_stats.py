"""Per-channel latent statistics of a diffusers VAE, and the check that its normalisation is right.

The text-to-image trainer never sees raw latents: it encodes a posterior *sample* and normalises
it with :func:`common.vae_config.normalisation_constants`, ``(z - shift) * scale``. The DiT's
noise schedule assumes the result has zero mean and unit variance per channel; a VAE whose config
carries stale statistics (the REPA-E stage's BatchNorm EMA lags a drifting latent scale) silently
trains at the wrong signal-to-noise ratio. Two functions keep that honest:

* :func:`measure_latents` -- per-channel mean / std (float64) of the *un-normalised* posterior
  samples of some images, in the channels the DiT sees (after the family's own patchify: FLUX.2's
  128, not its VAE's 32, because those are the channels its BatchNorm normalises): the numbers to
  write into ``latents_mean`` / ``latents_std`` (or FLUX.2's BatchNorm);
* :func:`check_normalisation` -- the same images through the VAE's own config constants, exactly
  as the trainer normalises, with a pass/fail against a tolerance.

Posterior noise is seeded per image (stream ``STREAM_LATENT_STATS`` of :mod:`common.randomness`),
so the figures do not depend on the batch size or the device. ``AutoencoderKL`` takes images
(B, 3, H, W); ``AutoencoderKLQwenImage`` is a video VAE and gets a frame axis on the way in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from common.randomness import STREAM_LATENT_STATS, derive_seed, randn
from common.vae_config import family_of_module

DEFAULT_TOLERANCE = 0.05


def _as_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1]; float images are taken to be in [-1, 1] already."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.float().div(127.5).sub(1.0)
    return images.float()


def _posterior_samples(
    vae: torch.nn.Module, images: torch.Tensor, *, batch_size: int, seed: int, sample: bool
) -> Iterator[torch.Tensor]:
    """Un-normalised float32 latents (B, C, h, w) batch by batch: posterior samples or means."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("no images to measure latents on")
    param = next(vae.parameters())
    family = family_of_module(vae)
    for start in range(0, len(images), batch_size):
        x = _as_unit(images[start : start + batch_size]).to(device=param.device, dtype=param.dtype)
        mean, std = family.encode_moments(vae, x)
        if not sample or std is None:  # an RAE's latent is deterministic
            yield mean
            continue
        generators = [
            torch.Generator().manual_seed(derive_seed(seed, (STREAM_LATENT_STATS,), i))
            for i in range(start, start + len(mean))
        ]
        yield mean + std * randn(mean.shape, generators, mean.device)


class _ChannelMoments:
    """Running per-channel mean / std over (N, H, W) in float64, shifted by the first batch's mean."""

    def __init__(self) -> None:
        self.count = 0
        self.pivot: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, z: torch.Tensor) -> None:
        z = z.detach().double().transpose(0, 1).reshape(z.shape[1], -1)  # (C, B*h*w)
        if self.pivot is None:
            self.pivot = z.mean(dim=1)
            self.total = torch.zeros_like(self.pivot)
            self.squares = torch.zeros_like(self.pivot)
        d = z - self.pivot[:, None]
        self.total += d.sum(dim=1)
        self.squares += d.pow(2).sum(dim=1)
        self.count += z.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        shifted = self.total / self.count
        var = (self.squares / self.count - shifted.pow(2)).clamp_min(0.0)
        return (self.pivot + shifted).cpu(), var.sqrt().cpu()


def _moments(
    vae: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    sample: bool,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    moments = _ChannelMoments()
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            for z in _posterior_samples(vae, images, batch_size=batch_size, seed=seed, sample=sample):
                moments.add(z if transform is None else transform(z))
    finally:
        vae.train(was_training)
    return moments.result()


def measure_latents(
    vae: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 256, seed: int = 0, sample: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean[C], std[C]) float64 of the VAE's un-normalised latents over (N, H, W).

    The channels are those of the latent the DiT sees before normalisation (``Family.patchify``:
    identity but for FLUX.2, whose statistics live per patchified channel); an RAE's latent is
    measured as its ``encode`` gives it (already normalised by its own statistics).

    ``images``: (N, 3, H, W), float in [-1, 1] (uint8 is converted). ``sample=True`` draws posterior
    samples (what text-to-image training encodes; noise seeded per image from ``seed``),
    ``sample=False`` uses the posterior means. The VAE runs in its own device and dtype, in eval
    mode and without gradients; its training flag is restored afterwards. ``std`` is the population
    standard deviation, so ``(z - mean) / std`` of these very latents has unit variance.
    """
    family = family_of_module(vae)
    return _moments(vae, images, batch_size=batch_size, seed=seed, sample=sample, transform=family.patchify)


def check_normalisation(
    vae: torch.nn.Module,
    images: torch.Tensor,
    *,
    tol_mean: float = DEFAULT_TOLERANCE,
    tol_std: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    batch_size: int = 256,
) -> dict:
    """Per-channel mean / std of the latents the text-to-image trainer would see, and whether they pass.

    Posterior samples go through the family's own patchify (FLUX.2: 2x2) and are normalised with
    the family's constants (``Family.normalisation_constants``: the config's, or FLUX.2's BatchNorm
    statistics) as ``(z - shift) * scale`` in float32, exactly as ``fusedit.latents.LatentCodec``
    does. ``ok`` holds when every channel's ``|mean| <= tol_mean`` and ``|std - 1| <= tol_std``.
    """
    family = family_of_module(vae)
    shift, scale = family.normalisation_constants(vae)

    def normalise(z: torch.Tensor) -> torch.Tensor:
        return (family.patchify(z) - shift.to(z.device)) * scale.to(z.device)

    mean, std = _moments(vae, images, batch_size=batch_size, seed=seed, sample=True, transform=normalise)
    max_abs_mean = float(mean.abs().max())
    max_abs_std_error = float((std - 1.0).abs().max())
    return {
        "per_channel_mean": [float(v) for v in mean],
        "per_channel_std": [float(v) for v in std],
        "max_abs_mean": max_abs_mean,
        "max_abs_std_error": max_abs_std_error,
        "ok": max_abs_mean <= tol_mean and max_abs_std_error <= tol_std,
        "tolerance": {"mean": tol_mean, "std": tol_std},
        "images": len(images),
        "source": family.normalisation_source(vae.config),
    }


def failing_channels(result: dict) -> list[str]:
    """One line per channel of a :func:`check_normalisation` result that is outside its tolerance."""
    tol = result["tolerance"]
    lines = []
    for c, (m, s) in enumerate(zip(result["per_channel_mean"], result["per_channel_std"])):
        problems = []
        if abs(m) > tol["mean"]:
            problems.append(f"mean {m:+.4f} (|mean| > {tol['mean']})")
        if abs(s - 1.0) > tol["std"]:
            problems.append(f"std {s:.4f} (|std - 1| > {tol['std']})")
        if problems:
            lines.append(f"channel {c}: " + ", ".join(problems))
    return lines


__all__ = ["DEFAULT_TOLERANCE", "check_normalisation", "failing_channels", "measure_latents"]
