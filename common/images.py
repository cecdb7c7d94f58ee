"""Image helpers shared by trainers, samplers and fixtures: sample grids and PSNR."""

from __future__ import annotations

from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: str | Path, ncol: int = 8) -> Path:
    """Write images in [0, 1] as one PNG grid (rows of ``ncol``)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=max(1, ncol), padding=2, pad_value=1.0)
    return path


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) tensors in [-1, 1] (peak-to-peak 2), in float64.

    The reconstruction is clamped to [-1, 1] first (a decoder may overshoot; pixels cannot). An
    exact reconstruction gives ``inf``: callers that average report the exact images apart
    instead of hiding them behind an arbitrary cap.
    """
    mse = (reference.double() - reconstruction.double().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse)


PIXEL_ROUNDING = ("round", "truncate")


def quantise(images: torch.Tensor, low: float = -1.0, rounding: str = "round") -> torch.Tensor:
    """Float images in ``[low, 1]`` -> uint8 of the same shape: ``(x - low) * 255 / (1 - low)``, clamped.

    ``round`` takes the nearest level (what a PNG viewer and PIL's conversion give). ``truncate``
    drops the fraction, as the reference REPA-E ``generate.py`` does: on average 0.5 grey levels
    darker, which moves FID, so sample sets meant to be compared with published numbers use it.
    """
    if rounding not in PIXEL_ROUNDING:
        raise ValueError(f"rounding must be one of {PIXEL_ROUNDING}, got {rounding!r}")
    levels = ((images.float() - low) * (255.0 / (1.0 - low))).clamp(0, 255)
    return (levels.round() if rounding == "round" else levels.floor()).to(torch.uint8)
