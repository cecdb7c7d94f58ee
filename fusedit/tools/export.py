"""Export a training checkpoint as a diffusers pipeline folder.

    python -m fusedit.export --checkpoint output/toy --out output/toy-pipeline         # EMA, latest
    python -m fusedit.export --checkpoint RUN --tag 500000 --raw --out DIR              # raw weights
    python -m fusedit.export --checkpoint RUN --out DIR --push-to-hub ORG/NAME          # then publish

The folder is the standard layout (``model_index.json``; ``transformer/``, ``text_encoder/``,
``tokenizer/``, ``vae/``, ``scheduler/``; a "fuse-dit-clip" model adds its CLIP text encoder as
``clip_text_encoder/`` and ``clip_tokenizer/``) plus ``pipeline.py``, the custom-pipeline entry
diffusers reads, and ``fusedit_export.json`` (source run, step, weights). Load it with::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)   # needs this package installed
    images = pipe("a red circle", num_inference_steps=25, guidance_scale=6.0, seed=0).images

The VAE's ``config.json`` carries the latent normalisation the DiT was trained in
(``scaling_factor``/``shift_factor`` or per-channel ``latents_mean``/``latents_std``), so a plain
``AutoencoderKL.from_pretrained(DIR, subfolder="vae")`` and our sampler agree on it. The folder
is written to ``DIR.partial`` and renamed when complete: a killed export never leaves a folder
that looks whole. ``--push-to-hub`` needs network access and a token (``huggingface-cli login``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from common.files import write_json_atomic

EXPORT_INFO = "fusedit_export.json"
PIPELINE_FILE = "pipeline.py"
PIPELINE_CODE = '''"""Loaded by diffusers with trust_remote_code=True; the pipeline lives in the fusedit package."""

from fusedit.diffusers_pipeline import FuseDiTPipeline

__all__ = ["FuseDiTPipeline"]
'''


class ExportError(Exception):
    """A user-caused problem (missing run or tag, existing output folder): one line, exit 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fusedit.export",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="training run folder (holds config.yaml and step tags)")
    p.add_argument("--tag", default="latest", help="step tag to export (default: %(default)s)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the saved transformer and text encoders (the VAE stays float32; default: %(default)s)",
    )
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="after writing, upload to this hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    return p.parse_args(argv)


def resolve_tag(run_dir: Path, tag: str) -> int:
    from common.checkpoint import CheckpointNotFound, checkpoint_folder

    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"--checkpoint {run_dir}: not a training run folder (no config.yaml)")
    try:
        return int(checkpoint_folder(run_dir, tag, needs="vae.json", flag="--checkpoint").name)
    except CheckpointNotFound as err:
        raise ExportError(str(err)) from None


def build_pipeline(run_dir: Path, step: int, use_ema: bool):
    """Our sampler's components, loaded from the run, wrapped as a :class:`FuseDiTPipeline`."""
    from fusedit.config import load_config
    from fusedit.diffusers_pipeline import FuseDiTPipeline
    from fusedit.pipeline import DiTPipeline

    sampler = DiTPipeline.from_checkpoint(run_dir, step, use_ema=use_ema)
    clip = sampler.clip
    return FuseDiTPipeline(
        transformer=sampler.transformer,
        text_encoder=sampler.text_encoder.model,
        tokenizer=sampler.text_encoder.tokenizer,
        vae=sampler.codec.vae,
        scheduler=sampler.scheduler,
        hidden_states_index=sampler.text_encoder.hidden_states_index,
        max_prompt_length=sampler.max_prompt_length,
        resolution=load_config(run_dir / "config.yaml").data.resolution,
        clip_text_encoder=None if clip is None else clip.model,
        clip_tokenizer=None if clip is None else clip.tokenizer,
    ), sampler


def check_vae_normalisation(folder: Path, normalisation: dict[str, Any], codec) -> None:
    """The saved VAE (its :func:`latent_normalisation`) must reproduce the codec's constants exactly."""
    shift = torch.tensor(normalisation["shift"], dtype=torch.float32)
    scale = torch.tensor(normalisation["scale"], dtype=torch.float32)
    if not (torch.equal(shift, codec.shift.cpu().flatten()) and torch.equal(scale, codec.scale.cpu().flatten())):
        raise RuntimeError(f"{folder / 'vae'}: latent normalisation differs from the training codec's")


def export(run_dir: Path, out: Path, tag: str = "latest", raw: bool = False, dtype: str = "float32") -> Path:
    """Write the pipeline folder for ``run_dir``'s step ``tag``; returns ``out``."""
    step = resolve_tag(run_dir, tag)
    pipe, sampler = build_pipeline(run_dir, step, use_ema=not raw)
    if dtype != "float32":
        for module in (pipe.transformer, pipe.text_encoder, pipe.clip_text_encoder):
            if module is not None:
                module.to(getattr(torch, dtype))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(str(partial), safe_serialization=True)
    _point_at_custom_pipeline(partial)
    normalisation = latent_normalisation(partial)  # loads the saved VAE once
    check_vae_normalisation(partial, normalisation, sampler.codec)
    info = export_info(run_dir, step, raw, dtype)
    info["latent_normalisation"] = normalisation
    write_json_atomic(partial / EXPORT_INFO, info)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def latent_normalisation(folder: Path) -> dict[str, Any]:
    """What the saved VAE means, spelled out: ``x0 = (z - shift) * scale`` per channel.

    A KL config may hold both per-channel ``latents_mean``/``latents_std`` and scalar
    ``scaling_factor``/``shift_factor`` (AutoencoderKL always has a scaling_factor); the
    per-channel pair wins when present, as in Qwen-Image's pipelines. FLUX.2's come from its
    BatchNorm buffers (weights, not config; over its 2x2-patchified channels); an RAE's are the
    identity here (it normalises inside encode / decode). Read through the family, as the codec does.
    """
    from common.vae_config import detect

    config = json.loads((folder / "vae" / "config.json").read_text())
    family = detect(str(folder / "vae"), "auto", config)
    shift, scale = family.normalisation_constants(family.vae_class().from_pretrained(str(folder / "vae")))
    return {
        "family": family.kind,
        "source": family.normalisation_source(config),
        "shift": shift.flatten().tolist(),
        "scale": scale.flatten().tolist(),
    }


def _point_at_custom_pipeline(folder: Path) -> None:
    """diffusers resolves ``_class_name: [file, class]`` to ``<folder>/<file>.py`` (trust_remote_code)."""
    (folder / PIPELINE_FILE).write_text(PIPELINE_CODE)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [Path(PIPELINE_FILE).stem, "FuseDiTPipeline"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_info(run_dir: Path, step: int, raw: bool, dtype: str) -> dict[str, Any]:
    """Where the folder came from; the evaluation samplers read step, weights and resolution here."""
    from fusedit.config import load_config

    return {
        "resolution": load_config(run_dir / "config.yaml").sample.height,
        "source_run": str(run_dir.resolve()),
        "step": step,
        "weights": "raw" if raw else "ema",
        "dtype": dtype,
        "vae": json.loads((run_dir / str(step) / "vae.json").read_text()),
    }


def push_to_hub(folder: Path, repo: str, private: bool) -> None:
    """Upload the folder as written (``pipeline.py`` and the export record included).

    ``DiffusionPipeline.push_to_hub`` would re-save the components and drop both files.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="fusedit.export")


def main(argv: list[str] | None = None) -> int:
    from common.lifecycle import error_exit, user_errors

    args = parse_args(argv)
    run_dir, out = Path(args.checkpoint), Path(args.out)
    try:
        if not run_dir.is_dir():
            raise ExportError(f"--checkpoint {run_dir}: no such folder")
        if out.exists() and not args.overwrite:
            raise ExportError(f"--out {out}: exists (pass --overwrite to replace it)")
        export(run_dir, out, args.tag, args.raw, args.dtype)
    except (ExportError, *user_errors()) as err:
        return error_exit(str(err))
    print(f"exported {run_dir} -> {out}")
    if args.push_to_hub:
        push_to_hub(out, args.push_to_hub, args.private)
        print(f"pushed {out} -> {args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
