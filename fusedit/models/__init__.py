"""The text-to-image model families: the baseline DiT and the deep-fusion FuseDiT.

:func:`model_class` picks the class a saved ``config.json`` (or a config dict) was written by, so
checkpoint readers (samplers, previews, export) load either family through one call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .dit import DiT, count_parameters
from .fuse_dit import FuseDiT, TextCache, fuse_dit_parameter_counts

__all__ = [
    "DiT",
    "FuseDiT",
    "TextCache",
    "count_parameters",
    "fuse_dit_parameter_counts",
    "is_fuse_dit",
    "model_class",
    "takes_pooled_text",
]


def _class_name(config: Mapping[str, Any] | str | Path) -> str:
    if not isinstance(config, Mapping):
        path = Path(config)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    return str(config.get("_class_name", "DiT"))


def model_class(config: Mapping[str, Any] | str | Path) -> type:
    """``DiT`` or ``FuseDiT`` for a config dict, a ``config.json`` or a weights folder (by ``_class_name``)."""
    return FuseDiT if _class_name(config) == "FuseDiT" else DiT


def is_fuse_dit(model: Any) -> bool:
    """Whether ``model`` is a FuseDiT (its LLM inside: it takes token ids, not encoder features)."""
    return isinstance(model, FuseDiT)


def takes_pooled_text(model: Any) -> bool:
    """Whether ``model`` is a FuseDiT that takes a pooled text embedding (``text_modulation_embeds_dim``,
    the reference's "fuse-dit-clip" type): its callers must supply one per prompt."""
    return is_fuse_dit(model) and model.config.text_modulation_embeds_dim is not None
