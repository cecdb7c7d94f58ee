"""The paired study on the toy world: the same DiT trained on the original and on the REPA-E tuned VAE.

    python -m evaluation.study --toy toy --out output/study            # what `make study` runs
    python -m evaluation.study --toy toy --out /tmp/study --steps 20   # smoke run, about two minutes

1. ``toy/e2e-vae`` missing: runs the REPA-E stage first (``python -m repae.demo``), which
   tunes the toy VAE and exports it there;
2. trains ``configs/e2e-vae/toy.yaml`` into ``<out>/toy`` and its twin ``toy-e2e.yaml`` (identical
   but for the VAE) into ``<out>/toy-e2e``, through ``train.py`` like ``fusedit.tools.demo``;
3. scores every kept checkpoint of both runs on the held-out prompts with the same prompts, seed,
   guidance and sampler (EMA weights, toy attribute scorer): ``<run>/<step>/toy_scores.json`` and
   ``<run>/<step>/heldout_grid.png``; the newest also as ``<run>/scores.json`` / ``heldout_grid.png``,
   the files ``fusedit.tools.demo`` writes;
4. writes the side-by-side report ``<out>/report/index.html`` (``evaluation.report``, with the
   REPA-E run when it exists) and prints the two score tables side by side.

Every stage resumes: a run whose ``latest`` checkpoint has reached ``max_steps`` is not started
again (``train.py`` would resume and stop at once, after loading everything), an interrupted one
resumes from its newest checkpoint, and a checkpoint already scored with the same settings is not
sampled again. ``--steps N`` shortens both runs alike (checkpoints and training-time samples at
N/2 and N, logging every N/50 steps, warm-up N/25 steps, the full run's proportions); the study
folder records its length and refuses to mix runs of another length.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "e2e-vae"
# (run name, training config, VAE folder inside the toy world)
PAIR = (("toy", "toy.yaml", "vae"), ("toy-e2e", "toy-e2e.yaml", "e2e-vae"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.study",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--toy", type=Path, default=Path("toy"), help="toy world folder")
    p.add_argument("--out", type=Path, default=Path("output/study"), help="study folder (two runs + report)")
    p.add_argument("--repae-run", type=Path, default=Path("output/repae/toy"), help="REPA-E run (made if needed)")
    p.add_argument("--steps", type=int, default=None, help="training steps of both runs (default: the config's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale for scoring (default: gen.scale)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both runs")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    return args


# --------------------------------------------------------------------------------------------
# 1. the tuned VAE
# --------------------------------------------------------------------------------------------
def ensure_e2e_vae(toy: Path, repae_run: Path) -> None:
    """Run the toy REPA-E stage when ``<toy>/e2e-vae`` is missing (it exports the folder last)."""
    if (toy / "e2e-vae" / "config.json").is_file():
        print(f"E2E-VAE present: {toy / 'e2e-vae'}", flush=True)
        return
    cmd = [sys.executable, "-m", "repae.demo", "--toy", str(toy), "--run", str(repae_run)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


# --------------------------------------------------------------------------------------------
# 2. training
# --------------------------------------------------------------------------------------------
def config_max_steps(config: Path) -> int:
    from fusedit.config import load_config

    return int(load_config(config).trainer.max_steps)


def step_overrides(steps: int | None) -> list[str]:
    """A shorter run in the full run's proportions (2500 steps: checkpoints and samples every 1250,
    logging every 50, warm-up 100)."""
    if steps is None:
        return []
    half = max(1, steps // 2)
    return [
        f"trainer.max_steps={steps}",
        f"trainer.checkpointing_steps={half}",
        f"trainer.sampling_steps={half}",
        f"trainer.logging_steps={max(1, steps // 50)}",
        f"lr_scheduler.num_warmup_steps={max(1, steps // 25)}",
    ]


def check_study_folder(out: Path, max_steps: int) -> None:
    """Refuse to resume a study made with another length: its checkpoints would mix two schedules."""
    record = out / "study.json"
    if record.is_file():
        previous = json.loads(record.read_text()).get("max_steps")
        if previous != max_steps:
            raise SystemExit(
                f"{out} holds a study of {previous} steps, this one asks for {max_steps}: "
                "pick another --out (or delete that folder)"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, {"max_steps": max_steps})


def latest_step(run: Path) -> int | None:
    from common.checkpoint import read_latest

    return read_latest(run) if (run / "latest").is_file() else None


def train_run(toy: Path, run: Path, config: Path, vae_folder: str, steps: int | None, max_steps: int) -> None:
    from fusedit.tools.demo import toy_overrides, train

    done = latest_step(run)
    if done is not None and done >= max_steps:
        print(f"{run.name}: already trained to step {done}, not restarted", flush=True)
        return
    train(str(config), run, toy_overrides(toy, vae_folder=vae_folder) + step_overrides(steps))


# --------------------------------------------------------------------------------------------
# 3. scoring
# --------------------------------------------------------------------------------------------
def checkpoint_steps(run: Path) -> list[int]:
    from common.checkpoint import list_steps

    return list_steps(run)


def _same_settings(path: Path, scale: float, steps: int, seed: int) -> bool:
    if not path.is_file():
        return False
    old = json.loads(path.read_text())
    return (old.get("guidance_scale"), old.get("steps"), old.get("seed")) == (scale, steps, seed)


def score_checkpoint(toy: Path, run: Path, step: int, guidance: float | None, seed: int) -> dict[str, Any]:
    """``fusedit.tools.demo.evaluate`` for one checkpoint step: every held-out prompt, EMA weights, fixed seed.

    Image i starts from noise seeded by (seed, i), so both runs see identical noise for each prompt.
    Written to ``<run>/<step>/toy_scores.json`` + ``heldout_grid.png``; skipped when already there.
    """
    import torch

    from common.files import write_text_atomic
    from common.images import save_grid
    from fusedit.config import load_config
    from fusedit.pipeline import DiTPipeline
    from toyworld.scorer import ToyScorer

    cfg = load_config(run / "config.yaml")
    scale = cfg.gen.scale if guidance is None else guidance
    folder = run / str(step)
    if _same_settings(folder / "toy_scores.json", scale, cfg.gen.steps, seed):
        print(f"{run.name} step {step}: already scored", flush=True)
        return json.loads((folder / "toy_scores.json").read_text())
    prompts = json.loads((toy / "prompts" / "heldout.json").read_text())
    pipe = DiTPipeline.from_checkpoint(run, step, use_ema=True)
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
    result = ToyScorer.from_pretrained(toy / "scorer").score(images * 2.0 - 1.0, prompts)
    result.update(guidance_scale=scale, steps=cfg.gen.steps, seed=seed, ema=True, checkpoint=str(step))
    save_grid(images, folder / "heldout_grid.png", ncol=8)
    write_text_atomic(folder / "toy_scores.json", json.dumps(result, indent=2) + "\n")  # key order kept
    print(f"{run.name} step {step}: scored {result['n']} held-out prompts", flush=True)
    return result


def score_run(toy: Path, run: Path, guidance: float | None, seed: int) -> dict[int, dict[str, Any]]:
    """Score every kept checkpoint; the newest is also published as ``<run>/scores.json`` / ``heldout_grid.png``."""
    results = {step: score_checkpoint(toy, run, step, guidance, seed) for step in checkpoint_steps(run)}
    if results:
        newest = max(results)
        write_json_atomic(run / "scores.json", results[newest], sort_keys=False)
        shutil.copyfile(run / str(newest) / "heldout_grid.png", run / "heldout_grid.png")
    return results


# --------------------------------------------------------------------------------------------
# 4. report and summary
# --------------------------------------------------------------------------------------------
def side_by_side(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Text tables, one per checkpoint step: metric, chance, then a column per run and their difference."""
    from evaluation.report import SETTINGS, fmt, score_rows

    names = list(results)
    blocks = []
    for step in sorted({s for r in results.values() for s in r}):
        rows = {n: score_rows(results[n][step]) if step in results[n] else {} for n in names}
        metrics = list(dict.fromkeys(m for r in rows.values() for m in r))
        table = [["step " + str(step), "chance", *names, f"{names[-1]} - {names[0]}"]]
        for m in metrics:
            values = [rows[n].get(m, (None, None))[0] for n in names]
            chance = next((rows[n][m][1] for n in names if m in rows[n] and rows[n][m][1] is not None), None)
            a, b = values[0], values[-1]
            numbers = isinstance(a, int | float) and isinstance(b, int | float)
            delta = fmt(b - a) if numbers and not (m in SETTINGS and a == b) else ""
            table.append([m, fmt(chance) if chance is not None else "", *map(fmt, values), delta])
        blocks.append(_text_table(table))
    return "\n\n".join(blocks)


def _text_table(table: list[list[str]]) -> str:
    """First column left-aligned, numbers right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def write_report(out: Path, runs: dict[str, Path], repae_run: Path) -> Path:
    from evaluation.report import build_report

    repae = repae_run if (repae_run / "metrics.jsonl").is_file() else None
    return build_report(runs, out / "report", repae=repae, title="Toy study: original VAE vs E2E-VAE")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    toy, out, repae_run = args.toy.resolve(), args.out.resolve(), args.repae_run.resolve()
    if not (toy / "world.json").is_file():
        raise SystemExit(f"{toy}: no toy world (build it: python dataset_download.py --toy {args.toy})")
    max_steps = args.steps if args.steps is not None else config_max_steps(CONFIGS / PAIR[0][1])
    check_study_folder(out, max_steps)
    ensure_e2e_vae(toy, repae_run)
    runs = {name: out / name for name, _, _ in PAIR}
    for name, config, vae_folder in PAIR:
        train_run(toy, runs[name], CONFIGS / config, vae_folder, args.steps, max_steps)
    results = {name: score_run(toy, runs[name], args.guidance, args.seed) for name in runs}
    page = write_report(out, runs, repae_run)
    print(f"\nreport: {page}\n")
    print(side_by_side(results))
    print(f"\nstudy: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
