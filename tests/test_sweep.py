"""Sweeps through submitit (fusedit/sweep.py) and the SLURM batch script (scripts/slurm/train.sbatch).

The local-executor tests run real toy trainings under submitit's local controller, including
a preemption: the job checkpoints on the signal, requeues itself and resumes from that checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusedit.tools import sweep
from tests.conftest import ROOT, TOY_CONFIG, tiny_train_overrides

SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
NODE_SH = ROOT / "scripts" / "slurm" / "node.sh"


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _sweep_overrides(world: Path, **extra: object) -> list[str]:
    """tiny_train_overrides minus the checkpoint folder, which the sweep assigns per run."""
    items = tiny_train_overrides(world, Path("unused"), **extra)
    return [o for o in items if not o.startswith("trainer.checkpoint_dir=")]


# ------------------------------------------------------------------------- planning (pure)
def test_grid_expansion_and_naming(tmp_path: Path) -> None:
    grid = sweep.parse_grid(["optimizer.lr=1e-3,3e-4", "optimizer.betas=[0.9,0.99],[0.9,0.95]"])
    assert grid == {"optimizer.lr": ["1e-3", "3e-4"], "optimizer.betas": ["[0.9,0.99]", "[0.9,0.95]"]}
    other = tmp_path / "other" / "toy.yaml"  # same stem as TOY_CONFIG: names must still differ
    runs = sweep.expand([str(TOY_CONFIG), str(other)], grid, ["trainer.max_steps=10"], str(tmp_path / "out"))

    assert len(runs) == 2 * 2 * 2
    assert len({r.name for r in runs}) == len(runs) and len({r.checkpoint_dir for r in runs}) == len(runs)
    first = runs[0]
    assert first.name == "e2e-vae-toy__lr=1e-3__betas=0.9_0.99"
    assert runs[4].name.startswith("other-toy__")
    assert first.checkpoint_dir == str(tmp_path / "out" / first.name)
    assert first.overrides == (
        "trainer.max_steps=10",
        "optimizer.lr=1e-3",
        "optimizer.betas=[0.9,0.99]",
        f"trainer.run={first.name}",
        f"trainer.checkpoint_dir={first.checkpoint_dir}",
        "trainer.resume_from=latest",
    )
    # the first grid key varies slowest
    assert [dict(r.point)["optimizer.lr"] for r in runs[:4]] == ["1e-3", "1e-3", "3e-4", "3e-4"]


def test_grid_edge_cases(tmp_path: Path) -> None:
    assert sweep.grid_points({}) == [{}]
    assert sweep.short_keys(["data.seed", "trainer.seed", "optimizer.lr"]) == {
        "data.seed": "data.seed",
        "trainer.seed": "trainer.seed",
        "optimizer.lr": "lr",
    }
    assert sweep.split_values("'a,b',[1,{x: 2}],3") == ["'a,b'", "[1,{x: 2}]", "3"]
    runs = sweep.expand([str(TOY_CONFIG)], {"sample.prompt_file": ["a/b", "a_b"]}, [], str(tmp_path))
    assert len({r.name for r in runs}) == 2  # same after sanitising: a hash keeps them apart
    kept = sweep.expand([str(TOY_CONFIG)], {}, ["trainer.resume_from=null"], str(tmp_path))[0]
    assert "trainer.resume_from=latest" not in kept.overrides
    for bad in (["trainer.checkpoint_dir=x,y"], ["lr"], ["a=1", "a=2"], ["a=1,,2"]):
        with pytest.raises(ValueError):
            sweep.parse_grid(bad)
    with pytest.raises(ValueError, match="trainer.run"):
        sweep.expand([str(TOY_CONFIG)], {}, ["trainer.run=mine"], str(tmp_path))
    assert [sweep.parse_time(t) for t in ("90", "02:00:00", "1-12", "0:30")] == [90, 120, 2160, 1]


def test_launch_commands() -> None:
    """One process: plain python; one node: torchrun --standalone; several: c10d on the first host."""
    (run,) = sweep.expand([str(TOY_CONFIG)], {}, [], "/tmp/x")
    single = sweep.TrainJob(run, "/tmp").command()
    assert single[1:4] == [str(ROOT / "train.py"), "-c", str(TOY_CONFIG)]
    node = " ".join(sweep.TrainJob(run, "/tmp", nproc_per_node=8).command())
    assert (
        "--nproc_per_node 8 --standalone" in node
        and "--signals-to-handle SIGINT,SIGHUP,SIGQUIT" in node  # USR1/TERM go to the workers (_Launch)
    )
    multi = " ".join(sweep.TrainJob(run, "/tmp", nnodes=4, nproc_per_node=8).command(["gpu07", "gpu08"], "31337"))
    assert "--nnodes 4 --rdzv_id 31337 --rdzv_backend c10d --rdzv_endpoint gpu07:31337" in multi
    assert multi.endswith("trainer.resume_from=latest")


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep"
    argv = ["--configs", str(TOY_CONFIG), "--grid", "optimizer.lr=1e-3,3e-4", "--set", "trainer.max_steps=10"]
    argv += ["--output", str(out), "--nodes", "2", "--partition", "gpu", "--time", "2:00:00", "--dry-run"]
    assert sweep.main(argv) == 0
    text = capsys.readouterr().out
    assert "sweep: 2 run(s); executor=slurm nodes=2 gpus/node=8 time=120min partition=gpu" in text
    for name in ("toy__lr=1e-3", "toy__lr=3e-4"):
        assert f"checkpoints  {out / name}" in text
        assert f"{out / name}/submitit/<job id>_0_log.out" in text
    assert "--nnodes 2" in text and "--rdzv_backend c10d" in text and "--signals-to-handle" in text
    assert text.rstrip().endswith("dry run: nothing submitted")
    assert not out.exists()

    assert sweep.main(argv[:-1] + ["--executor", "local", "--nodes", "1", "--gpus-per-node", "0", "--dry-run"]) == 0
    local = capsys.readouterr().out
    assert "torch.distributed.run" not in local and f"{ROOT / 'train.py'} -c {TOY_CONFIG}" in local

    assert sweep.main(["--configs", str(TOY_CONFIG), "--set", "trainer.max_step=1", "--dry-run"]) == 2
    assert "toy: trainer.max_step: unknown key" in capsys.readouterr().err


def test_slurm_executor_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sbatch file submitit would write: one task per node, requeueable, signal before the limit."""
    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit only checks that srun exists
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    (run,) = sweep.expand([str(TOY_CONFIG)], {}, [], str(tmp_path / "out"))
    settings = sweep.Settings(nodes=2, partition="gpu", account="proj", qos="high", time_min=120)
    text = sweep.make_executor(run, settings)._make_submission_file_text("CMD", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--account=proj"):
        assert f"#SBATCH {line}\n" in text
    for line in ("--qos=high", "--time=120", "--requeue", "--signal=USR2@180", "--job-name=toy"):
        assert f"#SBATCH {line}\n" in text
    assert f"--output {tmp_path / 'out' / 'toy' / 'submitit'}" in text


# -------------------------------------------------------------------------- the batch script
def test_sbatch_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    head = SBATCH.read_text()
    for flag in ("--gpus-per-node=8", "--signal=B:USR1@", "--requeue", "--output="):
        assert f"#SBATCH {flag}" in head
    assert "#SBATCH --ntasks-per-node" not in head  # it would make `--nodes=MIN-MAX` always give MIN


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _run_sbatch(tmp_path: Path, finish: bool) -> tuple[subprocess.CompletedProcess, str]:
    """Run the batch script with stand-ins for srun, scontrol and torchrun; return its output and their log.

    The stand-in torchrun starts one "worker" (python, which can catch USR1 although the real
    node.sh starts torchrun with USR1 ignored) and waits for it, as the real one does.
    """
    bin_dir, log, ready = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "ready"
    bin_dir.mkdir()
    (tmp_path / "scripts" / "slurm").mkdir(parents=True)
    shutil.copy2(NODE_SH, tmp_path / "scripts" / "slurm" / "node.sh")
    _stub(bin_dir, "scontrol", f'[ "$1" = show ] && printf "gpu01\\ngpu02\\n" || echo "scontrol $*" >> {log}\n')
    _stub(bin_dir, "srun", f'echo "srun $*" >> {log}\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    worker = (
        "import pathlib, signal, sys, time\n"
        f"def stop(*_):\n    open({str(log)!r}, 'a').write('checkpointed\\n'); sys.exit(0)\n"
        f"signal.signal(signal.SIGUSR1, stop); pathlib.Path({str(ready)!r}).touch()\n"
        "while True: time.sleep(0.05)\n"
    )
    (tmp_path / "worker.py").write_text(worker)
    torchrun = f'echo "torchrun $*" >> {log}\n[ -n "$FINISH" ] && exit 0\n'
    torchrun += f"{sys.executable} {tmp_path / 'worker.py'} &\nwait $!\n"
    _stub(bin_dir, "torchrun", torchrun)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2")
    env.update(SLURM_JOB_NODELIST="gpu[01-02]", SLURM_SUBMIT_DIR=str(tmp_path), FINISH="1" if finish else "")
    env.update(SLURM_GPUS_ON_NODE="8", TMPDIR=str(tmp_path))
    cmd = ["bash", str(SBATCH), "configs/x.yaml", "trainer.max_steps=9"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not finish:
        deadline = time.time() + 20
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the stand-in torchrun never started"
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 delivers
    out, _ = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(cmd, proc.returncode, out), log.read_text()


def test_sbatch_forwards_the_signal_then_requeues(tmp_path: Path) -> None:
    proc, calls = _run_sbatch(tmp_path, finish=False)
    assert proc.returncode == 0, proc.stdout
    expected = "torchrun --signals-to-handle SIGINT,SIGHUP,SIGQUIT --nnodes 2 --nproc_per_node 8 --rdzv_id 4242"
    assert expected + " --rdzv_backend c10d --rdzv_endpoint gpu01:29742" in calls
    assert "train.py -c configs/x.yaml --deepspeed-config-path configs/deepspeed/zero2.json trainer.max_steps=9" in (
        calls
    )
    assert "srun --overlap --nodes=2 --ntasks-per-node=1 scripts/slurm/node.sh --relay USR1" in calls
    assert calls.index("checkpointed") < calls.index("scontrol requeue 4242")


def test_sbatch_does_not_requeue_a_finished_run(tmp_path: Path) -> None:
    proc, calls = _run_sbatch(tmp_path, finish=True)
    assert proc.returncode == 0, proc.stdout
    assert "torchrun" in calls and "requeue" not in calls


# ---------------------------------------------------------------- real runs, local executor
@pytest.mark.multiprocess
def test_local_sweep_runs_two_configs_to_completion(
    quick_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    text = TOY_CONFIG.read_text()
    configs = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    configs[0].write_text(text)
    configs[1].write_text(text.replace("seed: 42", "seed: 7"))
    fixed = _sweep_overrides(quick_world, **{"trainer.max_steps": 4, "trainer.checkpointing_steps": 2})
    argv = ["--configs", *map(str, configs), "--set", *fixed, "--output", str(tmp_path / "out")]
    argv += ["--executor", "local", "--gpus-per-node", "0", "--time", "10", "--wait"]
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("a", "b"):
        run = tmp_path / "out" / name
        assert (run / "latest").read_text().strip() == "4"
        assert (run / "4" / "ema" / "config.json").is_file()
        assert _steps(run) == [1, 2, 3, 4]
        assert re.search(rf"submitted {name}  job=\d+", printed)
        assert f"done    {name}  latest=4" in printed
    assert json.loads((tmp_path / "out" / "b" / "4" / "trainer_state.json").read_text())["seed"] == 7


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [1, 2], ids=["python", "torchrun"])
def test_local_preemption_checkpoints_requeues_and_resumes(
    quick_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nproc: int
) -> None:
    """nproc=1 signals train.py directly; nproc=2 goes through torchrun's forwarding, as on SLURM."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    every = 25  # the first checkpoint; the signal goes out as soon as it appears
    max_steps = 150 if nproc == 1 else 60  # (with room after it for the signal to land mid-run)
    fixed = _sweep_overrides(quick_world, **{"trainer.max_steps": max_steps, "trainer.checkpointing_steps": every})
    (run,) = sweep.expand([str(TOY_CONFIG)], {}, fixed, str(tmp_path / "out"))
    settings = sweep.Settings(executor="local", gpus_per_node=nproc if nproc > 1 else 0, time_min=10)
    ((_, job),) = sweep.submit([run], settings)
    run_dir = Path(run.checkpoint_dir)
    try:
        deadline = time.time() + 150
        while not (run_dir / "latest").is_file():
            assert time.time() < deadline and not job.done(), "no checkpoint appeared while the job ran"
            time.sleep(0.05)
        assert sweep.preempt_local_job(job)  # what submitit's controller sends before a time limit
        while not job.done():
            assert time.time() < deadline + 60, "the requeued run did not finish"
            time.sleep(0.2)
        result = job.result()
    finally:
        if not job.done():
            job.cancel()
    out, err = job.paths.stdout.read_text(), job.paths.stderr.read_text()
    stop = int(re.search(r"requeueing; next attempt resumes from step (\d+)", out).group(1))
    assert every <= stop < max_steps
    assert f"checkpointed at step {stop}, stopping" in err  # the trainer saved on the forwarded SIGUSR1
    assert "Requeued job" in out and "attempt 1" in out  # submitit logs to stdout
    assert re.search(rf"resumed from \S+ at step {stop}\b", err)
    assert _steps(run_dir) == list(range(1, max_steps + 1))  # continued, never restarted at step 1
    assert result["latest"] == str(max_steps) and (run_dir / "latest").read_text().strip() == str(max_steps)
