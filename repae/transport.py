"""Flow-matching transport of the REPA-E stage (REPAE-2.7): time draws, interpolants, the loss.

Convention: t in [0,1], t=1 is pure noise, x_t = alpha(t) x0 + sigma(t) eps and the SiT predicts
the velocity v = alpha'(t) x0 + sigma'(t) eps (linear path: eps - x0).

Differences from the reference (docs/reference-facts.md), on purpose:

* Times are drawn from an explicit ``torch.Generator`` on that generator's device, so a CUDA
  generator costs no host round trip per step (REPAE-D13) and runs are reproducible per rank.
* Weighting only changes the time density; the loss is never reweighted (as in the reference).
"""

from __future__ import annotations

import math

import torch

PATH_TYPES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")


def _check(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")


def sample_time(
    batch: int,
    weighting: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    path_type: str = "linear",
) -> torch.Tensor:
    """(batch,) float32 training times.

    ``uniform``: U[0,1). ``lognormal``: s = exp(n), n ~ N(0,1), then t = s/(1+s) = sigmoid(n)
    for the linear path or t = (2/pi) atan(s) for the cosine path. The draw happens on the
    generator's device (CPU without a generator, unless ``device`` says otherwise) and the result
    is moved to ``device`` if given.
    """
    _check(weighting, WEIGHTINGS, "weighting")
    _check(path_type, PATH_TYPES, "path_type")
    draw_device = generator.device if generator is not None else torch.device(device or "cpu")
    if weighting == "uniform":
        t = torch.rand(batch, generator=generator, device=draw_device, dtype=torch.float32)
    else:
        n = torch.randn(batch, generator=generator, device=draw_device, dtype=torch.float32)
        t = torch.sigmoid(n) if path_type == "linear" else torch.atan(n.exp()) * (2 / math.pi)
    return t if device is None else t.to(device)


def path_coefficients(t: torch.Tensor, path_type: str = "linear") -> tuple[torch.Tensor, ...]:
    """(alpha, sigma, d_alpha, d_sigma) at t, same shape as t.

    linear: alpha = 1-t, sigma = t, alpha' = -1, sigma' = 1; cosine: alpha = cos(pi t/2),
    sigma = sin(pi t/2) and their t-derivatives. Also what an SDE sampler needs for the score.
    """
    _check(path_type, PATH_TYPES, "path_type")
    if path_type == "linear":
        return 1 - t, t, torch.full_like(t, -1.0), torch.ones_like(t)
    half_pi = math.pi / 2
    angle = half_pi * t
    return angle.cos(), angle.sin(), -half_pi * angle.sin(), half_pi * angle.cos()


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or (B,1,..,1) -> (B,1,...,1) broadcasting over ``like``; float32 on ``like``'s device."""
    if t.numel() != like.shape[0]:
        raise ValueError(f"t must have one entry per sample ({like.shape[0]}), got shape {tuple(t.shape)}")
    return t.to(device=like.device, dtype=torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, path_type: str = "linear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) for clean ``x0``, noise ``eps`` and per-sample ``t`` of shape (B,)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise shapes differ: {tuple(x0.shape)} vs {tuple(noise.shape)}")
    alpha, sigma, d_alpha, d_sigma = path_coefficients(_per_sample(t, x0), path_type)
    return alpha * x0 + sigma * noise, d_alpha * x0 + d_sigma * noise


def denoising_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) float32 per-sample mean squared error over all non-batch axes (unweighted)."""
    return (output.float() - target.float()).square().flatten(1).mean(dim=1)
