"""Scoring the checkpoints of a study on real configs: a benchmark sampler, then FID, per checkpoint.

Each kept checkpoint of each run becomes one job: ``evaluation/sample_<bench>_ckpt.py`` (through
``accelerate launch`` when it has several processes) writes the images to
``<run>/<step>/study_<bench>/``, then :func:`common.fid.compute_fid` compares them with the real
images and writes ``<run>/<step>/study_fid.json``. The jobs run here one after another
(``inline``) or through submitit (``local``, or ``slurm``: one job per checkpoint, GPUs as asked);
a checkpoint whose ``study_fid.json`` was made with the same settings is not scored again, and the
sampler itself resumes a half-written folder. The same prompts, seed and guidance serve every run,
so the per-seed FIDs of the two arms are paired like the toy scores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULT = "study_fid.json"


@dataclass(frozen=True)
class FidSettings:
    """What every checkpoint is scored with (recorded next to each result)."""

    bench: str
    real_images: str
    resolution: int
    guidance: float
    num_samples: int | None = None  # first N prompts (None: the whole benchmark)
    real_list: str | None = None
    feature_extractor: str | None = None  # None: clean-fid's InceptionV3
    seed: int = 0
    processes: int = 1
    prompts: str | None = None  # prompt file (default: the benchmark's own under prompts/)
    cache_dir: str | None = None  # reference statistics cache (default: common.fid's)


def sampler_command(run: Path, step: int, s: FidSettings, save_dir: Path) -> list[str]:
    """The benchmark sampler exactly as a user runs it (accelerate for several processes)."""
    script = str(ROOT / "evaluation" / f"sample_{s.bench}_ckpt.py")
    launch = [sys.executable, script]
    if s.processes > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(s.processes), script]
    cmd = [*launch, "--checkpoint", str(run), "--tag", str(step), "--save-dir", str(save_dir)]
    cmd += ["--guidance-scale", str(s.guidance), "--seed", str(s.seed)]
    if s.num_samples is not None:
        cmd += ["--max-prompts", str(s.num_samples)]
    if s.prompts is not None:
        cmd += ["--prompts", s.prompts]
    return cmd


def score_checkpoint(run: str, step: int, settings: FidSettings) -> dict[str, Any]:
    """Sample one checkpoint, compute its FID, write ``<run>/<step>/study_fid.json`` (the job body)."""
    from common.fid import DEFAULT_CACHE, compute_fid

    run_dir = Path(run)
    save_dir = run_dir / str(step) / sample_folder(settings)
    subprocess.run(sampler_command(run_dir, step, settings, save_dir), check=True, cwd=ROOT)
    result = compute_fid(
        settings.real_images,
        save_dir,
        resolution=settings.resolution,
        dataset_name=settings.bench,
        feature_extractor=settings.feature_extractor,
        real_list=settings.real_list,
        cache_dir=settings.cache_dir or DEFAULT_CACHE,
    )
    result.update(step=step, settings=asdict(settings))
    write_json_atomic(run_dir / str(step) / RESULT, result, sort_keys=False)
    return result


def sample_folder(settings: FidSettings) -> str:
    """One folder per scoring design: other guidance, seed, prompts or count never mix images."""
    import hashlib

    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:10]
    return f"study_{settings.bench}_{digest}"


def done(run: Path, step: int, settings: FidSettings) -> dict[str, Any] | None:
    path = run / str(step) / RESULT
    if path.is_file():
        result = json.loads(path.read_text())
        if result.get("settings") == asdict(settings):
            return result
    return None


def score_all(
    runs: dict[str, dict[int, Path]], steps: dict[Path, list[int]], settings: FidSettings, executor: Any = None
) -> dict[str, dict[int, dict[int, float]]]:
    """``fid[arm][seed][step]`` for every kept checkpoint; submitit ``executor`` or inline when None."""
    import submitit

    jobs: list[tuple[str, int, int, Any]] = []
    out: dict[str, dict[int, dict[int, float]]] = {arm: {seed: {} for seed in by_seed} for arm, by_seed in runs.items()}
    for arm, by_seed in runs.items():
        for seed, run in by_seed.items():
            for step in steps[run]:
                previous = done(run, step, settings)
                if previous is not None:
                    out[arm][seed][step] = previous["fid"]
                elif executor is None:
                    out[arm][seed][step] = score_checkpoint(str(run), step, settings)["fid"]
                    print(f"{arm} seed {seed} step {step}: FID {out[arm][seed][step]:.2f}", flush=True)
                else:
                    job = executor.submit(score_checkpoint, str(run), step, settings)
                    jobs.append((arm, seed, step, job))
                    if isinstance(executor, submitit.LocalExecutor):  # shares this machine's devices: one at a time
                        job.result()
    for arm, seed, step, job in jobs:
        out[arm][seed][step] = job.result()["fid"]
        print(f"{arm} seed {seed} step {step}: FID {out[arm][seed][step]:.2f}  (job {job.job_id})", flush=True)
    return out


def make_executor(kind: str, folder: Path, gpus: int, time_min: int, partition: str | None, account: str | None):
    """A submitit executor for the scoring jobs (one task, ``gpus`` GPUs each)."""
    import submitit

    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=time_min, gpus_per_node=gpus)  # else submitit hides every GPU
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict[str, Any] = {"timeout_min": time_min, "gpus_per_node": gpus, "tasks_per_node": 1, "nodes": 1}
    if partition:
        params["slurm_partition"] = partition
    if account:
        params["slurm_account"] = account
    ex.update_parameters(**params)
    return ex
