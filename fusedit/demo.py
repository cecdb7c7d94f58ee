"""The main job on the toy world: build it, train the DiT, sample held-out prompts, score them.

    python -m fusedit.demo --toy toy --run output/toy          # what `make demo` runs
    python -m fusedit.demo --quick --run /tmp/demo             # minutes -> seconds (tests)

Training runs through ``train.py`` in a subprocess, exactly as a user would launch it. Sampling
loads the run's EMA weights from safetensors, renders every held-out prompt (attribute triples
never seen in training) with fixed seeds, and the toy scorer reads colour / shape / position /
background back from the pixels. ``<run>/scores.json`` and ``<run>/heldout_grid.png`` are the
results; the last line printed is the score summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "e2e-vae" / "toy.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--toy", default="toy", help="toy world folder (built when missing)")
    p.add_argument("--run", default="output/toy", help="run folder (checkpoints, samples, scores)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training YAML")
    p.add_argument("--quick", action="store_true", help="tiny world and few steps: a smoke run for tests")
    p.add_argument("--steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale for scoring (default: gen.scale)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra training overrides")
    return p.parse_args(argv)


def toy_overrides(toy: Path, vae_folder: str = "vae") -> list[str]:
    """Point the toy config at a world folder wherever it lives.

    `vae_folder` is "vae" for configs/e2e-vae/toy.yaml and "e2e-vae" (the REPA-E export,
    `python -m repae.demo`) for its twin toy-e2e.yaml.
    """
    world = json.loads((toy / "world.json").read_text())
    pattern = world.get("train_pattern") or str(toy / "shards" / "train-*.tar")
    return [
        f"model.base={toy / 'text_encoder'}",
        f"vae.pretrained_model_name_or_path={toy / vae_folder}",
        f'data.data_path=["{toy / pattern if not Path(pattern).is_absolute() else pattern}"]',
        f"gen.val_prompt_file={toy / 'prompts' / 'val.json'}",
    ]


def ensure_world(toy: Path, quick: bool) -> None:
    from fusedit.data.toy import build_toy_world

    build_toy_world(toy, quick=quick)


def train(config: str, run: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, str(ROOT / "train.py"), "-c", config, f"trainer.checkpoint_dir={run}", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def evaluate(toy: Path, run: Path, guidance: float | None, seed: int) -> dict:
    """Sample every held-out prompt with the EMA weights and score the images."""
    import torch

    from fusedit.config import load_config
    from fusedit.data.toy_scorer import ToyScorer
    from fusedit.pipeline import DiTPipeline, save_grid

    cfg = load_config(run / "config.yaml")
    prompts = json.loads((toy / "prompts" / "heldout.json").read_text())
    pipe = DiTPipeline.from_checkpoint(run, "latest", use_ema=True)
    scale = cfg.gen.scale if guidance is None else guidance
    with torch.inference_mode():
        images = pipe(
            [p["prompt"] for p in prompts],
            height=cfg.gen.H,
            width=cfg.gen.W,
            num_inference_steps=cfg.gen.steps,
            guidance_scale=scale,
            seed=seed,
            batch_size=64,
        )
    scorer = ToyScorer.from_pretrained(toy / "scorer")
    result = scorer.score(images * 2.0 - 1.0, prompts)
    result.update(
        guidance_scale=scale, steps=cfg.gen.steps, seed=seed, ema=True, checkpoint=(run / "latest").read_text().strip()
    )
    save_grid(images, run / "heldout_grid.png", ncol=8)
    (run / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary_line(result: dict, seconds: float) -> str:
    acc = result["accuracy"]
    chance = result["chance"]
    parts = [f"{k} {acc[k]:.2f} (chance {chance[k]:.2f})" for k in acc]
    return f"scores on {result['n']} held-out prompts: " + ", ".join(parts) + f" | demo {seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    toy, run = Path(args.toy).resolve(), Path(args.run).resolve()
    ensure_world(toy, args.quick)
    t_world = time.perf_counter() - start
    overrides = toy_overrides(toy)
    if args.quick:
        overrides += [
            "trainer.max_steps=6",
            "trainer.logging_steps=2",
            "trainer.checkpointing_steps=3",
            "trainer.sampling_steps=0",
            "data.batch_size=8",
            "data.dataloader_num_workers=0",
        ]
    if args.steps is not None:
        overrides.append(f"trainer.max_steps={args.steps}")
    train(args.config, run, overrides + list(args.overrides))
    t_train = time.perf_counter() - start - t_world
    result = evaluate(toy, run, args.guidance, args.seed)
    total = time.perf_counter() - start
    result["timing_s"] = {"world": round(t_world, 1), "train": round(t_train, 1), "total": round(total, 1)}
    (run / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {run / 'scores.json'} and {run / 'heldout_grid.png'}")
    print(summary_line(result, total), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
