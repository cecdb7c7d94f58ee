"""Reference checkpoint -> our DiT: equivalence with the independent reference formulation."""

from __future__ import annotations

import argparse
import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from common.weights import CheckpointError, strip_prefixes
from fusedit.models import DiT, count_parameters
from fusedit.reference.convert import (
    dit_from_reference,
    dit_kwargs_from_reference_config,
    load_reference_dit,
    reference_text_encoder,
)
from fusedit.reference.reference_dit import ReferenceDiT, make_reference_config

ATTENTIONS = ["self", "cross"]
CONDITIONINGS = ["adaln-zero", "adaln-single", "addition", None]
POS_EMBEDS = ["ape", "1d-rope", "2d-rope", "m-rope"]
COMBOS = list(itertools.product(ATTENTIONS, CONDITIONINGS, POS_EMBEDS, [False, True], [False, True]))
TINY_BASE = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=48)


def combo_id(c) -> str:
    a, tc, pe, sw, qk = c
    return f"{a}-{tc}-{pe}-{'sw' if sw else 'nosw'}-{'qk' if qk else 'noqk'}"


def tiny_reference_config(attention="self", tc="adaln-zero", pe="ape", sandwich=False, qk=True) -> dict:
    # the reference's cross-attention only runs when text_hidden_size equals the DiT width
    text = 32 if attention == "cross" else 24
    return make_reference_config(
        base_override=TINY_BASE,
        attention=attention,
        timestep_conditioning=tc,
        pos_embed=pe,
        sandwich_norm=sandwich,
        qk_norm=qk,
        dit_num_hidden_layers=2,
        in_channels=4,
        out_channels=4,
        pos_embed_max_size=8,
        sample_size=8,
        text_hidden_size=text,
    )


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict with every parameter random and non-zero (buffers kept)."""
    g = torch.Generator().manual_seed(seed)
    names = {n for n, _ in model.named_parameters()}
    return {
        k: torch.randn(v.shape, generator=g) * 0.2 if k in names else v.clone() for k, v in model.state_dict().items()
    }


def inputs(cfg: dict, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 6, generator=g)
    t = torch.rand(2, generator=g) * 1000
    text = torch.randn(2, 5, cfg["text_hidden_size"], generator=g)
    text[0, 3:] = 1e3  # garbage behind the padding
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return x, t, text, mask


def write_run(tmp_path, cfg: dict, module_sd: dict, ema_sd: dict, tag: int = 100):
    """The reference's run layout: config.json, latest, <tag>/mp_rank_00_model_states.pt."""
    run = tmp_path / "run"
    (run / str(tag)).mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "latest").write_text(str(tag))
    states = {
        "module": module_sd,
        "ema": ema_sd,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "lr_scheduler": {"last_batch_iteration": tag},
        "global_steps": tag,
        "global_samples": tag * 32,
        "skipped_steps": 0,
        "buffer_names": ["patch_embed.pos_embed"],
        "param_shapes": None,
        "ds_config": {"train_micro_batch_size_per_gpu": 32, "gradient_clipping": 1.0},
        "ds_version": "0.15.1",
        "dp_world_size": 1,
        "mp_world_size": 1,
    }
    torch.save(states, run / str(tag) / "mp_rank_00_model_states.pt")
    return run


def reference_output(cfg: dict, sd: dict, args) -> torch.Tensor:
    ref = ReferenceDiT(cfg)
    ref.load_state_dict(sd)
    with torch.no_grad():
        return ref(*args)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_converted_model_matches_reference(tmp_path, combo):
    cfg = tiny_reference_config(*combo)
    torch.manual_seed(0)
    ref = ReferenceDiT(cfg)
    module_sd, ema_sd = random_state(ref, 1), random_state(ref, 2)
    run = write_run(tmp_path, cfg, module_sd, ema_sd)
    model = load_reference_dit(run)  # EMA by default
    args = inputs(cfg)
    with torch.no_grad():
        ours = model(*args)
    expected = reference_output(cfg, ema_sd, args)
    assert expected.abs().max() > 1e-3  # a meaningful comparison
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert count_parameters(dict(model.config)) == sum(p.numel() for p in ref.parameters())


def test_module_vs_ema_selection(tmp_path):
    cfg = tiny_reference_config()
    ref = ReferenceDiT(cfg)
    module_sd, ema_sd = random_state(ref, 1), random_state(ref, 2)
    run = write_run(tmp_path, cfg, module_sd, ema_sd, tag=7)
    args = inputs(cfg)
    raw = load_reference_dit(run, tag=7, use_ema=False)
    ema = load_reference_dit(run / "7" / "mp_rank_00_model_states.pt", use_ema=True)
    with torch.no_grad():
        torch.testing.assert_close(raw(*args), reference_output(cfg, module_sd, args), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ema(*args), reference_output(cfg, ema_sd, args), atol=1e-5, rtol=1e-5)
    assert not torch.equal(raw.proj_out.weight, ema.proj_out.weight)


def test_missing_ema_is_a_clear_error():
    cfg = tiny_reference_config()
    sd = random_state(ReferenceDiT(cfg), 1)
    with pytest.raises(CheckpointError, match="no 'ema' entry"):
        dit_from_reference(cfg, {"module": sd}, use_ema=True)


def test_bad_keys_are_listed():
    cfg = tiny_reference_config()
    sd = random_state(ReferenceDiT(cfg), 1)
    sd["layers.0.self_attn.extra_proj.weight"] = torch.zeros(2)
    del sd["layers.1.mlp.up_proj.weight"]
    sd["proj_out.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as info:
        dit_from_reference(cfg, sd)
    msg = str(info.value)
    assert "missing: layers.1.mlp.up_proj.weight" in msg
    assert "unexpected: layers.0.self_attn.extra_proj.weight" in msg
    assert "shape mismatch: proj_out.bias" in msg


def test_plain_state_dicts_with_prefixes(tmp_path):
    cfg = tiny_reference_config(pe="2d-rope")
    sd = random_state(ReferenceDiT(cfg), 4)
    args = inputs(cfg)
    expected = reference_output(cfg, sd, args)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    compiled = {f"_orig_mod.{k}": v for k, v in sd.items()}
    torch.save(compiled, tmp_path / "weights.pt")
    save_file({f"module.{k}": v.contiguous() for k, v in sd.items()}, tmp_path / "weights.safetensors")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # not mmap-able
    for name in ("weights.pt", "weights.safetensors", "legacy.pt"):
        model = load_reference_dit(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(model(*args), expected, atol=1e-5, rtol=1e-5)
    assert strip_prefixes({"module._orig_mod.a": 1}) == {"a": 1}


def test_unsafe_pickle_is_refused(tmp_path):
    cfg = tiny_reference_config()
    sd = random_state(ReferenceDiT(cfg), 1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "evil.pt"
    torch.save({"module": sd, "ema": sd, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="evil.pt.*weights_only"):
        load_reference_dit(path)


def test_shipped_3b_config_mapping():
    cfg = make_reference_config()
    kwargs = dit_kwargs_from_reference_config(json.loads(json.dumps(cfg)))
    assert kwargs["hidden_size"] == 2048 and kwargs["num_layers"] == 30
    assert (kwargs["num_attention_heads"], kwargs["num_key_value_heads"], kwargs["head_dim"]) == (16, 4, 128)
    assert kwargs["hidden_act"] == "gelu_pytorch_tanh" and kwargs["intermediate_size"] == 8192
    assert count_parameters(kwargs) == 2_660_490_816
    assert reference_text_encoder(cfg) == ("google/gemma-2b", -1)
    with torch.device("meta"):
        model = DiT(**kwargs)
    with torch.device("meta"):
        ref = ReferenceDiT(cfg)
    assert model.state_dict().keys() == ref.state_dict().keys()


def test_unsupported_reference_configs():
    with pytest.raises(CheckpointError, match="model_type"):
        dit_kwargs_from_reference_config({**tiny_reference_config(), "model_type": "FuseDiT"})
    with pytest.raises(CheckpointError, match="text_modulation_embeds_dim"):
        dit_kwargs_from_reference_config({**tiny_reference_config(), "text_modulation_embeds_dim": 768})
    with pytest.raises(CheckpointError, match="cross"):
        dit_kwargs_from_reference_config({**tiny_reference_config("cross"), "text_hidden_size": 24})


def test_reference_is_zero_at_init():
    cfg = tiny_reference_config(tc="adaln-single", pe="m-rope", sandwich=True)
    with torch.no_grad():
        out = ReferenceDiT(cfg)(*inputs(cfg))
    assert torch.equal(out, torch.zeros_like(out))


def test_ape_buffers_agree_with_the_sd3_table():
    """The converter loads the checkpoint's APE buffer, so check both constructions separately."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    cfg = tiny_reference_config()
    expected = get_2d_sincos_pos_embed(32, 8, base_size=4, output_type="pt").float()[None]
    kwargs = dit_kwargs_from_reference_config(cfg)
    torch.testing.assert_close(ReferenceDiT(cfg).patch_embed.pos_embed, expected)
    torch.testing.assert_close(DiT(**kwargs).patch_embed.pos_embed, expected)
