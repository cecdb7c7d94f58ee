"""The REPA-E trainers: gradient routing of the joint step, resume, export, frozen-VAE training, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.distributed import DistEnv
from tests.conftest import ROOT, in_parallel, launch

CONFIG = ROOT / "configs" / "repae" / "toy.yaml"


def tiny_overrides(world: Path, run: Path, **extra: object) -> list[str]:
    from repae.demo import toy_overrides

    base = {
        "trainer.max_steps": 2,
        "trainer.checkpointing_steps": 2,
        "trainer.logging_steps": 1,
        "trainer.sampling_steps": 0,
        "model.hidden_size": 32,
        "model.depth": 2,
        "model.num_heads": 2,
        "model.encoder_depth": 1,
        "model.projector_dim": 32,
        "loss.disc_channels": 8,
        "loss.discriminator_warmup_steps": 0,
        "loss.perceptual_net": "alex",
        "data.global_batch_size": 4,
        "data.dataloader_num_workers": 0,
        "vae.stats_batches": 1,
        "ema.decay": 0.5,
    }
    base.update(extra)
    return toy_overrides(world, run) + [f"{k}={v}" for k, v in base.items()]


def make_trainer(world: Path, run: Path, cls_path: str = "repae.train.JointTrainer", **extra: object):
    import importlib

    from repae.config import load_repae_config

    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    cfg = load_repae_config(CONFIG, tiny_overrides(world, run, **extra))
    return cls(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def run_module(module: str, args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return launch(["-m", module, *args], nproc=nproc, timeout=timeout)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    after = module.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def _phase_inputs(tr):
    from repae.train import to_unit

    batch = next(tr.data_iter)
    images, labels = batch["images"], batch["labels"]
    g = tr.generator()
    with torch.no_grad():
        zs = [enc(images).float() for enc in tr.encoders]
    x = to_unit(images)
    tr.vae.train()
    posterior, z, recon = tr.vae(x, generator=g)
    t, noise = tr._time_and_noise(z, g)
    return x, labels, zs, posterior, z, recon, t, noise, g


def test_vae_step_leaves_the_sit_and_its_batchnorm_alone(repae_world: Path, tmp_path: Path) -> None:
    tr = make_trainer(repae_world, tmp_path / "run")
    x, labels, zs, posterior, z, recon, t, noise, _ = _phase_inputs(tr)
    sit_before, vae_before = _snapshot(tr.sit), _snapshot(tr.vae)
    metrics = tr.vae_phase(x, recon, posterior, z, labels, zs, t, noise)
    assert _changed(sit_before, tr.sit) == [], "the alignment pass changed SiT weights or BatchNorm statistics"
    assert all(p.grad is None for p in tr.sit.parameters()), "SiT parameters received gradients in the VAE step"
    assert len(_changed(vae_before, tr.vae)) > 0, "the VAE step did not update the VAE"
    assert all(p.requires_grad for n, p in tr.sit.named_parameters() if n != "pos_embed"), "SiT left frozen"
    assert {"vae_loss", "vae_align_loss", "reconstruction_loss", "grad_norm_vae"} <= metrics.keys()


def test_repa_is_the_only_path_from_the_sit_into_the_vae(repae_world: Path, tmp_path: Path) -> None:
    """With every VAE loss but alignment switched off, the encoder still gets gradients, the decoder none."""
    tr = make_trainer(
        repae_world,
        tmp_path / "run",
        **{
            "loss.reconstruction_weight": 0.0,
            "loss.perceptual_weight": 0.0,
            "loss.kl_weight": 0.0,
            "loss.discriminator_factor": 0.0,
        },
    )
    x, labels, zs, posterior, z, recon, t, noise, _ = _phase_inputs(tr)
    captured = {}

    def capture():
        captured.update(
            {n: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for n, p in tr.vae.named_parameters()}
        )
        tr.opt_vae.opt.zero_grad(set_to_none=True)
        return 0.0, True

    tr.opt_vae.step = capture
    tr.vae_phase(x, recon, posterior, z, labels, zs, t, noise)
    encoder = [v for n, v in captured.items() if ".encoder." in f".{n}" or "quant_conv" in n and "post" not in n]
    decoder = [v for n, v in captured.items() if ".decoder." in f".{n}" or "post_quant_conv" in n]
    assert encoder and sum(encoder) > 0, "REPA did not reach the VAE encoder"
    assert decoder and sum(decoder) == 0, "the alignment loss reached the decoder"


def test_denoising_loss_never_reaches_the_vae_and_sit_step_updates_batchnorm(repae_world: Path, tmp_path: Path):
    tr = make_trainer(repae_world, tmp_path / "run")
    x, labels, zs, posterior, z, recon, t, noise, g = _phase_inputs(tr)
    tr.opt_vae.opt.zero_grad(set_to_none=True)
    vae_before = _snapshot(tr.vae)
    mean_before = tr.sit.bn.running_mean.clone()
    tr.disc_phase(x, recon)
    metrics = {k: float(v) for k, v in tr.sit_phase(z, labels, zs, t, noise, g).items()}  # device scalars
    assert all(p.grad is None for p in tr.vae.parameters()), "the SiT/discriminator step left VAE gradients"
    assert _changed(vae_before, tr.vae) == []
    assert not torch.equal(mean_before, tr.sit.bn.running_mean), "train-mode BatchNorm did not update its stats"
    assert metrics["sit_loss"] == pytest.approx(metrics["denoising_loss"] + 0.5 * metrics["proj_loss"], rel=1e-5)


def test_initial_denoising_loss_is_about_two(repae_world: Path, tmp_path: Path) -> None:
    """Zero-initialised output: E||eps - x_n||^2 = 2 per element for unit-variance x_n (REPAE-10.6)."""
    tr = make_trainer(repae_world, tmp_path / "run", **{"data.global_batch_size": 16})
    _, labels, zs, _, z, _, t, noise, g = _phase_inputs(tr)
    metrics = {k: float(v) for k, v in tr.sit_phase(z, labels, zs, t, noise, g).items()}  # device scalars
    assert 1.6 < metrics["denoising_loss"] < 2.4


def test_ema_tracks_parameters_and_batchnorm_buffers(repae_world: Path, tmp_path: Path) -> None:
    from repae.ema import ModelEMA

    tr = make_trainer(repae_world, tmp_path / "run")
    ema = ModelEMA(tr.sit, decay=0.5)
    with torch.no_grad():
        tr.sit.bn.running_mean.add_(2.0)
        tr.sit.y_embedder.embedding_table.weight.add_(1.0)
    before_mean = ema.model.bn.running_mean.clone()
    ema.update(tr.sit)
    assert torch.allclose(ema.model.bn.running_mean, before_mean + 1.0)
    assert ema.model.bn.num_batches_tracked == tr.sit.bn.num_batches_tracked


def test_joint_run_resumes_exactly_and_exports_an_e2e_vae(repae_world: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from fusedit.latents import LatentCodec
    from repae.checkpoint import load_sit

    straight, split, out = tmp_path / "straight", tmp_path / "split", tmp_path / "e2e"
    four = {"trainer.max_steps": 4}
    # independent runs side by side (one thread each): the straight 4-step run and the first half of
    # the split one; then the split run resumes while the straight one is exported
    in_parallel(
        lambda: run_module("repae.train", ["-c", str(CONFIG), *tiny_overrides(repae_world, straight, **four)]),
        lambda: run_module("repae.train", ["-c", str(CONFIG), *tiny_overrides(repae_world, split)]),
    )
    proc, _ = in_parallel(
        lambda: run_module("repae.train", ["-c", str(CONFIG), *tiny_overrides(repae_world, split, **four)]),
        lambda: run_module("repae.export", ["--run", str(straight), "--out", str(out), "--stats", "ema"]),
    )
    assert "resumed from" in proc.stderr
    for name in (
        "sit.safetensors",
        "ema.safetensors",
        "discriminator.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        a, b = load_file(straight / "4" / name), load_file(split / "4" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    lines = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    # one metric namespace with the T2I stage (common.metrics)
    shared = {"train/sit_loss", "train/vae_loss", "train/nonfinite_skipped", "data/skipped", "perf/steps_per_s"}
    assert shared <= lines[0].keys() and not [k for k in lines[0] if k not in ("step", "time") and "/" not in k]

    vae = AutoencoderKL.from_pretrained(out)
    scale, bias = load_sit(straight / "4").latents_stats()
    assert torch.allclose(torch.tensor(vae.config.latents_mean), bias, atol=1e-6)
    assert torch.allclose(torch.tensor(vae.config.latents_std), 1.0 / scale, atol=1e-5)
    codec = LatentCodec(vae)
    assert torch.allclose(codec.shift.flatten(), bias, atol=1e-6)


def test_the_tracker_gets_the_whole_config(repae_world: Path, tmp_path: Path, monkeypatch) -> None:
    import repae.train
    from common.metrics import MetricsLogger

    seen = {}

    def record(run_dir, report_to, project, run, config, enabled):
        seen.update(config=config, run=run)
        return MetricsLogger(run_dir, [], project, run, config, enabled)

    monkeypatch.setattr(repae.train, "MetricsLogger", record)
    tr = make_trainer(repae_world, tmp_path / "run", **{"trainer.max_steps": 1})
    tr.fit()
    assert seen["config"]["loss"]["proj_coeff"] == 0.5 and seen["config"]["trainer"]["max_steps"] == 1
    assert seen["run"] == tr.cfg.trainer.run


def test_generate_from_a_joint_run(repae_world: Path, tmp_path: Path) -> None:
    import numpy as np

    run = tmp_path / "run"
    run_module("repae.train", ["-c", str(CONFIG), *tiny_overrides(repae_world, run)])
    out = tmp_path / "samples"
    run_module(
        "repae.generate",
        ["--run-dir", str(run), "--num-samples", "6", "--batch-size", "4", "--num-steps", "2", "--out", str(out)],
    )
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (6, 32, 32, 3) and arr.dtype == np.uint8


def test_train_ldm_keeps_the_vae_and_batchnorm_fixed(repae_world: Path, tmp_path: Path) -> None:
    tr = make_trainer(repae_world, tmp_path / "run", "repae.train_ldm.LdmTrainer")
    vae_before, bn_before = _snapshot(tr.vae), tr.sit.bn.running_var.clone()
    batch = next(tr.data_iter)
    metrics = tr.train_step(batch)
    assert _changed(vae_before, tr.vae) == []
    assert torch.equal(bn_before, tr.sit.bn.running_var)
    assert metrics["denoising_loss"] > 0


def test_bad_config_fails_fast_with_the_field_name(repae_world: Path, tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["-c", str(CONFIG), *tiny_overrides(repae_world, tmp_path / "r", **{"loss.weighting": "cubic"})]
    proc = subprocess.run(
        [sys.executable, "-m", "repae.train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "loss.weighting" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.multiprocess
def test_two_process_ddp_joint_step_with_global_batchnorm(repae_world: Path, tmp_path: Path) -> None:
    """2 CPU processes (gloo): runs, checkpoints, and BatchNorm statistics see the global batch."""
    from safetensors.torch import load_file

    run = tmp_path / "ddp"
    run_module("repae.train", ["-c", str(CONFIG), *tiny_overrides(repae_world, run)], nproc=2)
    assert (run / "2" / "data_state_rank1.json").is_file()
    state = load_file(run / "2" / "sit.safetensors")
    assert int(state["bn.num_batches_tracked"]) == 2
    assert json.loads((run / "2" / "trainer_state.json").read_text())["world_size"] == 2
    # Continued on 1 process: the data position is global, so the loader continues exactly (issue 29)
    saved = json.loads((run / "2" / "data_state_rank0.json").read_text())
    assert saved == json.loads((run / "2" / "data_state_rank1.json").read_text())  # the same on every rank
    more = tiny_overrides(repae_world, run, **{"trainer.max_steps": 3})
    proc = run_module("repae.train", ["-c", str(CONFIG), *more], nproc=1)
    assert "not batch-exact" not in proc.stderr and "order restarts" not in proc.stderr, proc.stderr[-3000:]
    after = json.loads((run / "3" / "data_state_rank0.json").read_text())
    assert after["next_batch"] == saved["next_batch"] + 1 and after["global_batch"] == saved["global_batch"]
    assert after["world_size"] == 1


def _sync_bn_worker(rank: int, world: int, port: int, z: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from repae.sync_bn import batch_normalize

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    bn = torch.nn.BatchNorm2d(z.shape[1], affine=False, eps=1e-4, momentum=0.1).train()
    part = z.chunk(world)[rank]
    y = batch_normalize(bn, part)
    torch.save({"y": y, "mean": bn.running_mean, "var": bn.running_var}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_global_batchnorm_over_two_processes_equals_one_process_batchnorm(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from common.distributed import _free_port

    z = torch.randn(8, 4, 3, 3) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 1.5
    mp.spawn(_sync_bn_worker, args=(2, _free_port(), z, str(tmp_path)), nprocs=2, join=True)
    ref = torch.nn.BatchNorm2d(4, affine=False, eps=1e-4, momentum=0.1).train()
    expected = ref(z)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.allclose(torch.cat([p["y"] for p in parts]), expected, atol=1e-5)
    for p in parts:
        assert torch.allclose(p["mean"], ref.running_mean, atol=1e-6)
        assert torch.allclose(p["var"], ref.running_var, atol=1e-5)


def test_global_batchnorm_single_process_matches_batchnorm2d() -> None:
    from repae.sync_bn import batch_normalize

    z = torch.randn(6, 3, 4, 4) * 2 + 1
    a = torch.nn.BatchNorm2d(3, affine=False, eps=1e-4).train()
    b = torch.nn.BatchNorm2d(3, affine=False, eps=1e-4).train()
    assert torch.allclose(batch_normalize(a, z), b(z), atol=1e-5)
    assert torch.allclose(a.running_var, b.running_var) and torch.allclose(a.running_mean, b.running_mean)
    a.eval()
    assert torch.equal(batch_normalize(a, z), a(z))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_joint_step_is_finite(repae_world: Path, tmp_path: Path, precision: str) -> None:
    """bf16 autocast, and fp16 with one GradScaler per optimiser (the reference shared one)."""
    import math

    tr = make_trainer(repae_world, tmp_path / "run", **{"trainer.mixed_precision": precision})
    scalers = {id(o.scaler) for o in (tr.opt_sit, tr.opt_vae, tr.opt_disc)}
    assert len(scalers) == 3
    assert all(o.scaler.is_enabled() == (precision == "fp16") for o in (tr.opt_sit, tr.opt_vae, tr.opt_disc))
    metrics = tr.train_step(next(tr.data_iter))
    for key in ("sit_loss", "vae_loss", "d_loss", "proj_loss"):
        assert math.isfinite(metrics[key]), (key, metrics[key])
