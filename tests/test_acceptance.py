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
    stages = "environment,sdpa,dit_step"
    cmd = [sys.executable, "-m", "fusedit.tools.acceptance", "--quick", "--stages", stages, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["stages"]) == stages.split(",") and report["ok"]
    step = report["stages"]["dit_step"]
    assert step["layers"] == 2 and step["images_per_s"]["eager"] > 0
    assert step["mfu"]["eager"] is None  # no dense peak on a CPU: omitted, not invented
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


def test_planned_peak_is_the_planners_zero0_one_gpu_figure_without_frozen_encoders() -> None:
    """What the memory stage compares the measured peak with (the stage itself needs a GPU to mean much)."""
    from fusedit.config import load_config
    from fusedit.tools import acceptance
    from fusedit.tools.plan import build_plan

    args = acceptance.parse_args(["--quick", "--batch-size", "2"])
    planned = acceptance.planned_peak_gib(args, 2)
    overrides = [*acceptance.depth_overrides(args, 2), "data.batch_size_per_gpu=2"]
    cfg = load_config(str(acceptance.CONFIG), overrides)
    memory = build_plan(cfg, world_size=1, zero_stage=0, text_tokens=cfg.data.max_prompt_length).memory[0]
    frozen = sum(v for k, v in memory.static.items() if "frozen" in k)
    assert frozen > 0 and planned == (memory.peak(False) - frozen) / 2**30 > 0
