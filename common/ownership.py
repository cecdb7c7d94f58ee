"""One writer per run folder: a trainer claims its folder, keeps the claim alive, and lets go.

Two trainers writing one run folder corrupt it silently: their checkpoints interleave, ``latest``
points at either, and the metrics log mixes two runs. It happens more easily than it sounds: after
``kill -9`` of a ``torchrun`` launcher, its workers (torchrun starts them in process groups of
their own) train on, and a relaunch on the same folder runs beside them. So:

* Rank 0 claims the folder before any heavy work: ``<run>/owner.json`` names the host, pid, the
  process's start time, the SLURM job (id and restart count) and a heartbeat refreshed every
  :data:`HEARTBEAT_S` seconds by a daemon thread. A claim held by a live trainer is refused in one
  line naming it (:class:`RunFolderBusy`, a user error: exit 2).
* A claim whose owner is gone is taken over without a manual step. Gone means: on this host, the
  pid no longer runs the process that claimed (pid and start time, so a reused pid does not count);
  on another host (a shared filesystem, where local pids say nothing), no heartbeat for
  :data:`STALE_S` seconds; for the same SLURM job with a higher restart count (a requeue), at once.
* A trainer that lost its claim (taken over while it was thought dead, e.g. a host that froze for
  minutes) stops before its next checkpoint instead of writing into a folder that is no longer
  its own (:meth:`RunClaim.check`, collective).
* Workers whose launcher died stop on their own: under ``torchrun`` each rank watches its parent;
  when the launcher is gone the rank sends itself SIGTERM, which is a planned stop (checkpoint,
  then exit: common.signals), so nothing trains on unsupervised.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from common.config import ConfigError
from common.distributed import broadcast_object
from common.files import write_json_atomic

log = logging.getLogger("common.ownership")

OWNER_FILE = "owner.json"
HEARTBEAT_S = 10.0  # how often the owner refreshes its heartbeat
STALE_S = 90.0  # no heartbeat for this long: the owner on another host is gone
PARENT_POLL_S = 2.0  # how often a torchrun worker checks that its launcher is still there


class RunFolderBusy(ConfigError):
    """The run folder is held by a live trainer (a user error: two launches on one folder)."""


class RunFolderLost(ConfigError):
    """Another trainer took this run folder over; this one must not write into it any more."""


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None when it does not run.

    With the pid it identifies a process: a pid reused after the owner died has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces


def _job() -> dict[str, Any]:
    return {
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }


def describe(owner: dict[str, Any]) -> str:
    job = f", SLURM job {owner['job_id']}" if owner.get("job_id") else ""
    return f"host {owner.get('host')}, pid {owner.get('pid')}{job}"


def owner_gone(owner: dict[str, Any], now: float | None = None) -> str | None:
    """Why the recorded owner is gone, or None while it may still be writing."""
    mine = _job()
    if owner.get("job_id") and owner.get("job_id") == mine["job_id"] and int(owner.get("restart", 0)) < mine["restart"]:
        return f"SLURM requeued job {mine['job_id']} (restart {mine['restart']})"
    if owner.get("host") == socket.gethostname():
        if owner.get("pid") == os.getpid():
            return "this process claims it again (a new trainer in the same process)"
        started = process_start_time(int(owner.get("pid", -1)))
        if started is None or started != owner.get("start_time"):
            return f"pid {owner.get('pid')} no longer runs on this host"
        return None
    age = (now if now is not None else time.time()) - float(owner.get("heartbeat", 0))
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s (over {STALE_S:.0f} s)"
    return None


class RunClaim:
    """Rank 0's claim on a run folder; a heartbeat thread keeps it fresh until :meth:`release`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / OWNER_FILE
        pid = os.getpid()
        self.record = {
            "host": socket.gethostname(),
            "pid": pid,
            "start_time": process_start_time(pid),
            **_job(),
            "token": uuid.uuid4().hex,
            "claimed": time.time(),
            "heartbeat": time.time(),
        }
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # damaged: nobody can be shown to hold it

    def acquire(self) -> None:
        """Claim the folder or raise :class:`RunFolderBusy`; takes over a claim whose owner is gone."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f, indent=1)
        self._thread = threading.Thread(target=self._beat, name="run-folder-heartbeat", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        owner = self.read()
        why = owner_gone(owner) if owner else "its owner record is missing or damaged"
        if why is None:
            raise RunFolderBusy(
                f"{self.path.parent}: a live trainer is writing this run folder ({describe(owner)}); "
                f"stop it, or train into another folder (trainer.checkpoint_dir / run_dir)"
            )
        write_json_atomic(self.path, self.record)
        if (self.read() or {}).get("token") != self.record["token"]:  # another launch took it at the same time
            raise RunFolderBusy(f"{self.path.parent}: another trainer claimed this run folder at the same moment")
        log.warning("took over %s from %s: %s", self.path.parent, describe(owner or {}), why)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = self.read()
            if current is not None and current.get("token") != self.record["token"]:
                self.lost = True
                log.error("%s was taken over by %s; stopping before the next write", self.path, describe(current))
                return
            self.record["heartbeat"] = time.time()
            try:
                write_json_atomic(self.path, self.record)
            except OSError as err:  # a full or flaky disk: the checkpoint writer reports it where it matters
                log.warning("heartbeat not written to %s: %s", self.path, err)

    def release(self) -> None:
        """Stop the heartbeat and remove the claim if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self.read() or {}).get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)


class FolderOwnership:
    """The whole launch's view: rank 0 holds the claim, every rank learns the verdicts (collectives)."""

    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.claim = RunClaim(run_dir) if is_main else None

    def acquire(self) -> None:
        """Collective: every rank raises :class:`RunFolderBusy` when rank 0 could not claim the folder."""
        error = None
        if self.claim is not None:
            try:
                self.claim.acquire()
            except RunFolderBusy as err:
                error = str(err)
        error = broadcast_object(error)
        if error is not None:
            raise RunFolderBusy(error)

    def check(self) -> None:
        """Collective, before a checkpoint: every rank raises :class:`RunFolderLost` once the claim is gone."""
        lost = broadcast_object(self.claim.lost if self.claim is not None else False)
        if lost:
            raise RunFolderLost(
                f"{self.claim.path.parent if self.claim else 'the run folder'}: another trainer took this run "
                f"folder over; this one stopped without writing (its last checkpoint is the newest one there)"
            )

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()


def watch_launcher(poll_s: float = PARENT_POLL_S) -> threading.Thread | None:
    """Under torchrun, a daemon thread that turns the launcher's death into a planned stop (SIGTERM to self).

    torchrun starts its workers in process groups of their own, so ``kill -9`` of the launcher
    (or of its group) leaves them running; their parent then changes (the orphan is re-parented).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.error("the launcher (pid %d) is gone: stopping at the next logging step after a checkpoint", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread


__all__ = [
    "FolderOwnership",
    "OWNER_FILE",
    "RunClaim",
    "RunFolderBusy",
    "RunFolderLost",
    "describe",
    "owner_gone",
    "process_start_time",
    "watch_launcher",
]
