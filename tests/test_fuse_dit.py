"""Unit tests of fusedit.models.fuse_dit on tiny random Gemma / Gemma-2 configurations (CPU, fp32)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Gemma2Config,
    GemmaConfig,
    GemmaForCausalLM,
    GemmaModel,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipVisionConfig,
)

from fusedit.models import FuseDiT, TextCache, fuse_dit_parameter_counts
from fusedit.models.layers import rope_tables, rope_tables_at, timestep_sinusoid

ATTENTIONS = ["self", "cross"]
POS_EMBEDS = ["ape", "1d-rope", "2d-rope", "m-rope"]
CONDITIONINGS = ["adaln-zero", "adaln-single", "addition", None]

LLM = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    pad_token_id=0,
    initializer_range=0.1,
)
DIT = dict(in_channels=4, out_channels=4, patch_size=2, hidden_size=48, pos_embed_max_size=8, sample_size=8)
REAL_LENGTHS = (6, 4)  # sample 0 unpadded, sample 1 with two pads


def llm_config(gemma2: bool = False, layers: int = 3) -> dict:
    cls = Gemma2Config if gemma2 else GemmaConfig
    return cls(**LLM, num_hidden_layers=layers).to_dict()


def randomize(model: FuseDiT, seed: int = 1) -> FuseDiT:
    """Random non-zero weights everywhere: the DiT initialisation zeroes the output and adaLN,
    which would make every comparison pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.dit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, p in model.llm.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def make(gemma2: bool = False, llm_layers: int = 3, **kw) -> FuseDiT:
    torch.manual_seed(0)
    model = FuseDiT(llm_config=llm_config(gemma2, llm_layers), **{**DIT, "num_layers": 3, **kw})
    return randomize(model)


def inputs(batch_lengths=REAL_LENGTHS, length: int = 6, seed: int = 0, pooled_dim: int | None = None):
    g = torch.Generator().manual_seed(seed)
    b = len(batch_lengths)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 1000
    ids = torch.randint(3, 100, (b, length), generator=g)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, n in enumerate(batch_lengths):
        mask[i, :n] = 1
    ids = ids * mask  # pad id 0
    pooled = None if pooled_dim is None else torch.randn(b, pooled_dim, generator=g)
    return x, t, ids, mask, pooled


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 1 + 3: option grid: shapes, backward, cached == uncached
# --------------------------------------------------------------------------------------------
VARIANTS = [
    dict(),  # every DiT layer paired, no initial layer
    dict(llm_layers=4, initial_layers=1),  # one LLM-only layer first
    dict(num_layers=4, shared_attention_layers=[0, 2]),  # DiT 1 (gap) and DiT 3 (beyond) unpaired
    dict(llm_layers=4, initial_layers=1, shared_attention_layers=[1, 3]),  # gap LLM layer runs alone
]
GRID = []
for i, (attention, pos_embed, tc) in enumerate(itertools.product(ATTENTIONS, POS_EMBEDS, CONDITIONINGS)):
    GRID.append(
        dict(
            attention=attention,
            pos_embed=pos_embed,
            timestep_conditioning=tc,
            sandwich_norm=i % 2 == 0,
            qk_norm=i % 3 != 0,
            gemma2=(i // 2) % 2 == 1,
            text_modulation_embeds_dim=5 if tc is not None and i % 3 == 1 else None,
            **VARIANTS[i % len(VARIANTS)],
        )
    )


def grid_id(c: dict) -> str:
    parts = [c["attention"], c["pos_embed"], str(c["timestep_conditioning"])]
    parts += ["sw"] * c["sandwich_norm"] + ["qk"] * c["qk_norm"] + ["g2"] * c["gemma2"]
    parts += ["mod"] * (c["text_modulation_embeds_dim"] is not None)
    parts += [f"init{c.get('initial_layers', 0)}", "list" if "shared_attention_layers" in c else "all"]
    return "-".join(parts)


@pytest.mark.parametrize("combo", GRID, ids=[grid_id(c) for c in GRID])
def test_grid_forward_backward_and_cache(combo):
    model = make(**combo)
    x, t, ids, mask, pooled = inputs(pooled_dim=combo["text_modulation_embeds_dim"])
    out = model(x, t, ids, mask, pooled_text=pooled)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.abs().mean() > 1e-3  # randomised weights: a real function of the input
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert not any(p.requires_grad for p in model.llm.parameters())  # frozen by default

    with torch.no_grad():
        cache = model.encode_text(ids, mask, pooled)
        cached = model(x, t, text_cache=cache)
        # the same cache serves another image and timestep
        x2, t2, *_ = inputs(seed=7)
        close(model(x2, t2, text_cache=cache), model(x2, t2, ids, mask, pooled_text=pooled))
    close(cached, out.detach())


def test_unpaired_layers_attend_image_only():
    """DiT layers without an LLM partner get no text keys and no cross-attention module."""
    for attention in ATTENTIONS:
        model = make(attention=attention, num_layers=4, shared_attention_layers=[0, 2])
        assert model._pairs == (0, None, 2, None)
        cache = model.encode_text(*inputs()[2:4])
        assert [k is None for k in cache.keys] == [False, True, False, True]
        has_cross = [hasattr(layer, "cross_attn") for layer in model.dit.layers]
        assert has_cross == ([True, False, True, False] if attention == "cross" else [False] * 4)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = make(attention="cross", pos_embed="2d-rope", llm_layers=4, initial_layers=1)
        model.set_trainable(train_dit=True, train_llm=True)
        if ckpt:
            model.enable_gradient_checkpointing()
        model.train()
        x, t, ids, mask, _ = inputs()
        model(x, t, ids, mask).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        close(grads[1][name], grads[0][name])


def test_bf16_forward_is_finite():
    model = make(attention="self", pos_embed="2d-rope", qk_norm=True).to(torch.bfloat16)
    x, t, ids, mask, _ = inputs()
    with torch.no_grad():
        out = model(x, t, ids, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Faithfulness: the split computation equals one joint attention over [text; image]
# --------------------------------------------------------------------------------------------
def _table(pos: torch.Tensor, dim: int, theta: float = 10000.0):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    f = pos.float()[..., None] * inv
    e = torch.cat([f, f], dim=-1)
    return e.cos(), e.sin()


def _grid_tables(kind: str, rows: torch.Tensor, cols: torch.Tensor, hd: int):
    """Row/column tables laid out the way the original builds them (stack, chunk, flatten)."""
    if kind == "2d-rope":
        (hc, hs), (wc, ws) = _table(rows, hd // 2), _table(cols, hd // 2)
        out = []
        for h_, w_ in ((hc, wc), (hs, ws)):
            st = torch.stack([h_, w_], dim=2)  # (B, S, 2, hd/2)
            out.append(torch.cat([m.flatten(2) for m in st.chunk(2, dim=-1)], dim=-1))
        return tuple(out)
    (hc, hs), (wc, ws) = _table(rows, hd), _table(cols, hd)
    out = []
    for h_, w_ in ((hc, wc), (hs, ws)):
        st = torch.stack([h_, w_], dim=0)
        out.append(torch.cat([m[i % 2] for i, m in enumerate(st.chunk(4, dim=-1))], dim=-1))
    return tuple(out)


def _rot(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def joint_reference(model: FuseDiT, x_img, t, ids, mask) -> torch.Tensor:
    """Self mode, adaLN-zero, every layer shared: one float-masked attention per layer over
    [text; image] with repeated KV heads, positions built per sample from scratch."""
    cfg, llm, dit = model.config, model.llm, model.dit
    lc = llm.config
    nh, kv, hd = lc.num_attention_heads, lc.num_key_value_heads, lc.head_dim
    gemma2 = lc.model_type == "gemma2"
    b, length = ids.shape
    real = mask.sum(-1)
    x = dit.patch_embed(x_img)
    side = x_img.shape[-1] // cfg.patch_size
    s = x.shape[1]
    temb = dit.timestep_embedder(timestep_sinusoid(t))
    h = F.embedding(ids, llm.embed_tokens.weight) * lc.hidden_size**0.5
    text_pos = torch.arange(length).expand(b, -1)
    idx = torch.arange(s)
    if cfg.pos_embed == "ape":
        tables = _table(text_pos, hd)
    elif cfg.pos_embed == "1d-rope":
        tables = _table(torch.cat([text_pos, real[:, None] + idx], dim=1), hd)
    else:
        rows, cols = (idx // side)[None] + real[:, None], (idx % side)[None] + real[:, None]
        img = _grid_tables(cfg.pos_embed, rows, cols, hd)
        txt = _table(text_pos, hd)
        tables = tuple(torch.cat([a, c], dim=1) for a, c in zip(txt, img))
    cos, sin = (tb[:, None] for tb in tables)
    n = length + s
    neg = torch.finfo(torch.float32).min
    full = torch.full((b, 1, n, n), neg)
    full[:, :, :length, :length] = torch.triu(full[:, :, :length, :length], diagonal=1)
    full[:, :, length:, :] = 0
    full[:, :, :, :length] = full[:, :, :, :length].masked_fill(mask[:, None, None, :] == 0, neg)

    def heads(y, k):
        return y.view(b, -1, k, hd).transpose(1, 2)

    for lay, blk in zip(llm.layers, dit.layers):
        nt = lay.input_layernorm(h)
        ni, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.input_layernorm(x, temb)
        at, ai = lay.self_attn, blk.self_attn
        qt, kt, vt = heads(at.q_proj(nt), nh), heads(at.k_proj(nt), kv), heads(at.v_proj(nt), kv)
        qi, ki, vi = heads(ai.q_proj(ni), nh), heads(ai.k_proj(ni), kv), heads(ai.v_proj(ni), kv)
        if cfg.qk_norm:
            qi, ki = ai.q_norm(qi), ai.k_norm(ki)
        if cfg.pos_embed == "ape":
            qt, kt = _rot(qt, cos, sin), _rot(kt, cos, sin)
        q, k, v = torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2)
        if cfg.pos_embed != "ape":
            q, k = _rot(q, cos, sin), _rot(k, cos, sin)
        k, v = k.repeat_interleave(nh // kv, dim=1), v.repeat_interleave(nh // kv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=full).transpose(1, 2).reshape(b, n, -1)
        ot, oi = at.o_proj(o[:, :length]), ai.o_proj(o[:, length:])
        if gemma2:
            ot = lay.post_attention_layernorm(ot)
        h = h + ot
        m = lay.pre_feedforward_layernorm(h) if gemma2 else lay.post_attention_layernorm(h)
        m = lay.mlp(m)
        h = h + (lay.post_feedforward_layernorm(m) if gemma2 else m)
        x = x + gate_msa[:, None] * oi
        hm = blk.post_attention_layernorm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * blk.mlp(hm)
    x = dit.proj_out(dit.norm_out(x, temb))
    p, c = cfg.patch_size, cfg.out_channels
    return x.reshape(b, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, side * p, side * p)


@pytest.mark.parametrize("gemma2", [False, True], ids=["gemma", "gemma2"])
@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_matches_one_joint_attention(pos_embed, gemma2):
    model = make(gemma2=gemma2, attention="self", pos_embed=pos_embed, qk_norm=True)
    x, t, ids, mask, _ = inputs()
    with torch.no_grad():
        close(model(x, t, ids, mask), joint_reference(model, x, t, ids, mask))


def test_rope_tables_at_matches_grid_layout():
    for kind in ("1d-rope", "2d-rope", "m-rope"):
        ref = rope_tables(kind, 3, 5, 16, 10000.0, "cpu")
        idx = torch.arange(15)
        rows, cols = (idx, None) if kind == "1d-rope" else (idx // 5, idx % 5)
        got = rope_tables_at(kind, rows, cols, 16, 10000.0)
        close(got[0], ref[0], atol=0)
        close(got[1], ref[1], atol=0)
        if kind != "1d-rope":
            off = _grid_tables(kind, (idx // 5)[None] + 4, (idx % 5)[None] + 4, 16)
            close(rope_tables_at(kind, idx // 5 + 4, idx % 5 + 4, 16, 10000.0)[0], off[0][0])


@pytest.mark.parametrize(("gemma2", "initial"), [(False, 0), (False, 1), (True, 1)])
def test_text_stream_matches_the_llm(gemma2, initial):
    """The LLM half of a shared layer is the Gemma decoder layer itself, and LLM-only layers run
    through transformers: the cached keys of LLM layer i are the LLM's own key projection of its
    i-th hidden states (real positions). Gemma-2 shared layers drop soft-capping and use
    1/sqrt(head_dim), so for Gemma-2 only the first shared layer (fed by transformers) compares."""
    model = make(gemma2=gemma2, attention="cross", llm_layers=4, initial_layers=initial)
    _, _, ids, mask, _ = inputs()
    ref = type(model.llm)(model.llm.config).eval()
    ref.load_state_dict(model.llm.state_dict())
    with torch.no_grad():
        hs = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        cache = model.encode_text(ids, mask)
    compared = range(initial, initial + 1) if gemma2 else range(initial, len(ref.layers))
    for i in compared:
        layer = ref.layers[i]
        with torch.no_grad():
            k = layer.self_attn.k_proj(layer.input_layernorm(hs[i])).view(2, 6, 2, 8).transpose(1, 2)
        for s, n in enumerate(REAL_LENGTHS):
            close(cache.keys[i - initial][s, :, :n], k[s, :, :n])


# --------------------------------------------------------------------------------------------
# 2: the text stream does not depend on the image or t
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_text_stream_independent_of_image_and_t(attention):
    model = make(attention=attention, pos_embed="2d-rope", llm_layers=4, initial_layers=1)
    records: list[list[torch.Tensor]] = [[], []]
    run = [0]

    def hook(_module, _inputs, output):
        records[run[0]].append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handles = [model.llm.layers[0].register_forward_hook(hook)]
    for layer in model.llm.layers[1:]:
        for mod in (layer.self_attn.k_proj, layer.self_attn.v_proj, layer.input_layernorm):
            handles.append(mod.register_forward_hook(hook))
    x1, t1, ids, mask, _ = inputs(seed=0)
    x2, t2, *_ = inputs(seed=3)
    with torch.no_grad():
        out1 = model(x1, t1, ids, mask)
        run[0] = 1
        out2 = model(x2, t2, ids, mask)
    for h in handles:
        h.remove()
    assert not torch.allclose(out1, out2)
    assert len(records[0]) == len(records[1]) > 0
    for a, b in zip(*records):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# 3b: the original's cached positions, on request
# --------------------------------------------------------------------------------------------
def test_reference_cached_positions():
    x, t, ids, mask, _ = inputs()
    for pos_embed, should_differ in [("2d-rope", True), ("m-rope", True), ("ape", False), ("1d-rope", False)]:
        model = make(attention="self", pos_embed=pos_embed, reference_cached_positions=True)
        with torch.no_grad():
            uncached = model(x, t, ids, mask)
            cached = model(x, t, text_cache=model.encode_text(ids, mask))
        if should_differ:
            assert (cached - uncached).abs().max() > 1e-3, pos_embed
        else:
            close(cached, uncached)
    # cross mode has no offset to drop
    model = make(attention="cross", pos_embed="2d-rope", reference_cached_positions=True)
    with torch.no_grad():
        close(model(x, t, text_cache=model.encode_text(ids, mask)), model(x, t, ids, mask))


def test_text_cache_batching():
    model = make(attention="self", pos_embed="1d-rope")
    x, t, ids, mask, _ = inputs()
    with torch.no_grad():
        c0, c1 = model.encode_text(ids[:1], mask[:1]), model.encode_text(ids[1:], mask[1:])
        close(model(x, t, text_cache=TextCache.cat([c0, c1])), model(x, t, ids, mask))
        rep = c1.repeat_interleave(2)
        close(model(x, t, text_cache=rep), model(x, t, ids[1:].repeat(2, 1), mask[1:].repeat(2, 1)))
    with pytest.raises(ValueError, match="text batch"):
        model(x, t, text_cache=c0)


# --------------------------------------------------------------------------------------------
# 4 + 5: padding and causality
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_right_padding_is_invisible(attention, pos_embed):
    model = make(attention=attention, pos_embed=pos_embed, llm_layers=4, initial_layers=1, gemma2=True)
    x, t, ids, _, _ = inputs(batch_lengths=(5,), length=5)
    outs = []
    with torch.no_grad():
        for extra in (0, 1, 4):
            ids_p = F.pad(ids, (0, extra))
            mask_p = F.pad(torch.ones_like(ids), (0, extra))
            ids_p[:, 5:] = torch.randint(3, 100, (1, extra))  # pad positions hold garbage tokens
            outs.append(model(x, t, ids_p, mask_p))
    for o in outs[1:]:
        close(o, outs[0], atol=2e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_text_is_causal(attention):
    model = make(attention=attention, llm_layers=4, initial_layers=1)
    _, _, ids, mask, _ = inputs(batch_lengths=(6, 6))
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 97 + 3
    with torch.no_grad():
        a, b = model.encode_text(ids, mask), model.encode_text(changed, mask)
    for ka, kb, va, vb in zip(a.keys, b.keys, a.values, b.values):
        close(ka[:, :, :3], kb[:, :, :3], atol=0)
        close(va[:, :, :3], vb[:, :, :3], atol=0)
        assert not torch.allclose(ka[:, :, 3:], kb[:, :, 3:])


# --------------------------------------------------------------------------------------------
# 6: validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(attention="joint"), "attention must be"),
        (dict(pos_embed="3d-rope"), "pos_embed must be"),
        (dict(timestep_conditioning="film"), "timestep_conditioning must be"),
        (dict(shared_attention_layers=[0, 5]), "shared_attention_layers index 5 is beyond"),
        (dict(shared_attention_layers=[]), "shared_attention_layers must name"),
        (dict(shared_attention_layers=[1, 1]), "shared_attention_layers has duplicates"),
        (dict(shared_attention_layers="some"), "shared_attention_layers must be 'all'"),
        (dict(initial_layers=1, shared_attention_layers=[0, 1]), "index 0 is below initial_layers"),
        (dict(num_layers=1, shared_attention_layers=[0, 2]), "beyond num_layers"),
        (dict(initial_layers=3), "initial_layers must be in"),
        (dict(num_layers=0), "num_layers must be"),
        (dict(text_modulation_embeds_dim=8, timestep_conditioning=None), "text_modulation_embeds_dim needs"),
        (dict(hidden_size=-4), "hidden_size must be"),
    ],
)
def test_validation_names_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FuseDiT(llm_config=llm_config(), **{**DIT, "num_layers": 3, **kwargs})


def test_validation_of_llm_config():
    with pytest.raises(ValueError, match="llm_config must be a dict"):
        FuseDiT(llm_config=None)
    with pytest.raises(ValueError, match="llm_config model_type"):
        FuseDiT(llm_config={**llm_config(), "model_type": "llama"})
    odd = GemmaConfig(**{**LLM, "head_dim": 6}, num_hidden_layers=2).to_dict()
    with pytest.raises(ValueError, match="pos_embed '2d-rope' needs head_dim % 4"):
        FuseDiT(llm_config=odd, **DIT, pos_embed="2d-rope")
    with pytest.raises(ValueError, match="pos_embed 'm-rope' needs head_dim % 4"):
        FuseDiT(llm_config=odd, **DIT, pos_embed="m-rope")
    FuseDiT(llm_config=odd, **DIT, pos_embed="1d-rope")  # fine


def test_mask_must_be_right_padded():
    model = make()
    x, t, ids, mask, _ = inputs()
    with pytest.raises(ValueError, match="right-padded"):
        model.encode_text(ids, mask.flip(1))
    with pytest.raises(ValueError, match="at least one real token"):
        model(x, t, ids, torch.zeros_like(mask))


def test_forward_argument_errors():
    model = make(text_modulation_embeds_dim=5)
    x, t, ids, mask, pooled = inputs(pooled_dim=5)
    with pytest.raises(ValueError, match="pooled_text is required"):
        model(x, t, ids, mask)
    with pytest.raises(ValueError, match="needs input_ids or text_cache"):
        model(x, t)
    other = make(attention="cross")
    with pytest.raises(ValueError, match="differently configured"):
        model(x, t, text_cache=other.encode_text(ids, mask), pooled_text=pooled)


# --------------------------------------------------------------------------------------------
# 7: persistence and pretrained LLM loading
# --------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip(tmp_path):
    model = make(
        gemma2=True, llm_layers=4, initial_layers=1, shared_attention_layers=[1, 3], pos_embed="m-rope", qk_norm=True
    )
    x, t, ids, mask, _ = inputs()
    model.save_pretrained(tmp_path / "m")
    loaded = FuseDiT.from_pretrained(tmp_path / "m")
    assert loaded.config.shared_attention_layers == [1, 3]
    assert not any(p.requires_grad for p in loaded.llm.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ids, mask), model.eval()(x, t, ids, mask))


def _pretrained_llm(source: str):
    """(module to save, the Gemma decoder inside it) for each kind of pretrained folder."""
    torch.manual_seed(3)
    cfg = GemmaConfig(**LLM, num_hidden_layers=4)
    if source == "model":
        src = GemmaModel(cfg)
        return src, src
    if source == "causal-lm":
        src = GemmaForCausalLM(cfg)
        return src, src.model
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    pali = PaliGemmaConfig(
        text_config=cfg.to_dict(), vision_config=vision.to_dict(), projection_dim=32, image_token_index=99
    )
    src = PaliGemmaForConditionalGeneration(pali)
    return src, next(m for m in src.modules() if isinstance(m, GemmaModel))


@pytest.mark.parametrize("source", ["model", "causal-lm", "paligemma"])
def test_from_llm_loads_pretrained_weights(tmp_path, source):
    src, ref = _pretrained_llm(source)
    src.save_pretrained(tmp_path / "llm")
    model = FuseDiT.from_llm(tmp_path / "llm", **DIT, num_layers=2, shared_attention_layers=[0, 1])
    assert type(model.llm) is GemmaModel and len(model.llm.layers) == 2  # truncated after the last shared layer
    ref_state = ref.state_dict()
    for k, v in model.llm.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert not any(p.requires_grad for p in model.llm.parameters())
    # a loaded module works too
    again = FuseDiT.from_llm(src, **DIT, num_layers=2, shared_attention_layers=[0, 1])
    assert torch.equal(again.llm.layers[1].mlp.up_proj.weight, ref.layers[1].mlp.up_proj.weight)
    x, t, ids, mask, _ = inputs()
    with torch.no_grad():
        assert torch.isfinite(model(x, t, ids, mask)).all()


def test_set_trainable_leaves_no_unused_parameter():
    for gemma2 in (False, True):
        model = make(gemma2=gemma2, llm_layers=4, initial_layers=1)
        params = model.set_trainable(train_dit=True, train_llm=True)
        unused = model.unused_llm_parameter_names()
        assert "norm.weight" in unused and "layers.3.mlp.up_proj.weight" in unused
        assert "layers.3.self_attn.k_proj.weight" not in unused
        x, t, ids, mask, _ = inputs()
        model(x, t, ids, mask).square().mean().backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name
        assert len(params) == sum(1 for p in model.parameters() if p.grad is not None)
        assert model.set_trainable(train_dit=False, train_llm=False) == []


# --------------------------------------------------------------------------------------------
# 8: parameter counts
# --------------------------------------------------------------------------------------------
def test_meta_count_equals_real_build():
    for kw in [
        dict(attention="cross", qk_norm=True, sandwich_norm=True, text_modulation_embeds_dim=5, num_layers=3),
        dict(timestep_conditioning="adaln-single", num_layers=4, shared_attention_layers=[0, 2], gemma2=True),
    ]:
        gemma2 = kw.pop("gemma2", False)
        config = dict(llm_config=llm_config(gemma2), **DIT, **kw)
        model = FuseDiT(**config)
        counts = fuse_dit_parameter_counts({**config, "_class_name": "FuseDiT"})
        assert counts == {
            "dit": sum(p.numel() for p in model.dit.parameters()),
            "llm": sum(p.numel() for p in model.llm.parameters()),
        }


GEMMA_2B = dict(
    vocab_size=256000,
    hidden_size=2048,
    intermediate_size=16384,
    num_hidden_layers=18,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
)
GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
)


@pytest.mark.parametrize(
    ("llm", "kwargs", "dit", "llm_count"),
    [
        ("gemma", dict(qk_norm=True), 2_448_479_296, 2_506_172_416),  # baseline
        ("gemma", dict(qk_norm=True, attention="cross"), 2_599_478_848, 2_506_172_416),
        ("gemma2", dict(qk_norm=True, sandwich_norm=True, num_layers=26), 2_869_825_088, 2_614_341_888),
        (
            "gemma",
            dict(qk_norm=True, num_layers=10, initial_layers=4, shared_attention_layers=list(range(4, 14))),
            1_366_213_696,
            2_065_754_112,
        ),
    ],
    ids=["baseline", "cross", "gemma2-sandwich", "10-shared"],
)
def test_real_size_counts_match_the_original(llm, kwargs, dit, llm_count):
    cfg = GemmaConfig(**GEMMA_2B) if llm == "gemma" else Gemma2Config(**GEMMA2_2B)
    counts = fuse_dit_parameter_counts(dict(llm_config=cfg.to_dict(), **kwargs))
    assert counts == {"dit": dit, "llm": llm_count}
