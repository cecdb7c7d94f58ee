#!/usr/bin/env python3
"""A real two-node SLURM cluster on this one machine, to rehearse a launch before spending GPU hours.

    python scripts/slurm/local_cluster.py up /tmp/slurm      # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
    export SLURM_CONF=/tmp/slurm/slurm.conf
    sinfo                                                    # debug* up 2 idle n[1-2]
    sbatch --nodes 2 --gpus-per-node 0 --cpus-per-task 1 scripts/slurm/train.sbatch configs/e2e-vae/toy.yaml ...
    python scripts/slurm/local_cluster.py down /tmp/slurm

Debian's ``slurm-wlm`` runs one ``slurmctld`` and one ``slurmd`` per node, all on 127.0.0.1 with
their own ports, so ``sbatch``, ``srun -N2``, ``scancel --signal``, ``scontrol requeue`` and time
limits behave as on a real cluster (``make slurm`` installs it). Everything the daemons write
(state, spool, logs, pid files) stays in the given folder; ``down`` stops them by those pids,
never by name, so a real SLURM on the machine is left alone. Needs root (``SlurmUser=root``).

Only the standard library: the test suite loads this file, and so can a bare machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "munged", "munge")
MUNGE_DIRS = ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# fusedit local SLURM cluster"
# Short enough that a test of a dying node ends in seconds, long enough for a loaded 2-core machine.
# KillWait: SIGTERM -> SIGKILL grace of a cancelled or timed-out step; see docs/scaling-out.md.
TIMING = {"KillWait": 10, "MessageTimeout": 20, "SlurmdTimeout": 30}


class ClusterError(RuntimeError):
    """The cluster cannot be started here; the message says why (and what to install)."""


@dataclass(frozen=True)
class Cluster:
    """A started cluster: its folder, config and node names. ``env()`` is what a client needs."""

    folder: Path
    nodes: tuple[str, ...]

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: os.environ) with SLURM_CONF pointing at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, squeue, scontrol, ...) against this cluster."""
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, check=check, timeout=timeout)


def missing() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    absent = [b for b in BINARIES if shutil.which(b) is None]
    if absent:
        return f"SLURM not installed (missing {', '.join(absent)}): run `make slurm` as root"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd runs jobs as any user; SlurmUser=root)"
    return None


def config_text(folder: Path, nodes: tuple[str, ...], cpus: int, mem_mb: int, port: int) -> str:
    """slurm.conf for ``nodes`` on this host: every path the daemons write lies inside ``folder``."""
    host = socket.gethostname()
    first, last = port + 1, port + len(nodes)
    names = nodes[0] if len(nodes) == 1 else f"{nodes[0][:-1]}[1-{len(nodes)}]"
    lines = [
        "ClusterName=local",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={port}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"StateSaveLocation={folder}/state",
        f"SlurmdSpoolDir={folder}/spool/%n",
        f"SlurmctldPidFile={folder}/slurmctld.pid",
        f"SlurmdPidFile={folder}/slurmd-%n.pid",
        f"SlurmctldLogFile={folder}/log/ctld.log",
        f"SlurmdLogFile={folder}/log/d-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=bf_interval=1",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        *(f"{k}={v}" for k, v in TIMING.items()),
        f"NodeName={names} NodeHostname={host} NodeAddr=127.0.0.1 Port={first}-{last} "
        f"CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def _ensure_hosts(nodes: tuple[str, ...]) -> None:
    """torchrun's rendezvous host is the first node's *name*: make every node name resolve."""
    absent = [n for n in nodes if not _resolves(n)]
    if absent:
        with HOSTS_FILE.open("a") as f:
            f.write("".join(f"127.0.0.1 {n}  {HOSTS_MARK}\n" for n in absent))


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=True).stdout
        subprocess.run(["unmunge"], input=cred, capture_output=True, timeout=10, check=True)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _ensure_munge(folder: Path) -> None:
    """Start munged (with a fresh key when there is none) unless a working one is already running."""
    if _munge_works():
        return
    for d in MUNGE_DIRS:
        Path(d).mkdir(parents=True, exist_ok=True)
    if not MUNGE_KEY.exists():
        MUNGE_KEY.write_bytes(os.urandom(1024))
    subprocess.run(["chown", "-R", "munge:munge", *MUNGE_DIRS], check=True)
    MUNGE_KEY.chmod(0o400)
    subprocess.run(["munged", "--force"], check=True, timeout=30)
    (folder / "started-munged").write_text("/run/munge/munged.pid\n")
    _wait(_munge_works, 15, "munged did not start")


def _wait(ready, timeout: float, what: str, poll: float = 0.2) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise ClusterError(what)
        time.sleep(poll)


def up(
    folder: str | Path, nodes: int = 2, cpus: int = 1, mem_mb: int = 9000, port: int = 16817, timeout: float = 60
) -> Cluster:
    """Start slurmctld and one slurmd per node in ``folder``; return once every node is idle."""
    why = missing()
    if why:
        raise ClusterError(why)
    folder = Path(folder).absolute()  # the daemons change directory
    if (folder / "slurmctld.pid").exists():
        down(folder)
    for sub in ("state", "log", *(f"spool/n{i + 1}" for i in range(nodes))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    names = tuple(f"n{i + 1}" for i in range(nodes))
    cluster = Cluster(folder, names)
    cluster.conf.write_text(config_text(folder, names, cpus, mem_mb, port))
    _ensure_hosts(names)
    _ensure_munge(folder)
    env = cluster.env()
    try:
        subprocess.run(["slurmctld", "-c", "-f", str(cluster.conf)], env=env, check=True, timeout=30)
        for name in names:
            subprocess.run(["slurmd", "-f", str(cluster.conf), "-N", name], env=env, check=True, timeout=30)
        _wait(lambda: _idle(cluster) == len(names), timeout, f"nodes not idle after {timeout:.0f}s")
    except (subprocess.SubprocessError, ClusterError) as err:
        logs = _log_tail(folder)
        down(folder)
        raise ClusterError(f"could not start the local SLURM cluster in {folder}: {err}; logs: {logs}") from err
    return cluster


def _idle(cluster: Cluster) -> int:
    out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10).stdout
    return sum(1 for line in out.splitlines() if line.split()[-1:] == ["idle"])


def _log_tail(folder: Path, lines: int = 5) -> str:
    logs = sorted((folder / "log").glob("*.log"))
    return " | ".join(f"{p.name}: " + " / ".join(p.read_text().splitlines()[-lines:]) for p in logs)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes (its parent, not us, must reap it).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(pid: int, grace: float = 10) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _no_jobs(env: dict[str, str]) -> bool:
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return True
    return out.returncode != 0 or not out.stdout.strip()


def down(folder: str | Path, grace: float = 30) -> None:
    """Cancel every job (their steps outlive slurmd), then stop the daemons by their pid files."""
    folder = Path(folder).absolute()
    conf = folder / "slurm.conf"
    if conf.exists() and _pid(folder / "slurmctld.pid") is not None:
        env = {**os.environ, "SLURM_CONF": str(conf)}
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            for args in (["--full", "--signal=KILL"], []):
                subprocess.run(["scancel", *args, "-u", "root"], env=env, capture_output=True, timeout=15)
            with contextlib.suppress(ClusterError):
                _wait(lambda: _no_jobs(env), grace, "jobs still listed")
    for pidfile in sorted(folder.glob("slurmd-*.pid")) + [folder / "slurmctld.pid"]:
        pid = _pid(pidfile)
        if pid is not None:
            _stop(pid)
        pidfile.unlink(missing_ok=True)
    started = folder / "started-munged"
    if started.exists():
        pid = _pid(Path(started.read_text().strip()))
        if pid is not None:
            _stop(pid)
        started.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down", "check"), help="start, stop, or say whether it can run here")
    parser.add_argument("folder", nargs="?", default="/tmp/fusedit-slurm", help="state, spool, logs, pid files")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1, help="CPUs SLURM may hand out per node")
    parser.add_argument("--mem-mb", type=int, default=9000, help="RealMemory of each node")
    parser.add_argument("--port", type=int, default=16817, help="slurmctld's port; node i listens on port + i")
    args = parser.parse_args(argv)
    if args.action == "check":
        why = missing()
        print(why or "ok: SLURM and munge are installed and this is root")
        return 1 if why else 0
    if args.action == "down":
        down(args.folder)
        print(f"stopped the cluster in {args.folder}")
        return 0
    try:
        cluster = up(args.folder, args.nodes, args.cpus_per_node, args.mem_mb, args.port)
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(cluster.nodes)} idle node(s) {', '.join(cluster.nodes)}; logs in {cluster.folder / 'log'}")
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
