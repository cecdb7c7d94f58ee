"""Checkpoints of the REPA-E trainers, and loading a run back for sampling.

A run directory (``trainer.checkpoint_dir``, by default ``exps/<trainer.run>/``) looks like::

    config.yaml                  resolved config (written once by rank 0)
    metrics.jsonl                one JSON object per logging step
    latest                       text: the newest complete step tag
    <step>/
      sit.safetensors            live SiT (parameters + BatchNorm buffers)
      ema.safetensors            EMA SiT (its BatchNorm buffers are the latent statistics)
      sit_config.json            the SiT constructor arguments (rebuild without the config)
      vae/                       joint runs: the tuned VAE, diffusers save_pretrained layout
      vae_source.json            where the VAE comes from: {"folder": "vae"} or the frozen spec
      discriminator.safetensors  discriminator + LeCam buffers (joint runs)
      optimizers.pt              optimiser and GradScaler states (tensors only: weights_only load)
      trainer_state.json         step, world size, skipped non-finite steps
      data_state_rank{r}.json    per-rank loader position (exact data resume)
      manifest.json              every other file's size and SHA-256 (common.manifest)

Publishing reuses the text-to-image stage's atomic protocol (:mod:`common.checkpoint`):
everything is written into ``.<step>.partial/`` and renamed only when complete, then ``latest``
is replaced atomically, so a kill never corrupts the last good checkpoint. Nothing is ever
loaded with unrestricted pickle: weights are safetensors, optimiser states are loaded with
``weights_only=True``. The loaders for sampling and export (:func:`load_sit`,
:func:`load_vae_from_checkpoint`, :func:`load_sampling_bundle`) check the files they read against
the tag's manifest first (``common.checkpoint.verify_files``; ``CheckpointDamaged`` names the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import checkpoint_folder, verify_files
from common.manifest import ManifestBuilder
from common.weights import safe_torch_load

SIT_CONFIG = "sit_config.json"
VAE_SOURCE = "vae_source.json"


def save_tensors(state: dict[str, torch.Tensor], path: Path, manifest: ManifestBuilder | None = None) -> None:
    """Safetensors of a state dict (CPU, contiguous; shared storage is copied).

    ``manifest`` (the save's ``CheckpointWriter.manifest_builder``): hash the file from memory in
    the background while the caller writes on.
    """
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    if manifest is not None:
        manifest.add_safetensors(path, tensors)


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def resolve_tag(run_dir: Path, tag: str | int = "latest") -> Path:
    """The folder of a complete REPA-E checkpoint: ``latest`` or a step number (common.checkpoint's reader)."""
    return checkpoint_folder(run_dir, tag, needs=SIT_CONFIG, flag="--run")


def load_vae_from_checkpoint(folder: Path, device: torch.device | str = "cpu"):
    """The VAE a checkpoint used: its own tuned copy, or the frozen one it names."""
    from repae.vae import TrainableVAE, load_vae

    verify_files(folder, [VAE_SOURCE])
    source = read_json(folder / VAE_SOURCE)
    if "folder" in source:
        verify_files(folder, [source["folder"]])
        vae = load_vae(str(folder / source["folder"]))
    else:
        vae = load_vae(
            source["name_or_path"],
            subfolder=source.get("subfolder"),
            kind=source.get("kind", "auto"),
            checkpoint=source.get("checkpoint"),
        )
    return TrainableVAE(vae).to(device).eval().requires_grad_(False)


def load_sit(folder: Path, use_ema: bool = True, device: torch.device | str = "cpu"):
    """Rebuild the SiT from ``sit_config.json`` and load the EMA (default) or live weights, strictly."""
    from repae.models.sit import SiT

    weights = "ema.safetensors" if use_ema else "sit.safetensors"
    verify_files(folder, [SIT_CONFIG, weights])
    kwargs = read_json(folder / SIT_CONFIG)
    kwargs["z_dims"] = tuple(kwargs["z_dims"])
    sit = SiT(**kwargs)
    state = load_tensors(folder / weights)
    sit.load_state_dict(state, strict=True)
    return sit.to(device).eval().requires_grad_(False)


@dataclass
class SamplingBundle:
    """Everything sampling needs from a run: the SiT, the VAE and the latent statistics.

    The SiT works in normalised latent space; ``decode`` undoes the normalisation with the
    SiT's own BatchNorm statistics (the EMA's, by default — as the reference does) using the
    same eps as the forward normalisation (reference defect REPAE-D7, docs/reference-facts.md), then decodes.
    """

    sit: Any
    vae: Any
    num_classes: int
    latent_shape: tuple[int, int, int]
    resolution: int
    config: dict
    step: int

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.sit.denormalize(x.float())
        return self.vae.decode(z.to(next(self.vae.parameters()).dtype)).float()


def load_sampling_bundle(
    run_dir: str | Path, tag: str | int = "latest", use_ema: bool = True, device: torch.device | str = "cpu"
) -> SamplingBundle:
    folder = resolve_tag(Path(run_dir), tag)
    sit = load_sit(folder, use_ema=use_ema, device=device)
    vae = load_vae_from_checkpoint(folder, device=device)
    verify_files(folder, ["trainer_state.json"])
    state = read_json(folder / "trainer_state.json")
    latent_shape = tuple(int(v) for v in state["latent_shape"])
    return SamplingBundle(
        sit=sit,
        vae=vae,
        num_classes=int(state["num_classes"]),
        latent_shape=latent_shape,
        resolution=int(state["resolution"]),
        config=run_config(Path(run_dir)),
        step=int(state["step"]),
    )


def run_config(run_dir: Path) -> dict:
    """The resolved config the run was trained with (``config.yaml``), as a plain dict.

    Always in the current vocabulary: a run saved with the older names (``run.*``, ``optim.*``,
    ``data.batch_size``, ...) is read through the stage's aliases (quietly).
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    from common.config import apply_aliases, load_yaml_file
    from repae.config import ALIASES

    loaded = OmegaConf.to_container(load_yaml_file(path), resolve=False)
    if not isinstance(loaded, dict):
        return {}
    return OmegaConf.to_container(OmegaConf.create(apply_aliases(loaded, ALIASES, str(path))), resolve=True)


def save_optimizers(path: Path, states: dict[str, Any]) -> None:
    torch.save(states, path)


def load_optimizers(path: Path) -> dict[str, Any]:
    """Optimiser and scaler states: tensors, numbers, lists and dicts only (``weights_only``)."""
    return safe_torch_load(path)
