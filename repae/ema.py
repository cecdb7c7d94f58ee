"""EMA of the SiT: parameters *and* buffers, because the BatchNorm buffers define the latents.

The reference averages every named parameter (the frozen positional embedding included) and
every floating-point buffer, and copies integer buffers. That matters here more than
in most diffusion models: the EMA's BatchNorm running mean/variance become the E2E-VAE's latent
statistics at export and sampling time. The update is one fused ``torch._foreach_lerp_`` over
all floating tensors instead of the reference's Python loop over ~700 tensors.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """A frozen, eval-mode copy of a model whose floating state follows ``lerp(ema, live, 1-decay)``."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, live: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        ema_state = dict(self.model.state_dict(keep_vars=True))
        live_state = dict(live.state_dict(keep_vars=True))
        if ema_state.keys() != live_state.keys():
            extra = sorted(set(ema_state) ^ set(live_state))[:5]
            raise KeyError(f"EMA and live model state differ, e.g. {extra}")
        floats_ema, floats_live, ints = [], [], []
        for name, e in ema_state.items():
            src = live_state[name].detach()
            if e.is_floating_point():
                floats_ema.append(e.data if isinstance(e, nn.Parameter) else e)
                floats_live.append(src.to(e.dtype))
            else:
                ints.append((e, src))
        return floats_ema, floats_live, ints

    @torch.no_grad()
    def update(self, live: nn.Module, decay: float | None = None) -> None:
        """One fused lerp over every floating tensor; integer buffers are copied."""
        d = self.decay if decay is None else decay
        floats_ema, floats_live, ints = self._pairs(live)
        torch._foreach_lerp_(floats_ema, floats_live, 1.0 - d)
        for e, src in ints:
            e.copy_(src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
