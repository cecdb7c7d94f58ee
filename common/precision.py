"""The run's precision policy, resolved once from ``trainer.mixed_precision`` and the device.

Both trainers, the caches built ahead of training and the benchmarks used to read the string
``trainer.mixed_precision`` wherever a dtype was needed and re-derive it each time (an autocast
dtype here, the frozen encoders' dtype there, whether to scale the loss somewhere else). One
object answers all three, so they cannot disagree:

==========  ==================  ====================================  ============
name        autocast dtype      frozen encoders (text encoder, VAE)   loss scaling
==========  ==================  ====================================  ============
``no``      none (fp32)         fp32                                  no
``bf16``    bfloat16            bfloat16                              no
``fp16``    float16             fp32 (fp16 activations of a large     yes
                                text encoder overflow)
==========  ==================  ====================================  ============
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

NAMES = ("no", "bf16", "fp16")
_AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """``trainer.mixed_precision`` on one device type, with every dtype decision that follows from it."""

    name: str
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"trainer.mixed_precision: {self.name!r} is not one of {', '.join(map(repr, NAMES))}")

    @classmethod
    def resolve(cls, mixed_precision: str, device: torch.device | str) -> Precision:
        return cls(str(mixed_precision), torch.device(device).type)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the trained network computes in under autocast (None: fp32, no autocast)."""
        return _AUTOCAST[self.name]

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype frozen encoders run in: bf16 under bf16 training, else fp32.

        One rule for the trainer and for the caches built ahead of it, so a cache holds exactly
        what training would have computed.
        """
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def loss_scaling(self) -> bool:
        """Whether gradients need a loss scaler (fp16's narrow exponent range)."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the trained network's forward (a no-op in fp32)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)
