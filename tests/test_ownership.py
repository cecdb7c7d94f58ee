"""One writer per run folder (common.ownership): who counts as gone; real trainers refusing, taking over, stopping."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import ownership
from tests.conftest import ROOT
from tests.test_repae_train import CONFIG, tiny_overrides


def _record(**fields: object) -> dict:
    base = {"host": socket.gethostname(), "pid": os.getppid(), "heartbeat": time.time(), "job_id": None, "restart": 0}
    base["start_time"] = ownership.process_start_time(int(base["pid"]))
    base.update(fields)
    return base


def test_who_counts_as_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert ownership.owner_gone(_record()) is None  # a live process on this host (pytest's parent)
    assert "no longer runs" in ownership.owner_gone(_record(start_time=1))  # its pid, reused by another process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert "no longer runs" in ownership.owner_gone(_record(pid=int(dead.stdout)))
    # another host (a shared filesystem): only the heartbeat says anything
    assert ownership.owner_gone(_record(host="elsewhere", heartbeat=time.time() - 30)) is None
    assert "no heartbeat" in ownership.owner_gone(_record(host="elsewhere", heartbeat=time.time() - 600))
    # a SLURM requeue: the previous incarnation of this job is gone, however fresh its heartbeat
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert "requeued" in ownership.owner_gone(_record(host="elsewhere", job_id="77", restart=0))
    assert ownership.owner_gone(_record(host="elsewhere", job_id="78", restart=0)) is None


def test_a_live_foreign_claim_is_refused_and_a_damaged_one_taken(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ownership.OWNER_FILE).write_text(json.dumps(_record(host="node-b", pid=4242, job_id="9")))
    with pytest.raises(ownership.RunFolderBusy, match="host node-b, pid 4242, SLURM job 9"):
        ownership.RunClaim(run).acquire()
    (run / ownership.OWNER_FILE).write_text("{not json")
    claim = ownership.RunClaim(run)
    claim.acquire()
    assert json.loads((run / ownership.OWNER_FILE).read_text())["token"] == claim.record["token"]
    claim.release()
    assert not (run / ownership.OWNER_FILE).exists()


def _start(args: list[str], torchrun: bool = False) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else []
    return subprocess.Popen(
        [sys.executable, *launcher, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_for(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.5)


def _run_to_end(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _long_run(world: Path, run: Path, steps: int = 100000) -> list[str]:
    extra = {"trainer.max_steps": steps, "trainer.checkpointing_steps": 100000}
    return ["-m", "repae.train", "-c", str(CONFIG), *tiny_overrides(world, run, **extra)]


@pytest.mark.multiprocess
def test_second_trainer_is_refused_then_takes_over_after_kill_9(repae_world: Path, tmp_path: Path) -> None:
    run, owner = tmp_path / "run", tmp_path / "run" / ownership.OWNER_FILE
    first = _start(_long_run(repae_world, run))
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file(), 180, "the first trainer to train")
        second = _run_to_end(_long_run(repae_world, run, steps=2))
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr
        assert f"a live trainer is writing this run folder (host {socket.gethostname()}, pid {first.pid}" in errors[0]
    finally:
        first.kill()  # kill -9: no clean-up, the owner file stays behind
        first.wait(timeout=30)
    assert json.loads(owner.read_text())["pid"] == first.pid
    third = _run_to_end(_long_run(repae_world, run, steps=2))
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over {run}" in third.stderr and f"pid {first.pid} no longer runs" in third.stderr
    assert (run / "latest").read_text().strip() == "2" and not owner.exists()  # let go at exit


@pytest.mark.multiprocess
def test_workers_stop_on_their_own_when_torchrun_is_killed(repae_world: Path, tmp_path: Path) -> None:
    """kill -9 of the launcher alone: its worker (own process group) checkpoints and exits instead of training on."""
    run, owner = tmp_path / "run", tmp_path / "run" / ownership.OWNER_FILE
    launcher = _start(_long_run(repae_world, run), torchrun=True)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file(), 240, "the worker to train")
        worker = json.loads(owner.read_text())["pid"]
        assert worker != launcher.pid
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        _wait_for(lambda: not _running(worker), 120, "the orphaned worker to stop")
    finally:
        if launcher.poll() is None:
            launcher.kill()
    step = int((run / "latest").read_text())
    assert step >= 1 and (run / str(step) / "sit.safetensors").is_file()  # the planned stop's checkpoint
    assert not owner.exists()
