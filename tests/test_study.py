"""The study tool (evaluation.study): arms x seeds trained alike, resumable, through submitit too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TOY_CONFIG, tiny_train_overrides


def study_module():
    from evaluation import study

    return study


def tiny_study_args(world: Path, out: Path, *extra: str) -> list[str]:
    """Two arms of the tiny toy DiT on the quick world; the twin's VAE is a copy (plumbing, not science)."""
    twin = world.parent / "twin-vae"
    if not twin.is_dir():
        shutil.copytree(world / "vae", twin)
    common = [o for o in tiny_train_overrides(world, out / "unused") if not o.startswith("trainer.checkpoint_dir")]
    common.append("sample.num_steps=2")  # scoring samples with the run's sampler settings: 2 ODE steps, not 25
    return [
        "--toy",
        str(world),
        "--kind",
        "t2i",
        "--arm",
        f"original={TOY_CONFIG}",
        "--arm",
        f"twin={TOY_CONFIG}",
        "--out",
        str(out),
        *extra,
        *common,
    ]


def test_cli_rejects_incomplete_designs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    study = study_module()
    for argv, message in (
        (["--kind", "t2i", "--arm", f"a={TOY_CONFIG}"], "a baseline and at least one arm"),
        (["--toy", "toy", "--families", "--kind", "ldm"], "--families is the toy text-to-image study"),
        (["--arm", f"a={TOY_CONFIG}", "--arm", f"b={TOY_CONFIG}"], "--kind"),
        (["--toy", "toy", "--seeds", "0"], "--seeds must be at least 1"),
        (["--toy", "toy", "not-an-override"], "is not key=value"),
        ([], "--toy"),
    ):
        with pytest.raises(SystemExit):
            study.parse_args(argv)
        assert message in capsys.readouterr().err


def test_runs_differ_only_in_seed_and_folder(tmp_path: Path) -> None:
    study = study_module()
    s = study.Study(
        kind="ldm",
        arms=[
            study.Arm("original", "a.yaml", ["vae.pretrained_model_name_or_path=A"]),
            study.Arm("e2e", "a.yaml", ["vae.pretrained_model_name_or_path=B"]),
        ],
        seeds=[0, 1, 2],
        max_steps=100,
        eval_every=25,
        overrides=["optimizer.sit_lr=1e-4"],
        samples=2,
        out=str(tmp_path),
    )
    specs = study.run_specs(s)
    assert [r.name for r in specs] == [f"{a}-seed{k}" for a in ("original", "e2e") for k in range(3)]
    assert all(r.entry == ("-m", "repae.train_ldm") for r in specs)
    by_name = {r.name: r for r in specs}
    a, b = set(by_name["original-seed0"].overrides), set(by_name["original-seed1"].overrides)
    assert a ^ b == {
        "trainer.seed=0",
        "trainer.seed=1",
        f"trainer.checkpoint_dir={tmp_path / 'original' / 'seed0'}",
        f"trainer.checkpoint_dir={tmp_path / 'original' / 'seed1'}",
        "trainer.run=original-seed0",
        "trainer.run=original-seed1",
    }
    assert "trainer.checkpointing_steps=25" in a and "trainer.checkpoints_total_limit=12" in a
    paired = set(by_name["original-seed0"].overrides) ^ set(by_name["e2e-seed0"].overrides)
    assert {o.split("=")[0] for o in paired} == {
        "vae.pretrained_model_name_or_path",
        "trainer.checkpoint_dir",
        "trainer.run",
    }
    # the sweep's job launches the other trainer with the same -c / key=value interface
    from fusedit.tools.sweep import Settings, make_job

    cmd = make_job(specs[0], Settings(executor="local", gpus_per_node=2)).command()
    assert cmd[cmd.index("-m", 3) : cmd.index("-m", 3) + 2] == ["-m", "repae.train_ldm"]
    assert "train.py" not in " ".join(cmd)


def test_only_grid_checkpoints_are_scored(tmp_path: Path) -> None:
    """A stop signal leaves a checkpoint off the --eval-every grid: kept for resuming, never scored."""
    study = study_module()
    s = study.Study("t2i", [study.Arm("a", "x.yaml"), study.Arm("b", "y.yaml")], [0], 100, 25, [], 1, str(tmp_path))
    run = tmp_path / "a" / "seed0"
    for step in (25, 37, 50, 100):
        (run / str(step)).mkdir(parents=True)
        (run / str(step) / "trainer_state.json").write_text("{}")
    from common.checkpoint import list_steps

    if list_steps(run) != [25, 37, 50, 100]:
        pytest.skip(f"list_steps reads checkpoints differently here: {list_steps(run)}")
    assert study.scored_steps(s, run) == [25, 50, 100]


def test_study_folder_refuses_another_design(tmp_path: Path) -> None:
    study = study_module()
    s = study.Study("t2i", [study.Arm("a", "x.yaml"), study.Arm("b", "y.yaml")], [0, 1], 10, 5, [], 1, str(tmp_path))
    study.check_study_folder(s)
    study.check_study_folder(s)  # the same design resumes
    s.seeds = [0, 1, 2]
    with pytest.raises(SystemExit, match="differs in seeds"):
        study.check_study_folder(s)


def test_a_sweep_may_add_arms_but_not_change_one(tmp_path: Path) -> None:
    """grow_arms: a new arm joins the record; an existing arm with other overrides, or another length, is refused."""
    study = study_module()
    arms = [study.Arm("original", "x.yaml", ["vae=a"]), study.Arm("one", "x.yaml", ["vae=b"])]
    s = study.Study("t2i", arms, [100], 600, 600, [], 2, str(tmp_path))
    study.check_study_folder(s, grow_arms=True)
    s.arms = [arms[0], study.Arm("two", "x.yaml", ["vae=c"])]  # a later call names only its own arms
    study.check_study_folder(s, grow_arms=True)
    names = [a["name"] for a in json.loads((tmp_path / "study.json").read_text())["arms"]]
    assert names == ["original", "one", "two"]
    s.arms = [study.Arm("one", "x.yaml", ["vae=changed"])]
    with pytest.raises(SystemExit, match="holds arms"):
        study.check_study_folder(s, grow_arms=True)
    s.arms, s.max_steps = arms, 300
    with pytest.raises(SystemExit, match="differs in max_steps"):
        study.check_study_folder(s, grow_arms=True)
    with pytest.raises(SystemExit, match="differs in arms"):
        study.check_study_folder(s)  # a study proper never grows


def _run_study(argv: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "evaluation.study", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_two_arm_two_seed_study_survives_a_kill_and_reports(quick_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    argv = tiny_study_args(quick_world, out, "--seeds", "2", "--steps", "4", "--eval-every", "2", "--samples", "1")
    proc = _run_study(argv)
    first = out / "original" / "seed0"
    deadline = time.time() + 240
    # kill the whole study while the second run trains (after the first one finished)
    while time.time() < deadline and not (out / "original" / "seed1" / "config.yaml").is_file():
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (first / "latest").read_text().strip() == "4"
    stamp = (first / "4" / "trainer_state.json").stat().st_mtime_ns
    again = _run_study(argv)
    log, _ = again.communicate(timeout=600)
    assert again.returncode == 0, log[-4000:]
    assert "original-seed0: trained to step 4, not restarted" in log
    assert (first / "4" / "trainer_state.json").stat().st_mtime_ns == stamp  # not trained again
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == ["original", "twin"]
    for metric in ("color", "shape", "joint", "fd"):
        m = results["metrics"][metric]
        assert [p["step"] for p in m["curves"]["original"]] == [2, 4]
        assert all(p["seeds"] == 2 for p in m["curves"]["twin"])
        assert m["final"]["verdict"]
    assert results["metrics"]["fd"]["higher_is_better"] is False
    assert results["design"]["guidance_scale"] in (1.0, 1.5, 2.0, 3.0)
    assert (out / "guidance.json").is_file() and (out / "report" / "index.html").is_file()
    assert "E2E" in (out / "report" / "index.html").read_text() or "twin" in (out / "report" / "index.html").read_text()
    # scoring resumes too: a third call trains nothing and samples nothing
    log3 = subprocess.run(
        [sys.executable, "-m", "evaluation.study", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert log3.returncode == 0, log3.stderr[-3000:]
    assert " images, " not in log3.stdout


@pytest.mark.e2e
def test_more_arms_are_each_compared_with_the_baseline(quick_world: Path, tmp_path: Path) -> None:
    """Three arms (what --families runs with four): one guidance choice over all runs, then one
    two-arm summary and report per arm against the baseline, and an index."""
    out = tmp_path / "study"
    argv = tiny_study_args(quick_world, out, "--seeds", "1", "--steps", "2", "--eval-every", "2", "--samples", "1")
    at = argv.index("--out")
    argv[at:at] = ["--arm", f"third={TOY_CONFIG}"]
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.study", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] == "original" and list(results["comparisons"]) == ["twin", "third"]
    for arm in ("twin", "third"):
        pair = json.loads((out / f"{arm}-vs-original" / "results.json").read_text())
        assert pair["arms"] == ["original", arm]
        assert pair == {**results["comparisons"][arm], "timing_s": pair["timing_s"]}
        assert (out / f"{arm}-vs-original" / "report" / "index.html").is_file()
        assert pair["design"]["guidance_scale"] == results["comparisons"]["twin"]["design"]["guidance_scale"]
    assert "third-vs-original/report/index.html" in (out / "index.html").read_text()
    assert "third vs original:" in proc.stdout


@pytest.mark.multiprocess
def test_cluster_path_through_submitits_local_executor(quick_world: Path, tmp_path: Path) -> None:
    """Real-config path: runs submitted as submitit jobs, then every checkpoint scored by a submitit job
    (benchmark sampler + FID with the offline feature extractor) and summarised with intervals."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "cluster"
    design = ["--seeds", "1", "--steps", "2", "--executor", "local"]
    argv = [a for a in tiny_study_args(quick_world, out, *design) if a not in ("--toy", str(quick_world))]
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.study", *argv, "--train-only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("submitted ") == 2
    for arm in ("original", "twin"):
        run = out / arm / "seed0"
        assert (run / "latest").read_text().strip() == "2"
        assert list((run / "submitit").glob("*_log.out"))  # the job ran under submitit
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(real / f"{i}.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps([p["prompt"] for p in json.loads((quick_world / "prompts/heldout.json").read_text())])
    )
    score = [
        "--fid-real",
        str(real),
        "--fid-prompts",
        str(prompts),
        "--fid-samples",
        "6",
        "--fid-extractor",
        "common.fid:random_conv_extractor",
        "--guidance",
        "1.5",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.study", *argv, *score], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("(job ") == 2  # one scoring job per run x checkpoint
    results = json.loads((out / "results.json").read_text())
    fid = results["metrics"]["fid"]
    assert fid["higher_is_better"] is False and [p["step"] for p in fid["curves"]["twin"]] == [2]
    assert all(p["seeds"] == 1 for p in fid["curves"]["original"])
    assert "one seed" in fid["final"]["verdict"]  # no interval is claimed from a single seed
    one = json.loads((out / "original" / "seed0" / "2" / "study_fid.json").read_text())
    assert one["num_fake"] == 6 and one["settings"]["guidance"] == 1.5


def test_repae_sweep_arms_and_table() -> None:
    """The toy REPA-E sweep: every arm names a real config key, and the table says what its intervals cover."""
    from evaluation import repae_sweep
    from repae.config import load_repae_config

    config = ROOT / "configs" / "repae" / "toy.yaml"
    for arm, (overrides, tag) in repae_sweep.ARMS.items():
        cfg = load_repae_config(config, overrides)  # an unknown key or a bad value fails here, not an hour later
        assert cfg.trainer.max_steps >= tag, arm
    with pytest.raises(SystemExit):
        repae_sweep.parse_args(["--arms", "default,nope"])
    ci = {
        "mean": 0.5,
        "low": 0.4,
        "high": 0.6,
        "method": "bootstrap(prompts); one seed: training-seed variance not covered",
    }
    vae = {"psnr": 29.5, "latent_mean_max_abs": 0.01, "latent_std_max_error": 0.02, "normalisation_ok": True}
    rows = {
        "original": {"vae": vae, "downstream": {"shape": ci, "joint": ci, "fd": 12.0}},
        "align-0.5": {"vae": vae, "downstream": {"shape": ci, "joint": ci, "joint_vs_original": ci, "fd": 10.0}},
        "depth-1": {"vae": vae},
    }
    table = repae_sweep.markdown(rows)
    assert table.count("\n| ") == 3  # one row per arm under the header
    assert "loss.vae_align_proj_coeff=0.5 (step 600)" in table and "+0.500 [+0.400, +0.600]" in table
    assert "one seed: training-seed variance not covered" in table
