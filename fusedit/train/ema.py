"""Exponential moving average of the trainable weights, kept in fp32.

The reference updated ~460 tensors in a Python loop every step. Here the update is one fused
multi-tensor ``lerp`` (``torch._foreach_lerp_``): ``ema <- ema + (1 - decay) * (theta - ema)``.
The EMA is stored by parameter name so it can be written as a ``save_pretrained`` folder.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().float().clone() for n in self.names]

    def _live(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"EMA parameters missing from the model: {missing[:5]}")
        return [params[n].detach() for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = [p.float() if p.dtype != torch.float32 else p for p in self._live(model)]
        torch._foreach_lerp_(self.shadow, live, 1.0 - self.decay)

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
