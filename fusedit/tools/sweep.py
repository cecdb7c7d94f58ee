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
import contextlib
import dataclasses
import hashlib
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.job_environment import JobEnvironment
from submitit.helpers import Checkpointable, DelayedSubmission

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "train.py"
# The sweep owns these: every run needs its own folder, and a requeued run must resume.
OWNED_KEYS = ("trainer.run", "trainer.checkpoint_dir")
# torchrun treats every signal it handles as a death signal (it raises, kills its workers and exits 1
# with a traceback), so it handles only these; the stop signals go to its workers (see _Launch).
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Set by whoever launched *us*; inherited by train.py they would make concurrent runs share a port.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


# ------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep: what to train and where it writes."""

    name: str
    config: str
    overrides: tuple[str, ...]
    checkpoint_dir: str
    point: tuple[tuple[str, str], ...] = ()
    # What runs instead of train.py: e.g. ("-m", "repae.train_ldm") for the class-conditional
    # stage of a study (evaluation.study). Empty: train.py, the text-to-image trainer.
    entry: tuple[str, ...] = ()

    @property
    def log_folder(self) -> Path:
        """submitit's folder (pickles, ``<job id>_0_log.out|err``), next to the run's checkpoints."""
        return Path(self.checkpoint_dir) / "submitit"


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


def parse_time(text: str) -> int:
    """SLURM time (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) -> whole minutes (submitit's unit)."""
    days, _, clock = text.rpartition("-")
    try:
        d = int(days or 0)
        parts = [int(p) for p in clock.split(":")]
    except ValueError:
        parts = []
    if not parts or len(parts) > 3:
        raise ValueError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    if days:
        h, m, s = (parts + [0, 0])[:3]
    else:
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts)}.get(len(parts), tuple(parts))  # M, M:S, H:M:S
    return d * 1440 + h * 60 + m + (1 if s else 0)


# ----------------------------------------------------------------------------------- the job
def _child_preexec(torchrun: bool) -> Callable[[], None]:
    """What the forked child does before exec'ing the training command (prepared in the parent).

    Parent dies -> the child gets a signal (SIGTERM: the trainer checkpoints; torchrun gets
    SIGHUP, which it handles by tearing its workers down), so a killed submitit task never
    orphans a training run. submitit's own preemption signal (USR2 by default) is ignored: SLURM
    delivers it to *every* process of the step, and its default action would kill torchrun and
    the trainer before they could checkpoint. torchrun also ignores SIGUSR1 and SIGTERM, which
    _Launch hands to its workers instead. SIG_IGN survives exec, and the trainer installs its own
    SIGUSR1/SIGTERM handlers. libc is looked up here, not after fork.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None
    sig = _preempt_signal()
    ignore = {sig} - set(STOP_SIGNALS) | (set(STOP_SIGNALS) if torchrun else set())
    death = signal.SIGHUP if torchrun else signal.SIGTERM

    def preexec() -> None:
        if prctl is not None:
            prctl(1, int(death))  # PR_SET_PDEATHSIG
        for each in ignore:
            signal.signal(each, signal.SIG_IGN)

    return preexec


def _preempt_signal() -> signal.Signals:
    """The signal submitit turns into checkpoint(): USR2 unless $SUBMITIT_PREEMPT_SIGNAL says otherwise."""
    return JobEnvironment._usr_sig()


class _Launch:
    """A running training command whose exit status is collected by a helper thread.

    submitit calls ``checkpoint()`` from a signal handler on the main thread, possibly while
    ``__call__`` is waiting for this same process. Popen's wait/poll take a non-reentrant lock,
    so waiting on it again from the handler could deadlock; the main thread therefore only
    reads ``returncode`` set by the reaper thread, which alone calls ``wait()``.
    """

    def __init__(self, cmd: list[str], cwd: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.torchrun = "torch.distributed.run" in cmd
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, preexec_fn=_child_preexec(self.torchrun))
        self.returncode: int | None = None
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.returncode = self.proc.wait()

    def wait(self, timeout: float | None = None, poll_s: float = 0.2) -> int | None:
        """Exit status, or None if still running after ``timeout`` seconds (lock-free polling)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(poll_s)
        return self.returncode

    def send(self, sig: int) -> None:
        """Signal the trainer: torchrun's workers for the stop signals (torchrun ignores them), all for SIGKILL."""
        if self.returncode is not None:
            return
        if self.torchrun and sig in (*STOP_SIGNALS, signal.SIGKILL):
            _signal_children(self.proc.pid, sig)
            if sig != signal.SIGKILL:
                return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)


def _signal_children(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to the direct children of ``pid``; return their pids."""
    import psutil

    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.send_signal(sig)
    return [c.pid for c in children]


def _read_latest(checkpoint_dir: str) -> str | None:
    f = Path(checkpoint_dir) / "latest"
    return f.read_text().strip() if f.is_file() else None


@dataclass
class TrainJob(Checkpointable):
    """The callable submitit runs for one training run (one task per node).

    Plain attributes only: submitit pickles it at submission and again at every requeue.
    """

    run: RunSpec
    workdir: str
    nnodes: int = 1
    nproc_per_node: int = 1
    deepspeed_config: str | None = None
    stop_timeout_s: float = 600.0
    attempt: int = 0
    _launch: _Launch | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_launch"] = None  # a live process cannot travel in a pickle
        return state

    def train_args(self) -> list[str]:
        if self.run.entry:  # another trainer: it takes -c and key=value overrides, no DeepSpeed JSON
            return [*self.run.entry, "-c", self.run.config, *self.run.overrides]
        args = [str(TRAIN_SCRIPT), "-c", self.run.config]
        if self.deepspeed_config:
            args += ["--deepspeed_config_path", self.deepspeed_config]
        return args + list(self.run.overrides)

    def command(self, hostnames: list[str] | None = None, job_id: str = "0") -> list[str]:
        """``python train.py`` for one process, else torchrun (standalone on one node, c10d across nodes)."""
        if self.nnodes * self.nproc_per_node == 1:
            return [sys.executable, *self.train_args()]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc_per_node)]
        if self.nnodes == 1:
            cmd += ["--standalone"]
        else:
            head = (hostnames or ["<first host>"])[0]
            digits = re.sub(r"\D", "", job_id)  # same port on every node without sharing a file
            port = str(20000 + int(digits) % 20000) if digits else "<port>"
            cmd += ["--nnodes", str(self.nnodes), "--rdzv_id", job_id, "--rdzv_backend", "c10d"]
            cmd += ["--rdzv_endpoint", f"{head}:{port}"]
        cmd += ["--signals-to-handle", TORCHRUN_SIGNALS, "--shutdown-timeout", str(int(self.stop_timeout_s))]
        return cmd + self.train_args()

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        cmd = self.command(list(env.hostnames), env.job_id)
        resume = _read_latest(self.run.checkpoint_dir)
        where = f"{env.hostname} (node {env.node}/{env.num_nodes})"
        print(f"[sweep] {self.run.name}: attempt {self.attempt} on {where}; resume from {resume or '-'}", flush=True)
        print("[sweep] $ " + shlex.join(cmd), flush=True)
        self._launch = _Launch(cmd, self.workdir)
        try:
            code = self._launch.wait()
        finally:
            self._stop_if_running()
        if code != 0:
            raise RuntimeError(f"{self.run.name}: training exited with status {code} (see this job's log)")
        latest = _read_latest(self.run.checkpoint_dir)
        return {"run": self.run.name, "checkpoint_dir": self.run.checkpoint_dir, "latest": latest}

    def _stop_if_running(self) -> None:
        """Leaving __call__ by an exception (cancel, Ctrl-C): let training checkpoint, then go."""
        launch = self._launch
        if launch is not None and launch.returncode is None:
            launch.send(signal.SIGTERM)
            if launch.wait(timeout=self.stop_timeout_s) is None:
                launch.send(signal.SIGKILL)

    def checkpoint(self) -> DelayedSubmission:
        """Called by submitit on preemption/time-out: checkpoint the training, then requeue.

        SIGUSR1 makes the trainer save at its next logging step and exit 0 (on this node it goes
        to torchrun's workers; the ranks agree on the stop step through an all-reduce, so
        signalling one node is enough). Only then is it safe to hand submitit the next
        attempt: on SLURM ``scontrol requeue`` kills whatever is still running.
        """
        launch = self._launch
        if launch is not None and launch.returncode is None:
            print(f"[sweep] {self.run.name}: preempted; SIGUSR1 -> pid {launch.proc.pid} to checkpoint", flush=True)
            launch.send(signal.SIGUSR1)
            if launch.wait(timeout=self.stop_timeout_s) is None:
                print(f"[sweep] {self.run.name}: no exit after {self.stop_timeout_s:.0f}s; killing", flush=True)
                launch.send(signal.SIGKILL)
                launch.wait(timeout=30)
        latest = _read_latest(self.run.checkpoint_dir)
        print(f"[sweep] {self.run.name}: requeueing; next attempt resumes from step {latest or '-'}", flush=True)
        return DelayedSubmission(dataclasses.replace(self, attempt=self.attempt + 1))


# ------------------------------------------------------------------------------- submission
@dataclass
class Settings:
    """Where and how the jobs run (the executor's parameters)."""

    executor: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 1440
    signal_delay_s: int = 180
    max_requeues: int = 50
    deepspeed_config: str | None = None
    setup: list[str] = field(default_factory=list)

    @property
    def nproc_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def stop_timeout_s(self) -> float:
        """How long a preempted job waits for the checkpoint: what the signal delay leaves, minus margin."""
        return float(max(30, self.signal_delay_s - 20))


def make_job(run: RunSpec, settings: Settings) -> TrainJob:
    ds = str(Path(settings.deepspeed_config).absolute()) if settings.deepspeed_config else None
    nodes = settings.nodes if settings.executor == "slurm" else 1
    return TrainJob(run, os.getcwd(), nodes, settings.nproc_per_node, ds, settings.stop_timeout_s)


def make_executor(run: RunSpec, settings: Settings) -> Any:
    """A submitit executor whose folder is inside the run, so logs sit next to checkpoints."""
    if settings.executor == "local":
        ex = submitit.LocalExecutor(folder=run.log_folder, max_num_timeout=settings.max_requeues)
        ex.update_parameters(
            timeout_min=settings.time_min,
            gpus_per_node=settings.gpus_per_node,
            tasks_per_node=1,
            signal_delay_s=settings.signal_delay_s,
        )
        return ex
    ex = submitit.SlurmExecutor(folder=run.log_folder, max_num_timeout=settings.max_requeues)
    params: dict[str, Any] = dict(
        job_name=run.name,
        nodes=settings.nodes,
        ntasks_per_node=1,  # one submitit task per node; it starts torchrun for the node's GPUs
        time=settings.time_min,
        signal_delay_s=settings.signal_delay_s,
        additional_parameters={"requeue": True},
    )
    optional = dict(gpus_per_node=settings.gpus_per_node or None, cpus_per_task=settings.cpus_per_task)
    optional.update(partition=settings.partition, account=settings.account)
    optional.update(qos=settings.qos, mem=f"{settings.mem_gb:g}GB" if settings.mem_gb else None)
    optional.update(setup=settings.setup or None)
    params.update({k: v for k, v in optional.items() if v is not None})
    ex.update_parameters(**params)
    return ex


def submit(runs: list[RunSpec], settings: Settings) -> list[tuple[RunSpec, Any]]:
    """Submit every run as its own job (own folder, own SLURM job name); return (run, job) pairs."""
    submitted = []
    for run in runs:
        Path(run.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        job = make_executor(run, settings).submit(make_job(run, settings))
        submitted.append((run, job))
    return submitted


def preempt_local_job(job: Any) -> list[int]:
    """Deliver submitit's preemption signal to a local job's task, as SLURM would before a time limit.

    ``LocalJob._interrupt()`` in submitit 1.5.4 signals the *controller* process, which has no
    handler for that signal and simply dies, leaving the task running unsupervised; the
    controller itself only signals its tasks when their time runs out. The tasks are the
    controller's children, so signal those.
    """
    return _signal_children(int(job.job_id), _preempt_signal())


# ------------------------------------------------------------------------------------- output
def describe(run: RunSpec, settings: Settings) -> list[str]:
    """What --dry-run prints for one run: inputs, outputs and the exact launch command."""
    job = make_job(run, settings)
    if settings.executor == "slurm":
        launch = f"sbatch: {settings.nodes} node(s) x 1 submitit task (srun), each running:"
        cmd = job.command(job_id="<job id>")
    else:
        launch, cmd = "local subprocess of a submitit task:", job.command()
    return [
        f"  config       {run.config}",
        f"  checkpoints  {run.checkpoint_dir}   (resumes from its 'latest')",
        f"  logs         {run.log_folder}/<job id>_0_log.out|err",
        f"  launch       {launch}",
        f"               {shlex.join(cmd)}",
    ]


def settings_line(settings: Settings) -> str:
    if settings.executor == "local":
        return f"executor=local gpus={settings.gpus_per_node} timeout={settings.time_min}min"
    bits = [f"nodes={settings.nodes}", f"gpus/node={settings.gpus_per_node}", f"time={settings.time_min}min"]
    bits += [f"{k}={v}" for k in ("partition", "account", "qos") if (v := getattr(settings, k))]
    sig = _preempt_signal().name
    return f"executor=slurm {' '.join(bits)} signal={sig}@{settings.signal_delay_s}s requeue<={settings.max_requeues}"


def wait_all(submitted: list[tuple[RunSpec, Any]]) -> int:
    """Block until every job ends; print each outcome. Returns the number of failed runs."""
    failed = 0
    for run, job in submitted:
        try:
            result = job.result()
            print(f"done    {run.name}  latest={result.get('latest')}  {run.checkpoint_dir}", flush=True)
        except Exception as err:  # submitit re-raises the job's error with its traceback
            failed += 1
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            print(f"FAILED  {run.name}: {first}\n        log: {job.paths.stderr}", flush=True)
    return failed


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
