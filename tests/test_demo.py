"""The main job (`make demo`) end to end at reduced size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusedit.tools import demo
from tests.conftest import ROOT


@pytest.mark.e2e
def test_demo_quick_runs_end_to_end(quick_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fusedit.tools.demo",
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
        "gen.steps=2",  # the sampler's code path (--quick: 4 ODE steps), for half the sampling time
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("scores on ") and "color" in last
    scores = json.loads((run / "scores.json").read_text())
    assert scores["n"] == len(json.loads((quick_world / "prompts" / "heldout.json").read_text()))
    for attr in ("color", "shape", "position"):
        assert 0.0 <= scores["accuracy"][attr] <= 1.0 and 0.0 < scores["chance"][attr] < 1.0
    samples = scores["samples_per_prompt"]
    assert samples == 2 and scores["images"] == scores["n"] * samples
    for attr, span in scores["interval"].items():
        assert span["low"] <= scores["accuracy"][attr] <= span["high"], attr
    # the guidance scale is chosen on the training-triple prompts, never on the held-out ones
    selection = scores["guidance_selection"]
    assert selection["prompts"] == 48 and scores["guidance_scale"] == selection["chosen"]
    assert [row["scale"] for row in selection["grid"]] == list(demo.GUIDANCE_GRID)
    assert set(scores["goals"]["rows"]) == set(demo.GOALS)
    assert scores["versions"]["torch"] and scores["threads"] >= 1
    assert (run / "heldout_grid.png").stat().st_size > 0
    assert (run / "latest").read_text().strip() == "6"
