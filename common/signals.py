"""Stop on a signal, at a step every rank agrees on, after a checkpoint.

SLURM (``--signal=USR1@90``, or SIGTERM at pre-emption or the time limit) and ``kill`` deliver a
signal to every process. The handler only records it; the trainer asks :meth:`StopSignal.agreed`
(an all-reduce, so all ranks stop at the same step even when only some got the signal) on its
logging steps, saves a checkpoint and exits. Asking only on logging steps keeps one collective
out of every step; the price is a delay of up to ``logging_steps`` steps, which must stay inside
the scheduler's grace period (pick ``--signal=USR1@<seconds>`` accordingly).
"""

from __future__ import annotations

import contextlib
import signal

import torch

from common.distributed import all_reduce_sum

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Records SIGTERM / SIGUSR1; :meth:`agreed` tells every rank whether any rank got one."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: int | None = None
        for sig in signals:
            with contextlib.suppress(ValueError):  # not the main thread (some launchers): no handler
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank has received a stop signal."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)


def ignore_stop_signals(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
    """Training is over: a late stop request has nothing left to stop. For entry points only.

    A launcher may ask again for a stop it already got (train.sbatch resends USR1 until the
    trainers exit), and at interpreter shutdown CPython puts every Python-level handler back to
    SIG_DFL, whose action for SIGUSR1 is to kill: a finished run would end as "killed by signal
    10". SIG_IGN is left alone by that shutdown. Not for library code, which must not change the
    signal dispositions of a process it does not own.
    """
    for sig in signals:
        with contextlib.suppress(ValueError):
            signal.signal(sig, signal.SIG_IGN)
