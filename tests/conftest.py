"""Shared fixtures: one quick toy world per test session, and a helper that runs train.py."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY_CONFIG = ROOT / "configs" / "e2e-vae" / "toy.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# A test (set-up and teardown included) that runs longer than this is stuck, not slow: the slowest
# test takes a few minutes, the session's toy world ~4 under load. Without a watchdog one hang
# (a worker waiting on a lock it inherited) ate the whole 90-minute CI budget and said nothing.
TEST_TIMEOUT_S = int(os.environ.get("TEST_TIMEOUT_S", "900"))
TIMEOUT_GRACE_S = 120  # after the TimeoutError, the time clean-up gets before the process exits


def _on_timeout(signum: int, frame: object) -> None:
    """First alarm: print every thread's stack and fail the test; second (clean-up stuck too): exit."""
    sys.stderr.write(f"\n=== test exceeded TEST_TIMEOUT_S={TEST_TIMEOUT_S}: stacks of all threads ===\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    signal.signal(signal.SIGALRM, _on_stuck_cleanup)
    signal.alarm(TIMEOUT_GRACE_S)
    raise TimeoutError(f"test ran longer than {TEST_TIMEOUT_S} s (TEST_TIMEOUT_S); stacks above")


def _on_stuck_cleanup(signum: int, frame: object) -> None:
    sys.stderr.write(f"\n=== clean-up after a timed-out test is stuck {TIMEOUT_GRACE_S} s more: exiting ===\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Fail a stuck test with its stacks instead of hanging the suite (SIGALRM: main thread only)."""
    if TEST_TIMEOUT_S <= 0:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_timeout)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy world (few hundred images, briefly trained VAE) built once for the session.

    Built as a user builds it, ``dataset_download.py --toy DIR --quick``, which puts itself on the
    pinned numeric path (common/numerics.py): the world then has the same weights on every x86-64
    CPU with AVX2 (tests/test_numerics.py checks them against committed digests), while the tests
    themselves run on the machine's own, faster kernels.
    """
    out = tmp_path_factory.mktemp("toy") / "world"
    cmd = [sys.executable, str(ROOT / "dataset_download.py"), "--toy", str(out), "--quick", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"quick world build failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="session")
def repae_world(quick_world: Path) -> Path:
    """The quick toy world plus a briefly trained toy vision encoder."""
    from repae.toy import build_toy_encoder

    if not (quick_world / "repae" / "encoder" / "model.safetensors").is_file():
        build_toy_encoder(quick_world, quick=True, progress=False)
    return quick_world


def tiny_train_overrides(world: Path, run: Path, **extra: object) -> list[str]:
    """Overrides that make configs/e2e-vae/toy.yaml train in seconds on the quick world."""
    from fusedit.tools.demo import toy_overrides

    base = {
        "trainer.checkpoint_dir": str(run),
        "trainer.logging_steps": 1,
        "trainer.sampling_steps": 0,
        "trainer.report_to": "[]",
        "data.batch_size_per_gpu": 4,
        "data.dataloader_num_workers": 0,
        "data.num_streams": "null",  # one stream per sample of the global batch: any world size
        "model.hidden_size": 32,
        "model.num_hidden_layers": 2,
        "model.num_attention_heads": 2,
        "model.num_key_value_heads": 1,
        "model.head_dim": 16,
        "model.intermediate_size": 64,
        "ema.decay": 0.9,
        # toy.yaml's linear decay depends on max_steps; the tests stop and resume runs at other lengths
        "lr_scheduler.name": "constant_with_warmup",
        "lr_scheduler.num_warmup_steps": 2,
    }
    base.update(extra)
    return toy_overrides(world) + [f"{k}={v}" for k, v in base.items()]


def images_and_cache_runs(world: Path, tmp_path: Path, tokenizer: dict[str, object]) -> tuple[dict, dict]:
    """A tokenizer's latent cache, then 2 tiny training steps from the images (with a preview at step 2)
    and 2 from the cache, each in ``tmp_path/<images|cache>``; returns (cache.json, {run: losses})."""
    from fusedit.config import load_config
    from fusedit.data import latent_cache
    from fusedit.tools.demo import toy_overrides

    cache = tmp_path / "latents"
    cfg = load_config(TOY_CONFIG, [*toy_overrides(world), *(f"{k}={v}" for k, v in tokenizer.items())])
    info = latent_cache.build_cache(cfg, cache, batch_size=48, progress=False)
    losses = {}
    for name, extra in (("images", {"trainer.sampling_steps": 2}), ("cache", {"data.latent_cache": str(cache)})):
        run = tmp_path / name
        run_train(tiny_train_overrides(world, run, **{**tokenizer, "trainer.max_steps": 2, **extra}))
        losses[name] = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return info, losses


def tiny_fuse_overrides(world: Path, run: Path, **extra: object) -> list[str]:
    """tiny_train_overrides for configs/e2e-vae/toy-fusedit.yaml: a FuseDiT takes its head layout
    from its LLM (the toy text encoder: 4 heads, 1 KV head of 16), and a third DiT layer runs alone."""
    sizes = {"model.num_attention_heads": 4, "model.num_key_value_heads": 1, "model.head_dim": 16}
    return tiny_train_overrides(world, run, **{**sizes, "model.num_hidden_layers": 3, **extra})


def launch(target: list[str], nproc: int = 1, timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    """Run a script (``[path, args...]``) or module (``["-m", name, args...]``) as a user would:
    plain python for 1 process, torchrun for more; one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, *target]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        name = target[1] if target[0] == "-m" else Path(target[0]).name
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_train(
    overrides: list[str],
    nproc: int = 1,
    timeout: int = 240,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Launch train.py with configs/e2e-vae/toy.yaml and ``overrides``."""
    return launch([str(ROOT / "train.py"), "-c", str(TOY_CONFIG), *overrides], nproc, timeout, check)


def in_parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run independent zero-argument calls (typically ``launch``/``run_train`` of separate runs) at once.

    Each launched process uses one thread, so on the 2-core test machines two runs that do not
    depend on each other take the wall time of one. Results come back in order; the first
    failure is re-raised after every call has finished.
    """
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def cli_env() -> dict[str, str]:
    """The environment of a CLI child process: one thread, unbuffered, no inherited torchrun rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


# Loads an exported pipeline folder with diffusers alone (a fresh process: nothing of ours imported
# first) and samples: argv = folder, output .npz, prompts.
LOAD_EXPORT = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
prompts = sys.argv[3:]
out = pipe(prompts, num_inference_steps=2, guidance_scale=3.0, seed=5, num_images_per_prompt=2, output_type="np")
one = pipe(prompts[0], num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
np.savez(sys.argv[2], images=out.images, cls=type(pipe).__name__, pil_size=one.images[0].size)
"""
