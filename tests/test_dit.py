"""Unit tests of fusedit.models.dit / layers on tiny configurations (CPU, fp32)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

from fusedit.models import DiT, count_parameters
from fusedit.models.layers import rope_tables, sincos_2d_table, timestep_sinusoid

ATTENTIONS = ["self", "cross"]
CONDITIONINGS = ["adaln-zero", "adaln-single", "addition", None]
POS_EMBEDS = ["ape", "1d-rope", "2d-rope", "m-rope"]
COMBOS = list(itertools.product(ATTENTIONS, CONDITIONINGS, POS_EMBEDS, [False, True], [False, True]))

TINY = dict(
    in_channels=4,
    out_channels=4,
    patch_size=2,
    hidden_size=32,
    num_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=48,
    text_hidden_size=24,
    pos_embed_max_size=8,
    sample_size=8,
)

CONFIG_3B = dict(
    hidden_size=2048,
    num_layers=30,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=8192,
    in_channels=16,
    out_channels=16,
    patch_size=2,
    text_hidden_size=2048,
    attention="self",
    timestep_conditioning="adaln-zero",
    pos_embed="ape",
    qk_norm=True,
)


def combo_id(c) -> str:
    a, tc, pe, sw, qk = c
    return f"{a}-{tc}-{pe}-{'sw' if sw else 'nosw'}-{'qk' if qk else 'noqk'}"


def tiny(**kw) -> DiT:
    torch.manual_seed(0)
    return DiT(**{**TINY, **kw})


def randomize(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> torch.nn.Module:
    """Random non-zero values everywhere, so zero-initialised paths are exercised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(batch: int = 2, text_len: int = 5, seed: int = 2, height: int = 4, width: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], height, width, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, text_len, TINY["text_hidden_size"], generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, 3:] = 0
    return x, t, text, mask


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_shapes_and_parameter_formula(combo):
    attention, tc, pe, sandwich, qk = combo
    kw = dict(attention=attention, timestep_conditioning=tc, pos_embed=pe, sandwich_norm=sandwich, qk_norm=qk)
    model = randomize(tiny(**kw))
    x, t, text, mask = inputs()
    with torch.no_grad():
        out = model(x, t, text, mask)
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert count_parameters({**TINY, **kw}) == sum(p.numel() for p in model.parameters())
    assert ("patch_embed.pos_embed" in model.state_dict()) == (pe == "ape")


def test_parameter_formula_with_bias_and_default_keys():
    kw = dict(attention="cross", attention_bias=True, sandwich_norm=True, timestep_conditioning="adaln-single")
    model = tiny(**kw)
    assert count_parameters({**TINY, **kw, "_class_name": "DiT"}) == sum(p.numel() for p in model.parameters())
    assert count_parameters(dict(model.config)) == sum(p.numel() for p in model.parameters())


def test_3b_parameter_count():
    assert count_parameters(CONFIG_3B) == 2_660_490_816
    assert count_parameters({}) == 2_660_490_816  # the defaults are the shipped config
    with torch.device("meta"):
        model = DiT(**CONFIG_3B)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_660_490_816
    assert model.patch_embed.pos_embed.shape == (1, 64 * 64, 2048)


@pytest.mark.parametrize("tc", CONDITIONINGS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_zero_output_at_init(attention, tc):
    model = tiny(attention=attention, timestep_conditioning=tc)
    x, t, text, mask = inputs()
    assert torch.equal(model(x, t, text, mask), torch.zeros_like(x))


def test_blocks_are_identity_at_init():
    model = tiny()
    x, t, text, mask = inputs()
    h = model.patch_embed(x)
    temb = model.timestep_embedder(timestep_sinusoid(t))
    ctx = model.context_embedder(text)
    out = model.layers[0](h, temb, None, ctx, model._key_mask(mask, h.shape[1]))
    assert torch.equal(out, h)


@pytest.mark.parametrize("pe", POS_EMBEDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padded_text_does_not_change_output(attention, pe):
    model = randomize(tiny(attention=attention, pos_embed=pe, qk_norm=True)).eval()
    x, t, text, _ = inputs(text_len=3)
    garbage = torch.randn(2, 4, TINY["text_hidden_size"]) * 50
    padded = torch.cat([text, garbage], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]] * 2)
    with torch.no_grad():
        ref = model(x, t, text, None)
        out = model(x, t, padded, mask)
        out_other_garbage = model(x, t, torch.cat([text, -garbage], dim=1), mask)
    # same kernel path, different garbage: bit-identical
    assert torch.equal(out_other_garbage, out)
    # masked path vs the unmasked path on the trimmed text: equal up to summation order
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_key_mask_is_boolean_and_only_when_padded():
    model = tiny()
    n = 6
    assert model._key_mask(None, n) is None
    assert model._key_mask(torch.ones(2, 5, dtype=torch.long), n) is None
    m = model._key_mask(torch.tensor([[1, 1, 0], [1, 1, 1]]), n)
    assert m.dtype == torch.bool and m.shape == (2, 1, 1, 3 + n)
    assert m[0, 0, 0].tolist() == [True, True, False] + [True] * n
    cross = tiny(attention="cross")._key_mask(torch.tensor([[1, 0]]), n)
    assert cross.shape == (1, 1, 1, 2)
    x, t, text, _ = inputs(text_len=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text, torch.ones(2, 3)), model(x, t, text, None))


def test_save_load_roundtrip_exact(tmp_path):
    model = randomize(tiny(pos_embed="ape", sandwich_norm=True))
    model.save_pretrained(tmp_path / "dit")
    loaded = DiT.from_pretrained(tmp_path / "dit")
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert public(loaded.config) == public(model.config)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x, t, text, mask = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, text, mask), loaded(x, t, text, mask))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_gradient_checkpointing_same_grads(attention):
    x, t, text, mask = inputs()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = randomize(tiny(attention=attention, pos_embed="2d-rope")).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.is_gradient_checkpointing
        model(x, t, text, mask).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_mixed_precision_inputs():
    """fp32 inputs under bf16 autocast, and fp32 inputs into a bf16 model, both run."""
    model = randomize(tiny())
    x, t, text, mask = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with torch.no_grad():
        out_bf16 = model.to(torch.bfloat16)(x, t, text, mask)
    assert out_bf16.dtype == torch.bfloat16 and torch.isfinite(out_bf16).all()


def test_scalar_timestep_broadcasts():
    model = randomize(tiny())
    x, t, text, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, torch.tensor(500.0), text, mask), model(x, torch.full((2,), 500.0), text, mask)
        )


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="pos_embed"):
        DiT(**{**TINY, "pos_embed": "3d-rope"})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        DiT(**{**TINY, "num_key_value_heads": 3, "num_attention_heads": 2})


# ----------------------------------------------------------------------------------------------
# primitives against the library the reference used / the formulas in docs/reference-facts.md
# ----------------------------------------------------------------------------------------------
def test_timestep_sinusoid_matches_diffusers():
    t = torch.tensor([0.0, 2.994, 517.3, 1000.0])
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_sinusoid(t), ref)


def test_ape_table_matches_diffusers_sd3_table():
    ours = sincos_2d_table(32, 8, base_size=4)
    ref = get_2d_sincos_pos_embed(32, 8, base_size=4, output_type="pt").float()
    torch.testing.assert_close(ours, ref)
    # first half encodes the column: token (r=0, c=1) differs from (0, 0) only there
    assert torch.equal(ours[1, 16:], ours[0, 16:]) and not torch.equal(ours[1, :16], ours[0, :16])


def test_rope_layouts():
    hd, theta, h, w = 16, 10000.0, 3, 4
    rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
    cos1, sin1 = rope_tables("1d-rope", h, w, hd, theta, "cpu")
    f = theta ** (-torch.arange(0, hd, 2).float() / hd)
    torch.testing.assert_close(cos1[:, : hd // 2], torch.cos(torch.arange(h * w)[:, None] * f))
    torch.testing.assert_close(sin1[:, hd // 2 :], torch.sin(torch.arange(h * w)[:, None] * f))
    q = hd // 4
    cos2, _ = rope_tables("2d-rope", h, w, hd, theta, "cpu")
    f2 = theta ** (-torch.arange(q).float() / q)
    for block, pos in enumerate([rows, cols, rows, cols]):
        torch.testing.assert_close(cos2[:, block * q : (block + 1) * q], torch.cos(pos[:, None] * f2))
    cosm, _ = rope_tables("m-rope", h, w, hd, theta, "cpu")
    fm = theta ** (-torch.arange(hd // 2).float() / (hd // 2))
    torch.testing.assert_close(cosm[:, :q], torch.cos(rows[:, None] * fm[:q]))
    torch.testing.assert_close(cosm[:, q : 2 * q], torch.cos(cols[:, None] * fm[q:]))
    torch.testing.assert_close(cosm[:, 2 * q : 3 * q], torch.cos(rows[:, None] * fm[:q]))
    torch.testing.assert_close(cosm[:, 3 * q :], torch.cos(cols[:, None] * fm[q:]))
    assert math.isclose(float(cosm[0, 0]), 1.0)
