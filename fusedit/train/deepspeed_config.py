"""Merge a DeepSpeed JSON with the training config so that every setting really reaches DeepSpeed.

The reference read its JSON and then replaced it with a dict built in code, so ZeRO and bf16
were silently off (docs/reference-facts.md, T2I-1.4). Here the JSON is the base, each ``"auto"`` is filled
from the training config, an explicit value that contradicts the training config is an error,
and an ``"auto"`` we cannot fill is an error too: nothing is dropped without a word.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from common.config import ConfigError
from fusedit.config import TrainConfig

# Used when no JSON is given: the same settings as configs/deepspeed/zero2.json.
DEFAULT_ZERO2: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    },
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000_000,
}

# The smallest ZeRO gradient bucket "auto" gives, in elements (2**22 = 2048**2: the 3B configs'
# hidden_size**2, so their buckets are unchanged). DeepSpeed pays a Python hook pass, a flatten and
# a collective per bucket; with hidden_size**2 alone the toy DiT (hidden 128) cut its 1.3M gradients
# into ~80 buckets a step and spent ~11% of its step there (docs/performance.md). The bucket size
# only groups elements for communication: each element's sum is the same, so the weights are too.
MIN_REDUCE_BUCKET = 2**22


def auto_reduce_bucket_size(hidden_size: int) -> int:
    """``reduce_bucket_size`` for ``"auto"``: hidden_size**2 (the usual DeepSpeed rule), at least MIN_REDUCE_BUCKET."""
    return max(int(hidden_size) ** 2, MIN_REDUCE_BUCKET)


def load_deepspeed_json(path: str | Path | None) -> dict[str, Any]:
    """Read the JSON (or the ZeRO-2 defaults); a parse error names the file."""
    if path is None:
        return copy.deepcopy(DEFAULT_ZERO2)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed-config-path: file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be an object")
    return data


def _fill(ds: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set ``ds[key]`` from the training config; an explicit, different value is a conflict."""
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(
            f'deepspeed.{key}: JSON says {current!r} but {source} says {value!r}; set it to "auto" or make them agree'
        )


def _fill_section_flag(ds: dict[str, Any], section: str, value: bool) -> None:
    sec = ds.setdefault(section, {})
    enabled = sec.get("enabled", "auto")
    if enabled == "auto":
        sec["enabled"] = value
    elif bool(enabled) != value:
        raise ConfigError(
            f"deepspeed.{section}.enabled: JSON says {enabled!r} but trainer.mixed_precision "
            f'implies {value!r}; set it to "auto"'
        )


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []


def resolve_deepspeed_config(raw: dict[str, Any], cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """Return the dict handed to ``deepspeed.initialize``: JSON + values from ``cfg``."""
    ds = copy.deepcopy(raw)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"deepspeed.{section}: remove it from the JSON; the optimizer and LR schedule come "
                f"from the YAML 'optimizer' and 'lr_scheduler' sections (one source of truth)"
            )
    micro = cfg.data.batch_size_per_gpu
    accum = cfg.trainer.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "data.batch_size_per_gpu")
    _fill(ds, "gradient_accumulation_steps", accum, "trainer.gradient_accumulation_steps")
    _fill(ds, "gradient_clipping", float(cfg.trainer.gradient_clipping), "trainer.gradient_clipping")
    _fill(ds, "train_batch_size", micro * accum * world_size, "batch_size_per_gpu x accumulation x world size")
    _fill_section_flag(ds, "bf16", cfg.trainer.mixed_precision == "bf16")
    _fill_section_flag(ds, "fp16", cfg.trainer.mixed_precision == "fp16")
    if ds["bf16"].get("enabled"):  # ZeRO-1/2 skip a non-finite step in bf16 only with this (the trainer's guard)
        ds["bf16"].setdefault("check_grad_overflow", True)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("reduce_bucket_size") == "auto":
        # The size Hugging Face's integration uses: one hidden x hidden block per bucket.
        zero["reduce_bucket_size"] = auto_reduce_bucket_size(cfg.model.hidden_size)
    if zero.get("stage", 0) not in (0, 1, 2):
        raise ConfigError(
            f"deepspeed.zero_optimization.stage: {zero.get('stage')!r} is not supported; use 0, 1 or 2 "
            f"(stage 3 shards parameters, which the EMA and sampling code do not gather)"
        )
    left = _find_auto(ds)
    if left:
        raise ConfigError(f'deepspeed: cannot fill "auto" for {", ".join(left)}; give explicit values')
    ds.setdefault("steps_per_print", 1_000_000_000)
    return ds
