"""Check that a VAE's latent statistics normalise its latents to zero mean, unit std per channel.

    python -m evaluation.check_latents --vae toy/vae --vae toy/e2e-vae --toy toy
    python -m evaluation.check_latents --vae exps/e2e-sdvae --run exps/sit-xl-repae-sdvae --images 4096 --json c.json

Each VAE encodes training images (posterior samples, noise seeded per image) and normalises them
with its own config constants exactly as the text-to-image trainer does
(``common.vae_config.normalisation_constants``: per-channel ``latents_mean`` / ``latents_std``
when present, else ``shift_factor`` / ``scaling_factor``). A table lists each channel's mean and
std; the command exits 1, naming the VAE and the channel, when any channel's ``|mean|`` exceeds
``--tol-mean`` or its ``|std - 1|`` exceeds ``--tol-std`` (both 0.05 by default).

Training images: ``--toy DIR`` reads the first ``--images`` images of ``DIR/shards/train-*.tar``
(tar order); ``--run DIR`` those of a REPA-E run's ``config.yaml``, as ``python -m repae.export
--stats images`` does (spread evenly over the shards).
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

from common.latent_stats import DEFAULT_TOLERANCE, check_normalisation, failing_channels
from common.vae_config import VaeSpec


def toy_training_images(toy: Path, count: int) -> torch.Tensor:
    """The first ``count`` images of a toy world's training shards as uint8 (N, 3, H, W)."""
    from PIL import Image

    from toyworld.world import read_shard_samples

    shards = sorted((Path(toy) / "shards").glob("train-*.tar"))
    if not shards:
        raise FileNotFoundError(f"{toy}/shards: no train-*.tar shards")
    images = []
    for sample in itertools.islice(read_shard_samples(shards), count):
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            images.append(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(images))


def load_vae(path: str, device: torch.device) -> torch.nn.Module:
    """A diffusers VAE folder / hub id of any family (common.vae_config.FAMILIES), float32, eval."""
    cls = VaeSpec(path).family().vae_class()
    return cls.from_pretrained(path, torch_dtype=torch.float32).to(device).eval()


def format_table(name: str, result: dict) -> str:
    lines = [
        f"{name}  ({result['source']}, {result['images']} images): max |mean| {result['max_abs_mean']:.4f}, "
        f"max |std - 1| {result['max_abs_std_error']:.4f}  -> {'ok' if result['ok'] else 'FAIL'}",
        "  channel      mean       std",
    ]
    for c, (m, s) in enumerate(zip(result["per_channel_mean"], result["per_channel_std"])):
        lines.append(f"  {c:>7}  {m:+8.4f}  {s:8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.check_latents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vae", action="append", required=True, help="diffusers VAE folder or hub id (repeatable)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--toy", type=Path, help="toy world folder: training images from its shards/train-*.tar")
    source.add_argument("--run", type=Path, help="REPA-E run folder: training images from its config.yaml")
    parser.add_argument("--images", type=int, default=4096, help="number of training images (default 4096)")
    parser.add_argument("--tol-mean", type=float, default=DEFAULT_TOLERANCE, help="allowed |mean| per channel")
    parser.add_argument("--tol-std", type=float, default=DEFAULT_TOLERANCE, help="allowed |std - 1| per channel")
    parser.add_argument("--seed", type=int, default=0, help="posterior-noise seed")
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder batch")
    parser.add_argument("--device", default=None, help="device to encode on (default: cuda if available)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1:
        parser.error("--images and --batch-size must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if args.toy is not None:
            images = toy_training_images(args.toy, args.images)
        else:
            from repae.export import training_images

            images = training_images(args.run, args.images)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    results, failures = {}, []
    for name in args.vae:
        vae = load_vae(name, device)
        result = check_normalisation(
            vae, images, tol_mean=args.tol_mean, tol_std=args.tol_std, seed=args.seed, batch_size=args.batch_size
        )
        results[name] = result
        print(format_table(name, result), flush=True)
        failures += [f"{name}: {line}" for line in failing_channels(result)]
        del vae
    if args.json is not None:
        from common.files import write_json_atomic

        write_json_atomic(args.json, results, sort_keys=False)
    if failures:
        print("latent normalisation outside tolerance:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"all {len(results)} VAE(s) within tolerance (mean {args.tol_mean}, std {args.tol_std})")
    return 0


if __name__ == "__main__":
    from common.lifecycle import run_cli

    sys.exit(run_cli("python -m evaluation.check_latents", main))
