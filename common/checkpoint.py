"""Checkpoint layout and atomic publishing.

A run directory looks like::

    <checkpoint_dir>/
      config.yaml                  resolved training config (written once, by rank 0)
      latest                       text: the newest complete step tag, e.g. "1000"
      1000/
        deepspeed/                 DeepSpeed engine state (module, ZeRO optimizer shards, LR scheduler)
        deepspeed_universal/       only after a resume at another world size: the same state in
                                   DeepSpeed's world-size-free "universal" form (ensure_universal)
        ema/                       EMA weights, save_pretrained layout (config.json + safetensors)
        model/                     raw weights, same layout (for --no-ema_weights)
        vae.json                   the VAE spec used in training (travels with the weights)
        trainer_state.json         step, samples seen, world size, seed
        data_state_rank{r}.json    per-rank stream position (resume without replaying data)

Every rank writes into ``.<step>.partial/``; after a barrier rank 0 renames it to ``<step>/``
and only then rewrites ``latest`` (temp file + ``os.replace``). A kill at any moment therefore
leaves either the previous complete checkpoint or the new one as ``latest``, never a tag whose
files are missing (reference defect 11). Evaluation reads only the safetensors folders, so no
pickle from a checkpoint is ever loaded outside the trainer's own resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.files import write_json_atomic, write_text_atomic

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def partial_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".{step}.partial"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / str(step)


def save_weights_folder(model_config: dict[str, Any], state: dict[str, torch.Tensor], folder: Path) -> None:
    """Write ``state`` in diffusers ``save_pretrained`` layout without building a second model."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / WEIGHTS_NAME))


def publish(run_dir: Path, step: int) -> Path:
    """Rename the finished partial folder to its tag and point ``latest`` at it (rank 0 only)."""
    src, dst = partial_dir(run_dir, step), step_dir(run_dir, step)
    if dst.exists():  # re-saving a step (e.g. after resuming at it): keep the old one until the swap
        old = run_dir / f".{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    _fsync_dir(run_dir)
    write_text_atomic(run_dir / "latest", f"{step}\n")
    return dst


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in Path(run_dir).iterdir() if p.is_dir() and p.name.isdigit())


def prune(run_dir: Path, keep: int | None) -> list[int]:
    """Delete the oldest complete checkpoints beyond ``keep`` (never the one ``latest`` names)."""
    if not keep:
        return []
    latest = read_latest(run_dir)
    steps = [s for s in list_steps(run_dir) if s != latest]
    doomed = steps[: max(0, len(steps) - (keep - 1))]
    for s in doomed:
        # Rename first (atomic), delete second: a kill mid-delete leaves a dot-folder that no step
        # listing counts and the next save cleans up, never a half-deleted "<step>/" that looks
        # like a checkpoint to list_steps, the studies' scorers or resume_from=<step>.
        trash = run_dir / f".{s}.pruned"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(step_dir(run_dir, s), trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def clean_partials(run_dir: Path) -> None:
    """Remove leftovers of a save, re-save or prune that was killed half-way (never checkpoints)."""
    for pattern in (".*.partial", ".*.old", ".*.pruned"):
        for p in Path(run_dir).glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def read_latest(run_dir: Path) -> int | None:
    f = Path(run_dir) / "latest"
    if not f.is_file():
        return None
    text = f.read_text().strip()
    if not text.isdigit() or not step_dir(run_dir, int(text)).is_dir():
        raise RuntimeError(f"{f}: names tag {text!r}, which is not a complete checkpoint folder")
    return int(text)


def resolve_resume(run_dir: Path, resume_from: str | None) -> int | None:
    """Which step to resume from: ``latest`` (None when the run is new), a number, or None."""
    if resume_from is None or not Path(run_dir).is_dir():
        return None
    if resume_from == "latest":
        return read_latest(run_dir)
    step = int(resume_from)
    if not step_dir(run_dir, step).is_dir():
        raise FileNotFoundError(f"trainer.resume_from={step}: no checkpoint folder {step_dir(run_dir, step)}")
    return step


UNIVERSAL_TAG = "deepspeed_universal"


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
    _fsync_dir(Path(step_folder))
    return out


def universal_checkpoint_info() -> dict[str, Any]:
    """The client state DeepSpeed's converter asks for (written with every save)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


# --------------------------------------------------------------------------------------------
# The save / publish / prune / resume sequence, for every trainer
# --------------------------------------------------------------------------------------------
def data_state_name(rank: int) -> str:
    return f"data_state_rank{rank}.json"


TRAINER_STATE = "trainer_state.json"


class CheckpointWriter:
    """Owns a run directory's checkpoints: the one save sequence both stages' trainers use.

    :meth:`save` is collective (every rank calls it at the same step):

    1. rank 0 removes leftovers of killed saves and creates ``.<step>.partial/``; barrier;
    2. every rank runs ``write_all(partial)`` (DeepSpeed's ``engine.save_checkpoint`` writes
       per-rank ZeRO shards) and writes its own data position, ``data_state_rank{r}.json``;
    3. rank 0 runs ``write_main(partial)`` (weights, configs) and writes ``trainer_state.json``;
       barrier;
    4. rank 0 publishes (rename to ``<step>/``, then ``latest``) and prunes to ``keep``; barrier.

    A kill at any point leaves ``latest`` naming a complete folder. Resuming reads the same
    names back (:meth:`resume_step`, :meth:`trainer_state`, :meth:`data_state`).
    """

    def __init__(self, run_dir: Path, rank: int, is_main: bool, keep: int | None, barrier: Any = None) -> None:
        from common.distributed import barrier as default_barrier

        self.run_dir, self.rank, self.is_main, self.keep = Path(run_dir), rank, is_main, keep
        self.barrier = barrier or default_barrier

    def folder(self, step: int) -> Path:
        return step_dir(self.run_dir, step)

    def save(
        self,
        step: int,
        trainer_state: dict[str, Any],
        data_state: dict[str, Any],
        write_main: Any,
        write_all: Any = None,
    ) -> Path:
        partial = partial_dir(self.run_dir, step)
        if self.is_main:
            if self.run_dir.is_dir():
                clean_partials(self.run_dir)
            partial.mkdir(parents=True)
        self.barrier()
        if write_all is not None:
            write_all(partial)
        write_json_atomic(partial / data_state_name(self.rank), data_state)
        if self.is_main:
            write_main(partial)
            write_json_atomic(partial / TRAINER_STATE, trainer_state)
        self.barrier()
        if self.is_main:
            publish(self.run_dir, step)
            prune(self.run_dir, self.keep)
        self.barrier()
        return self.folder(step)

    def resume_step(self, resume_from: str | None) -> int | None:
        return resolve_resume(self.run_dir, resume_from)

    def trainer_state(self, step: int) -> dict[str, Any]:
        return json.loads((self.folder(step) / TRAINER_STATE).read_text())

    def data_state(self, step: int, world_size: int) -> dict[str, Any] | None:
        """This rank's saved data position, or None when it cannot continue (another world size)."""
        saved = self.trainer_state(step).get("world_size")
        path = self.folder(step) / data_state_name(self.rank)
        if saved != world_size or not path.is_file():
            return None
        return json.loads(path.read_text())
