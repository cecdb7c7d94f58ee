"""Submit a list or a grid of training runs through submitit, on SLURM or on this machine.

    python -m fusedit.tools.sweep --configs configs/e2e-vae/toy.yaml --grid optimizer.lr=1e-3,3e-4 --dry-run
    python -m fusedit.tools.sweep --configs a.yaml b.yaml --executor slurm --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 48:00:00 --deepspeed-config configs/deepspeed/zero2.json
    python -m fusedit.tools.sweep --configs configs/e2e-vae/toy.yaml --executor local --wait

Every (config, grid point) pair is one run with its own ``trainer.run`` and
``trainer.checkpoint_dir`` (``<output>/<config stem>__<key>=<value>...``), so runs never share
checkpoints, and submitting the same sweep again resumes each run where it stopped.

Each job is a submitit ``Checkpointable``. On SLURM, submitit starts one task per node and each
task launches ``torchrun`` (c10d rendezvous on the first host of the allocation). On submitit's
preemption/time-out signal (USR2 in submitit 1.5.4, or $SUBMITIT_PREEMPT_SIGNAL) the job sends
SIGUSR1 to the training processes, which checkpoint at the end of the current step and exit; the
job then requeues itself and the new attempt resumes from ``<checkpoint_dir>/latest``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from common.jobs import (  # noqa: F401  (re-exported: the sweep's API)
    RunSpec,
    Settings,
    TrainJob,
    describe,
    make_executor,
    make_job,
    parse_time,
    preempt_local_job,
    preempt_signal,
    settings_line,
    submit,
    wait_all,
)

ROOT = Path(__file__).resolve().parents[2]
# The sweep owns these: every run needs its own folder, and a requeued run must resume.
OWNED_KEYS = ("trainer.run", "trainer.checkpoint_dir")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


# ------------------------------------------------------------------------------------- planning
def split_values(text: str) -> list[str]:
    """Split ``v1,v2`` on commas outside brackets and quotes, so ``[0.9,0.99]`` stays one value."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["key=v1,v2", ...]`` -> ``{key: [v1, v2]}``; errors name the offending item."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--grid {item!r}: expected key=v1,v2,...")
        if key in grid:
            raise ValueError(f"--grid {key}: given twice; list all its values in one item")
        values = split_values(raw)
        if any(v == "" for v in values):
            raise ValueError(f"--grid {item!r}: empty value")
        grid[key] = values
    _reject_owned(grid)
    return grid


def _reject_owned(keys: Any) -> None:
    for key in keys:
        if key in OWNED_KEYS:
            raise ValueError(f"{key}: set by the sweep for each run; choose the parent folder with --output")


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Cartesian product of the grid, first key varying slowest (the order runs are listed in)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def short_keys(keys: list[str]) -> dict[str, str]:
    """Last dotted component of each key, unless two keys share it (then the full key)."""
    tails = Counter(k.rsplit(".", 1)[-1] for k in keys)
    return {k: k.rsplit(".", 1)[-1] if tails[k.rsplit(".", 1)[-1]] == 1 else k for k in keys}


def run_name(stem: str, point: dict[str, str], shorts: dict[str, str]) -> str:
    """``toy__lr=1e-3__batch_size_per_gpu=32``: readable in ``ls`` and safe as a folder and job name."""
    clean = lambda text: _NAME_UNSAFE.sub("_", text).strip("_") or "_"
    return "__".join([clean(stem)] + [f"{clean(shorts[k])}={clean(v)}" for k, v in point.items()])


def config_stems(configs: list[str]) -> list[str]:
    """File stems, prefixed with the parent folder when two configs share a stem."""
    paths = [Path(c) for c in configs]
    counts = Counter(p.stem for p in paths)
    return [f"{p.parent.name}-{p.stem}" if counts[p.stem] > 1 else p.stem for p in paths]


def _disambiguate(names: list[str], keys: list[str]) -> list[str]:
    """Append a short hash to names that still collide (e.g. values differing only in '/')."""
    counts = Counter(names)
    out = []
    for name, key in zip(names, keys):
        out.append(name if counts[name] == 1 else f"{name}__{hashlib.sha1(key.encode()).hexdigest()[:6]}")
    return out


def expand(configs: list[str], grid: dict[str, list[str]], fixed: list[str], output: str) -> list[RunSpec]:
    """Every (config, grid point) as a RunSpec with absolute paths, so jobs do not depend on cwd."""
    _reject_owned(item.partition("=")[0].strip() for item in fixed)
    out_root = Path(output).expanduser().absolute()
    shorts = short_keys(list(grid))
    combos = [(c, s, p) for c, s in zip(configs, config_stems(configs)) for p in grid_points(grid)]
    names = [run_name(stem, point, shorts) for _, stem, point in combos]
    names = _disambiguate(names, [f"{Path(c).absolute()}|{sorted(p.items())}" for c, _, p in combos])
    runs = []
    for (config, _, point), name in zip(combos, names):
        ckpt_dir = out_root / name
        owned = [f"trainer.run={name}", f"trainer.checkpoint_dir={ckpt_dir}"]
        if not any(item.startswith("trainer.resume_from=") for item in fixed):
            owned.append("trainer.resume_from=latest")  # a requeued attempt must continue, never restart
        overrides = tuple(fixed) + tuple(f"{k}={v}" for k, v in point.items()) + tuple(owned)
        runs.append(RunSpec(name, str(Path(config).absolute()), overrides, str(ckpt_dir), tuple(point.items())))
    return runs


def validate_runs(runs: list[RunSpec]) -> list[str]:
    """Load every run's config now, so a typo fails here and not in a queue hours later."""
    from common.config import ConfigError
    from fusedit.config import load_config

    errors = []
    for run in runs:
        try:
            load_config(run.config, list(run.overrides))
        except ConfigError as err:
            errors.append(f"{run.name}: {err}")
    return errors


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusedit.tools.sweep",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to train")
    what.add_argument("--configs", nargs="+", required=True, metavar="YAML", help="training configs, one run each")
    what.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="cartesian product over values")
    what.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="override for all")
    what.add_argument("--output", default="output/sweeps", help="parent of the run folders (default: %(default)s)")
    what.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON for train.py (default: built-in)")
    where = p.add_argument_group("where it runs")
    where.add_argument("--executor", choices=("slurm", "local"), default="slurm")
    where.add_argument("--nodes", type=int, default=1, help="SLURM nodes per run (local: always 1)")
    where.add_argument("--gpus-per-node", type=int, default=8, help="torchrun processes per node (0/1: plain python)")
    where.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node (one task per node)")
    where.add_argument("--mem-gb", type=float, default=None)
    where.add_argument("--partition", default=None)
    where.add_argument("--account", default=None)
    where.add_argument("--qos", default=None)
    where.add_argument("--time", default="24:00:00", help="per-job limit: minutes, HH:MM:SS or D-HH:MM:SS")
    where.add_argument("--signal-delay-s", type=int, default=180, help="preemption signal this long before the limit")
    where.add_argument("--max-requeues", type=int, default=50, help="time-outs a run may be requeued after")
    where.add_argument("--setup", action="append", default=[], metavar="CMD", help="sbatch line before srun")
    act = p.add_argument_group("action")
    act.add_argument("--dry-run", action="store_true", help="print the plan and commands, submit nothing")
    act.add_argument("--wait", action="store_true", help="wait for all jobs and report (exit 1 if any failed)")
    act.add_argument("--no-validate", action="store_true", help="skip loading every config before submitting")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        executor=args.executor,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time_min=parse_time(args.time),
        signal_delay_s=args.signal_delay_s,
        max_requeues=args.max_requeues,
        deepspeed_config=args.deepspeed_config,
        setup=list(args.setup),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.executor == "local" and args.nodes > 1:
        parser.error("--nodes > 1 needs --executor slurm")
    try:
        settings = settings_from_args(args)
        runs = expand(args.configs, parse_grid(args.grid), args.set, args.output)
    except ValueError as err:
        parser.error(str(err))
    errors = [] if args.no_validate else validate_runs(runs)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if errors:
        return 2
    if settings.executor == "slurm" and not args.dry_run and not shutil.which("sbatch"):
        print(
            "error: sbatch not found; submit from a SLURM login node, or use --executor local / --dry-run",
            file=sys.stderr,
        )
        return 2
    print(f"sweep: {len(runs)} run(s); {settings_line(settings)}")
    if args.dry_run:
        for i, run in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {run.name}", *describe(run, settings), sep="\n")
        print("dry run: nothing submitted")
        return 0
    submitted = submit(runs, settings)
    for run, job in submitted:
        print(f"submitted {run.name}  job={job.job_id}", flush=True)
        print(f"  checkpoints  {run.checkpoint_dir}\n  logs         {job.paths.stdout} | {job.paths.stderr}")
    if args.wait:
        return 1 if wait_all(submitted) else 0
    if settings.executor == "local":
        print("local jobs keep running after this command exits; add --wait to follow them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
