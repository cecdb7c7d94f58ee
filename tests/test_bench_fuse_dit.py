"""fusedit.tools.bench on a FuseDiT: the LLM is timed inside the model, and its FLOPs are the trainer's.

The toy FuseDiT (configs/e2e-vae/toy-fusedit.yaml) on the quick world, at the sizes the FuseDiT
training tests use. The reference formulation needs one DiT layer per LLM layer and the LLM's MLP
width on the DiT side, so the comparison runs 2 DiT layers with the toy LLM's MLP width (128).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from common.config import ConfigError
from fusedit.tools import bench

from .conftest import ROOT, tiny_fuse_overrides

FUSE_CONFIG = ROOT / "configs" / "e2e-vae" / "toy-fusedit.yaml"
COMPARABLE = {"model.num_hidden_layers": 2, "model.intermediate_size": 128}  # what the reference can run


def run_bench(tmp_path: Path, overrides: list[str], *flags: str) -> dict:
    out = tmp_path / "bench.json"
    bench.main(["-c", str(FUSE_CONFIG), "--out", str(out), *flags, *overrides])
    return json.loads(out.read_text())


def model_config(overrides: list[str], train_llm: bool) -> dict:
    """The saved config of the toy FuseDiT the bench builds, without building it (for the FLOP count)."""
    from transformers import AutoConfig

    from fusedit.config import load_config
    from fusedit.tools.plan import describe_vae

    cfg = load_config(FUSE_CONFIG, overrides)
    llm = AutoConfig.from_pretrained(cfg.model.base).to_dict()
    kwargs = cfg.fuse_dit_kwargs(describe_vae(cfg).latent_channels)
    return {**kwargs, "llm_config": llm, "_class_name": "FuseDiT", "train_llm": train_llm}


def test_bench_fuse_dit_against_its_reference(quick_world: Path, tmp_path: Path) -> None:
    """Variants and phases; the MFU's FLOPs are the training log's (and the dry run's); the loss check agrees."""
    from fusedit.config import load_config
    from fusedit.flops import TrainingFlops
    from fusedit.tools.plan import build_fuse_dit_plan, describe_vae, vae_encoder_forward_flops

    overrides = tiny_fuse_overrides(quick_world, tmp_path / "run", **COMPARABLE)
    flags = ("--compare-reference", "--steps", "2", "--warmup", "1", "--peak-tflops", "1")
    report = run_bench(tmp_path, overrides, *flags)

    assert report["settings"]["model"] == "FuseDiT" and report["settings"]["train_llm"]  # the toy trains its LLM
    assert report["frozen"]["llm"].endswith("inside the model: trained")
    assert any("no text_encoder phase" in n for n in report["notes"])
    assert set(report["variants"]) == {"ours", "ours_padded", "reference"}
    for name, v in report["variants"].items():
        assert set(v["phases"]) == {"data_wait", "vae_encode", "llm_and_dit_forward_backward", "optimizer", "ema"}
        for phase in ("vae_encode", "llm_and_dit_forward_backward", "optimizer", "ema"):
            assert v["phases"][phase]["median_s"] > 0, (name, phase)
        assert len(v["step_s"]) == 2 and v["images_per_s"] > 0
    max_len = report["settings"]["max_prompt_length"]
    ours = report["variants"]["ours"]
    assert report["variants"]["reference"]["text_padded_length_mean"] == max_len
    assert ours["text_padded_length_mean"] < max_len  # toy captions are short

    # model FLOPs: TrainingFlops' per-sample count (what the training log's MFU divides) x batch, per step
    cfg = load_config(FUSE_CONFIG, overrides)
    batch, vae = cfg.data.batch_size_per_gpu, describe_vae(cfg)
    vae_flops = vae_encoder_forward_flops(vae, cfg.data.resolution)
    counter = TrainingFlops(model_config(overrides, True), report["settings"]["image_tokens"], None, vae_flops)
    per_step = [counter.per_sample(n) * batch for n in ours["text_padded_lengths"]]
    assert report["model_flops_per_step_mean"] == statistics.fmean(per_step)
    plan = build_fuse_dit_plan(cfg, None, 1, 2, ours["text_padded_lengths"][0])  # what --dry-run prints
    assert plan.flops.model_per_sample() * batch == per_step[0]
    assert ours["mfu"] == pytest.approx(ours["model_tflop_per_s"])  # against the 1 TFLOP/s given
    assert ours["model_tflop_per_s"] == pytest.approx(sum(per_step) / sum(ours["step_s"]) / 1e12, rel=1e-3)
    assert report["model_flops"]["llm_passes"] == 3 and 0 < report["model_flops"]["llm_share_excluding_vae"] < 1

    check = report["loss_check"]
    first = check["first_step"]
    assert check["agree"] and first["reference"]["grad_norm"] > 0
    for name in ("ours", "ours_padded"):
        assert first[name]["loss"] == pytest.approx(first["reference"]["loss"], abs=1e-5)
        assert first[name]["grad_norm"] == pytest.approx(first["reference"]["grad_norm"], rel=1e-5)
    assert report["comparison"]["speedup_ours_vs_reference"]["paired_median"] > 0


def test_train_llm_adds_the_llm_backward_and_its_weights(quick_world: Path, tmp_path: Path) -> None:
    """train_llm: false -> the LLM counts once (forward) and stays out of optimizer and EMA; true -> 3x, in both."""
    import torch

    from fusedit.config import load_config
    from fusedit.flops import fuse_dit_forward_flops

    fixed = ("--text-tokens", "8", "--steps", "1", "--warmup", "0")  # every step pads to 8 tokens
    flops, trained, cpu = {}, {}, torch.device("cpu")
    for train_llm in (False, True):
        overrides = tiny_fuse_overrides(quick_world, tmp_path / "run", **{**COMPARABLE, "trainer.train_llm": train_llm})
        report = run_bench(tmp_path, overrides, *fixed)
        flops[train_llm] = report["model_flops_per_step_mean"]
        assert report["model_flops"]["llm_passes"] == (3 if train_llm else 1)

        args = bench.parse_args(["-c", str(FUSE_CONFIG), "--compare-reference", *overrides])
        cfg = load_config(FUSE_CONFIG, args.overrides)
        _, model, kw = bench.setup_fuse_dit(args, cfg, cpu, torch.float32, [])
        variants = {v.name: v for v in bench.make_variants(model, kw, cfg, args, cpu)}
        ours, ref = variants["ours"], variants["reference"]
        names = {id(p): n for n, p in ours.module.named_parameters()}
        held = {names[id(p)] for p in ours.optimizer.params}
        assert held == {n for n, p in ours.module.named_parameters() if p.requires_grad} == set(ours.ema.names)
        assert set(ref.ema.shadow) == held  # the reference trains the same tensors
        trained[train_llm] = {n.split(".")[0] for n in held}
    assert trained == {False: {"dit"}, True: {"dit", "llm"}}

    config = model_config(overrides, train_llm=False)
    _, llm_forward = fuse_dit_forward_flops(config, report["settings"]["image_tokens"], 8)
    batch = report["settings"]["batch_size"]
    assert flops[True] - flops[False] == 2 * llm_forward * batch > 0  # the trained LLM's backward


def test_options_that_do_not_apply_are_refused_by_name(quick_world: Path, tmp_path: Path) -> None:
    overrides = tiny_fuse_overrides(quick_world, tmp_path / "run")
    with pytest.raises(ConfigError, match="--cached-text: a FuseDiT has no text-encoder output"):
        run_bench(tmp_path, overrides, "--cached-text")
    with pytest.raises(ConfigError, match="--random-frozen.*--random-init-frozen"):
        run_bench(tmp_path, overrides, "--random-frozen")
    # no hub offline: the LLM cannot load, and random text features cannot stand in for token ids
    with pytest.raises(ConfigError, match="could not be loaded.*pass --random-init-frozen"):
        run_bench(tmp_path, [*overrides, "model.base=google/gemma-2b"])
    # the reference formulation cannot run a DiT layer without an LLM partner (the toy's third layer)
    with pytest.raises(ConfigError, match="--compare-reference: reference FuseDiT config: dit_num_hidden_layers=3"):
        run_bench(tmp_path, [*overrides, "model.intermediate_size=128"], "--compare-reference")
    with pytest.raises(ConfigError, match="set model.intermediate_size=128"):
        run_bench(tmp_path, overrides, "--compare-reference")
