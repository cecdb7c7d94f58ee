"""Safe weight loading: no pickle from an untrusted file is ever executed.

One allow-listed ``torch.load`` (``weights_only=True``), safetensors by extension, and one
stripper of wrapper prefixes (``torch.compile``'s ``_orig_mod.``, DDP's ``module.``) for every
stage that reads weights it did not write itself.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(ValueError):
    """A reference checkpoint or config cannot be converted; the message says why."""


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain containers; a clear error otherwise.

    Zip-format files (every torch.save since 1.6, DeepSpeed's included) are memory-mapped: a 3B
    model-states file is ~43 GB (weights + EMA + Adam moments) and only the ~10.6 GB copy we
    select should ever be read from disk.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:  # the weights_only refusal; I/O errors propagate as is
        lines = [ln.strip() for ln in str(err).splitlines() if "Unpickler error" in ln] or [type(err).__name__]
        reason = lines[0]
        raise CheckpointError(
            f"refusing to load {os.fspath(path)!r}: torch.load(weights_only=True) rejected it ({reason}). "
            "Only tensors and plain containers are loaded from checkpoints, because unpickling arbitrary "
            "objects can execute code. If you trust the file, re-save just the weights in a trusted "
            "environment, e.g. torch.save(torch.load(p, weights_only=False)['ema'], 'ema.pt') or as "
            ".safetensors, and load that."
        ) from err


def load_weights_file(path: str | os.PathLike) -> Any:
    """Raw content of a weights file: safetensors by extension, restricted torch.load otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(os.fspath(path), device="cpu")
    if path.name.endswith(".zst"):
        raise CheckpointError(f"{path}: zstd-compressed exports are not supported; decompress it first")
    return safe_torch_load(path)


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``_orig_mod.`` from torch.compile, ``module.`` from DDP/DeepSpeed)."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out
