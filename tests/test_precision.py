"""The precision policy: one object answers every dtype question of a run (common.precision)."""

from __future__ import annotations

import pytest
import torch

from common.precision import Precision


@pytest.mark.parametrize(
    "name, autocast, frozen, scaling",
    [
        ("no", None, torch.float32, False),
        ("bf16", torch.bfloat16, torch.bfloat16, False),
        ("fp16", torch.float16, torch.float32, True),
    ],
)
def test_each_setting_resolves_every_dtype(name: str, autocast, frozen, scaling: bool) -> None:
    p = Precision.resolve(name, torch.device("cpu"))
    assert (p.autocast_dtype, p.frozen_dtype, p.loss_scaling) == (autocast, frozen, scaling)
    x = torch.ones(2, 2)
    with p.autocast():
        y = x @ x
    assert y.dtype == (autocast or torch.float32)


def test_an_unknown_setting_names_the_field() -> None:
    with pytest.raises(ValueError, match="^trainer.mixed_precision: 'fp32' is not one of"):
        Precision("fp32")
