"""The GPU acceptance check runs end to end on a CPU with --quick (its numbers mean nothing there)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.e2e
def test_quick_acceptance_writes_one_json_with_every_stage_it_ran(tmp_path: Path) -> None:
    out = tmp_path / "acceptance.json"
    stages = "environment,sdpa,dit_step,memory"
    cmd = [sys.executable, "-m", "fusedit.tools.acceptance", "--quick", "--stages", stages, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["stages"]) == stages.split(",") and report["ok"]
    step = report["stages"]["dit_step"]
    assert step["layers"] == 2 and step["images_per_s"]["eager"] > 0
    assert step["mfu"]["eager"] is None  # no dense peak on a CPU: omitted, not invented
    memory = report["stages"]["memory"]
    assert memory["planned_peak_gib"] > 0 and memory["measured_peak_gib"] > 0
    assert report["stages"]["sdpa"]["unpadded"]["backends_that_run"]


def test_acceptance_refuses_an_unknown_stage() -> None:
    cmd = [sys.executable, "-m", "fusedit.tools.acceptance", "--stages", "environment,warp_drive"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "warp_drive" in proc.stderr


def test_the_node_script_keeps_the_nodes_torch() -> None:
    script = (ROOT / "scripts" / "gpu_acceptance.sh").read_text()
    assert "--system-site-packages" in script and "--no-deps" in script
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_acceptance.sh"), "--print-requirements"], capture_output=True, text=True
    )
    names = {line.split("==")[0] for line in proc.stdout.splitlines()}
    assert names and not names & {"torch", "torchvision", "triton"} and not any(n.startswith("nvidia-") for n in names)
    assert "deepspeed" in names and "diffusers" in names
