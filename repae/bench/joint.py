"""Warm-step benchmark of the REPA-E joint step: ours against the reference formulation, interleaved.

    python -m repae.bench [-c configs/repae/toy.yaml] [--toy toy] [--steps 20] [--warmup 3]
                          [--out FILE.json] [key=value ...]

Why a tool and not the trainer's steps/s: deciding whether our joint step is faster than the
original's needs both formulations on the same weights, batches and random draws, timed
alternately on the same machine, with a check that they compute the same losses. What it does:

* builds our :class:`repae.train.JointTrainer` from the config (toy world by default), then the
  reference formulation (:mod:`repae.reference.joint_step`) on copies of its VAE, SiT and loss
  module (state dicts copied: identical weights), with its own three AdamW optimisers and EMA;
* forces ``loss.reference_faithful=true``: the published losses, which both formulations compute
  (our default fixes change the loss values, so they cannot be loss-checked against the original);
* runs repetition r on batch r for both variants, the order alternating every repetition; the
  first ``--warmup`` repetitions are untimed. Repetition r uses the trainer's generator of step r
  for both (posterior noise, time, noise, label dropout), so both see the same draws;
* times every step and its phases (encoders, VAE forward, draws, VAE step, discriminator step,
  SiT step, EMA, logging) on the real ``JointTrainer.train_step`` (its phase methods wrapped);
* checks the first step (identical weights, batch and draws): every loss, logit mean and gradient
  norm must agree within float rounding (``loss_check``);
* reports the speed-up as the ratio of median step times with a 95% paired bootstrap interval over
  the timed repetitions, the paired median and the min/min ratio, and the machine it ran on.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import write_json_atomic
from common.machine import machine_info

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "repae" / "toy.yaml"
PHASES = ("encoders", "vae_forward", "draws", "vae_step", "disc_step", "sit_step", "ema", "logging")
# What the loss check compares: every loss of the three updates, the logit means and gradient norms.
CHECKED = (
    "reconstruction_loss",
    "perceptual_loss",
    "kl_loss",
    "gan_loss",
    "weighted_gan_loss",
    "vae_align_loss",
    "vae_loss",
    "grad_norm_vae",
    "d_loss",
    "logits_real",
    "logits_fake",
    "grad_norm_disc",
    "denoising_loss",
    "proj_loss",
    "sit_loss",
    "grad_norm_sit",
)
# fp32: u = 6e-8; the formulations reorder reductions over up to ~1e5 terms (per-sample vs batched
# REPA, float64 vs float32 BatchNorm moments, two discriminator passes vs one per side), so
# differences of ~sqrt(n) u = 2e-5 relative at worst are rounding; any change in what is computed
# (LPIPS range, a loss term, a draw) moves a loss by >1e-3. Half precision rounds at ~4e-3.
TOLERANCE = {"fp32": {"rel": 2e-5, "abs": 1e-7}, "half": {"rel": 2e-2, "abs": 1e-4}}
GOAL_SPEEDUP = 1.3
BOOTSTRAP_RESAMPLES = 2000


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
class PhaseClock:
    """Wall time per named phase of one step; on CUDA each boundary synchronises."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def reset(self) -> None:
        self.times = {}


class Timed:
    """A callable (a bound method or a module) whose calls are timed as one phase; other attributes pass through."""

    def __init__(self, clock: PhaseClock, name: str, target: Any) -> None:
        self._clock, self._name, self._target = clock, name, target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._clock(self._name):
            return self._target(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target, attr)


@dataclass
class Variant:
    """One formulation: how to run a step, and what its steps measured."""

    name: str
    label: str
    run: Callable[[dict[str, Any], int], dict[str, float]]
    clock: PhaseClock
    records: list[dict[str, float]] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)

    def timed_step(self, batch: dict[str, Any], index: int) -> dict[str, float]:
        """Run one step; phase times plus ``total`` (the whole step) and ``other`` (the rest)."""
        self.clock.reset()
        self.clock.sync()
        t0 = time.perf_counter()
        losses = self.run(batch, index)
        self.clock.sync()
        total = time.perf_counter() - t0
        self.losses.append(losses)
        times = {p: self.clock.times.get(p, 0.0) for p in PHASES}
        times["other"] = max(total - sum(times.values()), 0.0)
        times["total"] = total
        return times


# --------------------------------------------------------------------------------------------
# The two formulations
# --------------------------------------------------------------------------------------------
def ours_variant(trainer: Any) -> Variant:
    """Our ``JointTrainer.train_step`` itself, its phase methods wrapped, plus the fit loop's logging."""
    from repae.train import mean_over_ranks

    clock = PhaseClock(trainer.device)
    trainer.batch_inputs = Timed(clock, "encoders", trainer.batch_inputs)
    trainer.vae_train = Timed(clock, "vae_forward", trainer.vae_train)
    trainer._time_and_noise = Timed(clock, "draws", trainer._time_and_noise)
    trainer.vae_phase = Timed(clock, "vae_step", trainer.vae_phase)
    trainer.disc_phase = Timed(clock, "disc_step", trainer.disc_phase)
    trainer.sit_phase = Timed(clock, "sit_step", trainer.sit_phase)
    trainer.ema.update = Timed(clock, "ema", trainer.ema.update)
    window: dict[str, Any] = {}
    every = max(int(trainer.cfg.trainer.logging_steps), 1)

    def run(batch: dict[str, Any], index: int) -> dict[str, float]:
        trainer.step = index
        metrics = trainer.train_step(batch)
        with clock("logging"):  # what JointTrainer.fit does per step: a device-side window, reduced every N
            for k, v in metrics.items():
                window[k] = window[k] + v if k in window else v
            if (index + 1) % every == 0:
                mean_over_ranks({k: v / every for k, v in window.items()}, trainer.device)
                window.clear()
        return {k: float(v) for k, v in metrics.items()}

    return Variant("ours", "repae.train.JointTrainer.train_step", run, clock)


def reference_variant(trainer: Any) -> Variant:
    """The reference formulation on copies of the trainer's modules (same weights, fresh optimisers)."""
    from repae.reference.joint_step import ReferenceJointStep, ReferenceRecipe, StepDraws

    cfg, device = trainer.cfg, trainer.device
    vae, sit, loss_module = (_copy_module(m) for m in (trainer.vae, trainer.sit, trainer.loss_fn))
    o = cfg.optimizer
    common = {"betas": tuple(o.betas), "weight_decay": o.weight_decay, "eps": o.eps}
    lrs = {"sit": o.sit_lr, "vae": o.vae_lr, "disc": o.disc_lr}
    step = ReferenceJointStep(
        vae=vae,
        sit=sit,
        loss_module=loss_module,
        encoders=trainer.encoders,
        recipe=ReferenceRecipe.from_config(cfg),
        optimizer_kwargs={k: {"lr": lr, **common} for k, lr in lrs.items()},
        autocast=trainer.precision.autocast,
    )
    clock = PhaseClock(device)
    ours_loss = trainer.loss_fn

    def run(batch: dict[str, Any], index: int) -> dict[str, float]:
        trainer.step = index  # the trainer's generator of this step: the draws ours makes
        draws = StepDraws(
            generator=trainer.generator(),
            gan_factor=ours_loss.discriminator_factor * ours_loss.gan_ramp(index),
            disc_factor=ours_loss.discriminator_factor if ours_loss.discriminator_active(index) else 0.0,
        )
        with clock("encoders"):
            images = batch["images"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
        return step.step(images, labels, draws, clock)

    return Variant("reference", "repae.reference.joint_step (docs/reference-facts.md, REPAE-5.2)", run, clock)


def _copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with the state dict copied in again (strict): the same weights, explicitly."""
    twin = copy.deepcopy(module)
    twin.load_state_dict(module.state_dict(), strict=True)
    return twin


def run_interleaved(variants: list[Variant], batches: Iterator[dict[str, Any]], warmup: int, steps: int) -> None:
    """Repetition r: every variant runs step r on batch r, the order alternating; warm-up untimed."""
    for rep in range(warmup + steps):
        batch = next(batches)
        order = variants if rep % 2 == 0 else variants[::-1]
        for v in order:
            times = v.timed_step(batch, rep)
            if rep >= warmup:
                v.records.append(times)


# --------------------------------------------------------------------------------------------
# Statistics and the report
# --------------------------------------------------------------------------------------------
def speedup(reference: list[float], ours: list[float], seed: int = 0) -> dict[str, Any]:
    """median(reference) / median(ours), with a paired percentile bootstrap over repetitions.

    Resampling whole repetitions keeps the pairing (both variants of one repetition ran back to
    back, so they saw the same machine load).
    """
    ref, our = np.asarray(reference), np.asarray(ours)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(ref), size=(BOOTSTRAP_RESAMPLES, len(ref)))
    boot = np.median(ref[picks], axis=1) / np.median(our[picks], axis=1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return {
        "ratio_of_medians": float(np.median(ref) / np.median(our)),
        "interval_95": [float(low), float(high)],
        "interval_method": f"paired percentile bootstrap over repetitions, {BOOTSTRAP_RESAMPLES} resamples",
        "paired_median": float(np.median(ref / our)),
        "min_over_min": float(ref.min() / our.min()),
        "total_time": float(ref.sum() / our.sum()),
    }


def summarize(v: Variant, batch: int) -> dict[str, Any]:
    """Step times (median: robust to load spikes; mean; min; all), per-phase median and mean, first losses."""
    steps = [r["total"] for r in v.records]
    med = statistics.median(steps)
    phases = {
        p: {"median_s": statistics.median(r[p] for r in v.records), "mean_s": statistics.fmean(r[p] for r in v.records)}
        for p in (*PHASES, "other")
    }
    return {
        "label": v.label,
        "step_s_median": med,
        "step_s_mean": statistics.fmean(steps),
        "step_s_min": min(steps),
        "step_s": [round(s, 5) for s in steps],
        "images_per_s": batch / med,
        "phases": phases,
        "first_step_losses": v.losses[0],
    }


def loss_check(ours: Variant, reference: Variant, precision: str) -> dict[str, Any]:
    """First step (identical weights, batch and draws): every checked value must agree to rounding.

    Later steps start from weights that differ by rounding, so their differences are reported
    (``max_rel_diff_all_steps``) but not checked.
    """
    tol = TOLERANCE["fp32" if precision == "no" else "half"]

    def diffs(a: dict[str, float], b: dict[str, float]) -> dict[str, dict[str, float]]:
        out = {}
        for k in CHECKED:
            if k in a and k in b:
                d = abs(a[k] - b[k])
                out[k] = {"ours": a[k], "reference": b[k], "abs_diff": d, "rel_diff": d / max(abs(b[k]), 1e-30)}
        return out

    first = diffs(ours.losses[0], reference.losses[0])
    missing = [k for k in CHECKED if k not in first]
    agree = not missing and all(d["abs_diff"] <= tol["abs"] + tol["rel"] * abs(d["reference"]) for d in first.values())
    later = [diffs(a, b) for a, b in zip(ours.losses[1:], reference.losses[1:])]
    return {
        "step": 0,
        "tolerance": tol,
        "rule": "|ours - reference| <= abs + rel * |reference|, every checked value of the first step",
        "values": first,
        "missing": missing,
        "max_rel_diff": max(d["rel_diff"] for d in first.values()) if first else None,
        "max_rel_diff_all_steps": max((d["rel_diff"] for s in later for d in s.values()), default=None),
        "agree": agree,
    }


def compare(ours: Variant, reference: Variant) -> dict[str, Any]:
    """The headline speed-up and, per phase, the mean time each variant spent (means add up to the step)."""
    ref_steps, our_steps = ([r["total"] for r in v.records] for v in (reference, ours))
    phase = {}
    for p in (*PHASES, "other"):
        r, o = (statistics.fmean(rec[p] for rec in v.records) for v in (reference, ours))
        phase[p] = {"reference_mean_s": r, "ours_mean_s": o, "saved_s": r - o}
    return {"speedup_ours_vs_reference": speedup(ref_steps, our_steps), "phases": phase}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def settings(args: argparse.Namespace, cfg: Any, trainer: Any) -> dict[str, Any]:
    """What was run: config, overrides, sizes, precision, threads (so a number can be reproduced)."""
    return {
        "config": str(args.config),
        "toy": None if args.toy == "none" else str(args.toy),
        "overrides": list(args.overrides),
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "global_batch_size": cfg.data.global_batch_size,
        "resolution": cfg.data.resolution,
        "latent_shape": list(trainer.latent_shape),
        "precision": cfg.trainer.mixed_precision,
        "sit": {k: trainer.sit_config[k] for k in ("hidden_size", "depth", "num_heads", "patch_size", "encoder_depth")},
        "parameters": {
            "sit": _count(trainer.sit),
            "vae": _count(trainer.vae),
            "discriminator": _count(trainer.loss_fn.discriminator),
            "lpips": 0 if trainer.loss_fn.lpips is None else _count(trainer.loss_fn.lpips),
        },
        "perceptual_net": cfg.loss.perceptual_net if cfg.loss.perceptual_weight > 0 else None,
        "reference_faithful": cfg.loss.reference_faithful,
    }


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m repae.bench",
        description=(
            "Time warm REPA-E joint steps (VAE + discriminator + SiT + EMA) of our trainer against the reference "
            "formulation of the same step (repae.reference.joint_step), on the same weights, batches and random "
            "draws, interleaved. Checks that both give the same losses on the first step, reports the ratio of "
            "median step times with a 95% bootstrap interval, per-phase times and the machine. Exit status 1 "
            "when the loss check fails. Runs loss.reference_faithful=true (the published losses) in both."
        ),
        epilog="example: python -m repae.bench --steps 20 --warmup 3 --out output/bench/repae-toy.json",
    )
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, help="REPA-E YAML (default: %(default)s)")
    p.add_argument(
        "--toy",
        default="toy",
        help="toy world folder the config is pointed at (VAE, encoder, shards; default: %(default)s); "
        "'none' uses the config's own paths",
    )
    p.add_argument("--steps", type=int, default=10, help="timed repetitions, each one step of both variants")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (allocator, caches; >= 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: one per core); 1 on a busy machine"
    )
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.global_batch_size=16")
    args = p.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the loss check reads the first, untimed, step)")
    if any(o.split("=", 1)[0] == "loss.reference_faithful" for o in args.overrides):
        p.error("loss.reference_faithful is fixed to true: the reference formulation computes the published losses")
    return args


def load_config(args: argparse.Namespace, run_dir: Path) -> Any:
    """The config with the toy world, a throw-away run folder, faithful losses and the user's overrides."""
    from repae.config import load_repae_config
    from repae.demo import toy_overrides

    base = [] if args.toy == "none" else toy_overrides(Path(args.toy), run_dir)
    forced = [f"trainer.checkpoint_dir={run_dir}", "trainer.sampling_steps=0", "loss.reference_faithful=true"]
    return load_repae_config(args.config, [*base, *args.overrides, *forced])


def pick_device(name: str | None) -> torch.device:
    """The asked device, else the current GPU, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from common.distributed import DistEnv
    from repae.train import JointTrainer

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="repae-bench-") as tmp:
        cfg = load_config(args, Path(tmp) / "run")
        machine = machine_info(device)
        trainer = JointTrainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=device))
        variants = [reference_variant(trainer), ours_variant(trainer)]  # copies taken before any step
        run_interleaved(variants, trainer.data_iter, args.warmup, args.steps)
        machine["load_average_end"] = list(os.getloadavg())
        reference, ours = variants
        comparison = compare(ours, reference)
        return {
            "tool": "repae.bench",
            "machine": machine,
            "settings": settings(args, cfg, trainer),
            "variants": {v.name: summarize(v, cfg.data.global_batch_size) for v in variants},
            "comparison": comparison,
            "loss_check": loss_check(ours, reference, cfg.trainer.mixed_precision),
            "goal": goal(comparison["speedup_ours_vs_reference"]),
        }


def goal(s: dict[str, Any]) -> dict[str, Any]:
    """The issue's target (ours >= 1.3x the reference), judged by the ratio and by the interval's low end."""
    return {
        "speedup_at_least": GOAL_SPEEDUP,
        "met_by_ratio": s["ratio_of_medians"] >= GOAL_SPEEDUP,
        "met_by_interval_low": s["interval_95"][0] >= GOAL_SPEEDUP,
    }


def print_summary(report: dict[str, Any], out: Any = sys.stdout) -> None:
    m, s = report["machine"], report["settings"]
    print(
        f"machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"{m['device']}, load {m['load_average_start'][0]:.2f} -> {m['load_average_end'][0]:.2f}",
        file=out,
    )
    print(
        f"batch {s['global_batch_size']} at {s['resolution']} px, latents {s['latent_shape']}, SiT {s['sit']}, "
        f"{s['steps']} timed steps after {s['warmup']} warm-up",
        file=out,
    )
    header = "variant".ljust(10) + "step_s".rjust(9) + "".join(p.rjust(12) for p in (*PHASES, "other"))
    print(header, file=out)
    for name, v in report["variants"].items():
        cells = "".join(f"{v['phases'][p]['median_s']:12.4f}" for p in (*PHASES, "other"))
        print(f"{name:<10}{v['step_s_median']:9.4f}{cells}", file=out)
    sp = report["comparison"]["speedup_ours_vs_reference"]
    lo, hi = sp["interval_95"]
    print(
        f"speed-up ours vs reference: {sp['ratio_of_medians']:.3f}x (95% interval {lo:.3f}-{hi:.3f}; paired median "
        f"{sp['paired_median']:.3f}x, min/min {sp['min_over_min']:.3f}x); goal {GOAL_SPEEDUP}x "
        f"{'met' if report['goal']['met_by_ratio'] else 'not met'}",
        file=out,
    )
    lc = report["loss_check"]
    verdict = "agree" if lc["agree"] else "DISAGREE"
    print(f"loss check (first step): {verdict}, max relative difference {lc['max_rel_diff']:.2e}", file=out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark must not start a download
    args = parse_args(argv)
    report = run(args)
    print_summary(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, report, sort_keys=False)
    return report
