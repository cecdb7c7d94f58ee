"""A paired, multi-seed study: every arm x seed trained alike, every checkpoint scored alike, with intervals.

    python -m evaluation.study --toy toy --out output/study          # what `make study` runs: both toy pairs
    python -m evaluation.study --toy toy --out /tmp/s --seeds 2 --steps 40 --eval-every 20 --samples 1
    python -m evaluation.study --toy toy --kind t2i --arm original=configs/e2e-vae/toy.yaml \\
        --arm e2e=configs/e2e-vae/toy-e2e.yaml --seeds 3 --eval-every 250 optimizer.lr=5e-4
    # the paired 3B study on SLURM (training through submitit, one job per arm x seed):
    python -m evaluation.study --kind t2i --executor slurm --nodes 4 --gpus-per-node 8 --time 48:00:00 \\
        --arm fluxvae=configs/e2e-vae/sa-w2048-3b-res256-fluxvae-fulldataset-500k.yaml \\
        --arm e2efluxvae=configs/e2e-vae/sa-w2048-3b-res256-e2efluxvae-fulldataset-500k.yaml \\
        --seeds 3 --eval-every 50000 --out /shared/studies/flux --train-only

What a study is. The first ``--arm`` is the baseline (the original VAE), the second its twin
(the E2E-VAE); further arms are each compared with the same baseline (a study across tokenizer
families: ``--toy DIR --families`` runs the toy VAE, its E2E twin, the toy FLUX.2 VAE and the toy
RAE, docs/tokenizers.md; results per comparison in ``<out>/<arm>-vs-<baseline>/``). Seed k of
every arm runs with ``trainer.seed=k`` — initialisation, data order and
noise change with it, everything else stays identical — and keeps a checkpoint every
``--eval-every`` steps (``trainer.checkpointing_steps``; none is pruned). ``key=value`` overrides
apply to every run. Runs live in ``<out>/<arm>/seed<k>``; the study folder records its
specification and refuses to resume with another one.

Toy world (``--toy``). Without ``--arm`` the two toy pairs run one after another: the
text-to-image pair (``configs/e2e-vae/toy.yaml`` vs ``toy-e2e.yaml``, ``--kind t2i``) in
``<out>/t2i`` and the ImageNet-stage pair (``configs/repae/toy-ldm.yaml`` on ``toy/vae`` vs
``toy/e2e-vae``, class-conditional SiT + REPA on a frozen VAE, ``--kind ldm``) in ``<out>/ldm``;
``toy/e2e-vae`` is made first by ``python -m repae.demo`` when missing. Each checkpoint is scored by
:mod:`evaluation.toy_study_eval`: t2i: all held-out triples x backgrounds x caption templates x
``--samples`` sampling seeds; ldm: all 24 classes x ``--samples``; attribute accuracies from the toy
scorer and a toy Fréchet distance on its features. The guidance scale is chosen once per study, on
the *validation* set (the world's guidance prompts, training triples; for ldm another sampling
seed), at the last checkpoint of every run, and then used for every reported image.

Statistics (:mod:`evaluation.paired_stats`): per metric and checkpoint the mean over seeds with a
95% interval (bootstrap over seeds and prompts, widened to a Student-t interval over seeds when
there are few), the paired difference twin - baseline with its interval and a verdict, the area
under the score-vs-step curve and the steps to reach 90% of the best arm's final score.
``<out>/results.json`` holds them, ``<out>/report/index.html`` shows them.

Cluster. ``--executor slurm`` (or ``local``: submitit on this machine) submits every arm x seed
through :mod:`fusedit.tools.sweep` (requeue on preemption, resume from ``latest``) and waits. Toy
scoring then runs here; real configs are trained with ``--train-only`` and evaluated per kept
checkpoint by the benchmark samplers (``evaluation/sample_*_ckpt.py``) + ``evaluation/fid.py``.
Every stage resumes: finished runs are not restarted and scored checkpoints are not rescored.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.files import write_json_atomic
from common.lifecycle import UsageExit

ROOT = Path(__file__).resolve().parents[1]
TOY_T2I = (
    ("original", ROOT / "configs/e2e-vae/toy.yaml", "vae"),
    ("e2e", ROOT / "configs/e2e-vae/toy-e2e.yaml", "e2e-vae"),
)
# The study across tokenizer families (--families): the baseline and its twin, then one toy tokenizer of
# each other family (toyworld.families; dataset_download.py --toy DIR --families builds them).
TOY_FAMILIES = (
    *TOY_T2I,
    ("flux2", ROOT / "configs/e2e-vae/toy-flux2.yaml", "flux2-vae"),
    ("rae", ROOT / "configs/e2e-vae/toy-rae.yaml", "rae"),
)
TOY_LDM = (
    ("original", ROOT / "configs/repae/toy-ldm.yaml", "vae"),
    ("e2e", ROOT / "configs/repae/toy-ldm.yaml", "e2e-vae"),
)
ENTRY = {"t2i": (), "ldm": ("-m", "repae.train_ldm")}
GUIDANCE_GRID = {"t2i": (1.0, 1.5, 2.0, 3.0), "ldm": (1.0, 1.5, 2.0, 3.0)}
EVAL_FILE = "study_eval.json"
# Toy default lengths, chosen so `make study` (both pairs, 3 seeds) fits 45 minutes on 2 cores.
TOY_DEFAULTS = {
    # 450 steps, not 600: both pairs x 3 seeds must fit in 45 minutes on an idle 2-core machine
    # (600 steps took 48.8). Every 150 steps keeps three points on each curve.
    "t2i": {"steps": 450, "eval_every": 150, "samples": 4},  # 36 units x 4 templates x 4 = 576 images
    "ldm": {"steps": 450, "eval_every": 150, "samples": 8},  # 24 classes x 8 = 192 images
}


@dataclass
class Arm:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Study:
    """Everything that defines a study; recorded in ``<out>/study.json``."""

    kind: str
    arms: list[Arm]
    seeds: list[int]
    max_steps: int
    eval_every: int
    overrides: list[str]
    samples: int
    out: str

    def run_dir(self, arm: str, seed: int) -> Path:
        return Path(self.out) / arm / f"seed{seed}"

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("out")
        return data


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.study",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to compare")
    what.add_argument(
        "--arm", action="append", default=[], metavar="NAME=CONFIG", help="an arm; the first is the baseline"
    )
    what.add_argument("--kind", choices=("t2i", "ldm"), default=None, help="trainer: train.py (t2i) or repae.train_ldm")
    what.add_argument("--toy", type=Path, default=None, help="toy world folder: toy pairs and toy scoring")
    what.add_argument(
        "--families",
        action="store_true",
        help="with --toy: the text-to-image study across tokenizer families (toy VAE, its E2E twin, toy FLUX.2 "
        "VAE, toy RAE), each compared with the toy VAE",
    )
    what.add_argument("--seeds", type=int, default=3, help="training seeds per arm (default: %(default)s)")
    what.add_argument(
        "--steps", type=int, default=None, help="training steps of every run (default: toy 450 / the config's)"
    )
    what.add_argument("--eval-every", type=int, default=None, help="checkpoint (and score) every N steps")
    what.add_argument("--samples", type=int, default=None, help="sampling seeds per prompt unit (toy scoring)")
    what.add_argument("--guidance", type=float, default=None, help="fixed CFG scale (default: chosen on validation)")
    what.add_argument("--out", type=Path, default=Path("output/study"), help="study folder (runs, results, report)")
    what.add_argument("--repae-run", type=Path, default=Path("output/repae/toy"), help="REPA-E run made when needed")
    what.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    where = p.add_argument_group("where it runs")
    where.add_argument(
        "--executor",
        choices=("inline", "local", "slurm"),
        default="inline",
        help="inline: one run after another here; local/slurm: submitit jobs (fusedit.tools.sweep)",
    )
    where.add_argument("--nodes", type=int, default=1, help="SLURM nodes per run")
    where.add_argument("--gpus-per-node", type=int, default=1, help="processes per node (torchrun when > 1)")
    where.add_argument("--partition", default=None)
    where.add_argument("--account", default=None)
    where.add_argument("--time", default="24:00:00", help="per-job limit: minutes, HH:MM:SS or D-HH:MM:SS")
    where.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON for train.py")
    where.add_argument("--train-only", action="store_true", help="train (or submit) and stop; score later")
    where.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    fid = p.add_argument_group("scoring real configs (no --toy): benchmark sampler + FID per kept checkpoint")
    fid.add_argument("--fid-bench", default="mjhq", choices=("mjhq", "coco", "genaibench"), help="prompt set")
    fid.add_argument("--fid-real", default=None, help="folder of real images (the FID reference)")
    fid.add_argument("--fid-real-list", default=None, help="text file of paths under --fid-real to use")
    fid.add_argument("--fid-prompts", default=None, help="prompt file (default: the benchmark's, prompts/)")
    fid.add_argument("--fid-samples", type=int, default=None, help="first N prompts (default: all)")
    fid.add_argument(
        "--fid-resolution", type=int, default=None, help="FID resolution (default: the run's sample.height)"
    )
    fid.add_argument("--fid-extractor", default=None, help="module:function features (default: InceptionV3)")
    fid.add_argument("--eval-gpus", type=int, default=1, help="processes (GPUs) per scoring job")
    args = p.parse_args(argv)
    for flag in ("seeds", "steps", "eval_every", "samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.arm and len(args.arm) < 2:
        p.error(f"--arm: a study needs a baseline and at least one arm to compare with it, got {len(args.arm)}")
    if args.families and (args.toy is None or args.arm or args.kind == "ldm"):
        p.error("--families is the toy text-to-image study: give --toy, and no --arm or --kind ldm")
    if args.arm and args.kind is None:
        p.error("--arm needs --kind t2i or --kind ldm")
    if not args.arm and args.toy is None:
        p.error("give two --arm NAME=CONFIG, or --toy for the toy pairs")
    if args.toy is None and not (args.train_only or args.dry_run):
        if args.fid_real is None:
            p.error("scoring real configs needs --fid-real (the real images), or --train-only")
        if args.guidance is None:
            p.error("scoring real configs needs --guidance, chosen beforehand on a validation prompt set")
        if args.kind == "ldm":
            p.error(
                "--kind ldm on real configs: train with --train-only, score with repae.generate + evaluation/fid.py"
            )
    for item in args.overrides:
        if "=" not in item:
            p.error(f"override {item!r} is not key=value")
    return args


def parse_arm(text: str) -> tuple[str, Path]:
    name, sep, config = text.partition("=")
    if not sep or not name or not config:
        raise UsageExit(f"--arm {text!r}: expected NAME=CONFIG")
    if not Path(config).is_file():
        raise UsageExit(f"--arm {name}: config {config} not found")
    return name, Path(config).resolve()  # runs start in the repository root, wherever this was called


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def config_max_steps(kind: str, config: Path) -> int:
    if kind == "t2i":
        from fusedit.config import load_config

        return int(load_config(config).trainer.max_steps)
    from common.config import merge_structured
    from repae.config import ALIASES, RepaeConfig

    # Merged (extends, aliases) but not validated: the study needs the length, not the data.
    return int(merge_structured(RepaeConfig, config, [], aliases=ALIASES, notify=None).trainer.max_steps)


def seed_overrides(study: Study, arm: Arm, seed: int) -> list[str]:
    """What differs between the runs of a study: the seed and the folder; the rest is the study's.

    When the study shortens a text-to-image config (``--steps`` below its ``trainer.max_steps``,
    as the toy studies do), logging and warm-up shrink in proportion, so a short run keeps the full
    run's shape; a study at the config's own length changes neither.
    """
    run = study.run_dir(arm.name, seed)
    keep = study.max_steps // study.eval_every + 8  # room for stop checkpoints off the grid
    out = [
        f"trainer.seed={seed}",
        f"trainer.max_steps={study.max_steps}",
        f"trainer.checkpointing_steps={study.eval_every}",
        f"trainer.checkpoints_total_limit={keep}",
        f"trainer.sampling_steps={study.max_steps}",
        f"trainer.run={arm.name}-seed{seed}",
        f"trainer.checkpoint_dir={run}",
    ]
    if study.kind == "t2i" and study.max_steps < config_max_steps(study.kind, Path(arm.config)):
        out += [f"trainer.logging_steps={max(1, study.max_steps // 40)}"]
        out += [f"lr_scheduler.num_warmup_steps={max(1, study.max_steps // 25)}"]
    return out


def scored_steps(study: Study, run: Path) -> list[int]:
    """The kept checkpoints on the study's grid (multiples of ``eval_every``, and the last step).

    A stop signal saves an extra checkpoint wherever training was; it is for resuming, not scoring.
    """
    return [s for s in checkpoint_steps(run) if s % study.eval_every == 0 or s == study.max_steps]


def run_specs(study: Study) -> list:
    """One :class:`fusedit.tools.sweep.RunSpec` per arm x seed (what inline and submitit both launch)."""
    from common.jobs import RunSpec

    specs = []
    for arm in study.arms:
        for seed in study.seeds:
            overrides = [*arm.overrides, *study.overrides, *seed_overrides(study, arm, seed)]
            specs.append(
                RunSpec(
                    name=f"{arm.name}-seed{seed}",
                    config=arm.config,
                    overrides=tuple(overrides),
                    checkpoint_dir=str(study.run_dir(arm.name, seed)),
                    entry=ENTRY[study.kind],
                )
            )
    return specs


def latest_step(run: Path) -> int | None:
    from common.checkpoint import read_latest

    return read_latest(run) if (run / "latest").is_file() else None


def finished(spec, max_steps: int) -> bool:
    done = latest_step(Path(spec.checkpoint_dir))
    return done is not None and done >= max_steps


def train_inline(specs: list, max_steps: int, args: argparse.Namespace | None = None) -> None:
    """One run after another, each a subprocess exactly as a user launches it; finished runs are skipped.

    The command is the submitit job's (plain python, or torchrun with ``--gpus-per-node`` > 1).
    """
    from common.jobs import make_job

    for i, spec in enumerate(specs, 1):
        if finished(spec, max_steps):
            print(f"[{i}/{len(specs)}] {spec.name}: trained to step {max_steps}, not restarted", flush=True)
            continue
        cmd = make_job(spec, _settings(args, local=True)).command()
        print(f"[{i}/{len(specs)}] {spec.name}\n$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


def _settings(args: argparse.Namespace | None, local: bool = False):
    from common.jobs import Settings, parse_time

    if args is None:
        return Settings(executor="local", gpus_per_node=1)
    return Settings(
        executor="local" if local else args.executor,
        nodes=1 if local else args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        account=args.account,
        time_min=parse_time(args.time),
        deepspeed_config=args.deepspeed_config,
    )


def active_job(spec) -> str | None:
    """The id of this run's earlier submission when it is still queued or running (then not resubmitted).

    ``<run>/submitted.json`` records every submission; SLURM is asked through ``squeue``, a local
    job (submitit's local executor: the id is a pid) through the process table.
    """
    record = Path(spec.checkpoint_dir) / "submitted.json"
    if not record.is_file():
        return None
    job = json.loads(record.read_text())
    if job["executor"] == "slurm":
        state = subprocess.run(["squeue", "-h", "-j", job["job_id"]], capture_output=True, text=True)
        return job["job_id"] if state.returncode == 0 and state.stdout.strip() else None
    import psutil

    return job["job_id"] if psutil.pid_exists(int(job["job_id"])) else None


def train_submitit(specs: list, max_steps: int, args: argparse.Namespace) -> None:
    """Submit the unfinished runs through the sweep tool (SLURM or submitit's local executor) and wait.

    SLURM jobs are all submitted at once; local ones one after another (they share this machine's
    devices). A run whose earlier job is still queued or running is not submitted again: rerunning
    the command after the driver died waits for nothing and submits only what is missing.
    """
    from common.jobs import submit, wait_all

    todo = []
    for spec in specs:
        if finished(spec, max_steps):
            continue
        running = active_job(spec)
        if running:
            print(f"{spec.name}: job {running} still queued or running; not resubmitted", flush=True)
        else:
            todo.append(spec)
    if not todo:
        print("every run is trained or still in a job of an earlier submission", flush=True)
        return
    settings = _settings(args)
    groups = [todo] if args.executor == "slurm" else [[spec] for spec in todo]
    failed = 0
    for group in groups:
        submitted = submit(group, settings)
        for spec, job in submitted:
            record = {"job_id": str(job.job_id), "executor": args.executor}
            write_json_atomic(Path(spec.checkpoint_dir) / "submitted.json", record)
            print(f"submitted {spec.name}  job={job.job_id}  logs {job.paths.stdout}", flush=True)
        failed += wait_all(submitted)
    if failed:
        raise SystemExit("some runs failed; fix them and run the same command again (finished runs are kept)")


# --------------------------------------------------------------------------------------------
# Study folder
# --------------------------------------------------------------------------------------------
def check_study_folder(study: Study, write: bool = True, grow_arms: bool = False) -> None:
    """Refuse to resume a study folder made with another specification: its runs would mix two designs.

    ``grow_arms`` lets a sweep add arms to a folder (each arm is compared with the same baseline,
    so a new arm changes no earlier run): the rest of the design must match, an arm already there
    must be unchanged, and the record keeps every arm ever run.
    """
    out = Path(study.out)
    record = out / "study.json"
    current = study.record()
    if record.is_file():
        previous = json.loads(record.read_text())
        if grow_arms:
            before = {a["name"]: a for a in previous.get("arms", [])}
            changed_arms = [a["name"] for a in current["arms"] if a["name"] in before and before[a["name"]] != a]
            if changed_arms:
                raise UsageExit(f"{out} holds arms {changed_arms} with other settings: pick another --out")
            merged = [*before.values(), *(a for a in current["arms"] if a["name"] not in before)]
            current, previous = {**current, "arms": merged}, {**previous, "arms": merged}  # arms compared above
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise UsageExit(
                f"{out} holds another study (differs in {', '.join(changed)}): pick another --out or delete it"
            )
    if write:  # a dry run checks but leaves no trace
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, current, sort_keys=False)


def ensure_e2e_vae(toy: Path, repae_run: Path) -> None:
    """Run the toy REPA-E stage when ``<toy>/e2e-vae`` is missing (it exports the folder last)."""
    if (toy / "e2e-vae" / "config.json").is_file():
        return
    cmd = [sys.executable, "-m", "repae.demo", "--toy", str(toy), "--run", str(repae_run)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


# The text-to-image recipe the toy study was measured with (docs/studies.md).
# configs/e2e-vae/toy.yaml has since become the demo's recipe (batch 32, linear decay, EMA 0.99, shift 1) to
# fit its 10 minutes on the pinned numeric path (docs/numerics.md); the study keeps its own.
TOY_T2I_RECIPE = (
    "data.batch_size_per_gpu=64",
    "lr_scheduler.name=constant_with_warmup",
    "ema.decay=0.995",
    "noise_scheduler.shift=3.0",
)


def ensure_families(toy: Path) -> None:
    """Build the toy FLUX.2 VAE and toy RAE into the world when missing (toyworld.families)."""
    from toyworld.families import build_toy_families

    build_toy_families(toy)


def toy_arm_overrides(toy: Path, kind: str, vae_folder: str) -> list[str]:
    """Point a toy config at the world folder wherever it lives, with this arm's VAE."""
    if kind == "t2i":
        from fusedit.tools.demo import toy_overrides

        return [*toy_overrides(toy, vae_folder=vae_folder), *TOY_T2I_RECIPE]
    from repae.demo import toy_overrides as repae_toy_overrides

    vae = f"vae.pretrained_model_name_or_path={toy / vae_folder}"
    base = repae_toy_overrides(toy, Path(ROOT))  # its trainer.* keys are the study's to set
    return [
        vae if o.startswith("vae.pretrained_model_name_or_path=") else o for o in base if not o.startswith("trainer.")
    ]


def toy_study(toy: Path, kind: str, args: argparse.Namespace, out: Path, table: tuple | None = None) -> Study:
    defaults = TOY_DEFAULTS[kind]
    table = table or (TOY_T2I if kind == "t2i" else TOY_LDM)
    arms = [Arm(name, str(config), toy_arm_overrides(toy, kind, folder)) for name, config, folder in table]
    return Study(
        kind=kind,
        arms=arms,
        seeds=list(range(args.seeds)),
        max_steps=args.steps or defaults["steps"],
        eval_every=min(args.eval_every or defaults["eval_every"], args.steps or defaults["steps"]),
        overrides=list(args.overrides),
        samples=args.samples or defaults["samples"],
        out=str(out),
    )


def config_study(args: argparse.Namespace) -> Study:
    arms = [Arm(name, str(config)) for name, config in map(parse_arm, args.arm)]
    steps = args.steps or config_max_steps(args.kind, Path(arms[0].config))
    return Study(
        kind=args.kind,
        arms=arms,
        seeds=list(range(args.seeds)),
        max_steps=steps,
        eval_every=min(args.eval_every or steps, steps),
        overrides=list(args.overrides),
        samples=args.samples or 4,
        out=str(args.out.resolve()),
    )


# --------------------------------------------------------------------------------------------
# Scoring (toy)
# --------------------------------------------------------------------------------------------
def choose_guidance(toy: Path, study: Study, fixed: float | None) -> dict[str, Any]:
    """One CFG scale for every arm and checkpoint, chosen on the validation set at the last checkpoints.

    Criterion: joint accuracy averaged over every run of every arm (each arm weighs the same), so
    the choice favours no tokenizer. Text-to-image never looks at the reported prompts; a
    class-conditional model has only its classes, so there the selection differs by sampling seed. Ties go to the
    smaller scale. Cached in ``<out>/guidance.json``.
    """
    from evaluation.toy_study_eval import selection_scores

    path = Path(study.out) / "guidance.json"
    if fixed is not None:
        return {"chosen": fixed, "by": "--guidance"}
    if path.is_file():
        return json.loads(path.read_text())
    grid = GUIDANCE_GRID[study.kind]
    table: dict[str, list[dict]] = {}
    for arm in study.arms:
        for seed in study.seeds:
            run = study.run_dir(arm.name, seed)
            rows = selection_scores(toy, study.kind, run, study.max_steps, grid, samples=1)
            table[f"{arm.name}-seed{seed}"] = rows
    mean_joint = {s: float(np.mean([rows[i]["joint"] for rows in table.values()])) for i, s in enumerate(grid)}
    chosen = max(grid, key=lambda s: (round(mean_joint[s], 6), -s))
    result = {
        "chosen": chosen,
        "by": "joint accuracy on the validation set, averaged over every run of every arm, last checkpoint",
        "validation": "guidance.json prompts (training triples), sampling seed 1000"
        if study.kind == "t2i"
        else "the same 24 classes (a class-conditional model has no other prompts), sampling seed 1000",
        "mean_joint": {str(s): round(v, 4) for s, v in mean_joint.items()},
        "per_run": table,
    }
    write_json_atomic(path, result, sort_keys=False)
    return result


def score_runs(
    toy: Path, study: Study, scale: float, prompt_set: str = "heldout", seed: int = 0
) -> dict[str, dict[int, dict[int, dict]]]:
    """``scores[arm][seed][step]``: every kept checkpoint scored once with the study's settings."""
    from common.files import write_text_atomic
    from common.images import save_grid
    from evaluation.toy_study_eval import score_checkpoint

    scores: dict[str, dict[int, dict[int, dict]]] = {}
    for arm in study.arms:
        scores[arm.name] = {}
        for seed in study.seeds:
            run = study.run_dir(arm.name, seed)
            scores[arm.name][seed] = {}
            for step in scored_steps(study, run):
                path = run / str(step) / EVAL_FILE
                settings = {"guidance_scale": scale, "samples": study.samples}
                if prompt_set != "heldout" or seed != 0:
                    settings.update(prompt_set=prompt_set, seed=seed)
                if path.is_file() and json.loads(path.read_text()).get("settings") == settings:
                    scores[arm.name][seed][step] = json.loads(path.read_text())
                    continue
                t0 = time.perf_counter()
                result = score_checkpoint(
                    toy, study.kind, run, step, scale=scale, samples=study.samples, seed=seed, prompt_set=prompt_set
                )
                grid = result.pop("grid")
                save_grid((grid + 1) / 2, run / str(step) / "study_grid.png", ncol=8)
                result["settings"] = settings
                write_text_atomic(path, json.dumps(result) + "\n")
                scores[arm.name][seed][step] = result
                acc = ", ".join(f"{k} {v:.3f}" for k, v in result["accuracy"].items())
                print(
                    f"{arm.name} seed {seed} step {step}: {acc}, fd {result['fd']:.2f} "
                    f"({result['images']} images, {time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    return scores


def checkpoint_steps(run: Path) -> list[int]:
    from common.checkpoint import list_steps

    return list_steps(run)


def score_table(scores: dict[str, dict[int, dict[int, dict]]]) -> dict[str, dict[str, dict[int, np.ndarray]]]:
    """``table[metric][arm][step]``: (seeds, units, per_unit) 0/1 cubes per attribute, (seeds,) FDs.

    Only steps every seed of an arm reached are kept (a run still training would bias the mean).
    """
    table: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for arm, by_seed in scores.items():
        steps = sorted(set.intersection(*(set(s) for s in by_seed.values()))) if by_seed else []
        for step in steps:
            first = by_seed[min(by_seed)][step]
            for metric in first["correct"]:
                cube = np.stack(
                    [np.asarray(by_seed[s][step]["correct"][metric], dtype=np.float64) for s in sorted(by_seed)]
                )
                table.setdefault(metric, {}).setdefault(arm, {})[step] = cube
            fds = np.array([by_seed[s][step]["fd"] for s in sorted(by_seed)], dtype=np.float64)
            table.setdefault("fd", {}).setdefault(arm, {})[step] = fds
    return table


def pair_studies(study: Study) -> list[Study]:
    """The baseline against each other arm, as two-arm studies (same runs, same folder)."""
    base = study.arms[0]
    return [replace(study, arms=[base, arm]) for arm in study.arms[1:]]


def aggregate(study: Study, scores: dict, guidance: dict[str, Any]) -> dict[str, Any]:
    """The summary of a two-arm study (its baseline and the one arm compared with it)."""
    from evaluation.paired_stats import summarize_study

    table = score_table({arm.name: scores[arm.name] for arm in study.arms})
    higher = {m: m != "fd" for m in table}
    arms = (study.arms[0].name, study.arms[1].name)
    summary = summarize_study(table, arms=arms, higher_is_better=higher)
    some = next(iter(next(iter(next(iter(scores.values())).values())).values()))
    summary["design"] = {
        **study.record(),
        "units": some["units"],
        "per_unit": some["per_unit"],
        "images_per_checkpoint": some["images"],
        "guidance_scale": guidance["chosen"],
        "guidance_selection": {k: v for k, v in guidance.items() if k != "per_run"},
        "sampling_interval_halfwidth": sampling_halfwidths(table),
    }
    return summary


def sampling_halfwidths(table: dict) -> dict[str, float]:
    """The widest per-run, per-checkpoint 95% sampling interval (half-width) of each attribute.

    What one checkpoint's score could move with other sampling seeds: the measurement's own
    precision, before training-seed variance (which the study's intervals add on top).
    """
    from common.stats import stratified_bootstrap_ci

    widest: dict[str, float] = {}
    for metric, by_arm in table.items():
        if metric == "fd":
            continue
        for cubes in by_arm.values():
            for cube in cubes.values():
                for matrix in cube:
                    ci = stratified_bootstrap_ci(matrix, resamples=500)
                    widest[metric] = max(widest.get(metric, 0.0), (ci["high"] - ci["low"]) / 2)
    return {k: round(v, 4) for k, v in widest.items()}


def score_real(study: Study, args: argparse.Namespace) -> dict[str, Any]:
    """Real configs: every kept checkpoint sampled with a benchmark's prompts and scored by FID."""
    from evaluation import study_fid
    from evaluation.paired_stats import summarize_study

    runs = {a.name: {seed: study.run_dir(a.name, seed) for seed in study.seeds} for a in study.arms}
    steps = {run: scored_steps(study, run) for by_seed in runs.values() for run in by_seed.values()}
    resolution = args.fid_resolution or _run_resolution(next(iter(steps)))
    settings = study_fid.FidSettings(
        bench=args.fid_bench,
        real_images=str(Path(args.fid_real).resolve()),
        resolution=resolution,
        guidance=args.guidance,
        num_samples=args.fid_samples,
        real_list=args.fid_real_list,
        feature_extractor=args.fid_extractor,
        processes=args.eval_gpus,
        prompts=str(Path(args.fid_prompts).resolve()) if args.fid_prompts else None,
        cache_dir=str(Path(study.out) / "fid-cache"),
    )
    executor = None
    if args.executor != "inline":
        from common.jobs import parse_time

        folder = Path(study.out) / "eval-logs"
        executor = study_fid.make_executor(
            args.executor, folder, args.eval_gpus, parse_time(args.time), args.partition, args.account
        )
    fids = study_fid.score_all(runs, steps, settings, executor)
    table: dict[str, dict[str, dict[int, np.ndarray]]] = {"fid": {}}
    for arm, by_seed in fids.items():
        common_steps = sorted(set.intersection(*(set(v) for v in by_seed.values())))
        table["fid"][arm] = {s: np.array([by_seed[k][s] for k in sorted(by_seed)]) for s in common_steps}
    arms = (study.arms[0].name, study.arms[1].name)
    summary = summarize_study(table, arms=arms, higher_is_better={"fid": False})
    summary["design"] = {**study.record(), "fid": {k: v for k, v in vars(settings).items()}}
    return summary


def _run_resolution(run: Path) -> int:
    from fusedit.config import load_config

    return int(load_config(run / "config.yaml").sample.height)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for metric, m in summary["metrics"].items():
        final = m["final"]
        lines.append(f"  {metric:10s} step {final['step']}: {final['verdict']}; AUC: {m['auc']['verdict']}")
    return lines


def write_report(study: Study, summary: dict[str, Any], title: str, folder: Path | None = None) -> Path:
    from evaluation.report import build_report

    runs = {f"{a.name}-seed{s}": study.run_dir(a.name, s) for a in study.arms for s in study.seeds[:1]}
    d = summary["design"]
    notes = [
        f"{len(study.seeds)} training seeds per arm; {study.max_steps} steps; a checkpoint every {study.eval_every}"
    ]
    if "fid" in d:
        f = d["fid"]
        notes.append(f"FID on {f['bench']} prompts ({f['num_samples'] or 'all'}), guidance {f['guidance']}")
    else:
        notes += [
            f"{d['images_per_checkpoint']} images per checkpoint ({d['units']} prompt units x {d['per_unit']})",
            f"guidance scale {d['guidance_scale']}: {d['guidance_selection'].get('by')}",
            f"widest per-checkpoint sampling interval (±): {d['sampling_interval_halfwidth']}",
        ]
    folder = folder or Path(study.out) / "report"
    return build_report(runs, folder, title=title, study=summary, study_notes=notes)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def run_study(study: Study, args: argparse.Namespace, toy: Path | None, title: str) -> dict[str, Any] | None:
    check_study_folder(study, write=not args.dry_run)
    specs = run_specs(study)
    if args.dry_run:
        from common.jobs import describe

        for i, spec in enumerate(specs, 1):
            print(f"[{i}/{len(specs)}] {spec.name}", *describe(spec, _settings(args)), sep="\n")
        return None
    t0 = time.perf_counter()
    if args.executor == "inline":
        train_inline(specs, study.max_steps, args)
    else:
        train_submitit(specs, study.max_steps, args)
    t1 = time.perf_counter()
    if args.train_only:
        print("trained; run the same command without --train-only to score the kept checkpoints", flush=True)
        return None
    if toy is None:
        summaries = [score_real(pair, args) for pair in pair_studies(study)]
    else:
        guidance = choose_guidance(toy, study, args.guidance)
        scores = score_runs(toy, study, guidance["chosen"])
        summaries = [aggregate(pair, scores, guidance) for pair in pair_studies(study)]
    timing = {"train": round(t1 - t0, 1), "score": round(time.perf_counter() - t1, 1)}
    if len(summaries) == 1:
        summary = {**summaries[0], "timing_s": timing}
        write_json_atomic(Path(study.out) / "results.json", summary, sort_keys=False)
        page = write_report(study, summary, title)
        print(f"\n{title}\n" + "\n".join(summary_lines(summary)) + f"\nreport: {page}", flush=True)
        return summary
    return write_comparisons(study, summaries, title, timing)


def write_comparisons(study: Study, summaries: list[dict[str, Any]], title: str, timing: dict) -> dict[str, Any]:
    """A study of more than two arms: one results.json + report per arm vs the baseline, and an index."""
    from common.files import write_text_atomic

    base = study.arms[0].name
    out, lines, items = Path(study.out), [f"\n{title}"], []
    for pair, summary in zip(pair_studies(study), summaries, strict=True):
        name = f"{pair.arms[1].name}-vs-{base}"
        write_json_atomic(out / name / "results.json", {**summary, "timing_s": timing}, sort_keys=False)
        page = write_report(pair, summary, f"{title}: {pair.arms[1].name} vs {base}", out / name / "report")
        lines += [f"{pair.arms[1].name} vs {base}:", *summary_lines(summary), f"  report: {page}"]
        items.append(f'<li><a href="{name}/report/index.html">{pair.arms[1].name} vs {base}</a></li>')
    combined = {"baseline": base, "comparisons": dict(zip([a.name for a in study.arms[1:]], summaries, strict=True))}
    combined["timing_s"] = timing
    write_json_atomic(out / "results.json", combined, sort_keys=False)
    page = f"<!doctype html><meta charset='utf-8'><title>{title}</title><h1>{title}</h1><ul>{''.join(items)}</ul>\n"
    write_text_atomic(out / "index.html", page)
    print("\n".join(lines) + f"\nindex: {out / 'index.html'}", flush=True)
    return combined


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    toy = args.toy.resolve() if args.toy is not None else None
    if toy is not None and not (toy / "world.json").is_file():
        raise UsageExit(f"{toy}: no toy world (build it: python dataset_download.py --toy {args.toy})")
    out = args.out.resolve()
    if args.arm:
        studies = [(config_study(args), "Paired study" if len(args.arm) == 2 else "Study")]
    elif args.families:
        if not args.dry_run:
            ensure_e2e_vae(toy, args.repae_run.resolve())
            ensure_families(toy)
        study = toy_study(toy, "t2i", args, out, TOY_FAMILIES)
        studies = [(study, "Toy text-to-image across tokenizer families: each vs the original toy VAE")]
    else:
        if not args.dry_run:
            ensure_e2e_vae(toy, args.repae_run.resolve())
        kinds = [args.kind] if args.kind else ["t2i", "ldm"]
        titles = {
            "t2i": "Toy text-to-image: original VAE vs E2E-VAE",
            "ldm": "Toy train_ldm: SiT + REPA on a frozen VAE",
        }
        studies = [(toy_study(toy, k, args, out / k), titles[k]) for k in kinds]
    timings = {}
    for study, title in studies:
        t0 = time.perf_counter()
        run_study(study, args, toy, title)
        timings[study.kind] = round(time.perf_counter() - t0, 1)
    if len(studies) > 1 and not args.dry_run:
        index_page(out, [(s, t) for s, t in studies])
    print(f"\nstudy: {(time.perf_counter() - start) / 60:.1f} min {timings}", flush=True)
    return 0


def index_page(out: Path, studies: list[tuple[Study, str]]) -> Path:
    """``<out>/index.html``: one link per study report."""
    from common.files import write_text_atomic

    items = "".join(f'<li><a href="{Path(s.out).name}/report/index.html">{t}</a></li>' for s, t in studies)
    page = out / "index.html"
    write_text_atomic(page, f"<!doctype html><meta charset='utf-8'><title>Study</title><ul>{items}</ul>\n")
    return page


if __name__ == "__main__":
    from common.lifecycle import run_cli

    sys.exit(run_cli("python -m evaluation.study", main))
