"""Dry-run planner and the six paired 3B configs: counts, FLOPs, memory, data checks, CLI.

Every number the planner prints is checked against something independent: parameter counts
against real (tiny) models, FLOP formulas against torch's FLOP counter, the activation estimate
against the tensors autograd really saves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.config import ConfigError
from common.shards import check_brace_syntax
from fusedit.config import load_config
from fusedit.models.dit import DiT, count_parameters
from fusedit.tools.plan import (
    GEMMA_2B,
    build_plan,
    check_data_paths,
    dit_activation_bytes,
    dit_forward_flops,
    memory_plan,
    residual_is_contiguous,
    run_dry_run,
    text_encoder_forward_flops,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "e2e-vae"
PAIRS = [("fluxvae", "e2efluxvae"), ("sd3.5vae", "e2esd3.5vae"), ("qwenimagevae", "e2eqwenimagevae")]
STEMS = [f"sa-w2048-3b-res256-{v}-fulldataset-500k" for pair in PAIRS for v in pair]
PARAMS_3B = 2_660_490_816


def _3b(stem: str, tmp_path: Path):
    return load_config(CONFIGS / f"{stem}.yaml", [f"trainer.checkpoint_dir={tmp_path}"])


# ------------------------------------------------------------------------------ the 3B configs
@pytest.mark.parametrize("stem", STEMS)
def test_3b_configs_plan_exact_parameter_count(stem: str, tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / f"{stem}.yaml")
    assert cfg.trainer.run == stem and cfg.trainer.checkpoint_dir == f"output/{stem}"
    plan = build_plan(cfg, world_size=32)
    dit = plan.component("DiT")
    assert dit.trainable == PARAMS_3B == count_parameters(cfg.dit_kwargs(16, 2048))
    assert plan.component("text encoder").frozen == GEMMA_2B["params"]
    assert plan.component("VAE").frozen > 50_000_000
    assert (plan.tokens.image_tokens, plan.tokens.text_tokens) == (256, 256)
    assert sum(r.shards for r in plan.data) == 4530


@pytest.mark.parametrize("original, tuned", PAIRS)
def test_pairs_differ_only_in_vae_and_run(original: str, tuned: str) -> None:
    a, b = (load_config(CONFIGS / f"sa-w2048-3b-res256-{v}-fulldataset-500k.yaml").to_dict() for v in (original, tuned))
    assert a["vae"] != b["vae"]
    for d in (a, b):
        del d["vae"], d["trainer"]["run"], d["trainer"]["checkpoint_dir"]
    assert a == b


def test_known_gemma_table_is_the_real_architecture() -> None:
    from transformers import GemmaConfig, GemmaModel

    arch = {k: v for k, v in GEMMA_2B.items() if k != "params"}
    with torch.device("meta"):
        model = GemmaModel(GemmaConfig(**arch))
    assert sum(p.numel() for p in model.parameters()) == GEMMA_2B["params"]


# ------------------------------------------------------------------------------ a tiny local world
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Gemma text encoder + AutoencoderKL saved locally, 2 of 4 shards present, a config."""
    from diffusers import AutoencoderKL
    from transformers import GemmaConfig, GemmaModel

    root = tmp_path_factory.mktemp("plan")
    torch.manual_seed(0)
    te = GemmaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    GemmaModel(te).save_pretrained(root / "text_encoder")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(root / "vae")
    (root / "shards").mkdir()
    for i in range(2):
        (root / "shards" / f"train-{i:03d}.tar").write_bytes(b"")
    (root / "tiny.yaml").write_text(
        f"""
trainer: {{run: tiny, checkpoint_dir: "{root}/run", mixed_precision: bf16}}
model: {{base: "{root}/text_encoder", hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
        num_key_value_heads: 1, head_dim: 16, intermediate_size: 64, patch_size: 1,
        pos_embed_max_size: 8, sample_size: 8}}
vae: {{pretrained_model_name_or_path: "{root}/vae"}}
data: {{data_path: ["{root}/shards/train-{{000..003}}.tar"], resolution: 16, batch_size_per_gpu: 2,
       max_prompt_length: 12}}
sample: {{height: 16, width: 16}}
"""
    )
    return root


def _tiny(root: Path, *overrides: str):
    return load_config(root / "tiny.yaml", list(overrides))


def test_tiny_counts_equal_the_real_models(tiny: Path) -> None:
    from diffusers import AutoencoderKL
    from transformers import AutoModel

    cfg = _tiny(tiny)
    plan = build_plan(cfg)

    def numel(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert plan.component("DiT").trainable == numel(DiT(**cfg.dit_kwargs(4, 32)))
    assert plan.component("text encoder").frozen == numel(AutoModel.from_pretrained(tiny / "text_encoder"))
    assert plan.component("VAE").frozen == numel(AutoencoderKL.from_pretrained(tiny / "vae"))
    assert plan.tokens.image_tokens == 64 and plan.tokens.vae_factor == 2  # 16 px / 2 / patch 1 = 8 x 8
    assert [(r.shards, r.existing) for r in plan.data] == [(4, 2)]


def test_unknown_hub_models_still_plan_the_dit(tiny: Path) -> None:
    """Offline, an unknown hub name cannot be sized; the DiT still can, from the config alone."""
    hub_names = ["model.base=someone/llm", "vae.pretrained_model_name_or_path=someone/vae"]
    cfg = _tiny(tiny, *hub_names, "model.text_hidden_size=32", "model.in_channels=4")
    plan = build_plan(cfg)
    assert plan.component("text encoder").frozen is None and plan.component("VAE").frozen is None
    assert plan.component("DiT").trainable == count_parameters(cfg.dit_kwargs(4, 32))
    assert plan.tokens.vae_factor == 8 and plan.flops.text_encoder_forward_per_sample is None


def test_mismatched_channels_and_unknown_sizes_are_config_errors(tiny: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.in_channels"):
        build_plan(_tiny(tiny, "model.in_channels=8"))
    with pytest.raises(ConfigError, match=r"model\.text_hidden_size"):
        build_plan(_tiny(tiny, "model.base=someone/llm"))
    with pytest.raises(ConfigError, match=r"model\.text_hidden_size"):
        build_plan(_tiny(tiny, "model.text_hidden_size=48"))  # the local encoder is 32 wide


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.attention=cross", "model.timestep_conditioning=adaln-single"], ["model.patch_size=2"]],
)
def test_dit_flop_formula_matches_torch_flop_counter(tiny: Path, overrides: list[str]) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    kw = _tiny(tiny, *overrides).dit_kwargs(4, 32)
    batch, side, n_text = 3, 8, 12
    with torch.device("meta"):
        dit = DiT(**kw)
        args = (torch.empty(batch, 4, side, side), torch.empty(batch), torch.empty(batch, n_text, 32))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        dit(*args)
    forward, _ = dit_forward_flops(kw, (side // kw["patch_size"]) ** 2, n_text)
    assert counter.get_total_flops() == batch * forward


def test_text_encoder_flop_formula_matches_torch_flop_counter(tiny: Path) -> None:
    """torch's counter does not see the CPU attention kernel, so compare the projections/MLP exactly."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    plan = build_plan(_tiny(tiny, "data.max_prompt_length=10"))
    model = AutoModel.from_pretrained(tiny / "text_encoder")
    ids = torch.randint(0, 64, (2, 10))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    arch = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    arch |= {"head_dim": 8, "intermediate_size": 64}
    attention = 2 * 4 * 10 * 10 * 4 * 8  # layers x (QK^T + AV) x L x L x heads*head_dim
    assert plan.flops.text_encoder_forward_per_sample == text_encoder_forward_flops(arch, 10)
    assert counter.get_total_flops() == 2 * (text_encoder_forward_flops(arch, 10) - attention)


def _saved_bytes(dit: torch.nn.Module, args: tuple) -> int:
    """Bytes of distinct storages autograd saves for backward, excluding the parameters."""
    params = {p.untyped_storage().data_ptr() for p in dit.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dit(*args)
    return sum(seen.values())


@pytest.mark.parametrize("dtype, act_bytes", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_activation_estimate_matches_saved_tensors(tiny: Path, dtype: torch.dtype, act_bytes: int) -> None:
    kw = _tiny(tiny).dit_kwargs(4, 32)
    batch, n_text = 2, 12
    torch.manual_seed(0)
    dit = DiT(**kw).to(dtype)
    args = (
        torch.randn(batch, 4, 8, 8, dtype=dtype),
        torch.rand(batch) * 1000,
        torch.randn(batch, n_text, 32, dtype=dtype),
    )
    acts = dit_activation_bytes(kw, 64, n_text, act_bytes, residual_is_contiguous(dit))
    plain = _saved_bytes(dit, args)
    dit.enable_gradient_checkpointing()
    checkpointed = _saved_bytes(dit, args)
    assert plain == pytest.approx(batch * acts.total(False), rel=0.03)
    # total(True) adds the one layer rebuilt during backward, which is not saved at forward time
    assert checkpointed == pytest.approx(batch * (acts.total(True) - acts.per_layer), rel=0.05)


# ------------------------------------------------------------------------------ memory
def _memory(stage: int, world: int, precision: str = "bf16"):
    cfg = dict(zero_stage=stage, world_size=world, micro_batch=32, mixed_precision=precision)
    acts = dit_activation_bytes(load_config(CONFIGS / f"{STEMS[0]}.yaml").dit_kwargs(16, 2048), 256, 256, 2)
    return memory_plan(PARAMS_3B, {"text encoder": 5_000_000_000, "VAE": 160_000_000}, acts, **cfg)


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_zero_stages_order_per_gpu_memory(precision: str) -> None:
    z0, z1, z2 = (_memory(s, 8, precision) for s in (0, 1, 2))
    for checkpointing in (False, True):
        assert z2.peak(checkpointing) < z1.peak(checkpointing) < z0.peak(checkpointing)
    assert z2.static_total < z1.static_total < z0.static_total


@pytest.mark.parametrize("stage", [1, 2])
def test_doubling_world_size_halves_partitioned_terms(stage: int) -> None:
    small, big = _memory(stage, 8), _memory(stage, 16)
    assert small.partitioned and small.partitioned == big.partitioned
    for name, value in small.static.items():
        if name in small.partitioned:
            assert abs(big.static[name] - value / 2) <= 1
        else:
            assert big.static[name] == value
    assert big.peak(False) < small.peak(False)


def test_frozen_weights_follow_the_trainer_dtype(tiny: Path) -> None:
    bf16 = build_plan(_tiny(tiny)).memory[2].static
    fp32 = build_plan(_tiny(tiny, "trainer.mixed_precision='no'")).memory[2].static
    te = build_plan(_tiny(tiny)).component("text encoder").frozen
    assert bf16["text encoder (bf16, frozen)"] == 2 * te and fp32["text encoder (fp32, frozen)"] == 4 * te


# ------------------------------------------------------------------------------ data paths
@pytest.mark.parametrize(
    "pattern", ["a/{000..999}.tar", "{a,b}/x.tar", "{1..10..2}.tar", "{a..f}", "{a,{1..3}}", "x.tar"]
)
def test_brace_syntax_accepts(pattern: str) -> None:
    check_brace_syntax(pattern)


@pytest.mark.parametrize("pattern", ["a/{000..0999x}.tar", "a/{000..999.tar", "a/000..999}.tar", "a/{abc}.tar", "{}"])
def test_brace_syntax_rejects(pattern: str) -> None:
    with pytest.raises(ValueError):
        check_brace_syntax(pattern)
    with pytest.raises(ConfigError, match=r"data\.data_path"):
        check_data_paths([pattern])


def test_remote_patterns_are_counted_not_checked() -> None:
    [report] = check_data_paths(["pipe:curl -s https://host/shard-{0000..0009}.tar"])
    assert (report.shards, report.local, report.existing) == (10, False, None)


# ------------------------------------------------------------------------------ outputs and CLI
def test_run_dry_run_writes_plan_and_resolved_config(tiny: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _tiny(tiny)
    plan = run_dry_run(cfg, deepspeed_config_path=str(ROOT / "configs" / "deepspeed" / "zero1.json"))
    assert plan.zero_stage == 1  # the DeepSpeed JSON's stage when --zero-stage is not given
    data = json.loads((tiny / "run" / "plan.json").read_text())
    assert data["components"][0]["trainable"] == plan.component("DiT").trainable
    assert data["flops"]["model_per_gpu"] == plan.flops.model_per_gpu
    assert set(data["memory"]) == {"zero0", "zero1", "zero2"}
    assert load_config(tiny / "run" / "config.resolved.yaml") == cfg
    assert plan.flops.mfu(step_seconds=2.0, peak_flops_per_gpu=plan.flops.model_per_gpu) == 0.5
    assert "2 of 4" in capsys.readouterr().out


def test_train_main_dry_run_starts_no_process_group(tiny: Path) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT))
    assert train.main(["-c", str(tiny / "tiny.yaml"), "--dry-run", "--zero-stage", "2", "--text-tokens", "5"]) == 0
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    assert json.loads((tiny / "run" / "plan.json").read_text())["tokens"]["text_tokens"] == 5


def test_train_py_dry_run_on_3b_config(tmp_path: Path) -> None:
    """The real CLI, offline: prints the exact count, writes plan.json, never imports DeepSpeed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    config = CONFIGS / f"{STEMS[0]}.yaml"
    cmd = [sys.executable, "-X", "importtime", "train.py", "-c", str(config), "--dry-run", "--world-size", "32"]
    start = time.perf_counter()
    proc = subprocess.run(
        [*cmd, f"trainer.checkpoint_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2,660,490,816" in proc.stdout and "ZeRO-2*" in proc.stdout
    assert json.loads((tmp_path / "plan.json").read_text())["components"][0]["trainable"] == PARAMS_3B
    assert (tmp_path / "config.resolved.yaml").is_file()
    assert not re.search(r"\|\s+deepspeed(\.|\s*$)", proc.stderr, re.MULTILINE), "dry run imported deepspeed"
    assert elapsed < 90, f"dry run took {elapsed:.0f} s"


def test_a_latent_cache_takes_the_vae_out_of_the_step(tmp_path: Path) -> None:
    online = build_plan(_3b("sa-w2048-3b-res256-fluxvae-fulldataset-500k", tmp_path), world_size=32).flops
    cfg = _3b("sa-w2048-3b-res256-fluxvae-fulldataset-500k", tmp_path)
    cfg.data.latent_cache = "data/latents"  # planning needs no cache on disk
    cached = build_plan(cfg, world_size=32).flops
    assert online.per_sample()["vae_encoder_forward"] > 0 and cached.per_sample()["vae_encoder_forward"] == 0
    assert online.model_per_sample() - cached.model_per_sample() == online.per_sample()["vae_encoder_forward"]


def test_a_text_cache_takes_the_text_encoder_out_of_the_step(tmp_path: Path) -> None:
    online = build_plan(_3b("sa-w2048-3b-res256-fluxvae-fulldataset-500k", tmp_path), world_size=32).flops
    cfg = _3b("sa-w2048-3b-res256-fluxvae-fulldataset-500k", tmp_path)
    cfg.data.text_cache = "data/gemma-2b-features"  # planning needs no cache on disk
    cached = build_plan(cfg, world_size=32).flops
    assert online.per_sample()["text_encoder_forward"] > 0 and cached.per_sample()["text_encoder_forward"] == 0
    assert online.model_per_sample() - cached.model_per_sample() == online.per_sample()["text_encoder_forward"]
