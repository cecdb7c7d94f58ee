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
        "sample.num_steps=2",  # the sampler's code path (--quick: 4 ODE steps), for half the sampling time
        "--select-guidance",  # the selection's code path; by default the recipe's sample.cfg_scale (below)
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
    assert scores["guidance_rule"] == "selected on the guidance prompts"
    assert set(scores["goals"]["rows"]) == set(demo.GOALS)
    assert scores["versions"]["torch"] and scores["threads"] >= 1
    # training and scoring on the pinned numeric path (the demo pins itself whatever it inherits),
    # on the world's encoder caches
    assert scores["numerics"]["threads"] == 2 and scores["numerics"]["env"]["MKL_CBWR"] == "COMPATIBLE,STRICT"
    assert scores["world_numerics"]["pinned"] == scores["numerics"]["pinned"]
    assert (quick_world / demo.LATENT_CACHE / "cache.json").is_file()
    assert (quick_world / demo.TEXT_CACHE / "cache.json").is_file()
    assert (run / "heldout_grid.png").stat().st_size > 0
    assert (run / "latest").read_text().strip() == "6"
    # without --select-guidance the scale is the recipe's, fixed before any held-out prompt is seen
    again = demo.evaluate(quick_world, run, None, seed=0, samples=1)
    assert again["guidance_scale"] == 1.5 and again["guidance_selection"] is None
    assert again["guidance_rule"] == "recipe (sample.cfg_scale)"


def _missed(world_pinned: bool) -> dict:
    return {
        "guidance_scale": 1.5,
        "world_numerics": {"pinned": world_pinned, "why": "E2E_UNPINNED=1 (the user opted out)", "cpu_model": "X"},
        "goals": {
            "met": False,
            "rows": {
                "color": {"goal": 0.9, "low": 0.8803, "met": False},
                "shape": {"goal": 0.6, "low": 0.7, "met": True},
            },
        },
    }


def test_a_missed_goal_ends_in_a_verdict_naming_goal_shortfall_world_and_what_to_try() -> None:
    text = demo.verdict(_missed(world_pinned=False))
    assert "UNPINNED (E2E_UNPINNED=1" in text and "CFG 1.5" in text
    assert "color: lower bound 0.880 < goal 0.90 (short by 0.020)" in text and "shape:" not in text
    assert "unset E2E_UNPINNED" in text and "--seed 1" in text
    assert "unset E2E_UNPINNED" not in demo.verdict(_missed(world_pinned=True))
