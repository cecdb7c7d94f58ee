"""One numeric path for the toy world and the demo on every x86-64 CPU with AVX2.

Why: a fixed seed and fixed step counts make a CPU build deterministic *on one machine*, but the
math libraries pick their kernels by instruction set. Measured on an AMD EPYC with AVX-512 (the
quick toy world, 2 threads): oneDNN's AVX-512 convolutions and its AVX2 ones give different VAE and
scorer weights; MKL's default code path and its conditional-numerical-reproducibility (CNR) path
give different scorer weights. A user on another CPU type therefore got another world, and the
demo's verdict moved with it.

The pinned path, set by the project (never by the user) before torch loads:

=====================  ======================  ==================================================
library                setting                 why
=====================  ======================  ==================================================
oneDNN (convolutions)  ``ONEDNN_MAX_CPU_ISA``  the AVX2 kernels exist on every CPU with AVX2;
                       ``= AVX2``              AVX-512 ones only on some
MKL (GEMMs)            ``MKL_CBWR =``          MKL honours an ISA-specific CNR branch (``AVX2``)
                       ``COMPATIBLE,STRICT``   only on Intel CPUs (on AMD it silently falls back to
                                               ``AUTO``: read back with ``mkl_serv_cbwr_get``);
                                               ``COMPATIBLE`` is the one branch documented to give
                                               the same bits on every x86 CPU, Intel or AMD
ATen (elementwise,     ``ATEN_CPU_CAPABILITY   torch's own vector kernels, compiled per ISA
reductions, SDPA)      = avx2``
threads                2 (OMP, MKL, torch)     CPU reductions split by thread count
=====================  ======================  ==================================================

What it cannot cover is named in ``docs/numerics.md``: oneDNN's blocking heuristics also read the
cache sizes, which no environment variable fixes, and CPUs without AVX2 or other architectures
(Arm) run other kernels and build another world. The test suite checks every machine it runs on
against committed weight hashes (``tests/test_numerics.py``), so such a difference shows up as a
failed test rather than as a missed demo goal.

``E2E_UNPINNED=1`` opts out: the machine's own (faster) kernels are used and ``world.json`` says
the world was built on an unpinned path.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

OPT_OUT = "E2E_UNPINNED"
PINNED_THREADS = 2
PINNED_ENV: dict[str, str] = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "ATEN_CPU_CAPABILITY": "avx2",
    "OMP_NUM_THREADS": str(PINNED_THREADS),
    "MKL_NUM_THREADS": str(PINNED_THREADS),
}
# mkl_cbwr_get's answer for COMPATIBLE (3) with the STRICT flag (0x10000).
_MKL_COMPATIBLE_STRICT = 0x10003
_ENV_SEEN = ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_supported() -> tuple[bool, str]:
    """(whether this CPU can run the pinned path, why not): an x86-64 CPU with AVX2 and FMA."""
    import platform

    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return False, f"a {machine} CPU"
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return True, "no /proc/cpuinfo to check; assuming AVX2"
    missing = [f for f in ("avx2", "fma") if f not in flags]
    return (not missing, f"an x86-64 CPU without {', '.join(missing)}" if missing else "x86-64 with AVX2")


def opted_out(env: Mapping[str, str] | None = None) -> bool:
    """Whether the user asked for the machine's own kernels (``E2E_UNPINNED=1``)."""
    value = (os.environ if env is None else env).get(OPT_OUT, "")
    return value.strip().lower() not in ("", "0", "false", "no")


def pinned_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the pinned settings, unless the user opted out.

    For launching a child process (a trainer, a builder) on the same path as its parent.
    """
    out = dict(os.environ if env is None else env)
    if not opted_out(out):
        out.update(PINNED_ENV)
    return out


def _env_is_pinned(env: Mapping[str, str]) -> bool:
    return all(env.get(k) == v for k, v in PINNED_ENV.items())


def pin_process(argv: list[str] | None = None) -> None:
    """Put this process on the pinned path; call first thing in an entry point's ``main``.

    The libraries read their settings once, when they first run a kernel, so the environment
    must be right before torch computes anything: if torch is not imported yet the variables are
    set in place; otherwise the process starts itself again with them (``os.execve``; ``argv``
    defaults to how this interpreter was started). Nothing happens when the user opted out or the
    environment already holds the pins.
    """
    if opted_out() or _env_is_pinned(os.environ):
        return
    if "torch" not in sys.modules:
        os.environ.update(PINNED_ENV)
        return
    args = list(sys.orig_argv) if argv is None else [sys.executable, *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, pinned_environment())


def _mkl_cbwr() -> int | None:
    """MKL's active CNR mode, read from the MKL linked into torch (None where it cannot be read)."""
    import torch

    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return int(get(-1))


def process_pinned() -> bool:
    """Whether this process computes on the pinned path, thread count aside (builds set that themselves)."""
    return not _problems(check_threads=False)


def _problems(check_threads: bool = True, capability: str | None = None, mkl: int | None = None) -> list[str]:
    """What keeps this process off the pinned path (empty: on it); ``capability``/``mkl`` if already read."""
    import torch

    capability = capability or torch.backends.cpu.get_cpu_capability()
    mkl = _mkl_cbwr() if mkl is None else mkl
    problems = []
    if opted_out():
        problems.append(f"{OPT_OUT}=1 (the user opted out)")
    elif not _env_is_pinned(os.environ):
        problems.append("the process was not started on the pinned path (numerics.pin_process)")
    if capability != "AVX2":
        problems.append(f"ATen CPU capability is {capability}, not AVX2")
    if mkl is not None and mkl != _MKL_COMPATIBLE_STRICT:
        problems.append(f"MKL CNR mode is {mkl:#x}, not COMPATIBLE,STRICT")
    if check_threads and torch.get_num_threads() != PINNED_THREADS:
        problems.append(f"torch runs {torch.get_num_threads()} threads, not {PINNED_THREADS}")
    return problems


def numeric_path() -> dict[str, Any]:
    """Which numeric path this process computes on, as recorded in world.json and scores.json.

    ``pinned`` is true only when every library really took its setting: the environment holds the
    pins, ATen reports the AVX2 capability, MKL reports the COMPATIBLE branch (when readable) and
    torch runs ``PINNED_THREADS`` threads. ``why`` names what is off otherwise.
    """
    import torch

    from common.machine import cpu_model

    capability = torch.backends.cpu.get_cpu_capability()
    mkl = _mkl_cbwr()
    problems = _problems(capability=capability, mkl=mkl)
    return {
        "pinned": not problems,
        "why": "; ".join(problems) or "every pin in effect",
        "cpu_model": cpu_model(),
        "aten_capability": capability,
        "mkl_cbwr": None if mkl is None else hex(mkl),
        "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in _ENV_SEEN},
    }


@contextlib.contextmanager
def pinned_threads() -> Iterator[None]:
    """Run the block on ``PINNED_THREADS`` torch threads (restored after), unless opted out.

    OMP_NUM_THREADS sets the count for a fresh process; this also covers a library caller (the
    test suite, a notebook) whose process runs another count.
    """
    import torch

    before = torch.get_num_threads()
    if not opted_out():
        torch.set_num_threads(PINNED_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)
