"""The demo's real margin: `make demo` on every variant of the numeric path this machine can make, x training seeds.

    python scripts/demo_variants.py --out output/demo-variants     # 3 variants x 3 seeds (~1.5 h, 2 cores)
    python scripts/demo_variants.py --out /tmp/v --variants pinned --seeds 42      # one cell

Variants (docs/numerics.md): ``pinned`` (what `make demo` runs), ``unpinned`` (E2E_UNPINNED=1:
this machine's own kernels) and ``unpinned-avx2`` (the same with oneDNN capped at AVX2 and MKL on
AVX2 code, what an AVX2-only CPU runs by default). Each variant builds its own world once
(``<out>/worlds/<variant>``), then runs the demo once per training seed (``trainer.seed``) into
``<out>/runs/<variant>-seed<N>``. Nothing is selected on the results: every cell is reported.
``<out>/variants.json`` collects every cell's lower bounds, chosen guidance and timings;
``<out>/variants.md`` is the table. Reruns skip cells whose scores.json exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import numerics  # noqa: E402
from common.files import write_json_atomic  # noqa: E402

VARIANTS = {
    "pinned": {},
    "unpinned": {numerics.OPT_OUT: "1"},
    "unpinned-avx2": {
        numerics.OPT_OUT: "1",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
    },
}
SEEDS = (42, 43, 44)  # 42 is configs/e2e-vae/toy.yaml's


def variant_env(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED_ENV and k != numerics.OPT_OUT}
    env["OMP_NUM_THREADS"] = str(numerics.PINNED_THREADS)  # what `make demo` exports on every variant
    env.update(VARIANTS[name])
    return env


def run_cell(out: Path, variant: str, seed: int) -> dict:
    run = out / "runs" / f"{variant}-seed{seed}"
    scores = run / "scores.json"
    if not scores.is_file():
        cmd = [sys.executable, "-m", "fusedit.tools.demo", "--toy", str(out / "worlds" / variant), "--run", str(run)]
        cmd.append(f"trainer.seed={seed}")
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(run.parent / f"{variant}-seed{seed}.log", "w") as log:
            start = time.perf_counter()
            env = variant_env(variant)
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            print(f"{variant} seed {seed}: exit {rc} after {time.perf_counter() - start:.0f}s", flush=True)
    result = json.loads(scores.read_text())
    goals = result["goals"]["rows"]
    return {
        "variant": variant,
        "seed": seed,
        "color_low": goals["color"]["low"],
        "shape_low": goals["shape"]["low"],
        "color_mean": round(result["accuracy"]["color"], 4),
        "shape_mean": round(result["accuracy"]["shape"], 4),
        "margin": round(min(goals[k]["low"] - goals[k]["goal"] for k in goals), 4),
        "guidance": result["guidance_scale"],
        "guidance_rule": result.get("guidance_rule", "selected on the guidance prompts"),
        "met": result["goals"]["met"],
        "world_vae_psnr_db": _world(out, variant)["vae"]["psnr_db"],
        "world_pinned": _world(out, variant)["numerics"]["pinned"],
        "timing_s": result["timing_s"],
    }


def _world(out: Path, variant: str) -> dict:
    return json.loads((out / "worlds" / variant / "world.json").read_text())


def table(cells: list[dict]) -> str:
    lines = [
        "| variant | seed | world VAE PSNR | CFG | colour (low) | shape (low) | margin | demo s (world+train+eval) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        t = c["timing_s"]
        lines.append(
            f"| {c['variant']} | {c['seed']} | {c['world_vae_psnr_db']:.2f} dB | {c['guidance']:g} | "
            f"{c['color_mean']:.3f} ({c['color_low']:.3f}) | {c['shape_mean']:.3f} ({c['shape_low']:.3f}) | "
            f"{c['margin']:+.3f} | {t['total']:.0f} ({t['world']:.0f}+{t['train']:.0f}+{t['evaluation']:.0f}) |"
        )
    worst = min(cells, key=lambda c: c["margin"])
    lines.append(f"\nSmallest margin: {worst['margin']:+.3f} ({worst['variant']}, seed {worst['seed']}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("output/demo-variants"))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    args = parser.parse_args(argv)
    out = args.out.resolve()
    cells = []
    for variant in args.variants:
        for seed in args.seeds:
            cells.append(run_cell(out, variant, seed))
            write_json_atomic(out / "variants.json", {"machine": numerics.cpu_supported()[1], "cells": cells})
            (out / "variants.md").write_text(table(cells))
    print(table(cells))
    return 0 if all(c["margin"] >= 0.02 for c in cells) else 3


if __name__ == "__main__":
    sys.exit(main())
