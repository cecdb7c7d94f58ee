"""Export a REPA-E run's tuned VAE as a diffusers folder: the E2E-VAE.

    python -m repae.export --run exps/sit-xl-repae-sdvae --tag latest --out exps/e2e-sdvae

The folder loads with ``AutoencoderKL.from_pretrained(folder)`` (``AutoencoderKLQwenImage`` for
Qwen-Image) and drops into the text-to-image configs (``vae.pretrained_model_name_or_path``).
Its latent statistics are the EMA SiT's BatchNorm running mean and variance — what the jointly
trained diffusion model actually normalised with — written both into the diffusers config as
per-channel ``latents_mean`` / ``latents_std`` (read by :mod:`fusedit.latents`) and as
``latents_stats.safetensors`` in the reference's meaning (``z_n = (z - bias) * scale``).
The reference's ``save_vae_weights.py`` ignored the BatchNorm eps here (defect 7); this uses the
same ``sqrt(var + eps)`` as the normalisation did. The discriminator can be exported too, so a
later tuning run can start from it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from repae import checkpoint as rckpt


def export_e2e_vae(
    run_dir: str | Path, out: str | Path, tag: str = "latest", use_ema: bool = True, with_discriminator: bool = False
) -> Path:
    """Write the tuned VAE + latent statistics of a joint run's checkpoint to ``out``."""
    from repae.vae import save_e2e_vae

    folder = rckpt.resolve_tag(Path(run_dir), tag)
    if not (folder / "vae").is_dir():
        raise FileNotFoundError(f"{folder}: no tuned VAE (a train_ldm run keeps its VAE frozen; nothing to export)")
    sit = rckpt.load_sit(folder, use_ema=use_ema)
    scale, bias = sit.latents_stats()
    vae = rckpt.load_vae_from_checkpoint(folder).vae
    state = rckpt.read_json(folder / "trainer_state.json")
    metadata = {
        "source_run": str(Path(run_dir).resolve()),
        "step": state["step"],
        "statistics_from": "ema" if use_ema else "live",
        "resolution": state["resolution"],
    }
    path = save_e2e_vae(vae, Path(out), scale, bias, metadata=metadata)
    if with_discriminator:
        shutil.copyfile(folder / "discriminator.safetensors", Path(out) / "discriminator.safetensors")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m repae.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="run directory of python -m repae.train")
    parser.add_argument("--tag", default="latest", help="checkpoint step or 'latest'")
    parser.add_argument("--out", required=True, help="destination folder (diffusers layout)")
    parser.add_argument("--no-ema", action="store_true", help="latent statistics from the live SiT, not the EMA")
    parser.add_argument("--with-discriminator", action="store_true", help="also copy discriminator.safetensors")
    args = parser.parse_args(argv)
    try:
        path = export_e2e_vae(args.run, args.out, args.tag, not args.no_ema, args.with_discriminator)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"E2E-VAE written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
