"""Export a REPA-E run's tuned VAE as a diffusers folder: the E2E-VAE.

    python -m repae.export --run exps/sit-xl-repae-sdvae --tag latest --out exps/e2e-sdvae
    python -m repae.export --run exps/sit-xl-repae-sdvae --out exps/e2e-sdvae --stats ema   # BN stats

The folder loads with ``AutoencoderKL.from_pretrained(folder)`` (``AutoencoderKLQwenImage`` for
Qwen-Image) and drops into the text-to-image configs (``vae.pretrained_model_name_or_path``).
Its per-channel latent statistics go into the diffusers config as ``latents_mean`` /
``latents_std`` (read by :mod:`fusedit.latents`) and into ``latents_stats.safetensors`` in the
reference's meaning (``z_n = (z - bias) * scale``). Where they come from (``--stats``):

* ``images`` (default): measured with the *exported* VAE on training images of the run (posterior
  samples, as the text-to-image trainer encodes; :func:`common.latent_stats.measure_latents`), so
  the trainer's normalised latents have zero mean and unit std per channel. The EMA SiT's
  BatchNorm running statistics (decay 0.99) lag the latent scale, which drifts during joint
  tuning: on the toy run they gave normalised latents of std ~1.1.
* ``ema``: the EMA SiT's BatchNorm running mean and variance (the previous behaviour; what the
  jointly trained SiT normalised with, so ``train_ldm`` on the exported VAE matches the SiT).
  The reference's ``save_vae_weights.py`` ignored the BatchNorm eps here (reference defect
  REPAE-D7, docs/reference-facts.md); this uses the same ``sqrt(var + eps)`` as the normalisation did.

``e2e_vae.json`` records which (``metadata.latent_statistics``: ``from``, ``images``, ``why``, and
the BatchNorm numbers for comparison either way). Check any VAE with ``python -m
evaluation.check_latents``. The discriminator can be exported too, so a later tuning run can start
from it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from common.lifecycle import error_exit, user_errors
from repae import checkpoint as rckpt

STATS_SOURCES = ("images", "ema")
DEFAULT_STATS_IMAGES = 4096
_WHY = {
    "images": (
        "measured with the exported VAE on posterior samples of training images, as the text-to-image "
        "trainer encodes them, so its normalised latents have zero mean and unit std per channel; the SiT's "
        "BatchNorm EMA lags the latent scale that drifts during joint tuning"
    ),
    "ema": (
        "the SiT's BatchNorm running statistics, what the jointly trained SiT normalised with (they lag the "
        "drifting latent scale, so text-to-image latents normalised with them are not exactly unit variance)"
    ),
}


def training_images(run_dir: str | Path, count: int = DEFAULT_STATS_IMAGES) -> torch.Tensor:
    """``count`` training images of a run as uint8 (N, 3, R, R), decoded like the joint trainer does.

    Read from the run's ``config.yaml`` (``data.data_path``, ``data.resolution``, ``data.label``)
    through the trainer's own index and decoder (:mod:`repae.data`): no flips, no shuffling. The
    rows are spread evenly over the whole index (deterministic), not its first ``count`` rows,
    because ImageNet shards are written class by class. Corrupt images are skipped.
    """

    from common.shards import BadSample, validate_data_paths
    from repae.data import SampleIndex, ShardFiles, local_shard_path, to_uint8_chw

    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: no saved config, so no training images to measure latent statistics on "
            "(an imported reference run?); use --stats ema (stats='ema') for the SiT's BatchNorm statistics"
        )
    data = rckpt.run_config(Path(run_dir)).get("data", {})  # the run's config, old spellings included
    paths = list(data.get("data_path", []))
    index = SampleIndex.build(validate_data_paths(paths), str(data.get("label", "cls")))
    if len(index) == 0:
        raise FileNotFoundError(f"{paths}: no usable training images")
    rows = np.unique(np.linspace(0, len(index) - 1, num=min(count, len(index))).round().astype(np.int64))
    files, images = ShardFiles(), []
    try:
        for row in rows.tolist():
            path = local_shard_path(index.urls[index.shard[row]])
            try:
                data_bytes = files.read(path, int(index.offset[row]), int(index.size[row]))
                images.append(to_uint8_chw(data_bytes, int(data["resolution"])))
            except BadSample:
                continue
    finally:
        files.close()
    if not images:
        raise FileNotFoundError(f"{paths}: none of the {len(rows)} chosen training images decodes")
    return torch.stack(images)


def export_e2e_vae(
    run_dir: str | Path,
    out: str | Path,
    tag: str = "latest",
    use_ema: bool = True,
    with_discriminator: bool = False,
    *,
    stats: str = "images",
    stats_images: int = DEFAULT_STATS_IMAGES,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> Path:
    """Write the tuned VAE + latent statistics of a joint run's checkpoint to ``out``.

    ``stats="images"``: statistics of the exported VAE's posterior samples on ``stats_images``
    training images (:func:`training_images`, :func:`common.latent_stats.measure_latents`, noise
    from ``seed``; encoded on ``device``, default CUDA when available). ``stats="ema"``: the
    BatchNorm running statistics of the EMA SiT (the live SiT with ``use_ema=False``).
    """
    from repae.vae import save_e2e_vae

    if stats not in STATS_SOURCES:
        raise ValueError(f"stats must be one of {STATS_SOURCES}, got {stats!r}")
    if stats_images < 1:
        raise ValueError(f"stats_images must be >= 1, got {stats_images}")
    folder = rckpt.resolve_tag(Path(run_dir), tag)
    if not (folder / "vae").is_dir():
        raise FileNotFoundError(f"{folder}: no tuned VAE (a train_ldm run keeps its VAE frozen; nothing to export)")
    sit = rckpt.load_sit(folder, use_ema=use_ema)
    bn_scale, bn_bias = sit.latents_stats()
    vae = rckpt.load_vae_from_checkpoint(folder).vae
    state = rckpt.read_json(folder / "trainer_state.json")
    bn_name = "sit batchnorm ema" if use_ema else "sit batchnorm live"
    record = {
        "from": bn_name,
        "images": None,  # BatchNorm running statistics: an EMA over training batches, not a fixed set
        "posterior": "samples",
        "why": _WHY["ema"],
        "bn_ema_mean": bn_bias.tolist(),
        "bn_ema_std": (1.0 / bn_scale.double()).tolist(),
    }
    scale, bias = bn_scale, bn_bias
    if stats == "images":
        scale, bias, count = _image_stats(vae, run_dir, stats_images, device, seed)
        record.update({"from": "training images", "images": count, "why": _WHY["images"], "seed": seed})
    metadata = {
        "source_run": str(Path(run_dir).resolve()),
        "step": state["step"],
        "statistics_from": record["from"],
        "sit_statistics_from": "ema" if use_ema else "live",
        "latent_statistics": record,
        "resolution": state["resolution"],
    }
    path = save_e2e_vae(vae, Path(out), scale, bias, metadata=metadata)
    if with_discriminator:
        shutil.copyfile(folder / "discriminator.safetensors", Path(out) / "discriminator.safetensors")
    return path


def _image_stats(
    vae: torch.nn.Module, run_dir: str | Path, count: int, device: str | torch.device | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(scale, bias, images used) float32 from the VAE's posterior samples on the run's training images."""
    from common.latent_stats import measure_latents

    images = training_images(run_dir, count)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mean, std = measure_latents(vae.to(device), images, seed=seed)
    vae.to("cpu")
    return (1.0 / std).float(), mean.float(), len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m repae.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="run directory of python -m repae.train")
    parser.add_argument("--tag", default="latest", help="checkpoint step or 'latest'")
    parser.add_argument("--out", required=True, help="destination folder (diffusers layout)")
    parser.add_argument(
        "--no-ema", action="store_true", help="with --stats ema: the live SiT's BatchNorm statistics, not the EMA's"
    )
    parser.add_argument("--with-discriminator", action="store_true", help="also copy discriminator.safetensors")
    parser.add_argument(
        "--stats",
        choices=STATS_SOURCES,
        default="images",
        help="latent statistics written into the config: 'images' (default) measures the exported VAE's "
        "posterior samples on training images of the run, so text-to-image latents are unit-variance; "
        "'ema' keeps the EMA SiT's BatchNorm running statistics (they lag the drifting latent scale)",
    )
    parser.add_argument(
        "--stats-images",
        type=int,
        default=DEFAULT_STATS_IMAGES,
        metavar="N",
        help="training images for --stats images, spread evenly over the run's shards "
        f"(default {DEFAULT_STATS_IMAGES})",
    )
    parser.add_argument(
        "--device", default=None, help="device that encodes for --stats images (default: cuda if available)"
    )
    parser.add_argument("--seed", type=int, default=0, help="posterior-noise seed for --stats images")
    args = parser.parse_args(argv)
    if args.stats_images < 1:
        parser.error("--stats-images must be >= 1")
    try:
        path = export_e2e_vae(
            args.run,
            args.out,
            args.tag,
            not args.no_ema,
            args.with_discriminator,
            stats=args.stats,
            stats_images=args.stats_images,
            device=args.device,
            seed=args.seed,
        )
    except (FileNotFoundError, *user_errors()) as err:
        return error_exit(str(err))
    print(f"E2E-VAE written to {path} (latent statistics: {args.stats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
