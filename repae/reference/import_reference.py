"""Turn a released reference REPA-E / LDM experiment into a run folder of this repository.

    python -m repae.reference.import_reference --exp pretrained/sit-repae-sdvae --out exps/sit-repae-sdvae
    python -m repae.generate --run-dir exps/sit-repae-sdvae --num-samples 50000 --mode sde --num-steps 250
    python -m repae.export --run exps/sit-repae-sdvae --out exps/e2e-sdvae --stats ema   # no data recorded

A reference experiment is ``args.json`` + ``checkpoints/<step:07d>.pt`` (a pickle with ``model``,
``ema``, ``vae``, ``discriminator``, optimiser states, an ``argparse.Namespace`` and ``steps``;
docs/reference-facts.md, REPAE-5.5). It is read once with ``weights_only=True`` (the Namespace is the one allow-listed
class), the SiT weights are loaded *strictly* into our SiT (same key layout), the jointly tuned
VAE is converted from the CompVis layout to a diffusers ``AutoencoderKL`` folder, and the result
is written in the layout ``repae.train`` writes, so ``generate``, ``export`` and resuming the
SiT work on it. An LDM-only experiment (no ``vae`` in the checkpoint) names its frozen VAE.

The reference de-normalised samples with ``1/sqrt(running_var)``; this repository uses
``sqrt(running_var + 1e-4)`` in both directions (reference defect REPAE-D7). For the released models the
running variances are O(1), so the difference is below 1e-4 relative.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from common.files import write_json_atomic, write_text_atomic
from common.manifest import write_manifest
from common.weights import TRAINING_ARGS, safe_torch_load
from repae import checkpoint as rckpt

LATENT_GEOMETRY = {"f8d4": (4, 8), "f16d32": (32, 16)}  # channels, spatial factor


def find_checkpoint(exp_dir: Path, step: int | None) -> Path:
    folder = exp_dir / "checkpoints"
    if step is not None:
        path = folder / f"{step:07d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such reference checkpoint")
        return path
    found = sorted(folder.glob("[0-9]*.pt"))
    if not found:
        raise FileNotFoundError(f"{folder}: no reference checkpoints (<step:07d>.pt)")
    return found[-1]


def read_reference(path: Path) -> dict[str, Any]:
    obj = safe_torch_load(path, allow=TRAINING_ARGS)
    if not isinstance(obj, dict) or "ema" not in obj:
        raise ValueError(f"{path}: not a reference training checkpoint (expected keys model, ema, ...)")
    return obj


def sit_config_from_args(args: dict[str, Any], z_dims: list[int]) -> dict[str, Any]:
    """Our SiT constructor arguments from the reference's args.json (REPAE-7.4 lists the keys used)."""
    from repae.models.sit import SIT_ARCHS

    vae = args.get("vae") or "f8d4"
    if vae not in LATENT_GEOMETRY:
        raise ValueError(f"args.json: vae {vae!r} is not one of {sorted(LATENT_GEOMETRY)}")
    channels, factor = LATENT_GEOMETRY[vae]
    arch = SIT_ARCHS[args.get("model") or "SiT-XL/2"]
    return dict(
        input_size=int(args.get("resolution") or 256) // factor,
        in_channels=channels,
        patch_size=arch["patch_size"],
        hidden_size=arch["hidden_size"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        class_dropout_prob=float(args.get("cfg_prob") if args.get("cfg_prob") is not None else 0.1),
        num_classes=int(args.get("num_classes") or 1000),
        z_dims=z_dims,
        encoder_depth=int(args.get("encoder_depth") or 8),
        projector_dim=2048,
        qk_norm=bool(args.get("qk_norm") or False),
        fused_attn=True,
        bn_momentum=float(args.get("bn_momentum") or 0.1),
    )


def encoder_dims(args: dict[str, Any]) -> list[int]:
    from repae.encoders import encoder_dim, split_specs

    res = int(args.get("resolution") or 256)
    return [encoder_dim(spec, res) for spec in split_specs(args.get("enc_type") or "dinov2-vit-b")]


def _strict_sit(config: dict[str, Any], state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    from common.weights import strip_prefixes
    from repae.models.sit import SiT

    with torch.device("meta"):
        sit = SiT(**config)
    state = strip_prefixes(state)
    missing = sorted(set(sit.state_dict()) - set(state))
    extra = sorted(set(state) - set(sit.state_dict()))
    if missing or extra:
        raise KeyError(f"{what}: SiT keys do not match the args.json model (missing {missing[:5]}, extra {extra[:5]})")
    expected = sit.state_dict()
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{what}: {len(wrong)} SiT tensors have other shapes than the args.json model, e.g. {k}: "
            f"{tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        )
    return state


def _write_vae(state: dict[str, torch.Tensor], arch: str, folder: Path, vae_config: dict | None) -> None:
    from diffusers import AutoencoderKL

    from repae.reference.convert import ldm_to_diffusers_vae, load_strict
    from repae.vae import VAE_PRESETS

    config = dict(vae_config or VAE_PRESETS[arch])
    vae = AutoencoderKL(**config)
    load_strict(vae, ldm_to_diffusers_vae(state, len(config["block_out_channels"])), source=f"checkpoint vae ({arch})")
    vae.save_pretrained(folder, safe_serialization=True)


def import_reference_run(
    exp_dir: str | Path,
    out: str | Path,
    step: int | None = None,
    vae_config: dict | None = None,
    z_dims: list[int] | None = None,
) -> Path:
    """Write ``out/<step>/`` (+ ``latest``) from a reference experiment; returns the step folder.

    ``vae_config`` / ``z_dims`` override the preset VAE config and the encoder widths (tests
    use tiny models; a real import reads both from ``args.json``).
    """
    exp_dir, out = Path(exp_dir), Path(out)
    args = json.loads((exp_dir / "args.json").read_text())
    path = find_checkpoint(exp_dir, step)
    ckpt = read_reference(path)
    config = sit_config_from_args(args, z_dims if z_dims is not None else encoder_dims(args))
    ema = _strict_sit(config, ckpt["ema"], f"{path}:ema")
    model = _strict_sit(config, ckpt.get("model", ckpt["ema"]), f"{path}:model")
    step_value = int(ckpt.get("steps") or int(path.stem))
    folder = out / str(step_value)
    folder.mkdir(parents=True, exist_ok=True)
    rckpt.save_tensors(ema, folder / "ema.safetensors")
    rckpt.save_tensors(model, folder / "sit.safetensors")
    write_json_atomic(folder / rckpt.SIT_CONFIG, config)
    joint = isinstance(ckpt.get("vae"), dict)
    if joint:
        _write_vae(ckpt["vae"], args.get("vae") or "f8d4", folder / "vae", vae_config)
        write_json_atomic(folder / rckpt.VAE_SOURCE, {"folder": "vae"})
        if isinstance(ckpt.get("discriminator"), dict):
            disc = {f"discriminator.{k}": v for k, v in ckpt["discriminator"].items()}
            rckpt.save_tensors(disc, folder / "discriminator.safetensors")
    else:
        source = {"name_or_path": args.get("vae") or "f16d32", "checkpoint": args.get("vae_ckpt"), "kind": "kl"}
        write_json_atomic(folder / rckpt.VAE_SOURCE, source)
    channels, factor = LATENT_GEOMETRY[args.get("vae") or "f8d4"]
    side = int(args.get("resolution") or 256) // factor
    state = {
        "kind": "joint" if joint else "ldm",
        "step": step_value,
        "world_size": 1,
        "latent_shape": [channels, side, side],
        "num_classes": config["num_classes"],
        "resolution": int(args.get("resolution") or 256),
        "imported_from": str(path),
    }
    write_json_atomic(folder / "trainer_state.json", state)
    write_manifest(folder)  # like every trainer-written tag: sizes and SHA-256 of its files
    write_text_atomic(out / "latest", f"{step_value}\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m repae.reference.import_reference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--exp", required=True, type=Path, help="reference experiment folder (args.json, checkpoints/)")
    parser.add_argument("--out", required=True, type=Path, help="run folder to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    args = parser.parse_args(argv)
    try:
        folder = import_reference_run(args.exp, args.out, args.step)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"imported {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
