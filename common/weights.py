"""Safe weight loading: no pickle from an untrusted file is ever executed.

One allow-listed ``torch.load`` (``weights_only=True``), safetensors by extension, and one
stripper of wrapper prefixes (``torch.compile``'s ``_orig_mod.``, DDP's ``module.``) for every
stage that reads weights it did not write itself.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

PREFIXES = ("_orig_mod.", "module.")
# Reference REPA-E training checkpoints pickle their argparse Namespace next to the tensors: the
# one non-container class we allow-list, for those files only.
TRAINING_ARGS = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A checkpoint (or a reference config) that cannot be loaded or converted; the message says why."""


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def safe_torch_load(path: str | os.PathLike, allow: tuple[type, ...] = ()) -> Any:
    """``torch.load`` restricted to tensors and plain containers (plus ``allow``); a clear error otherwise.

    Zip-format files (every torch.save since 1.6, DeepSpeed's included) are memory-mapped: a 3B
    model-states file is ~43 GB (weights + EMA + Adam moments) and only the ~10.6 GB copy we
    select should ever be read from disk.
    """
    try:
        with torch.serialization.safe_globals(list(allow)):
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


def load_weights_file(path: str | os.PathLike, allow: tuple[type, ...] = ()) -> Any:
    """Raw content of a weights file: safetensors by extension, restricted torch.load otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(os.fspath(path), device="cpu")
    if path.name.endswith(".zst"):
        raise CheckpointError(f"{path}: zstd-compressed exports are not supported; decompress it first")
    return safe_torch_load(path, allow)


def strip_key(key: str, prefixes: tuple[str, ...] = PREFIXES) -> str:
    """``key`` without any leading wrapper prefixes, also nested ones (``module._orig_mod.x``)."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def strip_prefixes(sd: Mapping[str, Any], prefixes: tuple[str, ...] = PREFIXES) -> dict[str, Any]:
    """A state dict without wrapper prefixes (``_orig_mod.`` from torch.compile, ``module.`` from DDP/DeepSpeed)."""
    return {strip_key(key, prefixes): value for key, value in sd.items()}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Short SHA-256 of a module's state dict rounded to bfloat16, so an fp32 and a bf16 load agree.

    What a cache of a frozen model's outputs (latents, text features) records, and what training
    compares it with: a fine-tuned twin under the same name has another fingerprint.
    """
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def safetensors_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of every tensor in a folder's ``*.safetensors`` files, bit-exact (names, dtypes, shapes, bytes).

    Unlike :func:`weights_fingerprint` nothing is rounded: two builds agree only if every weight has
    the same bits. The file bytes are not hashed, so a safetensors release that writes its header
    differently does not change the digest. What ``world.json`` records per trained part and what
    ``tests/test_numerics.py`` compares across machines.
    """
    import hashlib
    from pathlib import Path

    from safetensors import safe_open

    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name).contiguous()
                h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
                h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
