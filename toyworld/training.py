"""How the toy world's fixtures are trained: fixed, seeded step counts and quality gates.

Every trained part of the toy world (VAE, scorer, the REPA-E alignment encoder) trains for a
fixed number of steps with a schedule that depends only on the step index. An earlier design
trained for a wall-clock budget, so a slow or busy machine got a worse world (303 VAE steps and
21 dB PSNR instead of 1,250 steps and 27.5 dB) and a demo that could not pass. Now the same seed,
library versions and thread count give bit-identical weights on any machine; a slow machine only
takes longer, and the progress bars count steps and show an ETA.

A *quality gate* is a measured value the build checks before it declares the world ready: a
world that misses one fails with :class:`QualityGateError`, naming the part, the value and the
gate, instead of handing a broken fixture to the demo.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# tqdm settings for step loops: steps with an ETA, redrawn at most every 2 s so that logs written
# to a file stay readable.
STEP_BAR: dict[str, Any] = {"unit": "step", "mininterval": 2.0, "dynamic_ncols": True}


def cosine_lr(base: float, step: int, total: int, warmup: int = 20) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` to 5% of it at ``total``.

    A function of the step index alone, so the schedule (and so the weights) cannot depend on how
    fast the machine is.
    """
    fraction = min(1.0, step / max(total, 1))
    return base * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * fraction)))


def set_lr(optimizer: Any, lr: float) -> None:
    """Set every parameter group's learning rate (the schedules above are computed per step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def step_bar(total: int, desc: str, progress: bool):
    """A tqdm bar over ``total`` steps (rate and ETA included); silent when ``progress`` is off."""
    from tqdm.auto import tqdm

    return tqdm(range(total), desc=desc, total=total, disable=not progress, **STEP_BAR)


def train_fixed_steps(
    optimizer: Any,
    loss_at: Callable[[int], Any],
    *,
    steps: int,
    lr: float,
    desc: str,
    progress: bool,
    warmup: int = 20,
    clip_params: Any = None,
    log_every: int = 10,
) -> float:
    """The toy fixtures' training loop: ``steps`` AdamW steps on ``loss_at(step)``, cosine schedule.

    ``loss_at`` draws its batch (from a seeded generator) and returns the loss; the loop owns the
    schedule, the optional gradient clipping (norm 1 over ``clip_params``, a list: a generator would
    be used up by the first step) and the step-counting progress bar. Returns the last loss (NaN when ``steps`` is 0).
    """
    import torch

    clip = None if clip_params is None else list(clip_params)
    loss = torch.tensor(float("nan"))
    bar = step_bar(steps, desc, progress)
    for step in bar:
        loss = loss_at(step)
        set_lr(optimizer, cosine_lr(lr, step, steps, warmup=warmup))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        optimizer.step()
        if step % log_every == 0:
            bar.set_postfix_str(f"loss {loss.item():.4f}", refresh=False)
    return float(loss.item())


class QualityGateError(RuntimeError):
    """A toy-world part missed one of its quality gates (see :func:`check_gates`)."""


@dataclass(frozen=True)
class Gate:
    """One requirement on a measured value: ``value >= minimum``."""

    part: str  # "vae", "scorer", "repae_encoder"
    metric: str  # e.g. "psnr_db", "heldout_vae.accuracy.shape"
    minimum: float

    def record(self, value: float) -> dict[str, Any]:
        return {
            "part": self.part,
            "metric": self.metric,
            "value": round(float(value), 4),
            "minimum": self.minimum,
            "passed": bool(value >= self.minimum),
        }


def lookup(report: Mapping[str, Any], dotted: str) -> float:
    """``lookup(r, "a.b.c") == r["a"]["b"]["c"]``; KeyError naming the missing path."""
    node: Any = report
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"report has no {dotted!r} (missing {key!r})")
        node = node[key]
    return float(node)


def evaluate_gates(gates: list[Gate], report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Records (value, minimum, passed) of every gate against ``report``."""
    return [gate.record(lookup(report, gate.metric)) for gate in gates]


def check_gates(records: list[dict[str, Any]], where: str) -> None:
    """Raise :class:`QualityGateError` listing every failed gate (part, measured value, gate)."""
    failed = [r for r in records if not r["passed"]]
    if failed:
        lines = [f"{r['part']}: {r['metric']} = {r['value']:.4f}, gate >= {r['minimum']}" for r in failed]
        raise QualityGateError(
            f"the toy world in {where} missed {len(failed)} quality gate(s):\n  "
            + "\n  ".join(lines)
            + "\nThe fixtures train for fixed steps, so this is not the machine's speed: the step counts, "
            "the seed or a library version changed what the build produces (see world.json)."
        )


# The packages whose versions decide what a toy build or demo produces (world.json, scores.json).
VERSIONED_PACKAGES = (
    "torch",
    "numpy",
    "diffusers",
    "transformers",
    "tokenizers",
    "deepspeed",
    "timm",
    "webdataset",
    "safetensors",
    "pillow",
)


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONED_PACKAGES` (and Python), read from package metadata."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def torch_threads() -> int:
    """Intra-op threads torch uses: CPU results are bit-identical only for the same count."""
    import torch

    return torch.get_num_threads()
