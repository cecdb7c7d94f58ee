"""The trainer through its real entry point (train.py, DeepSpeed ZeRO-2 on CPU with gloo)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.weights import safe_torch_load
from tests.conftest import ROOT, TOY_CONFIG, in_parallel, launch, run_train, tiny_train_overrides

ZERO2 = str(ROOT / "configs" / "deepspeed" / "zero2.json")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, step: int, kind: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / str(step) / kind / "diffusion_pytorch_model.safetensors"))


def _optimizer_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The Adam moments and fp32 master weights of rank 0's ZeRO partition, flattened to name -> tensor."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    (path,) = (run / str(step) / "deepspeed").rglob("*optim_states.pt")
    state = safe_torch_load(path, allow=(LossScaler, ZeroStageEnum, fragment_address))  # DeepSpeed's own classes
    out: dict[str, torch.Tensor] = {}

    def walk(node, prefix: str) -> None:
        if torch.is_tensor(node):
            out[prefix] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}")

    walk(state["optimizer_state_dict"], "")
    return {k: v for k, v in out.items() if "exp_avg" in k or "fp32" in k}  # moments and master weights


def test_invalid_config_fails_before_heavy_work(quick_world: Path, tmp_path: Path) -> None:
    overrides = tiny_train_overrides(quick_world, tmp_path / "run") + ['data.data_path=["/nonexistent/x-{0..3}.tar"]']
    start = time.perf_counter()
    proc = run_train(overrides, check=False)
    assert proc.returncode == 2
    assert "data.data_path" in proc.stderr and "/nonexistent/x-0.tar" in proc.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_resume_continues_the_same_run(quick_world: Path, tmp_path: Path) -> None:
    """6 straight steps == 3 steps, stop, resume to 6: same losses, weights, EMA and optimizer path."""
    common = {"trainer.checkpointing_steps": 3, "data.dataloader_num_workers": 1}
    straight, split = tmp_path / "straight", tmp_path / "split"
    in_parallel(  # independent runs, one thread each: side by side
        lambda: run_train(tiny_train_overrides(quick_world, straight, **common, **{"trainer.max_steps": 6})),
        lambda: run_train(tiny_train_overrides(quick_world, split, **common, **{"trainer.max_steps": 3})),
    )
    assert (split / "latest").read_text().strip() == "3"
    run_train(tiny_train_overrides(quick_world, split, **common, **{"trainer.max_steps": 6}))

    a, b = _metrics(straight), _metrics(split)
    assert [m["step"] for m in a] == list(range(1, 7))
    assert [m["step"] for m in b] == list(range(1, 7))
    for ma, mb in zip(a, b):
        assert mb["train/loss"] == pytest.approx(ma["train/loss"], rel=1e-5, abs=1e-7), ma["step"]
        assert mb["train/lr"] == pytest.approx(ma["train/lr"])
    for kind in ("model", "ema"):
        wa, wb = _weights(straight, 6, kind), _weights(split, 6, kind)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=f"{kind}:{k}")
    state = json.loads((split / "6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["samples_seen"] == 6 * 4
    _assert_throughput_logged(straight, 6, [{**m, "world": 1} for m in a], peak_tflops=None)


def _assert_throughput_logged(run: Path, step: int, rows: list[dict], peak_tflops: float | None) -> None:
    """tokens/s and model TFLOP/s in every row, equal to the planner's FLOPs for the row's padded text
    length (logging every step: one length per row); MFU only against a known peak, never on a bare CPU."""
    from fusedit.config import load_config
    from fusedit.flops import TrainingFlops
    from fusedit.tools.plan import describe_text_encoder, describe_vae, vae_encoder_forward_flops

    cfg = load_config(str(run / "config.yaml"), [])
    config = json.loads((run / str(step) / "model" / "config.json").read_text())
    image_tokens = (config["sample_size"] // config["patch_size"]) ** 2
    vae = vae_encoder_forward_flops(describe_vae(cfg), cfg.data.resolution)
    planner = TrainingFlops(config, image_tokens, describe_text_encoder(cfg).arch, vae)
    lengths = range(8, cfg.data.max_prompt_length + 1, cfg.data.pad_to_multiple_of)
    for row in rows:
        assert row["perf/image_tokens_per_s"] == pytest.approx(row["perf/images_per_s"] * image_tokens)
        assert row["perf/text_tokens_per_s"] > 0
        per_image = row["perf/model_tflop_per_s_per_gpu"] * 1e12 * row["world"] / row["perf/images_per_s"]
        candidates = [planner.per_sample(n) for n in lengths]
        if row["world"] == 1:
            assert any(per_image == pytest.approx(c, rel=1e-6) for c in candidates), per_image
        else:  # the ranks' batches may pad to different lengths: the mean lies between
            assert min(candidates) * (1 - 1e-6) <= per_image <= max(candidates) * (1 + 1e-6)
        if peak_tflops is None:
            assert "perf/mfu" not in row
        else:
            assert row["perf/mfu"] == pytest.approx(row["perf/model_tflop_per_s_per_gpu"] / peak_tflops)


@pytest.mark.multiprocess
def test_two_process_zero2_bf16_trains_checkpoints_and_resumes(quick_world: Path, tmp_path: Path) -> None:
    """bf16 under DeepSpeed ZeRO-2 on 2 CPU processes (the path every GPU run takes), then 2 -> 1 process.

    ``ema.decay`` is tiny so that the sharded EMA must equal the fp32 master weights that
    DeepSpeed's own ``zero_to_fp32`` reads from the optimizer shards, not the bf16 weights.
    """
    run = tmp_path / "run"
    extra = {"trainer.max_steps": 3, "trainer.checkpointing_steps": 3, "trainer.mixed_precision": "bf16"}
    overrides = tiny_train_overrides(quick_world, run, **extra, **{"ema.decay": 1e-6, "trainer.peak_tflops": 2.0})
    run_train(["--deepspeed-config-path", ZERO2, *overrides], nproc=2)
    _assert_ema_follows_fp32_masters(run / "3", script=True)
    halves = json.loads((run / "3" / "trainer_state.json").read_text())["ema_bytes_per_rank"]
    files = sorted(p.name for p in (run / "3" / "deepspeed").iterdir())
    assert "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" in files
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in files  # optimizer state is sharded: ZeRO really on
    assert {p.name for p in (run / "3").glob("data_state_rank*.json")} == {
        "data_state_rank0.json",
        "data_state_rank1.json",
    }
    ranks = [json.loads((run / "3" / f"data_state_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] != ranks[1]  # ranks read different positions of their streams
    assert json.loads((run / "3" / "trainer_state.json").read_text())["world_size"] == 2
    overrides[overrides.index("trainer.max_steps=3")] = "trainer.max_steps=4"
    run_train(["--deepspeed-config-path", ZERO2, *overrides], nproc=2)
    steps = [m["step"] for m in _metrics(run)]
    assert steps == [1, 2, 3, 4]
    _assert_throughput_logged(run, 4, [{**m, "world": 2} for m in _metrics(run)], peak_tflops=2.0)
    assert all(m["train/samples_seen"] == m["step"] * 4 * 2 for m in _metrics(run))
    # the same run continues in 1 process: ZeRO state re-partitioned, the data stream re-seeded
    overrides[overrides.index("trainer.max_steps=4")] = "trainer.max_steps=5"
    proc = run_train(["--deepspeed-config-path", ZERO2, *overrides], nproc=1)
    assert "re-seeded" in proc.stderr
    assert [m["step"] for m in _metrics(run)][-1] == 5
    state = json.loads((run / "5" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["samples_seen"] == 4 * 8 + 4 and state["data_seed"] != state["seed"]
    assert all(math.isfinite(m["train/loss"]) and m["train/nonfinite_skipped"] == 0 for m in _metrics(run))
    assert halves < 0.51 * state["ema_bytes_per_rank"]  # 2 processes keep half the EMA each
    _assert_ema_follows_fp32_masters(run / "5")


def _assert_ema_follows_fp32_masters(folder: Path, script: bool = False) -> None:
    """DeepSpeed's own ``zero_to_fp32`` with its defaults (the tag comes from ``<step>/latest``).

    ``script``: run the ``zero_to_fp32.py`` DeepSpeed copies into the folder, as a user would;
    otherwise its library function. The consolidated fp32 masters must round to exactly our
    bf16 ``model/`` weights, and the EMA (decay ~0) must equal them.
    """
    if script:
        out = folder.parent / f"{folder.name}-fp32"
        cmd = [sys.executable, str(folder / "zero_to_fp32.py"), str(folder), str(out), "--safe_serialization"]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1")
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        masters = load_file(str(out / "model.safetensors"))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        masters = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    ema = load_file(str(folder / "ema" / "diffusion_pytorch_model.safetensors"))
    bf16 = _weights(folder.parent, int(folder.name), "model")
    assert set(masters) <= set(ema) and set(masters) <= set(bf16)
    for name, master in masters.items():
        torch.testing.assert_close(ema[name], master.float(), rtol=1e-5, atol=1e-6, msg=name)
        # model/ holds the masters rounded to bf16 (buffers such as the APE table stay fp32)
        assert torch.equal(bf16[name], master.bfloat16().float()) or torch.equal(bf16[name], master.float()), name
    off = max((bf16[n].float() - m.float()).abs().max().item() for n, m in masters.items())
    assert off > 1e-4  # the bf16 weights are not the masters: the EMA really tracks the fp32 copy


@pytest.mark.e2e
def test_sigkill_mid_run_leaves_a_resumable_checkpoint(quick_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = tiny_train_overrides(
        quick_world, run, **{"trainer.max_steps": 100000, "trainer.checkpointing_steps": 2}
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-c", str(TOY_CONFIG), *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            latest = run / "latest"
            if latest.is_file() and int(latest.read_text()) >= 4:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared in time")
        proc.send_signal(signal.SIGKILL)  # may land in the middle of the next save
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    from common.checkpoint import read_latest

    step = read_latest(run)
    assert step is not None and step >= 4 and (run / str(step) / "ema" / "config.json").is_file()
    overrides[overrides.index("trainer.max_steps=100000")] = f"trainer.max_steps={step + 1}"
    run_train(overrides)
    assert read_latest(run) == step + 1


@pytest.mark.e2e
def test_compiled_training_matches_eager(quick_world: Path, tmp_path: Path) -> None:
    """trainer.compile=true (DeepSpeed engine.compile, inductor on CPU): same losses, same weight names."""
    runs = {"eager": tmp_path / "eager", "compiled": tmp_path / "compiled"}
    # one DiT block: inductor's compile time grows with the traced graph, and one block is the same code path
    common = {"trainer.max_steps": 3, "model.num_hidden_layers": 1}

    def train(name: str, compiled: str) -> None:
        run_train(tiny_train_overrides(quick_world, runs[name], **common, **{"trainer.compile": compiled}))

    in_parallel(lambda: train("eager", "false"), lambda: train("compiled", "true"))  # one thread each: side by side
    a, b = _metrics(runs["eager"]), _metrics(runs["compiled"])
    assert [m["step"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b):
        assert mb["train/loss"] == pytest.approx(ma["train/loss"], rel=1e-4), ma["step"]
    wa, wb = _weights(runs["eager"], 3, "model"), _weights(runs["compiled"], 3, "model")
    assert wa.keys() == wb.keys()  # compiled in place: no _orig_mod. prefixes in checkpoints
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.e2e
def test_nonfinite_steps_are_skipped_then_stop_the_run(quick_world: Path, tmp_path: Path) -> None:
    """A NaN loss at step 3 leaves weights, EMA and optimizer as they were; two in a row (5, 6) stop the run."""
    run = tmp_path / "run"
    overrides = tiny_train_overrides(
        quick_world,
        run,
        **{
            "trainer.max_steps": 8,
            "trainer.checkpointing_steps": 1,
            "trainer.max_nonfinite_steps": 2,
            "trainer.checkpoints_total_limit": 10,
        },
    )
    script = str(ROOT / "tests" / "nonfinite_train.py")
    proc = launch([script, "3,5,6", "-c", str(TOY_CONFIG), *overrides], check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "step 6: 2 steps in a row had a non-finite loss or gradient norm" in proc.stderr
    assert "trainer.max_nonfinite_steps=2" in proc.stderr and "weights are those of step 4" in proc.stderr
    assert f"last good checkpoint: {run / '5'}" in proc.stderr
    assert (run / "latest").read_text().strip() == "5"

    skipped = {m["step"]: m["train/nonfinite_skipped"] for m in _metrics(run)}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 0, 5: 1}
    for kind in ("model", "ema"):
        two, three, four = (_weights(run, s, kind) for s in (2, 3, 4))
        assert all(torch.equal(two[k], three[k]) for k in two), f"{kind} moved on the skipped step"
        assert any(not torch.equal(three[k], four[k]) for k in three), f"{kind} did not move on a good step"
        assert all(torch.equal(four[k], _weights(run, 5, kind)[k]) for k in four)
    optim = {s: _optimizer_state(run, s) for s in (2, 3, 4)}
    assert all(torch.equal(optim[2][k], optim[3][k]) for k in optim[2]), "Adam moments moved on the skipped step"
    assert any(not torch.equal(optim[3][k], optim[4][k]) for k in optim[3])
    assert json.loads((run / "5" / "trainer_state.json").read_text())["nonfinite_total"] == 2


@pytest.mark.e2e
def test_nonfinite_gradient_under_zero_stage_0_stops_before_the_update(quick_world: Path, tmp_path: Path) -> None:
    """ZeRO-0 cannot skip a step: the run stops at the NaN with the previous checkpoint intact."""
    ds = json.loads((ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    ds["zero_optimization"] = {"stage": 0}
    (tmp_path / "zero0.json").write_text(json.dumps(ds))
    run = tmp_path / "run"
    overrides = tiny_train_overrides(quick_world, run, **{"trainer.max_steps": 4, "trainer.checkpointing_steps": 1})
    script = str(ROOT / "tests" / "nonfinite_train.py")
    args = [script, "2", "-c", str(TOY_CONFIG), *overrides, "--deepspeed-config-path", str(tmp_path / "zero0.json")]
    proc = launch(args, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "step 2: non-finite gradient under ZeRO stage 0" in proc.stderr and "weights are untouched" in proc.stderr
    assert (run / "latest").read_text().strip() == "1" and not (run / "2").exists()
