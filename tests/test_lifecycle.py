"""The run lifecycle both stages share (common.lifecycle): the loop's cadence, stops and exit codes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from common.lifecycle import Cadence, ExitCode, NonFiniteGuard, NonFiniteStop, run_entry, run_loop
from tests.test_repae_train import make_trainer


class _Bar:
    def __init__(self) -> None:
        self.n, self.postfix = 0, None

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix(self, postfix: dict) -> None:
        self.postfix = postfix


class _Stop:
    def __init__(self, at: int | None, stage: _Stage | None = None) -> None:
        self.at, self.stage, self.received = at, stage, None

    def agreed(self, device: torch.device) -> bool:
        if self.at is not None and self.stage.step >= self.at:
            self.received = signal.SIGUSR1
        return self.received is not None


class _Stage:
    def __init__(self, step: int = 0) -> None:
        self.step, self.events = step, []

    def loop_step(self) -> None:
        self.events.append(("step", self.step + 1))

    def log_window(self, steps: int, seconds: float) -> dict[str, str]:
        self.events.append(("log", self.step, steps))
        return {"steps": str(steps)}

    def save(self) -> None:
        self.events.append(("save", self.step))

    def preview(self) -> None:
        self.events.append(("preview", self.step))

    def end_step(self) -> None:
        pass


def _only(stage: _Stage, kind: str) -> list[tuple]:
    return [e[1:] for e in stage.events if e[0] == kind]


def test_loop_logs_previews_and_saves_on_their_cadence_and_at_the_end() -> None:
    stage, bar = _Stage(), _Bar()
    stopped = run_loop(stage, Cadence(7, 3, 4, 2), _Stop(None), torch.device("cpu"), bar)
    assert not stopped and stage.step == 7 and bar.n == 7
    assert _only(stage, "log") == [(3, 3), (6, 3), (7, 1)]  # the last window is short
    assert _only(stage, "save") == [(4,), (7,)]
    assert _only(stage, "preview") == [(2,), (4,), (6,), (7,)]
    assert bar.postfix == {"steps": "1"}


def test_loop_resumes_mid_run_and_a_stop_checkpoints_without_a_preview() -> None:
    stage = _Stage(step=4)
    stop = _Stop(at=6, stage=stage)
    stopped = run_loop(stage, Cadence(100, 2, 50, 3), stop, torch.device("cpu"), _Bar())
    assert stopped and stage.step == 6
    assert _only(stage, "save") == [(6,)]  # the stop's checkpoint, though 6 is off the cadence
    assert _only(stage, "preview") == []  # step 6 is on the preview cadence, but the grace period is short


def test_guard_allows_isolated_skips_and_stops_on_a_run_of_them() -> None:
    guard = NonFiniteGuard(limit=2)
    assert guard.record(False, 1, lambda: "x", warn=False) is False
    assert guard.record(True, 2, lambda: "x", warn=False) is True
    guard.record(False, 3, lambda: "x", warn=False)
    with pytest.raises(NonFiniteStop, match=r"step 4: 2 steps in a row .* those of step 2; last good checkpoint: x"):
        guard.record(False, 4, lambda: "x", warn=False)
    assert guard.total == 3


@pytest.fixture
def keep_signal_handlers():
    """run_entry ignores late stop signals (an entry point's right); give the test process its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_repae_planned_stop_checkpoints_and_exits_zero(repae_world: Path, tmp_path: Path, keep_signal_handlers) -> None:
    """A SLURM pre-emption is not a crash: before the shared lifecycle REPA-E exited 1 here."""
    run = tmp_path / "run"
    trainer = make_trainer(repae_world, run, **{"trainer.max_steps": 6, "trainer.checkpointing_steps": 100})
    trainer.stop_signal.received = signal.SIGUSR1  # what the handler records on `scancel --signal=USR1`
    assert run_entry(trainer.fit) == ExitCode.OK
    assert trainer.step == 1 and (run / "latest").read_text().strip() == "1"
    assert (run / "1" / "sit.safetensors").is_file()


def test_repae_nonfinite_stop_is_one_line_and_exit_three(
    repae_world: Path, tmp_path: Path, capsys, keep_signal_handlers
) -> None:
    """Before the shared lifecycle a run of non-finite REPA-E steps ended in a traceback (exit 1)."""
    run = tmp_path / "run"
    trainer = make_trainer(repae_world, run, **{"trainer.max_steps": 5, "trainer.max_nonfinite_steps": 2})
    step = trainer.opt_sit.step

    def nonfinite():
        norm, _ = step()
        return norm, False

    trainer.opt_sit.step = nonfinite
    assert run_entry(trainer.fit) == ExitCode.NON_FINITE
    err = capsys.readouterr().err  # the progress bar writes there too
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("error: step 2: 2 steps in a row had a non-finite")
    assert "last good checkpoint: none was written yet" in errors[0]
    assert trainer.guard.total == 2 and not (run / "latest").exists()
