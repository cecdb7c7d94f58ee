"""The REPA-E stage on the toy world, end to end, on a CPU in a few minutes.

    python -m repae.demo --toy toy --run output/repae/toy        (what `make repae` runs)

1. builds the toy world if it is missing (`python dataset_download.py --toy toy`) and its
   alignment target: a small timm ViT trained for fixed steps on the toy attributes (`toy/repae/encoder`);
2. jointly tunes the toy VAE with a tiny SiT (`python -m repae.train -c configs/repae/toy.yaml`);
3. exports the tuned VAE as a diffusers folder, `toy/e2e-vae` — what
   `configs/e2e-vae/toy-e2e.yaml` trains the text-to-image DiT on;
4. compares the original and the tuned VAE on the held-out validation shard: reconstruction
   PSNR / SSIM / LPIPS and the latent statistics the paper reports (per-channel spatial
   variance), written to `<run>/vae_comparison.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import numerics
from common.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "repae" / "toy.yaml"


def toy_overrides(toy: Path, run: Path) -> list[str]:
    """Point configs/repae/toy.yaml at a world folder and a run folder wherever they live."""
    world = json.loads((toy / "world.json").read_text())
    pattern = world.get("train_pattern") or "shards/train-*.tar"
    shards = pattern if Path(pattern).is_absolute() else str(toy / pattern)
    return [
        f"vae.pretrained_model_name_or_path={toy / 'vae'}",
        f'encoder.types=["local:{toy / "repae" / "encoder"}"]',
        f'data.data_path=["{shards}"]',
        f"trainer.run={run.name}",
        f"trainer.checkpoint_dir={run}",
    ]


def ensure_world(toy: Path, encoder_steps: int | None, quick: bool) -> None:
    from repae.toy import build_toy_encoder
    from toyworld.build import build_toy_world

    if not (toy / "world.json").is_file():
        build_toy_world(toy, quick=quick)
    if not (toy / "repae" / "encoder" / "model.safetensors").is_file():
        build_toy_encoder(toy, steps=encoder_steps, quick=quick)


def train(toy: Path, run: Path, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "repae.train", "-c", str(CONFIG), *toy_overrides(toy, run), *extra]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def compare(toy: Path, e2e: Path, run: Path, num_images: int) -> dict:
    """Original vs tuned toy VAE on the validation shard (images never used for tuning)."""
    import torch

    from repae.diagnostics import VaeSource, compare_vaes, format_table
    from repae.losses import build_lpips
    from toyworld.world import load_images

    images, _ = load_images(sorted((toy / "shards").glob("val-*.tar")))
    report = compare_vaes(
        [VaeSource(str(toy / "vae"), label="original"), VaeSource(str(e2e), label="e2e")],
        torch.from_numpy(images[:num_images]),
        lpips_fn=build_lpips("vgg", "random"),
        rfid=True,
        fid_extractor="common.fid:random_conv_extractor",
    )
    write_json_atomic(run / "vae_comparison.json", report, sort_keys=False)
    print(format_table(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m repae.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--toy", type=Path, default=Path("toy"), help="toy world folder (built when missing)")
    parser.add_argument("--run", type=Path, default=Path("output/repae/toy"), help="REPA-E run folder")
    parser.add_argument("--e2e-out", type=Path, default=None, help="exported E2E-VAE (default: <toy>/e2e-vae)")
    parser.add_argument(
        "--encoder-steps", type=int, default=None, help="training steps of the toy ViT (default: repae.toy.STEPS)"
    )
    parser.add_argument("--num-images", type=int, default=512, help="validation images for the VAE comparison")
    parser.add_argument("--quick", action="store_true", help="tiny world and budgets (tests)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for configs/repae/toy.yaml")
    args = parser.parse_args(argv)
    numerics.pin_process()  # the encoder build, tuning and comparison on the pinned numeric path
    from repae.export import export_e2e_vae

    toy, run = args.toy.resolve(), args.run.resolve()
    e2e = (args.e2e_out or toy / "e2e-vae").resolve()
    t0 = time.time()
    ensure_world(toy, args.encoder_steps, args.quick)
    t1 = time.time()
    train(toy, run, args.overrides)
    t2 = time.time()
    export_e2e_vae(run, e2e)
    compare(toy, e2e, run, args.num_images)
    timing = {
        "world_and_encoder_s": round(t1 - t0, 1),
        "joint_tuning_s": round(t2 - t1, 1),
        "export_and_compare_s": round(time.time() - t2, 1),
    }
    write_json_atomic(run / "demo_timing.json", timing, sort_keys=False)
    print(f"E2E-VAE: {e2e}\ncomparison: {run / 'vae_comparison.json'}\ntiming: {timing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
