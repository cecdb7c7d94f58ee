"""Reference FuseDiT checkpoint -> our FuseDiT: equivalence with the independent reference formulation.

``fusedit/reference/reference_fuse_dit.py`` re-formulates the reference's deep-fusion model (one
float-masked attention over [text; image], repeated K/V heads, positions built per sample); each
test builds it from a reference-format config, gives it random non-zero weights, converts its state
dict with ``fusedit.reference.convert_fuse_dit`` and compares our FuseDiT with it. One tiny case per
option combination that the reference's ``configs/fusedit/*.yaml`` ablations train (gemma-it,
gemma-it-instruction and paligemma have the baseline's architecture: a Gemma decoder), plus two
combinations none of them uses. Tolerances, relative to the largest magnitude of the compared tensor:
fp32 1e-5 (forward, loss, gradients); bf16 weights 5e-2 (forward, loss) and 1e-1 (gradients).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from common.weights import CheckpointError
from fusedit.models import DiT, FuseDiT, fuse_dit_parameter_counts
from fusedit.reference.convert_fuse_dit import (
    fuse_dit_from_reference,
    fuse_dit_kwargs_from_reference_config,
    load_reference_checkpoint,
    load_reference_fuse_dit,
)
from fusedit.reference.reference_dit import GEMMA_2B_BASE, ReferenceDiT, make_reference_config
from fusedit.reference.reference_fuse_dit import (
    ReferenceFuseDiT,
    ReferenceNotRunnable,
    make_reference_fuse_dit_config,
    reference_parameter_count,
)

FP32 = {"forward": 1e-5, "grad": 1e-5}
BF16 = {"forward": 5e-2, "grad": 1e-1}

# tiny LLM configs as the reference (transformers 4.43) saves them under base_config
GEMMA = {
    "_name_or_path": "google/gemma-2b",
    "architectures": ["GemmaForCausalLM"],
    "model_type": "gemma",
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "hidden_act": "gelu",
    "hidden_activation": None,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "torch_dtype": "float32",
}
GEMMA2 = {
    **GEMMA,
    "_name_or_path": "google/gemma-2-2b",
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 16,  # != head_dim: the shared layers must not use it
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
    "cache_implementation": "hybrid",
}
DIT = dict(in_channels=4, out_channels=4, patch_size=2, pos_embed_max_size=8, sample_size=8, qk_norm=True)

# configs/fusedit/<name>.yaml -> the options it changes from baseline.yaml (self, APE, adaLN-zero, qk-norm)
ABLATIONS = {
    "baseline": {},
    "1d-rope": dict(pos_embed="1d-rope"),
    "2d-rope": dict(pos_embed="2d-rope"),
    "m-rope": dict(pos_embed="m-rope"),
    "adaln-single": dict(timestep_conditioning="adaln-single"),
    "addition": dict(timestep_conditioning="addition"),
    "no-temb": dict(timestep_conditioning=None),
    "cross-attention": dict(attention="cross"),
    "gemma-2": dict(gemma2=True, sandwich_norm=True),
    "large-scale": dict(gemma2=True, sandwich_norm=True, pos_embed="2d-rope", timestep_conditioning=None),
    "layers-10": dict(llm_layers=4, initial_layers=2, shared_attention_layers=[2, 3]),
    "layers-14": dict(llm_layers=4, initial_layers=1, shared_attention_layers=[1, 2, 3]),
    "hidden-size-1280-1536-1792": dict(dit_hidden_size=48),
    "clip-mod": dict(text_modulation_embeds_dim=5),
}
# option combinations no ablation trains
EXTRA = {
    "cross-2d-rope-adaln-single-sandwich": dict(
        attention="cross", pos_embed="2d-rope", timestep_conditioning="adaln-single", sandwich_norm=True
    ),
    "gemma-2-initial-m-rope-addition": dict(
        gemma2=True, initial_layers=1, pos_embed="m-rope", timestep_conditioning="addition", qk_norm=False
    ),
}
CASES = {**ABLATIONS, **EXTRA}


def reference_config(gemma2: bool = False, llm_layers: int = 3, **fields) -> dict:
    base = copy.deepcopy(GEMMA2 if gemma2 else GEMMA)
    base["num_hidden_layers"] = llm_layers
    fields = {**DIT, "pos_embed": "ape", **fields}
    fields["dit_num_hidden_layers"] = llm_layers - fields.get("initial_layers", 0)
    return make_reference_fuse_dit_config(base, **fields)


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter random and non-zero (the initialisation zeroes the output); buffers kept."""
    g = torch.Generator().manual_seed(seed)
    names = {n for n, _ in model.named_parameters()}
    return {
        k: torch.randn(v.shape, generator=g) * 0.2 if k in names else v.clone() for k, v in model.state_dict().items()
    }


def reference_model(cfg: dict, sd: dict) -> ReferenceFuseDiT:
    torch.manual_seed(0)
    ref = ReferenceFuseDiT(cfg)
    ref.load_state_dict(sd)
    ref.llm.requires_grad_(False)  # the ablations' train_llm: false
    return ref


def inputs(cfg: dict, seed: int = 0) -> tuple:
    """Latents, timesteps, right-padded prompts (sample 1 has 2 pads holding garbage ids), pooled text."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.rand(2, generator=g) * 1000
    ids = torch.randint(3, 100, (2, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    dim = cfg["text_modulation_embeds_dim"]
    pooled = None if dim is None else torch.randn(2, dim, generator=g)
    return x, t, ids, mask, pooled


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def loss_and_grads(model: torch.nn.Module, run, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One training step's forward and backward: (output, loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = run(model)
    loss = (out.float() - target).square().mean()
    loss.backward()
    return out, loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def compare(ours: FuseDiT, ref: ReferenceFuseDiT, args: tuple, tol: dict, dtype: torch.dtype) -> dict[str, float]:
    """Forward, loss and every gradient of ours against the reference formulation; returns the errors."""
    x, t, ids, mask, pooled = args
    cast = None if pooled is None else pooled.to(dtype)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    out_r, loss_r, grads_r = loss_and_grads(ref, lambda m: m(x.to(dtype), t, ids, mask, cast), target)
    out_o, loss_o, grads_o = loss_and_grads(ours, lambda m: m(x.to(dtype), t, ids, mask, pooled_text=cast), target)
    assert out_r.abs().mean() > 1e-2  # random weights: a real function of the input
    assert grads_o.keys() == grads_r.keys() and grads_o and all(k.startswith("dit.") for k in grads_o)
    errors = {"forward": rel(out_o, out_r), "loss": rel(loss_o, loss_r)}
    errors["grad"] = max(rel(grads_o[k], grads_r[k]) for k in grads_r)
    assert errors["forward"] <= tol["forward"] and errors["loss"] <= tol["forward"], errors
    assert errors["grad"] <= tol["grad"], errors
    return errors


# --------------------------------------------------------------------------------------------
# Equivalence per ablation: fp32 and bf16, forward and one training step
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_matches_reference(name: str) -> None:
    cfg = reference_config(**CASES[name])
    sd = random_state(ReferenceFuseDiT(cfg), seed=1)
    ref = reference_model(cfg, sd)
    args = inputs(cfg)
    compare(fuse_dit_from_reference(cfg, sd).train(), ref.train(), args, FP32, torch.float32)
    ours16 = fuse_dit_from_reference(cfg, sd, dtype=torch.bfloat16).train()
    compare(ours16, ref.to(torch.bfloat16), args, BF16, torch.bfloat16)


def test_trained_llm_gets_the_reference_gradients() -> None:
    """``train_llm: true``: the LLM's gradients match too, and the weights our model keeps frozen
    (final norm, last layer's query/output/MLP) get none or exact zeros in the reference."""
    cfg = reference_config(pos_embed="2d-rope", llm_layers=4, initial_layers=1)
    sd = random_state(ReferenceFuseDiT(cfg), seed=4)
    ref = reference_model(cfg, sd).train()
    ref.llm.requires_grad_(True)
    ours = fuse_dit_from_reference(cfg, sd).train()
    ours.set_trainable(train_dit=True, train_llm=True)
    x, t, ids, mask, _ = inputs(cfg)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    _, _, grads_r = loss_and_grads(ref, lambda m: m(x, t, ids, mask), target)
    _, _, grads_o = loss_and_grads(ours, lambda m: m(x, t, ids, mask), target)
    unused = {f"llm.{n}" for n in ours.unused_llm_parameter_names()}
    assert unused and all(not grads_r[k].any() for k in unused & grads_r.keys())  # None or exactly 0
    assert grads_o.keys() == grads_r.keys() - unused
    for k in grads_o:
        assert rel(grads_o[k], grads_r[k]) <= FP32["grad"], k


# --------------------------------------------------------------------------------------------
# Checkpoint layouts
# --------------------------------------------------------------------------------------------
def tiny_case(seed: int = 1, **fields) -> tuple[dict, dict, dict]:
    """(config, raw weights, EMA weights) of a tiny reference FuseDiT run."""
    cfg = reference_config(**{"pos_embed": "1d-rope", **fields})
    model = ReferenceFuseDiT(cfg)
    return cfg, random_state(model, seed), random_state(model, seed + 1)


def reference_forward(cfg: dict, sd: dict, args: tuple) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(cfg, sd)(*args[:4], args[4])


def our_forward(model: FuseDiT, args: tuple) -> torch.Tensor:
    x, t, ids, mask, pooled = args
    with torch.no_grad():
        return model(x.to(model.dtype), t, ids, mask, pooled_text=pooled)


def write_deepspeed_run(root, cfg: dict, module_sd: dict, ema_sd: dict, tag: int = 5000, extra=None):
    """The reference's run layout: config.json, latest, <tag>/mp_rank_00_model_states.pt."""
    run = root / "run"
    (run / str(tag)).mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "latest").write_text(str(tag))
    states = {
        "module": module_sd,
        "ema": ema_sd,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "lr_scheduler": {"last_batch_iteration": tag},
        "global_steps": tag,
        "buffer_names": ["dit.patch_embed.pos_embed"],
        "ds_version": "0.15.1",
        **(extra or {}),
    }
    torch.save(states, run / str(tag) / "mp_rank_00_model_states.pt")
    return run


def write_pipeline(root, cfg: dict, sd: dict, shards: int = 1, dtype: torch.dtype = torch.float32):
    """What ``pipeline.save_pretrained`` leaves: model_index.json, transformer/{config.json, weights}."""
    folder = root / "pipeline"
    (folder / "transformer").mkdir(parents=True)
    index = {"_class_name": "FuseDiTPipeline", "_diffusers_version": "0.32.0"}
    index.update({k: ["diffusers", k] for k in ("scheduler", "vae", "tokenizer")})
    index["transformer"] = ["diffusion.models", cfg["model_type"]]
    (folder / "model_index.json").write_text(json.dumps(index))
    saved = {**cfg, "architectures": [cfg["model_type"]], "transformers_version": "4.43.3", "torch_dtype": "float32"}
    (folder / "transformer" / "config.json").write_text(json.dumps(saved))
    tensors = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    if shards == 1:
        save_file(tensors, str(folder / "transformer" / "model.safetensors"))
        return folder
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(folder / "transformer" / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "transformer" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_deepspeed_run_loads_ema_and_raw(tmp_path) -> None:
    cfg, module_sd, ema_sd = tiny_case(text_modulation_embeds_dim=5)
    run = write_deepspeed_run(tmp_path, cfg, module_sd, ema_sd)
    torch.save(ema_sd, run / "5000" / "ema.pt")  # a consolidated export, decompressed
    args = inputs(cfg)
    want_ema, want_raw = reference_forward(cfg, ema_sd, args), reference_forward(cfg, module_sd, args)
    for source, use_ema, want in [
        (run, True, want_ema),
        (run / "5000", False, want_raw),
        (run / "5000" / "mp_rank_00_model_states.pt", True, want_ema),
        (run / "5000" / "ema.pt", True, want_ema),
    ]:
        model = load_reference_checkpoint(source, use_ema=use_ema)
        assert isinstance(model, FuseDiT) and not any(p.requires_grad for p in model.llm.parameters())
        assert rel(our_forward(model, args), want) <= FP32["forward"]


@pytest.mark.parametrize("shards", [1, 3])
def test_save_pipeline_folder_loads(tmp_path, shards: int) -> None:
    cfg, sd, _ = tiny_case(attention="cross", pos_embed="m-rope")
    folder = write_pipeline(tmp_path, cfg, sd, shards=shards)
    args = inputs(cfg)
    want = reference_forward(cfg, sd, args)
    for source in (folder, folder / "transformer"):
        assert rel(our_forward(load_reference_fuse_dit(source), args), want) <= FP32["forward"]
    with pytest.raises(CheckpointError, match="tag"):
        load_reference_fuse_dit(folder, tag=5)
    assert load_reference_fuse_dit(folder, reference_cached_positions=True).config.reference_cached_positions


def test_bf16_pipeline_keeps_its_dtype(tmp_path) -> None:
    cfg, sd, _ = tiny_case()
    model = load_reference_fuse_dit(write_pipeline(tmp_path, cfg, sd, dtype=torch.bfloat16))
    assert model.dtype == torch.bfloat16 and model.llm.embed_tokens.weight.dtype == torch.bfloat16
    ref = reference_model(cfg, {k: v.to(torch.bfloat16).float() for k, v in sd.items()}).to(torch.bfloat16)
    args = inputs(cfg)
    with torch.no_grad():
        want = ref(args[0].bfloat16(), *args[1:4])
    assert rel(our_forward(model, args), want) <= BF16["forward"]


def test_family_comes_from_model_type(tmp_path) -> None:
    """A baseline-DiT pipeline folder loads as our DiT; asking it for a FuseDiT is an error."""
    base = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=48)
    cfg = make_reference_config(base_override=base, dit_num_hidden_layers=1, in_channels=4, out_channels=4)
    sd = random_state(ReferenceDiT(cfg), seed=3)
    folder = write_pipeline(tmp_path, cfg, sd)
    assert isinstance(load_reference_checkpoint(folder), DiT)
    with pytest.raises(CheckpointError, match="baseline DiT"):
        load_reference_fuse_dit(folder)
    with pytest.raises(CheckpointError, match="model_type 'Unet'"):
        load_reference_checkpoint(write_pipeline(tmp_path / "x", {**cfg, "model_type": "Unet"}, sd))


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
class NotAWeight:
    """A class the restricted unpickler must refuse."""


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.update({"dit.layers.0.bogus.weight": torch.zeros(2)}), "unexpected: dit.layers.0.bogus.weight"),
        (lambda sd: sd.pop("llm.layers.1.mlp.up_proj.weight"), "missing: llm.layers.1.mlp.up_proj.weight"),
        (lambda sd: sd.update({"dit.proj_out.weight": torch.zeros(3, 3)}), r"shape mismatch: dit.proj_out.weight"),
    ],
    ids=["bad-key", "missing-key", "wrong-shape"],
)
def test_state_dict_problems_are_named(tmp_path, edit, message: str) -> None:
    cfg, sd, ema = tiny_case()
    edit(ema)
    with pytest.raises(CheckpointError, match=message):
        load_reference_fuse_dit(write_deepspeed_run(tmp_path, cfg, sd, ema))


def test_untrusted_pickle_is_refused(tmp_path) -> None:
    cfg, sd, ema = tiny_case()
    run = write_deepspeed_run(tmp_path, cfg, sd, ema, extra={"hook": NotAWeight()})
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt.*weights_only"):
        load_reference_fuse_dit(run)


def test_missing_shard_is_named(tmp_path) -> None:
    cfg, sd, _ = tiny_case()
    folder = write_pipeline(tmp_path, cfg, sd, shards=2)
    (folder / "transformer" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_reference_fuse_dit(folder)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(attention="cross", pos_embed="1d-rope"), "1d-rope"),
        (dict(llm_layers=4, initial_layers=1, shared_attention_layers=[1, 3]), "shared_attention_layers"),
        (dict(dit_num_hidden_layers=4), "dit_num_hidden_layers"),
    ],
    ids=["cross-1d-rope", "gap", "extra-dit-layer"],
)
def test_configs_the_reference_cannot_run_are_refused(fields: dict, message: str) -> None:
    dit_layers = fields.pop("dit_num_hidden_layers", None)
    cfg = reference_config(**fields)
    if dit_layers is not None:
        cfg["dit_num_hidden_layers"] = dit_layers
    with pytest.raises(ReferenceNotRunnable, match=message):
        ReferenceFuseDiT(cfg)
    with pytest.raises(CheckpointError, match=message):
        fuse_dit_kwargs_from_reference_config(cfg)
    with pytest.raises(CheckpointError, match="model_type"):
        fuse_dit_kwargs_from_reference_config({**reference_config(), "model_type": "DiT"})


def test_uncached_forward_only() -> None:
    cfg, sd, _ = tiny_case()
    x, t, ids, mask, _ = inputs(cfg)
    with pytest.raises(NotImplementedError, match="uncached"):
        reference_model(cfg, sd)(x, t, ids, mask, use_cache=True)


# --------------------------------------------------------------------------------------------
# Real sizes (meta device): the formulation's counts are the reference's measured ones
# --------------------------------------------------------------------------------------------
GEMMA_2_2B = {
    **GEMMA2,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "vocab_size": 256000,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 8192,
}
REAL = {
    "baseline": (GEMMA_2B_BASE, dict(dit_num_hidden_layers=18), 2_448_479_296, 2_506_172_416),
    "gemma-2": (GEMMA_2_2B, dict(dit_num_hidden_layers=26, sandwich_norm=True), 2_869_825_088, 2_614_341_888),
    "layers-10": (
        GEMMA_2B_BASE,
        dict(dit_num_hidden_layers=10, initial_layers=4, shared_attention_layers=list(range(4, 14))),
        1_366_213_696,
        2_065_754_112,
    ),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_size_parameter_counts(name: str) -> None:
    base, fields, dit, llm = REAL[name]
    cfg = make_reference_fuse_dit_config(base, pos_embed="ape", qk_norm=True, **fields)
    assert reference_parameter_count(cfg) == {"dit": dit, "llm": llm}
    assert fuse_dit_parameter_counts(fuse_dit_kwargs_from_reference_config(cfg)) == {"dit": dit, "llm": llm}
