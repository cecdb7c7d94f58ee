"""The job launcher both stages and evaluation/ use: one training run as a submitit job that requeues itself.

A :class:`RunSpec` names what to train (``train.py``, or another trainer's module such as
``repae.train_ldm``) and where it writes; :func:`submit` hands each run to submitit (SLURM, or a
local executor) as a :class:`TrainJob`, which starts the trainer (python for one process,
torchrun otherwise), turns submitit's pre-emption signal into the trainers' planned stop
(checkpoint, exit 0: common.lifecycle) and requeues. ``fusedit.tools.sweep`` (grids of runs) and
``evaluation.study`` (paired multi-seed studies) are built on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.job_environment import JobEnvironment
from submitit.helpers import Checkpointable, DelayedSubmission

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "train.py"
# torchrun treats every signal it handles as a death signal (it raises, kills its workers and exits 1
# with a traceback), so it handles only these; the stop signals go to its workers (see _Launch).
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Set by whoever launched *us*; inherited by train.py they would make concurrent runs share a port.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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
    sig = preempt_signal()
    ignore = {sig} - set(STOP_SIGNALS) | (set(STOP_SIGNALS) if torchrun else set())
    death = signal.SIGHUP if torchrun else signal.SIGTERM

    def preexec() -> None:
        if prctl is not None:
            prctl(1, int(death))  # PR_SET_PDEATHSIG
        for each in ignore:
            signal.signal(each, signal.SIG_IGN)

    return preexec


def preempt_signal() -> signal.Signals:
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
    """The step a (re)started run resumes from, for the job's log (common.checkpoint reads the run)."""
    from common.checkpoint import read_latest

    try:
        step = read_latest(Path(checkpoint_dir))
    except RuntimeError as err:  # a damaged latest: the trainer falls back and says so itself
        return f"? ({err})"
    return None if step is None else str(step)


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
            args += ["--deepspeed-config-path", self.deepspeed_config]
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
    return _signal_children(int(job.job_id), preempt_signal())


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
    sig = preempt_signal().name
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
