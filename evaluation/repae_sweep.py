"""A small, recorded sweep of the toy REPA-E joint stage, scored by what matters downstream.

    python -m evaluation.repae_sweep --toy toy --out output/repae-sweep                 # every arm
    python -m evaluation.repae_sweep --toy toy --out output/repae-sweep --arms default,align-0.5

Each arm tunes the toy VAE with ``configs/repae/toy.yaml`` plus its overrides (alignment weight
into the VAE, tuning length, SiT encoder depth, the reference-faithful losses), exports it with
statistics measured on training images (:func:`repae.export.export_e2e_vae`), and is scored by:

* the VAE itself: reconstruction PSNR on the validation shard and the normalisation check (the
  T2I trainer's normalised latents on training images: per-channel mean and std);
* downstream: the toy text-to-image DiT trained on it (``configs/e2e-vae/toy.yaml`` with the arm's
  VAE) for ``--steps`` steps with ``--seeds`` seeds, next to the same DiT on the original VAE, all
  scored at the last checkpoint like :mod:`evaluation.study` but on the *validation* set (the
  world's guidance prompts, training triples, x templates x sampling seeds, sampling seed 2000,
  toy Fréchet distance against training images), with the difference to the original VAE and its
  interval. With one seed the interval covers prompts and sampling only, not training seeds.

Everything resumes (finished tunings, exports, DiT runs and scores are kept). The table is written
to ``<out>/sweep.json`` and ``<out>/sweep.md``; the recipe chosen from it is recorded in
``docs/toy-repae-sweep.md``. The sweep never looks at the held-out prompts ``make study`` reports,
and its DiTs use other training seeds (100.. here, 0..K-1 there).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.files import write_json_atomic, write_text_atomic

# name -> (overrides of configs/repae/toy.yaml, checkpoint exported). "steps-300" is the default
# run's own step-300 checkpoint: the tuning-length axis costs nothing extra.
ARMS: dict[str, tuple[list[str], int]] = {
    "default": ([], 600),  # 600 steps, alignment weight into the VAE 1.5, SiT encoder depth 2
    "steps-300": ([], 300),
    "align-0.5": (["loss.vae_align_proj_coeff=0.5"], 600),
    "align-0.5-steps-300": (["loss.vae_align_proj_coeff=0.5"], 300),
    "reference-faithful": (["loss.reference_faithful=true"], 600),
    "reference-faithful-steps-300": (["loss.reference_faithful=true"], 300),
    "depth-1": (["model.encoder_depth=1"], 600),
    "depth-1-steps-300": (["model.encoder_depth=1"], 300),
    "steps-1200": (["trainer.max_steps=1200", "trainer.checkpointing_steps=600"], 1200),
}
DOWNSTREAM_SEED_BASE = 100  # never the seeds a reported study uses (0..K-1)
GUIDANCE = 1.5
VALIDATION_SEED = 2000  # sampling seed of the sweep's scoring: neither the study's (0) nor its selection's (1000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.repae_sweep",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--toy", type=Path, default=Path("toy"), help="toy world folder")
    p.add_argument("--out", type=Path, default=Path("output/repae-sweep"), help="sweep folder")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--steps", type=int, default=600, help="downstream DiT steps (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="downstream DiT seeds per arm (default: %(default)s)")
    p.add_argument("--samples", type=int, default=2, help="sampling seeds per prompt unit and template")
    p.add_argument("--no-downstream", action="store_true", help="VAE scores only")
    p.add_argument("--base-run", type=Path, default=None, help="an existing default toy REPA-E run to reuse")
    args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; known: {list(ARMS)}")
    return args


def tune(toy: Path, out: Path, arm: str, base_run: Path | None) -> Path:
    """The arm's joint tuning (resumed when interrupted) and its export (statistics from training images).

    Arms with the same overrides share one run (``steps-300`` is ``default`` at step 300); those
    without any use ``base_run`` when given (the ``make repae`` run, so the sweep does not repeat
    it), else ``<out>/default/repae``. An arm whose checkpoint step was pruned fails to export.
    """
    from common.checkpoint import read_latest
    from repae.demo import train
    from repae.export import export_e2e_vae

    overrides, tag = ARMS[arm]
    owner = next(name for name, (o, _) in ARMS.items() if o == overrides)  # arms of one recipe share a run
    run = (base_run or out / "default" / "repae") if not overrides else out / owner / "repae"
    vae = out / arm / "e2e-vae"
    if not (vae / "config.json").is_file():
        if not ((run / "latest").is_file() and read_latest(run) >= tag):
            # Train only as far as this arm needs: the learning rates are constant and the GAN ramp
            # counts steps, so a 300-step run is the 600-step run's first half, and a later arm of
            # the same recipe resumes it.
            train(toy, run, [*overrides, f"trainer.max_steps={tag}"])
        export_e2e_vae(run, vae, tag=str(tag))
    return vae


def vae_scores(toy: Path, vae: Path) -> dict[str, Any]:
    """PSNR on the validation shard and the normalisation check on training images."""
    import torch
    from diffusers import AutoencoderKL

    from common.images import psnr
    from common.latent_stats import check_normalisation
    from toyworld.world import load_images

    model = AutoencoderKL.from_pretrained(vae).eval()
    val, _ = load_images(sorted((toy / "shards").glob("val-*.tar")))
    x = torch.from_numpy(val[:512]).float() / 127.5 - 1.0  # (N, 3, H, W) uint8
    with torch.no_grad():
        rec = model.decode(model.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    train, _ = load_images(sorted((toy / "shards").glob("train-000000.tar")))
    t = torch.from_numpy(train).float() / 127.5 - 1.0
    check = check_normalisation(model, t)
    return {
        "psnr": float(psnr(x, rec).mean()),
        "latent_mean_max_abs": check["max_abs_mean"],
        "latent_std_max_error": check["max_abs_std_error"],
        "normalisation_ok": check["ok"],
    }


def downstream(toy: Path, out: Path, vaes: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """The toy DiT on every arm's VAE (and the original), scored at the last checkpoint."""
    from evaluation import study as st
    from evaluation.paired_stats import hierarchical_bootstrap, paired_difference

    arms = [
        st.Arm(name, str(st.TOY_T2I[0][1]), st.toy_arm_overrides(toy, "t2i", str(vae))) for name, vae in vaes.items()
    ]
    design = st.Study(
        kind="t2i",
        arms=arms,
        seeds=[DOWNSTREAM_SEED_BASE + k for k in range(args.seeds)],
        max_steps=args.steps,
        eval_every=args.steps,
        overrides=[],
        samples=args.samples,
        out=str(out / "downstream"),
    )
    st.check_study_folder(design, grow_arms=True)  # new arms may join; another length or seed count is refused
    st.train_inline(st.run_specs(design), design.max_steps)
    table = st.score_table(st.score_runs(toy, design, GUIDANCE, prompt_set="validation", seed=VALIDATION_SEED))
    result: dict[str, Any] = {}
    base = "original"
    for name in vaes:
        row: dict[str, Any] = {}
        for metric in ("shape", "joint", "color"):
            cube = table[metric][name][args.steps]
            row[metric] = hierarchical_bootstrap(cube, resamples=500)
            if name != base:
                row[f"{metric}_vs_original"] = paired_difference(table[metric][base][args.steps], cube, resamples=500)
        row["fd"] = float(np.mean(table["fd"][name][args.steps]))
        result[name] = row
    return result


def label(arm: str) -> str:
    if arm not in ARMS:
        return "the toy world's VAE"
    overrides, tag = ARMS[arm]
    return " ".join(overrides) + f" (step {tag})" if overrides else f"configs/repae/toy.yaml (step {tag})"


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    def ci(d: dict | None) -> str:
        return "—" if not d else f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    def diff(d: dict | None) -> str:
        return "—" if not d else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    lines = [
        "| arm | overrides | PSNR dB | max abs latent mean | max abs latent std-1 | shape | joint "
        "| joint vs original | toy FD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in rows.items():
        d = r.get("downstream", {})
        lines.append(
            f"| {arm} | {label(arm)} | {r['vae']['psnr']:.2f} | "
            f"{r['vae']['latent_mean_max_abs']:.3f} | {r['vae']['latent_std_max_error']:.3f} | "
            f"{ci(d.get('shape'))} | {ci(d.get('joint'))} | {diff(d.get('joint_vs_original'))} | "
            f"{d['fd']:.1f} |"
            if d
            else f"| {arm} | {label(arm)} | {r['vae']['psnr']:.2f} | "
            f"{r['vae']['latent_mean_max_abs']:.3f} | {r['vae']['latent_std_max_error']:.3f} | — | — | — | — |"
        )
    methods = {d["method"] for r in rows.values() for d in [r.get("downstream", {}).get("joint")] if d}
    lines.append("")
    lines.append(f"Intervals: 95%, {'; '.join(sorted(methods)) or 'none'}; validation prompts (training triples).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    toy, out = args.toy.resolve(), args.out.resolve()
    start = time.perf_counter()
    vaes = {"original": toy / "vae"}
    for arm in args.arms.split(","):
        t0 = time.perf_counter()
        vaes[arm] = tune(toy, out, arm, args.base_run.resolve() if args.base_run else None)
        print(f"[sweep] {arm}: tuned and exported ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = {arm: {"vae": vae_scores(toy, vae)} for arm, vae in vaes.items()}
    if not args.no_downstream:
        for arm, scores in downstream(toy, out, vaes, args).items():
            rows[arm]["downstream"] = scores
    record = {
        "arms": {a: label(a) for a in vaes},
        "downstream": None if args.no_downstream else {"steps": args.steps, "seeds": args.seeds, "guidance": GUIDANCE},
        "rows": rows,
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }
    write_json_atomic(out / "sweep.json", record, sort_keys=False)
    write_text_atomic(out / "sweep.md", markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
