"""Load DiT weights trained by the reference ("fuse-dit") into our ``DiT``.

Accepted weight sources:

- a DeepSpeed ``mp_rank_00_model_states.pt`` (top-level ``module`` = raw weights, ``ema`` =
  EMA weights stored as client state; ``use_ema`` picks one);
- a plain state-dict file (``.pt``/``.pth``/``.bin`` via torch.load, or ``.safetensors``);
- an in-memory dict (either of the two shapes above).

Pickles are only ever read with ``torch.load(..., weights_only=True)``: a reference checkpoint
is an untrusted file and an unrestricted unpickle can execute arbitrary code. If the restricted
loader refuses a file, we raise instead of falling back.

The reference ``config.json`` is a DiTConfig: top-level DiT fields plus the (overridden) Gemma
config under ``base_config`` (docs/reference-facts.md, T2I-1.2, T2I-2.1, T2I-2.10); ``dit_kwargs_from_reference_config``
maps it to our ``DiT`` keyword arguments. Our state-dict keys equal the reference's, so the
weight mapping is only prefix stripping followed by a strict key and shape check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.weights import CheckpointError, load_weights_file, strip_prefixes
from fusedit.models.dit import DiT

MODEL_STATES = "mp_rank_00_model_states.pt"
UNSUPPORTED_FIELDS = {"text_modulation_embeds_dim": None, "initial_layers": 0}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def read_reference_config(path_or_dict: str | os.PathLike | Mapping) -> dict:
    """The reference DiTConfig as a dict, from a dict, a ``config.json`` or its directory."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def dit_kwargs_from_reference_config(ref: Mapping) -> dict[str, Any]:
    """Map a reference DiTConfig dict to ``DiT(**kwargs)``.

    Width/depth come from the DiT fields (``dit_hidden_size`` falls back to the base hidden size,
    as in the reference), attention geometry and norms from ``base_config``. The MLP activation
    is ``hidden_activation`` (Gemma's MLP ignores ``hidden_act``), tanh-GELU when unset.
    """
    if ref.get("model_type", "DiT") != "DiT":
        raise CheckpointError(f"expected a reference DiTConfig (model_type 'DiT'), got {ref.get('model_type')!r}")
    for key, ok in UNSUPPORTED_FIELDS.items():
        if ref.get(key, ok) != ok:
            raise CheckpointError(f"reference config field {key}={ref[key]!r} is not supported (only {ok!r})")
    base = ref.get("base_config")
    if not isinstance(base, Mapping):
        raise CheckpointError("reference config has no nested 'base_config' (the Gemma config)")
    hidden = ref.get("dit_hidden_size") or base["hidden_size"]
    heads = base["num_attention_heads"]
    kwargs = {
        "in_channels": ref.get("in_channels", 16),
        "out_channels": ref.get("out_channels", 16),
        "patch_size": ref.get("patch_size", 2),
        "hidden_size": hidden,
        "num_layers": ref["dit_num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": base.get("num_key_value_heads", heads),
        "head_dim": base.get("head_dim") or base["hidden_size"] // heads,
        "intermediate_size": base["intermediate_size"],
        "hidden_act": base.get("hidden_activation") or "gelu_pytorch_tanh",
        "rms_norm_eps": base.get("rms_norm_eps", 1e-6),
        "attention_bias": bool(base.get("attention_bias", False)),
        "text_hidden_size": ref.get("text_hidden_size") or base["hidden_size"],
        "attention": ref.get("attention", "self"),
        "qk_norm": bool(ref.get("qk_norm", False)),
        "sandwich_norm": bool(ref.get("sandwich_norm", False)),
        "timestep_conditioning": ref.get("timestep_conditioning", "adaln-zero"),
        "pos_embed": ref.get("pos_embed", "1d-rope"),
        "pos_embed_max_size": ref.get("pos_embed_max_size") or 64,
        "sample_size": ref.get("sample_size", 32),
        "rope_theta": float(base.get("rope_theta", 10000.0)),
        "initializer_range": base.get("initializer_range", 0.02),
    }
    if kwargs["attention"] == "cross" and kwargs["text_hidden_size"] != hidden:
        raise CheckpointError(
            "reference 'cross' attention with text_hidden_size != dit_hidden_size cannot have been run: "
            "its cross-attention text projections take text_hidden_size inputs but receive the "
            f"context-embedded text of width {hidden}"
        )
    return kwargs


def reference_text_encoder(ref: Mapping) -> tuple[str, int]:
    """(LLM / tokenizer name, hidden-states index) the reference pairs with this DiT: the name is
    ``base_config._name_or_path`` (the DiT and the frozen LLM share the base config's origin)."""
    base = ref.get("base_config") or {}
    return base.get("_name_or_path", ""), int(ref.get("text_hidden_states_index", -1))


def extract_state_dict(obj: Mapping, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The DiT weights inside a loaded object.

    DeepSpeed model states (a ``module`` key) yield ``ema`` when ``use_ema`` else ``module``;
    any other mapping of tensors is taken as the state dict itself.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict of weights, got {type(obj).__name__}")
    if "module" in obj and isinstance(obj["module"], Mapping):
        key = "ema" if use_ema else "module"
        if not isinstance(obj.get(key), Mapping):
            raise CheckpointError(
                f"DeepSpeed model states have no {key!r} entry (keys: {sorted(obj)}); "
                f"pass use_ema={not use_ema} to load the other copy"
            )
        obj = obj[key]
    non_tensors = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if non_tensors:
        raise CheckpointError(f"not a state dict: entries {non_tensors[:5]} are not tensors")
    return dict(obj)


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], name: str = "DiT") -> None:
    """Strict comparison of keys and shapes, listing every problem at once (``name``: the model
    family, for the message)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(sd) & set(expected))
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"reference state dict does not match the {name} built from its config:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  shape mismatch: {s}" for s in shapes]
        raise CheckpointError("\n".join(lines))


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference keys -> our keys. The layouts are identical by design (T2I-2.10), so
    this only strips wrapper prefixes. Tensors keep their dtype and are cloned, so the model owns
    ordinary memory rather than pages of a memory-mapped checkpoint file."""
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in strip_prefixes(sd).items()}


def dit_from_reference(
    config: str | os.PathLike | Mapping, weights: Any, use_ema: bool = True, dtype: torch.dtype | None = None
) -> DiT:
    """Build our DiT from a reference config and weights (path, loaded object or state dict)."""
    kwargs = dit_kwargs_from_reference_config(read_reference_config(config))
    raw = load_weights_file(weights) if isinstance(weights, (str, os.PathLike)) else weights
    sd = convert_state_dict(extract_state_dict(raw, use_ema=use_ema))
    with torch.device("meta"):
        model = DiT(**kwargs)
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Directory layout
# --------------------------------------------------------------------------------------------
def resolve_checkpoint(checkpoint_dir_or_file: str | os.PathLike, tag: str | int | None = None) -> tuple[Path, Path]:
    """(config.json, weights file) for a run directory, a tag directory or a weights file.

    Run directory: ``<dir>/config.json`` and ``<dir>/<tag>/mp_rank_00_model_states.pt``, the tag
    defaulting to the content of ``<dir>/latest``. A tag directory or a weights file looks for
    ``config.json`` next to it, then one level up.
    """
    path = Path(checkpoint_dir_or_file)
    if path.is_dir():
        if tag is None and not (path / MODEL_STATES).exists():
            latest = path / "latest"
            if not latest.exists():
                raise CheckpointError(f"{path}: no {MODEL_STATES}, no 'latest' file and no tag given")
            tag = latest.read_text().strip()
        weights = path / str(tag) / MODEL_STATES if tag is not None else path / MODEL_STATES
    else:
        weights = path
    if not weights.exists():
        raise CheckpointError(f"checkpoint file not found: {weights}")
    for folder in (weights.parent, weights.parent.parent):
        if (folder / "config.json").exists():
            return folder / "config.json", weights
    raise CheckpointError(f"no config.json next to {weights} or in its parent directory")


def load_reference_dit(
    checkpoint_dir_or_file: str | os.PathLike, tag: str | int | None = None, use_ema: bool = True
) -> DiT:
    """Our DiT with the weights of a reference checkpoint (EMA weights by default)."""
    config_path, weights = resolve_checkpoint(checkpoint_dir_or_file, tag)
    return dit_from_reference(config_path, weights, use_ema=use_ema)
