"""Exponential moving average of the trainable weights, kept in fp32.

The reference updated ~460 tensors in a Python loop every step. Here the update is one fused
multi-tensor ``lerp`` (``torch._foreach_lerp_``): ``ema <- ema + (1 - decay) * (theta - ema)``.
The EMA is stored by parameter name so it can be written as a ``save_pretrained`` folder.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, chunk_numel: int = 1 << 26) -> None:
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().float().clone() for n in self.names]
        self.groups = _chunk(self.shadow, chunk_numel)

    def _live(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"EMA parameters missing from the model: {missing[:5]}")
        return [params[n].detach() for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One fused lerp per group of tensors; bf16 weights are upcast a group at a time.

        Upcasting all of a 2.7B-parameter bf16 model at once would allocate a transient fp32 copy
        (~10 GiB); groups of ``chunk_numel`` elements bound that spike to ~256 MiB.
        """
        live = self._live(model)
        for lo, hi in self.groups:
            params = [p.float() if p.dtype != torch.float32 else p for p in live[lo:hi]]
            torch._foreach_lerp_(self.shadow[lo:hi], params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[n])

    def to(self, device: torch.device) -> EMA:
        self.shadow = [t.to(device) for t in self.shadow]
        return self

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. a sampling copy)."""
        for p, s in zip(self._live(model), self.shadow):
            p.copy_(s.to(p.dtype))


def _chunk(tensors: list[torch.Tensor], chunk_numel: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose tensors hold at most ``chunk_numel`` elements (or one tensor)."""
    groups, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        if size and size + t.numel() > chunk_numel:
            groups.append((start, i))
            start, size = i, 0
        size += t.numel()
    if start < len(tensors):
        groups.append((start, len(tensors)))
    return groups
