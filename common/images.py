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
