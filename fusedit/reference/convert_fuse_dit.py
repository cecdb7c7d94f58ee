"""Load FuseDiT weights trained by the reference ("fuse-dit" deep fusion) into our ``FuseDiT``.

Accepted sources (``load_reference_fuse_dit``; ``load_reference_checkpoint`` takes either family):

- a DeepSpeed run: a run folder (``config.json``, ``latest``, ``<tag>/mp_rank_00_model_states.pt``),
  a tag folder or the model-states file itself, as for the baseline DiT
  (:func:`fusedit.reference.convert.resolve_checkpoint`): top-level ``module`` = raw weights,
  ``ema`` = the EMA copy (client state, a full state dict of the model: LLM and buffers included);
- the diffusers pipeline folder that the reference's ``utils/save_pipeline.py`` writes
  (``pipeline.save_pretrained``): ``model_index.json`` at the top, the model in ``transformer/``
  as transformers' ``save_pretrained`` leaves it - ``config.json`` (the FuseDiTConfig) next to
  ``model.safetensors``, or, above the shard size (5 GB by default; a real FuseDiT is ~20 GB in
  fp32), shards ``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json``
  (``pytorch_model.bin[.index.json]`` from older writers). The ``transformer/`` folder alone is
  accepted too. It holds one copy of the weights, so ``use_ema`` does not apply;
- a plain state-dict file or an in-memory dict, with a config given separately.

Pickles are only read with ``torch.load(..., weights_only=True)`` (common.weights).

The config is a FuseDiTConfig dict (``model_type`` "FuseDiT", the DiT fields at the top, the LLM's
transformers config under ``base_config``); omitted fields take the reference's defaults.
State-dict keys: the reference's are ours (``llm.*`` is the transformers Gemma / Gemma-2 decoder,
``dit.*`` the image side with the DiT's names), so the mapping is wrapper-prefix stripping and a
strict key and shape check. Configurations the reference cannot run are refused by name
(:func:`fusedit.reference.reference_fuse_dit.check_runnable`): no checkpoint of them exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.weights import CheckpointError, load_weights_file
from fusedit.models.dit import DiT
from fusedit.models.fuse_dit import FuseDiT

from .convert import (
    check_state_dict,
    convert_state_dict,
    dit_from_reference,
    extract_state_dict,
    read_reference_config,
    resolve_checkpoint,
)
from .reference_fuse_dit import REFERENCE_DEFAULTS, ReferenceNotRunnable, check_runnable

FAMILIES = {"DiT": "baseline-dit", "FuseDiT": "fuse-dit"}
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_DROPPED_LLM_KEYS = ("transformers_version", "torch_dtype", "dtype")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def reference_family(ref: Mapping) -> str:
    """The family, "baseline-dit" or "fuse-dit", from the config's ``model_type`` (DiTConfig / FuseDiTConfig)."""
    model_type = ref.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"reference config model_type {model_type!r} is neither 'DiT' (baseline-dit) nor 'FuseDiT' (fuse-dit)"
        )
    return FAMILIES[model_type]


def _llm_config(base: Mapping) -> dict[str, Any]:
    """The LLM config our FuseDiT takes: the reference's ``base_config`` without bookkeeping keys.

    The reference ran transformers 4.43, whose Gemma MLP reads ``hidden_activation`` (tanh-GELU
    when unset) and ignores ``hidden_act``; current transformers reads ``hidden_act``, so it is set
    to the activation the reference ran (our DiT side takes the LLM's activation too).
    """
    llm = {k: v for k, v in base.items() if not k.startswith("_") and k not in _DROPPED_LLM_KEYS}
    if llm.get("head_dim") is None:  # the reference's builder derives it the same way
        llm["head_dim"] = llm["hidden_size"] // llm["num_attention_heads"]
    if llm.get("model_type") == "gemma":
        llm["hidden_act"] = llm.get("hidden_activation") or "gelu_pytorch_tanh"
    return llm


def fuse_dit_kwargs_from_reference_config(ref: Mapping) -> dict[str, Any]:
    """Map a reference FuseDiTConfig dict to ``FuseDiT(**kwargs)``.

    Heads, KV heads, head size, epsilon, RoPE theta and activation are the LLM's on both sides;
    the DiT's width is ``dit_hidden_size`` (the LLM's when unset) and its MLP width the LLM's
    ``intermediate_size``, as in the reference.
    """
    if ref.get("model_type") != "FuseDiT":
        raise CheckpointError(
            f"expected a reference FuseDiTConfig (model_type 'FuseDiT'), got {ref.get('model_type')!r}"
        )
    try:
        check_runnable(dict(ref))
    except ReferenceNotRunnable as err:
        raise CheckpointError(f"{err}; no reference checkpoint of this configuration can exist") from err
    cfg = {**REFERENCE_DEFAULTS, **ref}
    if cfg["pos_embed"] == "ape" and cfg["pos_embed_max_size"] is None:
        raise CheckpointError("reference config: pos_embed 'ape' with pos_embed_max_size None is not supported")
    shared = cfg["shared_attention_layers"]
    return {
        "llm_config": _llm_config(ref["base_config"]),
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "patch_size": cfg["patch_size"],
        "hidden_size": cfg["dit_hidden_size"] or ref["base_config"]["hidden_size"],
        "num_layers": cfg["dit_num_hidden_layers"],
        "intermediate_size": None,
        "attention": cfg["attention"],
        "qk_norm": bool(cfg["qk_norm"]),
        "sandwich_norm": bool(cfg["sandwich_norm"]),
        "timestep_conditioning": cfg["timestep_conditioning"],
        "pos_embed": cfg["pos_embed"],
        "pos_embed_max_size": cfg["pos_embed_max_size"] or 64,
        "sample_size": cfg["sample_size"],
        "initial_layers": cfg["initial_layers"],
        "shared_attention_layers": shared if shared == "all" else list(shared),
        "text_modulation_embeds_dim": cfg["text_modulation_embeds_dim"],
    }


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def _build_empty(kwargs: dict[str, Any]) -> FuseDiT:
    """Our FuseDiT with its parameters on the meta device (nothing allocated before the checkpoint's
    tensors are assigned) but real buffers: the non-persistent ones (the LLM's rotary frequencies,
    its embedding scale) are in no checkpoint, so they must be computed here."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            return FuseDiT(**kwargs)
    except ValueError as err:
        raise CheckpointError(f"reference config maps to a FuseDiT we cannot build: {err}") from err


def fuse_dit_from_reference(
    config: str | os.PathLike | Mapping,
    weights: Any,
    use_ema: bool = True,
    dtype: torch.dtype | None = None,
    reference_cached_positions: bool = False,
) -> FuseDiT:
    """Our FuseDiT from a reference config and weights (path, loaded object or state dict).

    Built with empty parameters (nothing allocated twice), checked strictly, then filled with the
    checkpoint's tensors in their stored dtype or in ``dtype``. The LLM stays frozen.
    ``reference_cached_positions=True`` makes cached 2d/m-RoPE sampling drop the image position
    offset as the reference's sampler did (see FuseDiT), to sample its checkpoints the way it did.
    """
    kwargs = fuse_dit_kwargs_from_reference_config(read_reference_config(config))
    kwargs["reference_cached_positions"] = reference_cached_positions
    raw = load_weights_file(weights) if isinstance(weights, (str, os.PathLike)) else weights
    sd = convert_state_dict(extract_state_dict(raw, use_ema=use_ema))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model = _build_empty(kwargs)
    check_state_dict(model, sd, "FuseDiT")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def read_weights_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a transformers ``save_pretrained`` folder: sharded (an index file) or one file."""
    folder = Path(folder)
    for name in INDEX_FILES:
        index = folder / name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map'")
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{index} lists the shard {shard}, which is missing")
                sd.update(load_weights_file(folder / shard))
            absent = sorted(set(weight_map) - set(sd))
            if absent:
                raise CheckpointError(f"{index}: keys listed but absent from their shards: {absent[:5]}")
            return sd
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return load_weights_file(folder / name)
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(INDEX_FILES + SINGLE_FILES)})")


def pipeline_transformer_folder(path: str | os.PathLike) -> Path | None:
    """The folder holding the model of a save_pipeline output (``<pipeline>/transformer``), the path
    itself when it is such a model folder, or None for anything else (e.g. a DeepSpeed run)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "model_index.json").is_file():
        folder = path / "transformer"
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path} is a pipeline folder but has no transformer/config.json")
        return folder
    has_weights = any((path / n).is_file() for n in INDEX_FILES + SINGLE_FILES)
    return path if has_weights and (path / "config.json").is_file() else None


def resolve_reference(path: str | os.PathLike, tag: str | int | None = None) -> tuple[dict, Any]:
    """(reference config dict, weights: a file path or a state dict) of a save_pipeline folder or a
    DeepSpeed run / tag folder / model-states file."""
    transformer = pipeline_transformer_folder(path)
    if transformer is None:
        config_path, weights = resolve_checkpoint(path, tag)
        return read_reference_config(config_path), weights
    if tag is not None:
        raise CheckpointError(f"{path} is a pipeline folder (one copy of the weights); tag={tag!r} does not apply")
    return read_reference_config(transformer), read_weights_folder(transformer)


def load_reference_checkpoint(
    path: str | os.PathLike, tag: str | int | None = None, use_ema: bool = True, dtype: torch.dtype | None = None
) -> DiT | FuseDiT:
    """Our DiT or FuseDiT, whichever the reference config's ``model_type`` names, from a DeepSpeed
    run / tag folder / model-states file (EMA weights by default) or a save_pipeline folder."""
    config, weights = resolve_reference(path, tag)
    build = fuse_dit_from_reference if reference_family(config) == "fuse-dit" else dit_from_reference
    return build(config, weights, use_ema=use_ema, dtype=dtype)


def load_reference_fuse_dit(
    path: str | os.PathLike,
    tag: str | int | None = None,
    use_ema: bool = True,
    dtype: torch.dtype | None = None,
    reference_cached_positions: bool = False,
) -> FuseDiT:
    """Our FuseDiT from a reference FuseDiT checkpoint (see :func:`load_reference_checkpoint` and
    :func:`fuse_dit_from_reference`)."""
    config, weights = resolve_reference(path, tag)
    if reference_family(config) != "fuse-dit":
        raise CheckpointError(f"{path} holds a reference baseline DiT (model_type 'DiT'), not a FuseDiT")
    return fuse_dit_from_reference(config, weights, use_ema, dtype, reference_cached_positions)
