"""fusedit.tools.bench: the report is complete, and the speed-up is not bought by computing something else.

Every variant's first step starts from identical weights on the identical batch (same captions,
noise and timesteps), so the reference formulation (dense float mask, text padded to
max_prompt_length, repeat_kv) and ours (key mask, batch-max padding, native GQA) must give the
same loss and gradient norm up to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusedit.tools import bench
from fusedit.tools.demo import toy_overrides

from .conftest import ROOT, TOY_CONFIG

TINY_MODEL = [
    "model.hidden_size=32",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",  # GQA, so repeat_kv vs native GQA is exercised
    "model.head_dim=16",
    "model.intermediate_size=64",
]
PHASES_RUN = ("text_encoder", "vae_encode", "dit_forward_backward", "optimizer", "ema")


def run_bench(tmp_path: Path, config: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    bench.main(["-c", str(config), "--steps", "2", "--warmup", "1", "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_bench_toy_compare_reference(quick_world: Path, tmp_path: Path) -> None:
    report = run_bench(
        tmp_path, TOY_CONFIG, "--compare-reference", "--batch-size", "4", *toy_overrides(quick_world), *TINY_MODEL
    )
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["torch"] and machine["device"] == "cpu"
    assert set(report["variants"]) == {"ours", "ours_padded", "reference"}
    for name, v in report["variants"].items():
        for key in ("images_per_s", "tokens_per_s", "image_tokens_per_s", "step_s_median", "model_tflop_per_s"):
            assert v[key] > 0, (name, key)
        for phase in PHASES_RUN:  # the toy world's real text encoder and VAE ran
            assert v["phases"][phase]["median_s"] > 0, (name, phase)
        assert v["mfu"] is None  # CPU: not meaningful, omitted
        assert len(v["step_s"]) == 2
    assert report["peak_memory"]["gib"] > 0 and "RSS" in report["peak_memory"]["kind"]
    assert report["model_flops_per_step_mean"] > 0
    for key in ("speedup_ours_vs_reference", "speedup_ours_padded_vs_reference", "speedup_ours_vs_ours_padded"):
        assert report["comparison"][key]["paired_median"] > 0
    max_len = report["settings"]["max_prompt_length"]
    assert report["variants"]["reference"]["text_padded_length_mean"] == max_len
    assert report["variants"]["ours"]["text_padded_length_mean"] < max_len  # toy captions are short

    check = report["loss_check"]
    first = check["first_step"]
    for name in ("ours", "ours_padded"):
        assert first[name]["loss"] == pytest.approx(first["reference"]["loss"], abs=1e-4)
        assert first[name]["grad_norm"] == pytest.approx(first["reference"]["grad_norm"], rel=1e-4)
    assert first["reference"]["grad_norm"] > 0 and check["agree"]


def test_bench_falls_back_to_random_encoders(tmp_path: Path) -> None:
    """Hub text encoder and VAE cannot load offline: the DiT is still timed, and the report says so."""
    config = ROOT / "configs" / "e2e-vae" / "sa-w2048-3b-res256-fluxvae-fulldataset-500k.yaml"
    report = run_bench(
        tmp_path,
        config,
        "--batch-size",
        "2",
        "--text-lengths",
        "uniform:3:40",
        "data.resolution=64",  # FLUX VAE x8, patch 2 -> 16 image tokens
        "data.max_prompt_length=48",
        *TINY_MODEL,
    )
    assert report["frozen"]["text_encoder"].startswith("random")
    assert report["frozen"]["vae"].startswith("random")
    assert any("could not be loaded" in n for n in report["notes"])
    assert any("fp32" in n for n in report["notes"])  # bf16 config downgraded on CPU
    ours = report["variants"]["ours"]
    assert report["settings"]["image_tokens"] == 16
    assert ours["images_per_s"] > 0 and ours["phases"]["dit_forward_backward"]["median_s"] > 0
    assert 8 <= ours["text_padded_length_mean"] <= 48  # batch max rounded up to 8, never above max_prompt_length


def test_text_length_specs() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    assert bench.draw_length(*bench.parse_lengths("fixed:300"), rng, 256) == 256
    lengths = [bench.draw_length(*bench.parse_lengths("normal:150:50"), rng, 256) for _ in range(200)]
    assert 1 <= min(lengths) and max(lengths) <= 256 and 120 < sum(lengths) / len(lengths) < 180
    assert bench.approx_token_count("a red circle, on a white background") == 9
    with pytest.raises(ValueError, match="text-lengths"):
        bench.parse_lengths("gamma:1")


def test_bench_cached_text_skips_the_encoder_and_its_flops(quick_world: Path, tmp_path: Path) -> None:
    from fusedit.config import load_config
    from fusedit.tools.plan import text_encoder_forward_flops

    overrides = [*toy_overrides(quick_world), *TINY_MODEL]
    out = tmp_path / "bench.json"
    args = ["--steps", "1", "--warmup", "0", "--cached-text", "--batch-size", "4", "--out", str(out)]
    bench.main(["-c", str(TOY_CONFIG), *args, *overrides])
    report = json.loads(out.read_text())
    ours = report["variants"]["ours"]
    assert report["settings"]["cached_text"] and ours["images_per_s"] > 0
    assert ours["phases"]["text_encoder"]["median_s"] < ours["phases"]["dit_forward_backward"]["median_s"]
    kw = load_config(TOY_CONFIG, overrides).dit_kwargs(4, 64)
    arch = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1}
    arch |= {"head_dim": 16, "intermediate_size": 128}
    frozen = bench.Frozen(None, None, 64, 4, 4, arch, 1000, {})
    online = bench.step_model_flops(kw, frozen, 16, 24, 2, False)
    cached = bench.step_model_flops(kw, frozen, 16, 24, 2, False, cached_text=True)
    assert online - cached == 2 * text_encoder_forward_flops(arch, 24) > 0
    no_vae = bench.step_model_flops(kw, frozen, 16, 24, 2, False, cached_latents=True)
    assert online - no_vae == 2 * 1000  # the latent cache takes the VAE encoder's FLOPs out too


def test_random_init_frozen_runs_the_real_architectures(quick_world: Path, tmp_path: Path) -> None:
    """--random-init-frozen: the config's text-encoder and VAE architectures, fresh weights, depth cut."""
    report = run_bench(
        tmp_path,
        TOY_CONFIG,
        "--random-init-frozen",
        "--text-layers",
        "1",
        "--batch-size",
        "2",
        *toy_overrides(quick_world),
        f"data.tokenizer={quick_world / 'text_encoder'}",
        *TINY_MODEL,
    )
    assert (
        report["frozen"]["text_encoder"].startswith("random weights") and "1 layers" in report["frozen"]["text_encoder"]
    )
    assert report["frozen"]["vae"].startswith("random weights")
    phases = report["variants"]["ours"]["phases"]
    assert phases["text_encoder"]["median_s"] > 0 and phases["vae_encode"]["median_s"] > 0  # they really ran
