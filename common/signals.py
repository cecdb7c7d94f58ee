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
