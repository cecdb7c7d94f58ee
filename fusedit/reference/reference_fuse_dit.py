"""The reference FuseDiT (the Fuse-DiT paper's deep fusion), written independently from a prose description.

The facts it follows are summarised in docs/fusedit-family.md ("The model"). Purpose: ground
truth for the FuseDiT checkpoint converter (``convert_fuse_dit``) and for equivalence tests of
``fusedit.models.fuse_dit.FuseDiT``. It therefore keeps the reference's formulation and its costly
choices on purpose, so that an error in one implementation cannot hide in both:

- one attention per shared layer over the concatenated ``[text; image]`` queries, keys and values
  ("self" mode), with a dense additive float mask of shape B x 1 x (L+S) x (L+S) filled with the
  dtype's minimum (causal text block, bidirectional image rows, pad columns masked for every row);
  our model instead splits the text rows from the image rows and uses boolean key masks;
- K/V heads expanded with ``repeat_kv`` before every attention;
- RoPE applied to the concatenated queries/keys with per-sample position ids built from scratch
  (image ids shifted by the prompt's real length), the m-RoPE text ids included;
- the redundant zero modulation after adaLN-zero; every LLM layer computed in full, including
  the last layer's attention output and MLP that nothing reads.

The LLM side uses the transformers ``GemmaModel`` / ``Gemma2Model`` modules (as the reference
does): their norms, projections and MLPs inside the shared layers, and whole decoder layers for
the ``initial_layers`` that run alone. The joint attention, masks, positions, rotary tables and
the DiT side are written here; primitives come from :mod:`fusedit.reference.reference_dit`, the
baseline DiT's formulation, never from ``fusedit.models``.

Built from a reference-format config dict (a FuseDiTConfig as its ``config.json`` holds it:
top-level DiT fields plus the LLM's Hugging Face config under ``base_config``); state-dict keys
are the reference's (``llm.*`` the transformers decoder, ``dit.*`` the image side). Only the
uncached forward is re-formulated, and only for configurations the reference can run
(:func:`check_runnable` refuses the others with the reason).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .reference_dit import (
    GemmaRMSNorm,
    RefAdaLNOut,
    RefAdaLNZero,
    RefMLP,
    RefPatchEmbed,
    add_timestep_modules,
    gemma_cos_sin,
    repeat_kv,
    rotate_half,
    sinusoid_timesteps,
)

Tables = tuple[torch.Tensor, torch.Tensor]

# FuseDiTConfig's defaults: a saved config.json may omit a field, which then has this value
REFERENCE_DEFAULTS: dict[str, Any] = {
    "attention": "self",
    "dit_hidden_size": None,
    "dit_num_hidden_layers": 18,
    "text_hidden_states_index": -1,
    "in_channels": 16,
    "initial_layers": 0,
    "out_channels": 16,
    "patch_size": 2,
    "pos_embed": "1d-rope",
    "pos_embed_max_size": 64,
    "qk_norm": False,
    "sample_size": 32,
    "sandwich_norm": False,
    "shared_attention_layers": "all",
    "text_hidden_size": None,
    "text_modulation_embeds_dim": None,
    "timestep_conditioning": "adaln-zero",
}
LLM_TYPES = ("gemma", "gemma2")


class ReferenceNotRunnable(ValueError):
    """A configuration the reference code cannot run (it crashes there); the message says where."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def make_reference_fuse_dit_config(base_config: dict, **fields: Any) -> dict:
    """A FuseDiTConfig dict as the reference's training script saves it.

    Like its builder: ``dit_hidden_size`` and ``text_hidden_size`` default to the LLM width, and
    with a list of shared layers the LLM config is cut after the last one.
    """
    base = copy.deepcopy(base_config)
    cfg = {"model_type": "FuseDiT", **REFERENCE_DEFAULTS, **fields}
    shared = cfg["shared_attention_layers"]
    if shared != "all":
        base["num_hidden_layers"] = min(base["num_hidden_layers"], max(shared) + 1)
        cfg["shared_attention_layers"] = list(shared)
    cfg["dit_hidden_size"] = cfg["dit_hidden_size"] or base["hidden_size"]
    cfg["text_hidden_size"] = base["hidden_size"]
    cfg["base_config"] = base
    return cfg


def normalized_config(config: dict) -> dict:
    """A deep copy with every omitted field at the reference default and the derived widths filled."""
    cfg = {**REFERENCE_DEFAULTS, **copy.deepcopy(dict(config))}
    base = cfg.get("base_config")
    if not isinstance(base, dict):
        raise ReferenceNotRunnable("the config has no nested 'base_config' (the LLM's transformers config)")
    if base.get("head_dim") is None:
        base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
    cfg["dit_hidden_size"] = cfg["dit_hidden_size"] or base["hidden_size"]
    return cfg


def shared_layer_indices(cfg: dict) -> list[int]:
    """The LLM layers the reference runs as shared layers: from ``initial_layers`` to its last layer."""
    return list(range(cfg["initial_layers"], cfg["base_config"]["num_hidden_layers"]))


def check_runnable(config: dict) -> None:
    """Raise :class:`ReferenceNotRunnable` for a configuration on which the reference crashes.

    Its forward walks LLM layers ``initial_layers .. n-1``: every one must be shared (an unshared
    one calls its DiT layer without text, which fails), DiT layer ``i - initial_layers`` must exist
    for each, and DiT layers beyond them crash the same way. "cross" with "1d-rope" builds image
    positions over text + image and fails to apply them to the image alone.
    """
    cfg = normalized_config(config)
    base = cfg["base_config"]

    def fail(msg: str) -> None:
        raise ReferenceNotRunnable(f"reference FuseDiT config: {msg}")

    if cfg.get("model_type", "FuseDiT") != "FuseDiT":
        fail(f"model_type must be 'FuseDiT', got {cfg.get('model_type')!r}")
    if base.get("model_type") not in LLM_TYPES:
        fail(f"base_config model_type must be one of {LLM_TYPES}, got {base.get('model_type')!r}")
    checks = {
        "attention": ("self", "cross"),
        "pos_embed": ("ape", "1d-rope", "2d-rope", "m-rope"),
        "timestep_conditioning": ("adaln-zero", "adaln-single", "addition", None),
    }
    for key, allowed in checks.items():
        if cfg[key] not in allowed:
            fail(f"{key} must be one of {allowed}, got {cfg[key]!r}")
    if cfg["attention"] == "cross" and cfg["pos_embed"] == "1d-rope":
        fail("attention 'cross' with pos_embed '1d-rope' crashes in the reference (image RoPE of text + image length)")
    n_llm, first = base["num_hidden_layers"], cfg["initial_layers"]
    if not 0 <= first < n_llm:
        fail(f"initial_layers={first} outside [0, {n_llm})")
    shared = cfg["shared_attention_layers"]
    if shared != "all" and sorted(shared) != shared_layer_indices(cfg):
        fail(
            f"shared_attention_layers={shared} must be exactly the LLM layers {first}..{n_llm - 1}: "
            "the reference runs an unshared layer in that range without text and crashes"
        )
    if cfg["dit_num_hidden_layers"] != n_llm - first:
        fail(
            f"dit_num_hidden_layers={cfg['dit_num_hidden_layers']} must equal the {n_llm - first} shared LLM layers "
            "(fewer: missing DiT layers; more: the extra DiT layers run without text and crash)"
        )


def _llm_module(base: dict) -> nn.Module:
    """The transformers decoder the reference holds as ``llm``.

    The reference's transformers (4.43) Gemma MLP reads ``hidden_activation`` (tanh-GELU when
    unset) and ignores ``hidden_act``; newer releases read ``hidden_act``, so it is set to the
    activation the reference ran.
    """
    from transformers import Gemma2Config, Gemma2Model, GemmaConfig, GemmaModel

    dropped = ("transformers_version", "torch_dtype", "dtype")
    d = {k: v for k, v in base.items() if not k.startswith("_") and k not in dropped}
    if d["model_type"] == "gemma":
        d["hidden_act"] = d.get("hidden_activation") or "gelu_pytorch_tanh"
        return GemmaModel(GemmaConfig.from_dict(d))
    return Gemma2Model(Gemma2Config.from_dict(d))


# --------------------------------------------------------------------------------------------
# The image side (``dit.*``)
# --------------------------------------------------------------------------------------------
class RefImageSelfAttention(nn.Module):
    """``self_attn`` of a DiT layer: q/k/v/o and optional q/k norms. The text keys come from the
    LLM layer, so (unlike the baseline DiT) there are no text projections."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        base, d = cfg["base_config"], cfg["dit_hidden_size"]
        h, kv, hd = base["num_attention_heads"], base["num_key_value_heads"], base["head_dim"]
        bias = base["attention_bias"]
        if cfg["qk_norm"]:
            self.q_norm = GemmaRMSNorm(hd, base["rms_norm_eps"])
            self.k_norm = GemmaRMSNorm(hd, base["rms_norm_eps"])
        self.q_proj = nn.Linear(d, h * hd, bias=bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, d, bias=bias)


class RefImageCrossAttention(nn.Module):
    """``cross_attn`` ("cross" mode): q/o and a query norm; keys/values are the LLM layer's."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        base, d = cfg["base_config"], cfg["dit_hidden_size"]
        h, hd, bias = base["num_attention_heads"], base["head_dim"], base["attention_bias"]
        if cfg["qk_norm"]:
            self.q_norm = GemmaRMSNorm(hd, base["rms_norm_eps"])
        self.q_proj = nn.Linear(d, h * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, d, bias=bias)


class RefImageLayer(nn.Module):
    """Parameters of one DiT layer; the shared layer's computation lives in ReferenceFuseDiT."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        d, eps, tc = cfg["dit_hidden_size"], cfg["base_config"]["rms_norm_eps"], cfg["timestep_conditioning"]
        if tc == "adaln-zero":
            self.input_layernorm = RefAdaLNZero(d, eps)
        else:
            if tc == "adaln-single":
                self.scale_shift_table = nn.Parameter(torch.randn(6 * d) / d**0.5)
            self.input_layernorm = GemmaRMSNorm(d, eps)
        self.self_attn = RefImageSelfAttention(cfg)
        if cfg["attention"] == "cross":
            self.cross_attn = RefImageCrossAttention(cfg)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps)
        if cfg["sandwich_norm"]:
            self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(d, eps)
            if cfg["attention"] == "cross":
                self.post_cross_attention_layernorm = GemmaRMSNorm(d, eps)
        base = cfg["base_config"]
        self.mlp = RefMLP(d, base["intermediate_size"], base.get("hidden_activation") or "gelu_pytorch_tanh")


class RefImageTower(nn.Module):
    """``dit``: the reference DiT built from a FuseDiT config (no context embedder)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        d, eps, tc = cfg["dit_hidden_size"], cfg["base_config"]["rms_norm_eps"], cfg["timestep_conditioning"]
        self.layers = nn.ModuleList([RefImageLayer(cfg) for _ in range(cfg["dit_num_hidden_layers"])])
        self.patch_embed = RefPatchEmbed(cfg)
        add_timestep_modules(self, d, tc)
        if cfg["text_modulation_embeds_dim"] is not None:
            p = cfg["text_modulation_embeds_dim"]
            self.condition_embedder = nn.Sequential(GemmaRMSNorm(p, eps), nn.Linear(p, d), nn.SiLU(), nn.Linear(d, d))
        self.norm_out = RefAdaLNOut(d, eps) if tc == "adaln-zero" else GemmaRMSNorm(d, eps)
        self.proj_out = nn.Linear(d, cfg["patch_size"] ** 2 * cfg["out_channels"], bias=True)
        self._initialize(cfg)

    def _initialize(self, cfg: dict) -> None:
        """The reference DiT's initialisation: xavier linears, zero adaLN and output, N(0, std) embedders."""
        std, tc = cfg["base_config"]["initializer_range"], cfg["timestep_conditioning"]
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        zeroed = [self.proj_out]
        if tc == "adaln-zero":
            zeroed += [layer.input_layernorm.linear for layer in self.layers] + [self.norm_out.linear]
        for mod in zeroed:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)
        normal = [self.timestep_embedder[0], self.timestep_embedder[2]] if tc is not None else []
        normal += [self.t_block[1]] if tc == "adaln-single" else []
        if cfg["text_modulation_embeds_dim"] is not None:
            normal += [self.condition_embedder[1], self.condition_embedder[3]]
        for mod in normal:
            nn.init.normal_(mod.weight, std=std)
        conv = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(conv.view(conv.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)


# --------------------------------------------------------------------------------------------
# Masks and positions
# --------------------------------------------------------------------------------------------
def joint_mask(text_mask: torch.Tensor, n_image: int, dtype: torch.dtype) -> torch.Tensor:
    """B x 1 x (L+S) x (L+S) additive mask over ``[text; image]``: 0 attends, the dtype's minimum masks.

    Text rows: causal over the text, no image column. Image rows: everything. Pad text columns:
    masked for every row. ``n_image=0`` gives the text-only mask of LLM-only layers and of
    "cross" mode.
    """
    b, length = text_mask.shape
    n, neg = length + n_image, torch.finfo(dtype).min
    mask = torch.full((b, 1, n, n), neg, dtype=dtype, device=text_mask.device)
    causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
    mask[:, :, :length, :length] = mask[:, :, :length, :length].masked_fill(causal, 0.0)
    mask[:, :, length:, :] = 0.0
    pad = (text_mask == 0)[:, None, None, :]
    mask[:, :, :, :length] = mask[:, :, :, :length].masked_fill(pad, neg)
    return mask


def cross_mask(text_mask: torch.Tensor, n_image: int, dtype: torch.dtype) -> torch.Tensor:
    """B x 1 x S x L additive mask of the image -> text cross-attention: pad columns masked."""
    keep = text_mask.to(torch.bool)[:, None, None, :].expand(-1, 1, n_image, -1)
    zeros = torch.zeros(keep.shape, dtype=dtype, device=text_mask.device)
    return zeros.masked_fill(~keep, torch.finfo(dtype).min)


def _tables(ids: torch.Tensor, dim: int, theta: float) -> Tables:
    """(B, N, dim) Gemma tables for (B, N) integer ids."""
    cos, sin = gemma_cos_sin(ids.reshape(-1), dim, theta)
    return cos.view(*ids.shape, dim), sin.view(*ids.shape, dim)


def grid_tables(kind: str, rows: torch.Tensor, cols: torch.Tensor, hd: int, theta: float) -> Tables:
    """2d-RoPE: half-width row and column tables, laid out [row q0, col q0, row q1, col q1] in
    quarters of ``hd/4``; m-RoPE: full-width tables whose quarters alternate row, col, row, col."""
    q = hd // 4
    if kind == "2d-rope":
        (rc, rs), (cc, cs) = _tables(rows, hd // 2, theta), _tables(cols, hd // 2, theta)
        pieces = [(0, q, True), (0, q, False), (q, 2 * q, True), (q, 2 * q, False)]
    else:
        (rc, rs), (cc, cs) = _tables(rows, hd, theta), _tables(cols, hd, theta)
        pieces = [(0, q, True), (q, 2 * q, False), (2 * q, 3 * q, True), (3 * q, 4 * q, False)]
    cos = torch.cat([(rc if row else cc)[..., a:b] for a, b, row in pieces], dim=-1)
    sin = torch.cat([(rs if row else cs)[..., a:b] for a, b, row in pieces], dim=-1)
    return cos, sin


def rotate(x: torch.Tensor, tables: Tables) -> torch.Tensor:
    """Gemma's rotation of (B, heads, N, hd) by (B or 1, N, hd) tables."""
    cos, sin = tables[0][:, None], tables[1][:, None]
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class ReferenceFuseDiT(nn.Module):
    """Reference FuseDiT: ``forward(hidden_states, timestep, input_ids, attention_mask,
    text_modulation_embeds=None) -> (B, out_channels, H, W)`` (the reference also returns its
    KV cache, which is not re-formulated)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        check_runnable(config)
        cfg = normalized_config(config)
        self.config = cfg
        base = cfg["base_config"]
        self.heads, self.kv_heads = base["num_attention_heads"], base["num_key_value_heads"]
        self.head_dim = base["head_dim"]
        self.theta = float(base.get("rope_theta", 10000.0))
        self.gemma2 = base["model_type"] == "gemma2"
        self.llm = _llm_module(base)
        self.dit = RefImageTower(cfg)

    # ----------------------------------------------------------------------------------------
    def _split(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, N, n*hd) -> (B, n, N, hd)."""
        return x.view(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, hd) -> (B, N, heads*hd)."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA over K/V expanded to every query head (the mask cast to the query dtype, as autocast does)."""
        groups = self.heads // self.kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        mask = None if mask is None else mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=False)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(hidden) in the embedding's dtype, as the reference scales them."""
        weight = self.llm.embed_tokens.weight
        hidden = self.config["base_config"]["hidden_size"]
        return F.embedding(input_ids, weight) * torch.tensor(hidden**0.5, dtype=weight.dtype)

    def _conditioning(
        self, timestep: torch.Tensor, x: torch.Tensor, pooled: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(t_emb for the adaLN-single head, temb for the blocks); zeros without conditioning."""
        cfg, dit = self.config, self.dit
        tc = cfg["timestep_conditioning"]
        if tc is None:
            return None, torch.zeros_like(x[:, 0, :])
        t_emb = dit.timestep_embedder(sinusoid_timesteps(timestep).to(x.dtype))
        if cfg["text_modulation_embeds_dim"] is not None:
            t_emb = t_emb + dit.condition_embedder(pooled)
        return t_emb, dit.t_block(t_emb) if tc == "adaln-single" else t_emb

    def _positions(self, text_mask: torch.Tensor, gh: int, gw: int) -> tuple[Tables, Tables | None]:
        """(text tables (B, L, hd) at positions 0..L-1, image-side tables): (B, L+S, hd) over
        ``[text; image]`` in "self" mode, (B, S, hd) in "cross" mode, None under APE. In "self" mode
        the image ids start after the prompt's last real token; fp32, cast by the caller."""
        cfg, hd, theta = self.config, self.head_dim, self.theta
        b, length = text_mask.shape
        dev = text_mask.device
        text_ids = torch.arange(length, device=dev).expand(b, -1)
        text = _tables(text_ids, hd, theta)
        kind, joint = cfg["pos_embed"], cfg["attention"] == "self"
        if kind == "ape":
            return text, None
        offset = text_mask.sum(-1, keepdim=True) if joint else torch.zeros(b, 1, dtype=torch.long, device=dev)
        idx = torch.arange(gh * gw, device=dev)
        rows, cols = (idx // gw)[None] + offset, (idx % gw)[None] + offset
        if kind == "1d-rope":
            image = _tables(idx[None] + offset, hd, theta)
        elif kind == "m-rope" and joint:  # text ids enter the same interleave, as equal row and column ids
            both = grid_tables(kind, torch.cat([text_ids, rows], dim=1), torch.cat([text_ids, cols], dim=1), hd, theta)
            return text, both
        else:
            image = grid_tables(kind, rows, cols, hd, theta)
        if joint:
            image = (torch.cat([text[0], image[0]], dim=1), torch.cat([text[1], image[1]], dim=1))
        return text, image

    # ----------------------------------------------------------------------------------------
    def _modulation(self, layer: RefImageLayer, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """(attention input, (gate_msa, shift_mlp, scale_mlp, gate_mlp)), as the reference builds them."""
        tc = self.config["timestep_conditioning"]
        if tc == "adaln-zero":
            h, gate_msa, shift_mlp, scale_mlp, gate_mlp = layer.input_layernorm(x, temb)
            shift_msa = scale_msa = torch.zeros_like(temb)  # the redundant second modulation
        else:
            h = layer.input_layernorm(x)
            if tc == "adaln-single":
                shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (layer.scale_shift_table + temb).chunk(
                    6, dim=1
                )
            else:
                shift_msa = scale_msa = shift_mlp = scale_mlp = torch.zeros_like(temb)
                gate_msa = gate_mlp = torch.ones_like(temb)
        h = h * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return h, (gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def _qkv(self, attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads of one side's q/k/v projections (no norm, no rotation)."""
        return (
            self._split(attn.q_proj(h), self.heads),
            self._split(attn.k_proj(h), self.kv_heads),
            self._split(attn.v_proj(h), self.kv_heads),
        )

    def _self_attention(
        self,
        blk: RefImageLayer,
        lay: nn.Module,
        hd_in: torch.Tensor,
        ht_in: torch.Tensor,
        tables: Tables | None,
        text_tables: Tables,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One attention over ``[text; image]``: returns (image output after o_proj, text output after o_proj)."""
        qi, ki, vi = self._qkv(blk.self_attn, hd_in)
        qt, kt, vt = self._qkv(lay.self_attn, ht_in)
        if self.config["qk_norm"]:
            qi, ki = blk.self_attn.q_norm(qi), blk.self_attn.k_norm(ki)
        if tables is None:  # APE: RoPE on the LLM's queries/keys only
            qt, kt = rotate(qt, text_tables), rotate(kt, text_tables)
        q, k, v = torch.cat([qt, qi], dim=2), torch.cat([kt, ki], dim=2), torch.cat([vt, vi], dim=2)
        if tables is not None:
            q, k = rotate(q, tables), rotate(k, tables)
        out = self._merge(self._attend(q, k, v, mask))
        length = ht_in.shape[1]
        return blk.self_attn.o_proj(out[:, length:]), lay.self_attn.o_proj(out[:, :length])

    def _cross_attention(
        self,
        blk: RefImageLayer,
        lay: nn.Module,
        x: torch.Tensor,
        hd_in: torch.Tensor,
        ht_in: torch.Tensor,
        gate_msa: torch.Tensor,
        tables: Tables | None,
        text_tables: Tables,
        text_mask: torch.Tensor,
        c_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The "cross" mode: text self-attention (RoPE, causal), image self-attention (no mask), then
        the image cross-attends to the LLM's raw keys/values. Returns (new x, text output)."""
        qt, kt, vt = self._qkv(lay.self_attn, ht_in)
        ot = self._attend(rotate(qt, text_tables), rotate(kt, text_tables), vt, text_mask)
        ot = lay.self_attn.o_proj(self._merge(ot))
        qi, ki, vi = self._qkv(blk.self_attn, hd_in)
        if self.config["qk_norm"]:
            qi, ki = blk.self_attn.q_norm(qi), blk.self_attn.k_norm(ki)
        if tables is not None:
            qi, ki = rotate(qi, tables), rotate(ki, tables)
        oi = blk.self_attn.o_proj(self._merge(self._attend(qi, ki, vi, None)))
        if self.config["sandwich_norm"]:
            oi = blk.post_attention_layernorm(oi)
        x = x + gate_msa[:, None] * oi
        qc = self._split(blk.cross_attn.q_proj(x), self.heads)
        if self.config["qk_norm"]:
            qc = blk.cross_attn.q_norm(qc)
        oc = blk.cross_attn.o_proj(self._merge(self._attend(qc, kt.to(x.dtype), vt.to(x.dtype), c_mask)))
        if self.config["sandwich_norm"]:
            oc = blk.post_cross_attention_layernorm(oc)
        return x + oc, ot

    def _shared_layer(
        self,
        i: int,
        x: torch.Tensor,
        h: torch.Tensor,
        temb: torch.Tensor,
        tables: Tables | None,
        text_tables: Tables,
        masks: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM layer ``i`` and DiT layer ``i - initial_layers`` around their one attention."""
        cfg = self.config
        blk, lay = self.dit.layers[i - cfg["initial_layers"]], self.llm.layers[i]
        hd_in, mods = self._modulation(blk, x, temb)
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        ht_in = lay.input_layernorm(h)
        if cfg["attention"] == "self":
            oi, ot = self._self_attention(blk, lay, hd_in, ht_in, tables, text_tables, masks[0])
            if cfg["sandwich_norm"]:
                oi = blk.post_attention_layernorm(oi)
            x = x + gate_msa[:, None] * oi
        else:
            x, ot = self._cross_attention(blk, lay, x, hd_in, ht_in, gate_msa, tables, text_tables, *masks)
        if self.gemma2:
            ot = lay.post_attention_layernorm(ot)
        h = h + ot
        m = blk.pre_feedforward_layernorm(x) if cfg["sandwich_norm"] else blk.post_attention_layernorm(x)
        m = blk.mlp(m * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        if cfg["sandwich_norm"]:
            m = blk.post_feedforward_layernorm(m)
        x = x + gate_mlp[:, None] * m
        n = lay.pre_feedforward_layernorm(h) if self.gemma2 else lay.post_attention_layernorm(h)
        n = lay.mlp(n)
        if self.gemma2:
            n = lay.post_feedforward_layernorm(n)
        return x, h + n

    def _llm_only_layer(self, i: int, h: torch.Tensor, mask: torch.Tensor, text_tables: Tables) -> torch.Tensor:
        """An LLM layer before the shared ones: the transformers decoder layer itself (Gemma-2's
        soft-capping and scaling included), text-only mask, positions 0..L-1."""
        b, length = h.shape[:2]
        ids = torch.arange(length, device=h.device).expand(b, -1)
        out = self.llm.layers[i](h, attention_mask=mask, position_ids=ids, position_embeddings=text_tables)
        return out[0] if isinstance(out, tuple) else out

    def _head(self, x: torch.Tensor, temb: torch.Tensor, t_emb: torch.Tensor | None, gh: int, gw: int) -> torch.Tensor:
        """Final norm (adaLN-zero: scale then shift; adaLN-single: table + t_emb, shift then scale),
        projection, and unpatchify with channels last inside a patch."""
        cfg, dit = self.config, self.dit
        tc, p, c = cfg["timestep_conditioning"], cfg["patch_size"], cfg["out_channels"]
        x = dit.norm_out(x, temb) if tc == "adaln-zero" else dit.norm_out(x)
        if tc == "adaln-single":
            shift, scale = (dit.scale_shift_table + torch.cat([t_emb, t_emb], dim=1)).chunk(2, dim=1)
            x = x * (1 + scale[:, None]) + shift[:, None]
        x = dit.proj_out(x).view(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_modulation_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        past_key_values: Any = None,
    ) -> torch.Tensor:
        if use_cache or past_key_values is not None:
            raise NotImplementedError("only the reference's uncached forward is re-formulated here")
        if attention_mask is None:
            raise ValueError("the reference builds its masks from attention_mask; pass one (1 = real token)")
        cfg, p = self.config, self.config["patch_size"]
        gh, gw = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
        x = self.dit.patch_embed(hidden_states)
        h = self._embed(input_ids)
        t_emb, temb = self._conditioning(timestep, x, text_modulation_embeds)
        if cfg["timestep_conditioning"] == "addition":
            x = x + temb[:, None]
        joint = cfg["attention"] == "self"
        text_tables, tables = self._positions(attention_mask, gh, gw)
        # tables take the dtype of what the reference's rotary module was given: the LLM stream for
        # the text alone, text and image concatenated otherwise
        text_tables = _cast(text_tables, h.dtype)
        tables = None if tables is None else _cast(tables, torch.promote_types(h.dtype, x.dtype))
        mask = joint_mask(attention_mask, x.shape[1] if joint else 0, h.dtype)
        masks = (mask,) if joint else (mask, cross_mask(attention_mask, x.shape[1], h.dtype))
        length = h.shape[1]
        for i in range(cfg["initial_layers"]):
            h = self._llm_only_layer(i, h, mask[:, :, :length, :length], text_tables)
        for i in shared_layer_indices(cfg):
            x, h = self._shared_layer(i, x, h, temb, tables, text_tables, masks)
        return self._head(x, temb, t_emb, gh, gw)


def _cast(tables: Tables, dtype: torch.dtype) -> Tables:
    """Both tables in ``dtype``."""
    return tables[0].to(dtype), tables[1].to(dtype)


def reference_parameter_count(config: dict) -> dict[str, int]:
    """``{"dit": ..., "llm": ...}`` of a meta-device build (nothing allocated)."""
    with torch.device("meta"):
        model = ReferenceFuseDiT(config)
    return {
        "dit": sum(p.numel() for p in model.dit.parameters()),
        "llm": sum(p.numel() for p in model.llm.parameters()),
    }
