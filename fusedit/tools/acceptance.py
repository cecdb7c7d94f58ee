"""GPU acceptance check: what a cluster user runs on one fresh GPU node before launching a 3B run.

    python -m fusedit.tools.acceptance --out acceptance.json          (usually via scripts/gpu_acceptance.sh)

It works offline (no hub, no data: random-weight encoders of the real architectures, a quick toy world
built on the spot) and writes one JSON with a section per stage:

- ``environment``: torch, CUDA, the GPU, library versions.
- ``sdpa``: which scaled-dot-product-attention backend serves the DiT's attention (flash expected for
  unpadded text, memory-efficient with a key-padding mask), probed with the 3B shapes.
- ``dit_step``: the bf16 3B-width DiT training step (``fusedit.tools.bench``, compiled and eager in one
  interleaved run: compile on/off), images/s and MFU; 30 layers if they fit, else the deepest that does.
- ``memory``: the same step uncompiled, its peak memory next to the planner's estimate for the same
  settings (one GPU, no ZeRO), and their ratio.
- ``caches``: the step with the real text encoder and VAE architectures (random weights, Gemma-2B and
  the config's VAE), and what the text and latent caches save: their phases' share of the step.
- ``train_resume``: ``train.py`` on a quick toy world, bf16 under DeepSpeed ZeRO-2, 20 steps as 10 +
  resume to 20; every loss finite and the resumed run continuing at step 11.

Each stage runs in its own process with a time limit, so an out-of-memory or a hang fails that stage
and the others still report. Exit code 0 when every stage passed, 1 otherwise. ``--quick`` shrinks the
model so the whole check runs on a CPU in about a minute (the test suite's smoke test): the numbers of
a quick run mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "e2e-vae" / "sa-w2048-3b-res256-fluxvae-fulldataset-500k.yaml"
TOY_CONFIG = ROOT / "configs" / "e2e-vae" / "toy.yaml"
STAGES = ("environment", "sdpa", "dit_step", "memory", "caches", "train_resume")
DEPTHS = (30, 24, 16, 8, 4)  # tried in turn until the step fits
QUICK_MODEL = [
    "model.hidden_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.head_dim=32",
    "model.intermediate_size=128",
    "data.resolution=64",
    "data.max_prompt_length=32",
]


# --------------------------------------------------------------------------------------------
# Stages that run in this process
# --------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    import torch

    from common.machine import machine_info

    versions = {}
    for name in ("deepspeed", "diffusers", "transformers", "webdataset", "safetensors"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as err:  # a missing or broken package is the finding, not a crash
            versions[name] = f"unavailable: {type(err).__name__}: {err}"
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {
        "machine": machine_info(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count(),
        "bf16_supported": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        "libraries": versions,
        "ok": all(not str(v).startswith("unavailable") for v in versions.values()),
    }


def sdpa(quick: bool) -> dict[str, Any]:
    """Which SDPA backends accept the DiT's attention call, and so which one the dispatcher picks.

    PyTorch tries flash, then memory-efficient, then cuDNN, then math; each is probed alone on the
    3B shapes (16 heads x 128, 4 KV heads repeated by GQA, 256 image + text tokens), without and with
    the boolean key mask a padded text batch carries.
    """
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    heads, kv, dim, n, text = (2, 1, 32, 16, 8) if quick else (16, 4, 128, 256, 160)
    q = torch.randn(4, heads, n, dim, device=device, dtype=dtype)
    k = torch.randn(4, kv, n + text, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    mask = torch.ones(4, 1, 1, n + text, dtype=torch.bool, device=device)
    mask[1:, ..., n + text // 2 :] = False  # three padded captions
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    out: dict[str, Any] = {"device": device, "dtype": str(dtype)}
    for case, attn_mask in (("unpadded", None), ("key_padding_mask", mask)):
        works = []
        for backend in order:
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
                works.append(backend.name)
            except RuntimeError:
                continue
        out[case] = {"backends_that_run": works, "dispatched": works[0] if works else None}
    out["flash_for_unpadded"] = out["unpadded"]["dispatched"] == "FLASH_ATTENTION"
    out["ok"] = out["flash_for_unpadded"] if cuda else bool(out["unpadded"]["dispatched"])
    if not cuda:
        out["note"] = "CPU: its kernels say nothing about a GPU's; the probe only shows the call runs"
    return out


# --------------------------------------------------------------------------------------------
# Stages that run in a child process
# --------------------------------------------------------------------------------------------
def _child(cmd: list[str], timeout: float, log: Path) -> tuple[int, str]:
    """Run ``cmd`` from the repository root; (exit code, last lines of its output). Timeout = 124."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with open(log, "w") as sink:
        try:
            code = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, "\n".join(log.read_text(errors="replace").splitlines()[-25:])


def _bench(args: argparse.Namespace, name: str, flags: list[str], overrides: list[str]) -> tuple[dict | None, str]:
    out = args.work / f"{name}.json"
    cmd = [sys.executable, "-m", "fusedit.tools.bench", "-c", str(args.config), "--out", str(out), *flags]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--text-lengths", args.text_lengths]
    cmd += ["--batch-size", str(args.batch_size), *overrides, *args.overrides]
    code, tail = _child(cmd, args.stage_timeout, args.work / f"{name}.log")
    if code != 0 or not out.is_file():
        return None, f"exit {code}: {tail}"
    return json.loads(out.read_text()), ""


def _out_of_memory(text: str) -> bool:
    return "out of memory" in text.lower() or "OutOfMemoryError" in text


def dit_step(args: argparse.Namespace) -> dict[str, Any]:
    """bf16 step at the 3B width, compiled vs eager in one run; the deepest model that fits."""
    tried = []
    for depth in args.depths:
        flags = ["--random-frozen"] + ([] if args.quick else ["--compile"])  # inductor on a CPU: minutes
        report, error = _bench(args, f"dit_step_{depth}", flags, depth_overrides(args, depth))
        if report is not None:
            v = report["variants"]
            # with --compile, "ours" is compiled and "ours_eager" the same model uncompiled
            compiled, eager = (v["ours"], v["ours_eager"]) if "ours_eager" in v else ({}, v["ours"])
            args.fitted_depth = depth
            return {
                "layers": depth,
                "tried": tried,
                "batch_size": args.batch_size,
                "images_per_s": {"compiled": compiled.get("images_per_s"), "eager": eager["images_per_s"]},
                "mfu": {"compiled": compiled.get("mfu"), "eager": eager["mfu"]},
                "compile_speedup": _safe_ratio(compiled.get("images_per_s"), eager["images_per_s"]),
                "mfu_peak": report["mfu_peak"],
                "ok": True,
            }
        tried.append({"layers": depth, "error": error[-2000:]})
        if not _out_of_memory(error):
            break
    return {"tried": tried, "ok": False}


def depth_overrides(args: argparse.Namespace, depth: int) -> list[str]:
    """Overrides for a DiT of ``depth`` layers (3B widths; tiny ones with --quick)."""
    tiny = [o for o in QUICK_MODEL if not o.startswith("model.num_hidden_layers")] if args.quick else []
    return [*tiny, f"model.num_hidden_layers={depth}"]


def _safe_ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Measured peak of the uncompiled step against the planner's ZeRO-0, one-GPU estimate."""
    depth = getattr(args, "fitted_depth", args.depths[-1])
    report, error = _bench(args, "memory", ["--random-frozen"], depth_overrides(args, depth))
    if report is None:
        return {"error": error[-2000:], "ok": False}
    planned = planned_peak_gib(args, depth)
    measured = report["peak_memory"]["gib"]
    measured = measured.get("ours") if isinstance(measured, dict) else measured
    ratio = measured / planned if measured and planned else None
    return {
        "layers": depth,
        "measured_peak_gib": measured,
        "measured_kind": report["peak_memory"]["kind"],
        "planned_peak_gib": planned,
        "measured_over_planned": ratio,
        "within_10_percent": ratio is not None and abs(ratio - 1) <= 0.10,
        "note": "planner: ZeRO-0, 1 GPU, same micro-batch, frozen encoders excluded (random stand-ins)",
        "ok": True,
    }


def planned_peak_gib(args: argparse.Namespace, depth: int) -> float:
    """The planner's per-GPU peak for the benchmarked settings: one GPU, ZeRO-0, no frozen encoders."""
    from fusedit.config import load_config
    from fusedit.tools.plan import build_plan

    overrides = [*depth_overrides(args, depth), f"data.batch_size_per_gpu={args.batch_size}", *args.overrides]
    cfg = load_config(str(args.config), overrides)
    plan = build_plan(cfg, world_size=1, zero_stage=0, text_tokens=cfg.data.max_prompt_length)
    mem = plan.memory[0]
    frozen = sum(v for k, v in mem.static.items() if "frozen" in k)
    return (mem.peak(cfg.trainer.enable_gradient_checkpointing) - frozen) / 2**30


def caches(args: argparse.Namespace, tokenizer: Path) -> dict[str, Any]:
    """The real encoder architectures (random weights) in the step: what each cache removes."""
    depth = getattr(args, "fitted_depth", args.depths[-1])
    text_layers = max(1, round(18 * depth / 30)) if not args.quick else 1  # Gemma-2B's 18 for the DiT's 30
    flags = ["--random-init-frozen", "--text-layers", str(text_layers)]
    overrides = [*depth_overrides(args, depth), f"data.tokenizer={tokenizer}"]
    report, error = _bench(args, "caches", flags, overrides)
    if report is None:
        return {"error": error[-2000:], "ok": False}
    phases = report["variants"]["ours"]["phases"]
    step = report["variants"]["ours"]["step_s_median"]
    text, vae = phases["text_encoder"]["median_s"], phases["vae_encode"]["median_s"]
    return {
        "layers": depth,
        "text_layers": text_layers,
        "step_s_median": step,
        "text_encoder_s": text,
        "vae_encode_s": vae,
        "speedup_text_cache": step / (step - text),
        "speedup_latent_cache": step / (step - vae),
        "speedup_both_caches": step / (step - text - vae),
        "how": "phase medians of one run: a cache removes exactly that phase (the posterior draw stays)",
        "ok": True,
    }


def train_resume(args: argparse.Namespace, world: Path) -> dict[str, Any]:
    """20 bf16 ZeRO-2 steps through train.py as 10 + resume to 20."""
    from fusedit.tools.demo import toy_overrides

    run = args.work / "train_run"
    base = [
        sys.executable,
        str(ROOT / "train.py"),
        "-c",
        str(TOY_CONFIG),
        *toy_overrides(world),
        f"trainer.checkpoint_dir={run}",
        "trainer.mixed_precision=bf16",
        "trainer.logging_steps=1",
        "trainer.checkpointing_steps=10",
        "trainer.sampling_steps=0",
        "trainer.report_to=[]",
        "data.dataloader_num_workers=1",
        "data.batch_size_per_gpu=8",
    ]
    results = []
    for steps in (10, 20):
        code, tail = _child([*base, f"trainer.max_steps={steps}"], args.stage_timeout, args.work / f"train_{steps}.log")
        results.append({"max_steps": steps, "exit_code": code})
        if code != 0:
            return {"runs": results, "error": tail[-2000:], "ok": False}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    finite = all(r["train/loss"] == r["train/loss"] and abs(r["train/loss"]) != float("inf") for r in rows)
    resumed = "resumed from" in (args.work / "train_20.log").read_text()
    return {
        "runs": results,
        "steps_logged": steps,
        "all_losses_finite": finite,
        "resumed_at_step_11": resumed and steps == list(range(1, 21)),
        "last": {k: v for k, v in rows[-1].items() if k.startswith(("train/", "perf/"))},
        "ok": finite and resumed and steps == list(range(1, 21)),
    }


def build_world(args: argparse.Namespace) -> Path:
    """A quick toy world (tokenizer, tiny encoder, VAE, shards) for the stages that need files."""
    if args.toy_world:
        return Path(args.toy_world)
    from toyworld.build import build_toy_world

    world = args.work / "toy"
    build_toy_world(world, seed=0, quick=True, progress=False)
    return world


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fusedit.tools.acceptance",
        description="One-command GPU acceptance check before a 3B run (offline; one JSON out).",
        epilog="Usually run through scripts/gpu_acceptance.sh, which prepares the environment from a wheel folder.",
    )
    p.add_argument("--out", type=Path, default=Path("output/acceptance/acceptance.json"), help="the JSON report")
    p.add_argument("--config", type=Path, default=CONFIG, help="3B training config (default: the FLUX-VAE one)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch of the step (default: the 3B runs' 32)")
    p.add_argument("--steps", type=int, default=8, help="timed benchmark repetitions per stage")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (compilation happens here)")
    p.add_argument("--text-lengths", default="normal:150:50", help="caption lengths (see fusedit.tools.bench)")
    p.add_argument("--stage-timeout", type=float, default=240.0, help="seconds one child stage may take")
    p.add_argument("--toy-world", default=None, help="an existing toy world instead of building a quick one")
    p.add_argument("--quick", action="store_true", help="tiny model: a CPU smoke test of the check itself")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the benchmark config")
    args = p.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        p.error(f"--stages: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    args.depths = (2,) if args.quick else DEPTHS
    if args.quick:
        args.batch_size, args.steps, args.warmup = min(args.batch_size, 2), min(args.steps, 2), min(args.warmup, 1)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    wanted = args.stages.split(",")
    start = time.perf_counter()
    report: dict[str, Any] = {"command": sys.argv, "quick": args.quick, "stages": {}}
    world = build_world(args) if {"caches", "train_resume"} & set(wanted) else None
    tokenizer = world / "text_encoder" if world else None
    stages = {
        "environment": environment,
        "sdpa": lambda: sdpa(args.quick),
        "dit_step": lambda: dit_step(args),
        "memory": lambda: memory(args),
        "caches": lambda: caches(args, tokenizer),
        "train_resume": lambda: train_resume(args, world),
    }
    for name in STAGES:
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            result = stages[name]()
        except Exception as err:  # one broken stage must not hide the others' results
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["stages"][name] = result
        print(f"[acceptance] {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["ok"] = all(s["ok"] for s in report["stages"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="acceptance-") as tmp:
        args.work = (args.work or Path(tmp)).resolve()
        args.work.mkdir(parents=True, exist_ok=True)
        report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[acceptance] {'PASSED' if report['ok'] else 'FAILED'} in {report['seconds']} s -> {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
