"""One run lifecycle for both stages: the exit codes, the non-finite guard, the loop, the entry point.

The text-to-image trainer (``train.py``) and the REPA-E trainers (``python -m repae.train``,
``python -m repae.train_ldm``) differ in what one optimizer step is and in what they log; they do
not differ in how a run starts, steps, logs, checkpoints, previews, stops or ends. That part
lives here, once, so a pre-empted run means the same thing to SLURM, torchrun and a sweep whichever
stage it belongs to (docs/lifecycle.md has the table for users).

Exit codes (:class:`ExitCode`):

====  ==========================================================================================
0     the run finished, or stopped on a signal after a checkpoint (SLURM requeues it; not a crash)
1     an unexpected failure: Python's own status, with its traceback
2     a user error (config, flag, file, run folder): one ``error:`` line naming the culprit
3     the non-finite guard stopped the run: the weights and the last good checkpoint are intact
4     a checkpoint could not be written (e.g. a full disk): nothing was published
====  ==========================================================================================
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import torch

log = logging.getLogger("common.lifecycle")


class ExitCode(IntEnum):
    OK = 0
    CRASH = 1
    USER_ERROR = 2
    NON_FINITE = 3
    SAVE_FAILED = 4


class NonFiniteStop(FloatingPointError):
    """Too many optimizer steps in a row were skipped for a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped (non-finite) optimizer steps and stops the run when they keep coming.

    Both stages skip an update whose loss or gradient norm is not finite (DeepSpeed's ZeRO
    optimizer in the T2I stage, the REPA-E step's own check); one bad batch must not end a
    GPU-week run, but a run that only produces NaNs must stop before it burns its allocation.
    ``total`` survives a resume (it is in ``trainer_state.json``).
    """

    def __init__(self, limit: int, total: int = 0) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = total

    def record(self, applied: bool, step: int, last_good: Callable[[], str], warn: bool = True) -> bool:
        """Note one optimizer step (``applied``: the weights changed); raise :class:`NonFiniteStop` at the limit."""
        if applied:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if warn:
            log.warning(
                "step %d: non-finite loss or gradient norm, update skipped on every rank (%d in a row, limit %d)",
                step,
                self.in_a_row,
                self.limit,
            )
        if self.in_a_row >= self.limit:
            raise NonFiniteStop(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient norm "
                f"(trainer.max_nonfinite_steps={self.limit}); the weights are those of step "
                f"{step - self.in_a_row}; last good checkpoint: {last_good()}"
            )
        return False


def last_good_checkpoint(run_dir: Path) -> str:
    """The folder a user restarts from after a stop, in words."""
    from common import checkpoint as ckpt

    latest = ckpt.read_latest(run_dir)
    return str(ckpt.step_dir(run_dir, latest)) if latest is not None else "none was written yet"


def preview_path(run_dir: Path, step: int) -> Path:
    """Where a trainer's preview grid for ``step`` goes: ``<run>/samples/<step:08d>.png`` in both stages."""
    return Path(run_dir) / "samples" / f"{step:08d}.png"


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cadence:
    """When the loop logs, checkpoints and previews (the shared ``trainer.*`` fields)."""

    max_steps: int
    logging_steps: int
    checkpointing_steps: int
    sampling_steps: int  # 0: no previews

    @classmethod
    def of(cls, trainer) -> Cadence:
        return cls(trainer.max_steps, trainer.logging_steps, trainer.checkpointing_steps, trainer.sampling_steps)


class Stage(Protocol):
    """What a trainer supplies to :func:`run_loop`; ``step`` is the number of optimizer steps taken."""

    step: int

    def loop_step(self) -> None:
        """One optimizer step (all its micro-batches); window statistics stay with the stage, on the device."""

    def log_window(self, steps: int, seconds: float) -> dict[str, str]:
        """Log the window of ``steps`` steps that took ``seconds``; return the progress bar's postfix."""

    def save(self) -> object:
        """Collective: write a checkpoint of step ``self.step``."""

    def preview(self) -> object:
        """Render a preview grid (rank 0 writes it; may be collective)."""

    def end_step(self) -> None:
        """Drop whatever the step's logging, preview and checkpoint shared (e.g. a gathered EMA)."""


class StopRequest(Protocol):
    received: int | None

    def agreed(self, device: torch.device) -> bool: ...


def run_loop(stage: Stage, cadence: Cadence, stop: StopRequest, device: torch.device, bar) -> bool:
    """Train until ``cadence.max_steps`` or an agreed stop; True when a signal stopped the run.

    Per step: train, log on logging steps (and the last), agree on a stop on logging steps only
    (one collective there, none on other steps: common.signals), preview on the sampling cadence
    and at the end (not when stopping: the grace period is for the checkpoint), checkpoint on the
    checkpointing cadence, at the end and when stopping. A planned stop is not a failure: the
    entry point exits 0 and the scheduler requeues the job, which resumes from that checkpoint.
    """
    window_start, window_steps = time.perf_counter(), 0
    while stage.step < cadence.max_steps:
        stage.loop_step()
        stage.step += 1
        window_steps += 1
        bar.update(1)
        done = stage.step == cadence.max_steps
        logging_step = stage.step % cadence.logging_steps == 0 or done
        if logging_step:
            bar.set_postfix(stage.log_window(window_steps, time.perf_counter() - window_start))
            window_start, window_steps = time.perf_counter(), 0
        stopping = logging_step and stop.agreed(device)
        sampling = cadence.sampling_steps and (stage.step % cadence.sampling_steps == 0 or done)
        if sampling and not stopping:
            stage.preview()
        if stage.step % cadence.checkpointing_steps == 0 or done or stopping:
            stage.save()
        stage.end_step()
        if stopping:
            log.warning("signal %s received: checkpointed at step %d, stopping", stop.received, stage.step)
            return True
    return False


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
def error_exit(message: str, code: ExitCode = ExitCode.USER_ERROR, prog: str | None = None) -> int:
    """Print the one ``error:`` line (``prog: error: ...`` as argparse does, when given) and return the code."""
    print(f"{prog}: error: {message}" if prog else f"error: {message}", file=sys.stderr)
    return int(code)


class UsageExit(SystemExit):
    """A user error deep in a tool's own code: one ``error:`` line now, exit 2 (still a ``SystemExit``).

    For tools whose callers and tests already expect ``SystemExit``; a bare ``SystemExit("text")``
    exits 1, which the exit-code table reserves for crashes.
    """

    def __init__(self, message: str) -> None:
        super().__init__(int(ExitCode.USER_ERROR))
        self.message = message
        print(f"error: {message}", file=sys.stderr)

    def __str__(self) -> str:
        return self.message


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user got wrong, for every entry point to turn into one line and exit 2 (never a traceback).

    :class:`common.config.ConfigError`: a bad config, flag value, or a run folder / tag that does not
    exist (``CheckpointNotFound``), or one held by another trainer (``RunFolderBusy``);
    :class:`common.checkpoint.CheckpointDamaged`: a file of a run that fails its manifest.
    """
    from common.checkpoint import CheckpointDamaged
    from common.config import ConfigError

    return (ConfigError, CheckpointDamaged)


def run_cli(prog: str, main: Callable[[], object]) -> int:
    """A tool's entry point: user errors and missing files or folders end in one ``prog: error:`` line, exit 2.

    ``OSError`` covers a missing input (``FileNotFoundError``), a permission problem, and a model
    hub that cannot be reached offline; the first line of its message is kept.
    """
    try:
        status = main()
        return status if isinstance(status, int) else 0  # some tools return their report
    except (*user_errors(), OSError) as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        return error_exit(lines[0] if lines else type(err).__name__, prog=prog)


def run_entry(body: Callable[[], object], cleanup: Callable[[], None] | None = None) -> int:
    """Run a trainer's body and turn how it ended into the documented exit code.

    User errors (:class:`common.config.ConfigError`, a busy run folder), the non-finite stop and a
    failed checkpoint save end in one ``error:`` line; anything else is a bug and keeps its
    traceback (exit 1). After a normal end, late stop signals are ignored (common.signals).
    """
    from common.checkpoint import CheckpointSaveError
    from common.config import ConfigError, user_message
    from common.signals import ignore_stop_signals

    try:
        body()
        ignore_stop_signals()
        return int(ExitCode.OK)
    except ConfigError as err:
        return error_exit(user_message(err))
    except FloatingPointError as err:  # NonFiniteStop, and ZeRO-0's refusal of a non-finite gradient
        return error_exit(str(err), ExitCode.NON_FINITE)
    except CheckpointSaveError as err:
        return error_exit(str(err), ExitCode.SAVE_FAILED)
    finally:
        if cleanup is not None:
            cleanup()


__all__ = [
    "Cadence",
    "ExitCode",
    "NonFiniteGuard",
    "NonFiniteStop",
    "Stage",
    "UsageExit",
    "error_exit",
    "user_errors",
    "last_good_checkpoint",
    "preview_path",
    "run_cli",
    "run_entry",
    "run_loop",
]
