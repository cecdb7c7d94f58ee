"""DeepSpeed's part of a text-to-image checkpoint: the engine folder, its ``latest``, the universal form.

Only the T2I stage trains under DeepSpeed; the run folder's layout, manifests, publishing and
resume choice are the shared part (common.checkpoint).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from common.checkpoint import fsync_dir
from common.files import write_text_atomic
from common.manifest import add_to_manifest

UNIVERSAL_TAG = "deepspeed_universal"
ENGINE_TAG = "deepspeed"


def write_engine_latest(step_folder: Path, tag: str = ENGINE_TAG) -> Path:
    """``<step>/latest`` naming the engine subfolder, as DeepSpeed's own ``save_latest`` writes it.

    The trainer saves with ``save_latest=False`` (the run-level ``latest`` is ours); this file
    lets DeepSpeed's tools read ``<step>/`` with their defaults, e.g.
    ``python -m deepspeed.utils.zero_to_fp32 <step> <out>`` (no ``-t deepspeed``).
    """
    return write_text_atomic(Path(step_folder) / "latest", tag)


def ensure_universal(step_folder: Path, workers: int = 2) -> Path:
    """DeepSpeed's *universal* form of ``step_folder/deepspeed`` (rank 0 only), made once.

    ZeRO-1/2 optimizer shards are cut for the world size that wrote them, and DeepSpeed refuses to
    load them at another one. Its ``ds_to_universal`` converter re-assembles every parameter's fp32
    master weight and Adam moments (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``), which an
    engine started with ``checkpoint.load_universal`` re-partitions for any world size. The result
    goes to a hidden partial folder and is renamed into place, so a kill mid-conversion leaves the
    checkpoint as it was.
    """
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    out = Path(step_folder) / UNIVERSAL_TAG
    if out.is_dir():
        return out
    partial = Path(step_folder) / f".{UNIVERSAL_TAG}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(Path(step_folder) / "deepspeed"),
        output_folder=str(partial),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # checkpoints written before the trainer recorded the universal info
    )
    ds_to_universal.main(args)
    os.replace(partial, out)
    fsync_dir(Path(step_folder))
    add_to_manifest(Path(step_folder), UNIVERSAL_TAG)  # the tag's manifest vouches for it too
    return out


def universal_checkpoint_info() -> dict[str, Any]:
    """The client state DeepSpeed's converter asks for (written with every save)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
