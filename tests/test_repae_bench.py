"""repae.bench: the report is complete, and our joint step computes what the reference formulation does.

Both formulations start from identical weights and see the same batch and random draws on the
first step, so every loss, logit mean and gradient norm must agree up to float rounding; a
speed-up bought by computing something else would fail here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from repae.bench import joint

TINY = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.encoder_depth=1",
    "model.projector_dim=32",
    "loss.disc_channels=8",
    "loss.perceptual_net=alex",
    "data.global_batch_size=4",
    "data.dataloader_num_workers=0",
    "vae.stats_batches=1",
]


def test_bench_reports_and_the_formulations_agree(repae_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    joint.main(["--toy", str(repae_world), "--steps", "2", "--warmup", "1", "--out", str(out), *TINY])
    report = json.loads(out.read_text())
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["device"] == "cpu"
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    assert report["settings"]["reference_faithful"] is True and report["settings"]["global_batch_size"] == 4
    assert set(report["variants"]) == {"ours", "reference"}
    for name, v in report["variants"].items():
        assert len(v["step_s"]) == 2 and v["step_s_median"] > 0 and v["images_per_s"] > 0, name
        for phase in ("encoders", "vae_forward", "vae_step", "disc_step", "sit_step", "ema"):
            assert v["phases"][phase]["median_s"] > 0, (name, phase)
    sp = report["comparison"]["speedup_ours_vs_reference"]
    low, high = sp["interval_95"]
    assert 0 < low <= sp["ratio_of_medians"] <= high
    assert sp["paired_median"] > 0 and sp["min_over_min"] > 0
    assert set(report["goal"]) == {"speedup_at_least", "met_by_ratio", "met_by_interval_low"}
    check = report["loss_check"]
    assert check["missing"] == [] and set(check["values"]) == set(joint.CHECKED)
    assert check["agree"], {k: v for k, v in check["values"].items() if v["rel_diff"] > check["tolerance"]["rel"]}


def test_loss_check_catches_a_different_computation() -> None:
    def variant(name: str, scale: float) -> joint.Variant:
        v = joint.Variant(name, name, run=lambda b, i: {}, clock=joint.PhaseClock(torch.device("cpu")))
        v.losses.append({k: 1.0 for k in joint.CHECKED} | {"proj_loss": -0.5 * scale})
        return v

    assert joint.loss_check(variant("ours", 1.0), variant("reference", 1.0), "no")["agree"]
    assert not joint.loss_check(variant("ours", 1.001), variant("reference", 1.0), "no")["agree"]


def test_foreach_adamw_is_bit_identical_to_the_loop() -> None:
    """repae.train.Optim asks for foreach AdamW (torch's CPU default is a Python loop): same weights, bit for bit."""
    from repae.config import OptimizerSection
    from repae.train import Optim

    torch.manual_seed(0)
    shapes = [(32, 16), (16,), (8, 3, 3, 3), (1,)] * 5
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    loop = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    cfg = OptimizerSection()
    opt = Optim(ours, 1e-3, cfg, fp16=False, device=torch.device("cpu"), max_norm=1.0)
    ref = torch.optim.AdamW(loop, lr=1e-3, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    assert ref.defaults["foreach"] is None  # the loop on CPU tensors
    for _ in range(4):
        for p, q in zip(ours, loop):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(loop, 1.0)
        ref.step()
        ref.zero_grad(set_to_none=True)
    assert all(torch.equal(p, q) for p, q in zip(ours, loop))
