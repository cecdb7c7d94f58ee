"""The main job (`make demo`) end to end at reduced size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.e2e
def test_demo_quick_runs_end_to_end(quick_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fusedit.demo",
        "--quick",
        "--toy",
        str(quick_world),
        "--run",
        str(run),
        "model.hidden_size=32",
        "model.num_hidden_layers=1",
        "model.num_attention_heads=2",
        "model.num_key_value_heads=1",
        "model.head_dim=16",
        "model.intermediate_size=64",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("scores on ") and "color" in last
    scores = json.loads((run / "scores.json").read_text())
    assert scores["n"] == len(json.loads((quick_world / "prompts" / "heldout.json").read_text()))
    for attr in ("color", "shape", "position"):
        assert 0.0 <= scores["accuracy"][attr] <= 1.0 and 0.0 < scores["chance"][attr] < 1.0
    assert (run / "heldout_grid.png").stat().st_size > 0
    assert (run / "latest").read_text().strip() == "6"
