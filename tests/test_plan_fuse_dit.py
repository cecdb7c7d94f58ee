"""``train.py --dry-run`` for the FuseDiT family: its LLM runs inside the model (issue 27).

The planner's parameter counts, FLOPs and activation bytes are checked against the real module
on a tiny local Gemma (a real build, torch's FLOP counter, autograd's saved tensors), and its
real-size counts against the reference's own numbers (docs/fusedit-family.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import ConfigError
from fusedit.config import load_config
from fusedit.tools.plan import build_plan, render

ROOT = Path(__file__).resolve().parents[1]
LLM = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma LLM and AutoencoderKL saved locally, and a FuseDiT config around them."""
    from diffusers import AutoencoderKL
    from transformers import GemmaConfig, GemmaModel

    root = tmp_path_factory.mktemp("plan-fuse")
    torch.manual_seed(0)
    GemmaModel(GemmaConfig(**LLM)).save_pretrained(root / "llm")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(root / "vae")
    (root / "fuse.yaml").write_text(
        f"""
trainer: {{run: fuse, checkpoint_dir: "{root}/run", mixed_precision: bf16}}
model: {{name: FuseDiT, base: "{root}/llm", hidden_size: 24, num_hidden_layers: 3, intermediate_size: 48,
        num_attention_heads: 4, num_key_value_heads: 2, head_dim: 8, patch_size: 1, qk_norm: true,
        pos_embed_max_size: 8, sample_size: 8}}
vae: {{pretrained_model_name_or_path: "{root}/vae"}}
data: {{data_path: ["{root}/shards/train-{{000..003}}.tar"], resolution: 16, batch_size_per_gpu: 2,
       max_prompt_length: 12}}
sample: {{height: 16, width: 16}}
"""
    )
    return root


def _cfg(root: Path, *overrides: str):
    return load_config(root / "fuse.yaml", list(overrides))


def _real_model(root: Path, cfg):
    from transformers import AutoModel

    from fusedit.models.fuse_dit import FuseDiT

    torch.manual_seed(0)
    model = FuseDiT.from_llm(AutoModel.from_pretrained(root / "llm"), **cfg.fuse_dit_kwargs(4))
    model.set_trainable(train_dit=cfg.trainer.train_dit, train_llm=cfg.trainer.train_llm)
    return model


def _split(module: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable


@pytest.mark.parametrize(
    "overrides",
    [[], ["trainer.train_llm=true"], ["trainer.train_llm=true", "trainer.train_dit=false"], ["model.attention=cross"]],
    ids=["frozen-llm", "train-llm", "llm-only", "cross"],
)
def test_counts_equal_the_real_module(tiny: Path, overrides: list[str]) -> None:
    cfg = _cfg(tiny, *overrides)
    plan, model = build_plan(cfg), _real_model(tiny, cfg)
    dit, llm = plan.component("DiT side"), plan.component("LLM")
    assert (dit.trainable, dit.frozen) == _split(model.dit)
    assert (llm.trainable, llm.frozen) == _split(model.llm)
    trained = dit.trainable + llm.trainable
    memory = plan.memory[2]
    assert memory.static["trained weights (bf16)"] == 2 * trained
    assert memory.static["LLM (bf16, frozen)"] == 2 * llm.frozen
    assert memory.static["Adam moments (fp32)"] == 8 * trained // plan.world_size
    assert plan.family == "fuse-dit" and "LLM forward (in the model)" in render(plan)


def test_the_llm_backward_and_its_activations_count_only_when_it_trains(tiny: Path) -> None:
    frozen, trained = build_plan(_cfg(tiny)), build_plan(_cfg(tiny, "trainer.train_llm=true"))
    llm_forward = frozen.flops.text_encoder_forward_per_sample
    assert llm_forward > 0 and frozen.flops.per_sample()["llm_backward"] == 0
    assert trained.flops.per_sample()["llm_backward"] == 2 * llm_forward
    assert trained.flops.model_per_sample() - frozen.flops.model_per_sample() == 2 * llm_forward
    assert trained.activations_per_sample.outside_layers > frozen.activations_per_sample.outside_layers
    assert trained.activations_per_sample.per_layer == frozen.activations_per_sample.per_layer


def test_plan_flops_equal_the_training_logs_mfu_flops(tiny: Path) -> None:
    """The dry run and the trainer's MFU (fusedit.flops.TrainingFlops) count the same model."""
    from fusedit.flops import TrainingFlops

    for overrides in ([], ["trainer.train_llm=true"]):
        cfg = _cfg(tiny, *overrides)
        plan = build_plan(cfg)
        config = {**_real_model(tiny, cfg).config, "_class_name": "FuseDiT"}  # as saved in config.json
        kwargs = {**config, "train_llm": cfg.trainer.train_llm}  # as the trainer builds it
        per_sample = TrainingFlops(kwargs, plan.tokens.image_tokens, None, 0).per_sample(12)
        vae = plan.flops.per_sample()["vae_encoder_forward"]
        assert per_sample == plan.flops.model_per_sample() - vae


@pytest.mark.parametrize("attention", ["self", "cross"])
def test_flop_formula_matches_torch_flop_counter_outside_attention(tiny: Path, attention: str) -> None:
    """torch's counter sees every projection and MLP matmul but not the CPU attention kernel: the
    attention products (4 * queries * keys * heads * head_dim) are taken out of the formula."""
    from torch.utils.flop_counter import FlopCounterMode

    from fusedit.flops import fuse_dit_forward_flops

    cfg = _cfg(tiny, f"model.attention={attention}", "model.pos_embed=1d-rope")
    model = _real_model(tiny, cfg)
    batch, n_text, n = 2, 12, 64
    ids = torch.randint(0, 64, (batch, n_text))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(batch, 4, 8, 8), torch.rand(batch) * 1000, input_ids=ids, attention_mask=torch.ones_like(ids))
    dit, llm = fuse_dit_forward_flops(model.config, n, n_text)
    q_dim = 4 * 8
    # 3 LLM layers: the first two attend over the full L x L square; of the last shared one only
    # the key/value projections run (nothing reads its queries, attention output or MLP)
    llm_attention = 2 * 4 * n_text * n_text * q_dim
    if attention == "self":
        dit_attention = 3 * 4 * n * (n + n_text) * q_dim  # each DiT layer over [text; image] keys
    else:
        dit_attention = 3 * (4 * n * n * q_dim + 4 * n * n_text * q_dim)
    assert counter.get_total_flops() == batch * (dit + llm - llm_attention - dit_attention)


def _saved_bytes(model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    """Bytes of distinct storages autograd saves for backward, excluding the parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args, **kwargs)
    return sum(seen.values())


@pytest.mark.parametrize(
    ("train_llm", "precision", "dtype"),
    [(False, "no", torch.float32), (True, "no", torch.float32), (True, "bf16", torch.bfloat16)],
    ids=["frozen-llm", "train-llm", "train-llm-bf16"],
)
def test_activation_estimate_matches_saved_tensors(tiny: Path, train_llm: bool, precision: str, dtype) -> None:
    cfg = _cfg(tiny, f"trainer.train_llm={str(train_llm).lower()}", f"trainer.mixed_precision={precision}")
    model = _real_model(tiny, cfg).to(dtype)
    plan = build_plan(cfg)
    batch, n_text = 2, 12
    ids = torch.randint(1, 64, (batch, n_text))
    args = (torch.randn(batch, 4, 8, 8, dtype=dtype), torch.rand(batch) * 1000)
    saved = _saved_bytes(model, args, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert saved == pytest.approx(batch * plan.activations_per_sample.total(False), rel=0.03)


def test_heads_that_contradict_the_llm_and_unknown_llms_are_refused_by_name(tiny: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.num_attention_heads: 8, but a FuseDiT takes it from its LLM"):
        build_plan(_cfg(tiny, "model.num_attention_heads=8"))
    with pytest.raises(ConfigError, match=r"model\.base: 'someone/llm' is not a local folder nor a known LLM"):
        build_plan(_cfg(tiny, "model.base=someone/llm"))


REAL = ["model.name=FuseDiT", "model.num_hidden_layers=18", "model.intermediate_size=16384"]


@pytest.mark.parametrize(
    ("overrides", "dit", "llm"),
    [
        ([], 2_448_479_296, 2_506_172_416),
        (["model.attention=cross"], 2_599_478_848, 2_506_172_416),
        (
            [
                "model.num_hidden_layers=10",
                "model.initial_layers=4",
                "model.shared_attention_layers=[4,5,6,7,8,9,10,11,12,13]",
            ],
            1_366_213_696,
            2_065_754_112,
        ),
    ],
    ids=["baseline", "cross", "10-shared"],
)
def test_real_size_plans_count_the_references_parameters(overrides: list[str], dit: int, llm: int) -> None:
    """Gemma-2B from the planner's known table, the 3B config's VAE and recipe: the DiT side and the
    (truncated) LLM have the reference's counts; the LLM is frozen, as in its configs."""
    path = ROOT / "configs" / "e2e-vae" / "sa-w2048-3b-res256-sd3.5vae-fulldataset-500k.yaml"
    plan = build_plan(load_config(path, REAL + overrides), world_size=8)
    assert (plan.component("DiT side").trainable, plan.component("LLM").frozen) == (dit, llm)
    assert plan.component("LLM").trainable == 0
    assert (
        plan.memory[2].static["LLM (bf16, frozen)"] == 2 * llm
        and "DiT side (bf16, frozen)" not in plan.memory[2].static
    )
    assert plan.memory[2].peak(True) < plan.memory[2].peak(False)
