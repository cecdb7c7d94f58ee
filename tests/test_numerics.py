"""One toy world on every x86-64 CPU: the pinned numeric path, checked against committed digests.

``tests/world_digests.json`` holds the bit-exact weight digests of the quick world built on the
pinned path (``common/numerics.py``). Every machine that runs the suite (a developer's, CI, a
user's) compares its own build with them, so a CPU type whose kernels give other bits fails here,
naming the part, instead of silently building another world for the demo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import numerics
from toyworld.training import library_versions

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = Path(__file__).with_name("world_digests.json")


def _committed() -> dict:
    return json.loads(DIGESTS.read_text())


def _skip_unless_comparable() -> dict:
    """The committed record, or a skip where the comparison cannot hold (other CPU family, other libraries)."""
    record = _committed()
    supported, why = numerics.cpu_supported()
    if not supported:
        pytest.skip(f"{why}: the pinned path covers x86-64 CPUs with AVX2 only (docs/numerics.md)")
    versions = library_versions()
    changed = {k: (v, versions.get(k)) for k, v in record["versions"].items() if versions.get(k) != v}
    if changed:
        pytest.skip(f"library versions differ from those the digests were made with: {changed}")
    return record


def _assert_same_world(world: dict, record: dict, where: str) -> None:
    assert world["numerics"]["pinned"], f"{where}: not built on the pinned path: {world['numerics']['why']}"
    differ = [p for p, d in record["quick"].items() if world["weights_sha256"][p] != d]
    assert not differ, (
        f"{where}: the pinned quick world's {differ} weights differ from the committed digests "
        f"(made on {record['cpu_model']}); this CPU ({world['numerics']['cpu_model']}) computes other bits "
        "on the pinned path: see docs/numerics.md, 'What the pin cannot cover'"
    )


def test_quick_world_matches_the_committed_digests(quick_world: Path) -> None:
    """The session's quick world (``dataset_download.py --toy DIR --quick``) is the committed one."""
    record = _skip_unless_comparable()
    world = json.loads((quick_world / "world.json").read_text())
    assert world["request"]["numerics"] == "pinned"
    _assert_same_world(world, record, "the session's quick world")


# What another machine would bring: MKL dispatch capped at SSE4.2 (a setting the pin leaves alone, so
# MKL's COMPATIBLE branch must not depend on it), oneDNN capped below AVX2, ATen without vector
# kernels and one thread (all three overridden by the pin).
HOSTILE_ENV = {
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "ATEN_CPU_CAPABILITY": "default",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_CBWR": "AUTO",
}


@pytest.mark.multiprocess
def test_pinned_build_ignores_the_machines_own_settings(tmp_path: Path) -> None:
    """``dataset_download.py --toy`` pins itself whatever the environment says, and gets the same bits."""
    record = _skip_unless_comparable()
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED_ENV}
    env.update(HOSTILE_ENV)
    out = tmp_path / "world"
    cmd = [sys.executable, str(ROOT / "dataset_download.py"), "--toy", str(out), "--quick", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    world = json.loads((out / "world.json").read_text())
    assert world["numerics"]["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and world["numerics"]["threads"] == 2
    _assert_same_world(world, record, "build under a hostile environment")


def test_pin_process_sets_the_environment_before_torch_loads() -> None:
    code = (
        "from common import numerics; numerics.pin_process(); import torch, json; "
        "print(json.dumps(numerics.numeric_path()))"
    )
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED_ENV and k != numerics.OPT_OUT}
    path = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    if numerics.cpu_supported()[0]:
        assert path["pinned"], path["why"]
    assert path["env"]["MKL_CBWR"] == "COMPATIBLE,STRICT" and path["threads"] == numerics.PINNED_THREADS


def test_pin_process_restarts_a_process_that_already_loaded_torch() -> None:
    """torch's libraries read their settings once: a late pin must start the process again."""
    code = (
        "import torch; torch.ones(2) @ torch.ones(2); from common import numerics; numerics.pin_process(); "
        "import json; print(json.dumps(numerics.numeric_path()))"
    )
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED_ENV and k != numerics.OPT_OUT}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    path = json.loads(proc.stdout)
    assert path["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    if numerics.cpu_supported()[0]:
        assert path["pinned"] and path["aten_capability"] == "AVX2", path["why"]


def test_opting_out_is_recorded_and_never_reused_as_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    from toyworld import build

    monkeypatch.setenv(numerics.OPT_OUT, "1")
    assert numerics.opted_out()
    assert numerics.pinned_environment({"X": "1", numerics.OPT_OUT: "1"}) == {"X": "1", numerics.OPT_OUT: "1"}
    assert numerics.pinned_environment({"X": "1"}) == {"X": "1", **numerics.PINNED_ENV}
    path = numerics.numeric_path()
    assert not path["pinned"] and "opted out" in path["why"]
    assert build.build_request(0, 32, 8, 8, 8, {"vae": 1}, True)["numerics"] == "unpinned"
