"""Batch statistics over the *global* batch for the SiT's latent BatchNorm.

The reference converts the SiT to ``SyncBatchNorm`` in multi-GPU runs so that the latent
normalisation (and the running statistics that later become the E2E-VAE's latent statistics)
see the global batch. ``SyncBatchNorm`` only runs on GPUs, and our multi-process tests run on
CPUs with gloo, so the train-mode normalisation is done here instead, with the same result:
per-channel sum and sum of squares are all-reduced, the batch is normalised with the biased
global variance and the running statistics are updated with the unbiased one, exactly as
``BatchNorm2d`` does for one process holding the whole batch. The input is always the detached
VAE latent in the SiT pass, so no gradient is needed through the statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def _global_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel mean and biased variance over (B, H, W) of every process, plus the count."""
    zf = z.float()
    stats = torch.cat([zf.sum(dim=(0, 2, 3)), zf.pow(2).sum(dim=(0, 2, 3))])
    count = torch.tensor([zf.numel() / zf.shape[1]], dtype=torch.float64, device=z.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        stats = stats.double()
        dist.all_reduce(stats)
        dist.all_reduce(count)
    n = float(count.item())
    c = z.shape[1]
    mean = stats[:c].double() / n
    var = (stats[c:].double() / n - mean.pow(2)).clamp_min(0.0)
    return mean, var, n


def batch_normalize(bn: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """Train-mode ``bn(z)`` with statistics over all processes; eval mode is plain ``bn(z)``."""
    if not bn.training:
        return bn(z)
    mean, var, n = _global_moments(z)
    with torch.no_grad():
        m = bn.momentum
        unbiased = var * (n / max(n - 1.0, 1.0))
        bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
        bn.num_batches_tracked.add_(1)
    shape = (1, -1, 1, 1)
    inv = torch.rsqrt(var + bn.eps).to(z.dtype).view(shape)
    return (z - mean.to(z.dtype).view(shape)) * inv
