"""The reference ("fuse-dit" baseline-dit) formulation, written independently from a prose description.

The facts it follows are recorded in docs/reference-facts.md (T2I-2.1 to T2I-2.12).

Purpose: (1) ground truth for the checkpoint converter's equivalence tests, (2) the "before"
side of a benchmark against ``dit.DiT``'s hot path. It therefore keeps the reference's costly
choices on purpose: a dense additive float mask of shape B x 1 x N x (L+N) filled with
``finfo(dtype).min`` (built even when nothing is padded), K/V heads expanded with ``repeat_kv``,
the redundant second (zero) modulation after adaLN-zero, and text padded as given.

Nothing is imported from ``dit.py``/``layers.py``: every primitive (RMSNorm, sin-cos tables,
rotary tables, attention) is re-written here so that an error in one implementation cannot
hide in both. The model is built from a reference-format config dict (a DiTConfig as saved in
the reference's ``config.json``: top-level DiT fields plus a nested Gemma ``base_config``), and
its state-dict keys are the reference's (T2I-2.10 and the variant names in dit.py).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GEMMA_2B_BASE = {
    "_name_or_path": "google/gemma-2b",
    "model_type": "gemma",
    "architectures": ["GemmaForCausalLM"],
    "hidden_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "intermediate_size": 16384,
    "hidden_act": "gelu",
    "hidden_activation": None,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 8192,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "vocab_size": 256000,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}

# the six shipped configs' base_config_override (T2I-1.2)
SHIPPED_OVERRIDE = {
    "hidden_activation": "gelu_pytorch_tanh",
    "head_dim": 128,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
}


def make_reference_config(base_override: dict | None = None, **dit_fields: Any) -> dict:
    """A DiTConfig dict as the reference's ``config.json`` holds it.

    Defaults reproduce the shipped 3B config; pass ``base_override`` (applied on top of the
    Gemma-2B config like ``base_config_override``) and top-level fields to shrink it for tests.
    """
    base = copy.deepcopy(GEMMA_2B_BASE)
    base.update(SHIPPED_OVERRIDE)
    base.update(base_override or {})
    cfg = {
        "model_type": "DiT",
        "attention": "self",
        "base_config": base,
        "dit_hidden_size": base["hidden_size"],
        "dit_num_hidden_layers": 30,
        "text_hidden_states_index": -1,
        "in_channels": 16,
        "initial_layers": 0,
        "out_channels": 16,
        "patch_size": 2,
        "pos_embed": "ape",
        "pos_embed_max_size": 64,
        "qk_norm": True,
        "sample_size": 32,
        "sandwich_norm": False,
        "shared_attention_layers": "all",
        "text_hidden_size": base["hidden_size"],
        "text_modulation_embeds_dim": None,
        "timestep_conditioning": "adaln-zero",
        "transformers_version": "4.43.3",
    }
    cfg.update(dit_fields)
    return cfg


# --------------------------------------------------------------------------------------------
class GemmaRMSNorm(nn.Module):
    """fp32 ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.to(torch.float32))).type_as(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


_ACT = {"gelu_pytorch_tanh": gelu_tanh, "gelu": lambda x: F.gelu(x), "silu": F.silu}


def _mlp_activation(base: dict) -> str:
    """Gemma's MLP uses ``hidden_activation``; when unset it falls back to tanh-GELU."""
    return base.get("hidden_activation") or "gelu_pytorch_tanh"


def sinusoid_timesteps(t: torch.Tensor) -> torch.Tensor:
    """256 channels, f_k = exp(-ln(1e4) k / 128), order [cos, sin]."""
    k = torch.arange(128, dtype=torch.float32, device=t.device)
    f = torch.exp(-math.log(10000.0) * k / 128.0)
    angle = t.to(torch.float32).unsqueeze(1) * f.unsqueeze(0)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)


def ape_table(width: int, max_size: int, base_size: int) -> torch.Tensor:
    """(max_size^2, width) table; per half [sin(p w_k), cos(p w_k)], columns first then rows."""
    quarter = width // 4
    w = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coord = torch.arange(max_size, dtype=torch.float64) * base_size / max_size
    r = coord.view(max_size, 1).expand(max_size, max_size).reshape(-1)
    c = coord.view(1, max_size).expand(max_size, max_size).reshape(-1)

    def enc(p: torch.Tensor) -> torch.Tensor:
        a = p.unsqueeze(1) * w.unsqueeze(0)
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([enc(c), enc(r)], dim=1).to(torch.float32)


def gemma_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma rotary tables (N, dim) for integer positions, duplicated halves."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    ang = torch.outer(positions.to(torch.float32), inv.to(positions.device))
    full = torch.cat((ang, ang), dim=-1)
    return full.cos(), full.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv, S, hd) -> (B, kv*groups, S, hd), each KV head repeated ``groups`` times in place."""
    b, kv, s, hd = x.shape
    if groups == 1:
        return x
    return x[:, :, None].expand(b, kv, groups, s, hd).reshape(b, kv * groups, s, hd)


# --------------------------------------------------------------------------------------------
class RefSelfAttention(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        base, d = cfg["base_config"], cfg["dit_hidden_size"]
        self.h, self.kv, self.hd = base["num_attention_heads"], base["num_key_value_heads"], base["head_dim"]
        bias = base["attention_bias"]
        self.joint = cfg["attention"] == "self"
        self.qk_norm = cfg["qk_norm"]
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.hd, base["rms_norm_eps"])
            self.k_norm = GemmaRMSNorm(self.hd, base["rms_norm_eps"])
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=bias)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=bias)
        if self.joint:
            self.text_k_proj = nn.Linear(d, self.kv * self.hd, bias=bias)
            self.text_v_proj = nn.Linear(d, self.kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], n, self.hd).permute(0, 2, 1, 3)

    def forward(self, x, cos_sin=None, text=None, mask=None):
        q = self._heads(self.q_proj(x), self.h)
        k = self._heads(self.k_proj(x), self.kv)
        v = self._heads(self.v_proj(x), self.kv)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos_sin is not None:
            cos, sin = cos_sin
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if self.joint:
            tk = self._heads(self.text_k_proj(text), self.kv)
            tv = self._heads(self.text_v_proj(text), self.kv)
            if self.qk_norm:
                tk = self.k_norm(tk)
            k = torch.cat([tk, k], dim=2)
            v = torch.cat([tv, v], dim=2)
        k, v = repeat_kv(k, self.h // self.kv), repeat_kv(v, self.h // self.kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        out = out.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], self.h * self.hd)
        return self.o_proj(out)


class RefCrossAttention(nn.Module):
    """Text projections take ``text_hidden_size`` inputs, as in the reference (only runnable when
    that equals the DiT width, since the text is already context-embedded)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        base, d = cfg["base_config"], cfg["dit_hidden_size"]
        self.h, self.kv, self.hd = base["num_attention_heads"], base["num_key_value_heads"], base["head_dim"]
        bias = base["attention_bias"]
        self.qk_norm = cfg["qk_norm"]
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.hd, base["rms_norm_eps"])
            self.k_norm = GemmaRMSNorm(self.hd, base["rms_norm_eps"])
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=bias)
        self.text_k_proj = nn.Linear(cfg["text_hidden_size"], self.kv * self.hd, bias=bias)
        self.text_v_proj = nn.Linear(cfg["text_hidden_size"], self.kv * self.hd, bias=bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], n, self.hd).permute(0, 2, 1, 3)

    def forward(self, x, text, mask):
        q = self._heads(self.q_proj(x), self.h)
        k = self._heads(self.text_k_proj(text), self.kv)
        v = self._heads(self.text_v_proj(text), self.kv)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        k, v = repeat_kv(k, self.h // self.kv), repeat_kv(v, self.h // self.kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        out = out.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], self.h * self.hd)
        return self.o_proj(out)


class RefAdaLNZero(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 6 * d)
        self.norm = GemmaRMSNorm(d, eps)

    def forward(self, x, emb):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(F.silu(emb)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class RefAdaLNOut(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 2 * d)
        self.norm = GemmaRMSNorm(d, eps)

    def forward(self, x, emb):
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class RefMLP(nn.Module):
    def __init__(self, d: int, inner: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)
        self.act = _ACT[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RefLayer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        base, d = cfg["base_config"], cfg["dit_hidden_size"]
        eps = base["rms_norm_eps"]
        self.tc, self.mode, self.sandwich = cfg["timestep_conditioning"], cfg["attention"], cfg["sandwich_norm"]
        if self.tc == "adaln-zero":
            self.input_layernorm = RefAdaLNZero(d, eps)
        else:
            if self.tc == "adaln-single":
                self.scale_shift_table = nn.Parameter(torch.randn(6 * d) / d**0.5)
            self.input_layernorm = GemmaRMSNorm(d, eps)
        self.self_attn = RefSelfAttention(cfg)
        if self.mode == "cross":
            self.cross_attn = RefCrossAttention(cfg)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(d, eps)
            if self.mode == "cross":
                self.post_cross_attention_layernorm = GemmaRMSNorm(d, eps)
        self.mlp = RefMLP(d, base["intermediate_size"], _mlp_activation(base))

    def forward(self, x, temb, cos_sin, text, mask):
        if self.tc == "adaln-zero":
            h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.input_layernorm(x, temb)
            shift_msa = scale_msa = torch.zeros_like(temb)  # the redundant second modulation
        else:
            h = self.input_layernorm(x)
            if self.tc == "adaln-single":
                mods = (self.scale_shift_table + temb).chunk(6, dim=1)
                shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
            else:
                shift_msa = scale_msa = shift_mlp = scale_mlp = torch.zeros_like(temb)
                gate_msa = gate_mlp = torch.ones_like(temb)
        h = h * (1 + scale_msa[:, None]) + shift_msa[:, None]
        if self.mode == "self":
            a = self.self_attn(h, cos_sin, text, mask)
        else:
            a = self.self_attn(h, cos_sin)
        if self.sandwich:
            a = self.post_attention_layernorm(a)
        x = x + gate_msa[:, None] * a
        if self.mode == "cross":
            c = self.cross_attn(x, text, mask)
            if self.sandwich:
                c = self.post_cross_attention_layernorm(c)
            x = x + c
        h = self.pre_feedforward_layernorm(x) if self.sandwich else self.post_attention_layernorm(x)
        h = h * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        m = self.mlp(h)
        if self.sandwich:
            m = self.post_feedforward_layernorm(m)
        return x + gate_mlp[:, None] * m


class RefPatchEmbed(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        d, p = cfg["dit_hidden_size"], cfg["patch_size"]
        self.p = p
        self.proj = nn.Conv2d(cfg["in_channels"], d, kernel_size=(p, p), stride=p, bias=True)
        self.max_size = cfg["pos_embed_max_size"]
        if cfg["pos_embed"] == "ape":
            table = ape_table(d, self.max_size, cfg["sample_size"] // p)
            self.register_buffer("pos_embed", table[None], persistent=True)
        else:
            self.pos_embed = None

    def forward(self, latent):
        gh, gw = latent.shape[-2] // self.p, latent.shape[-1] // self.p
        tokens = self.proj(latent).flatten(2).transpose(1, 2)
        if self.pos_embed is None:
            return tokens
        m = self.max_size
        top, left = (m - gh) // 2, (m - gw) // 2
        grid = self.pos_embed.view(1, m, m, -1)[:, top : top + gh, left : left + gw, :].reshape(1, gh * gw, -1)
        return (tokens + grid).to(tokens.dtype)


def add_timestep_modules(module: nn.Module, d: int, tc: str | None) -> None:
    """The reference's timestep conditioning modules on ``module`` (its DiT and FuseDiT towers alike):
    the timestep MLP unless conditioning is none, adaLN-single's ``t_block`` and output table."""
    if tc is not None:
        module.timestep_embedder = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
    if tc == "adaln-single":
        module.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        module.scale_shift_table = nn.Parameter(torch.randn(2 * d) / d**0.5)


class ReferenceDiT(nn.Module):
    """Reference DiT: ``forward(hidden_states, timestep, text_hidden_states, attention_mask)``."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        cfg = copy.deepcopy(config)
        base = cfg["base_config"]
        if base.get("head_dim") is None:
            base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
        cfg["dit_hidden_size"] = cfg.get("dit_hidden_size") or base["hidden_size"]
        cfg["text_hidden_size"] = cfg.get("text_hidden_size") or base["hidden_size"]
        self.config = cfg
        d, eps, tc = cfg["dit_hidden_size"], base["rms_norm_eps"], cfg["timestep_conditioning"]
        self.layers = nn.ModuleList([RefLayer(cfg) for _ in range(cfg["dit_num_hidden_layers"])])
        self.patch_embed = RefPatchEmbed(cfg)
        add_timestep_modules(self, d, tc)
        t = cfg["text_hidden_size"]
        self.context_embedder = nn.Sequential(GemmaRMSNorm(t, eps), nn.Linear(t, d))
        self.norm_out = RefAdaLNOut(d, eps) if tc == "adaln-zero" else GemmaRMSNorm(d, eps)
        p, c = cfg["patch_size"], cfg["out_channels"]
        self.proj_out = nn.Linear(d, p * p * c, bias=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Reference initialisation (T2I-2.9)."""
        cfg, std = self.config, self.config["base_config"]["initializer_range"]
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.constant_(mod.bias, 0.0)
        if cfg["timestep_conditioning"] == "adaln-zero":
            for layer in self.layers:
                nn.init.constant_(layer.input_layernorm.linear.weight, 0.0)
                nn.init.constant_(layer.input_layernorm.linear.bias, 0.0)
            nn.init.constant_(self.norm_out.linear.weight, 0.0)
            nn.init.constant_(self.norm_out.linear.bias, 0.0)
        elif cfg["timestep_conditioning"] == "adaln-single":
            nn.init.normal_(self.t_block[1].weight, std=std)
        conv = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(conv.view(conv.shape[0], -1))
        nn.init.constant_(self.patch_embed.proj.bias, 0.0)
        if cfg["timestep_conditioning"] is not None:
            nn.init.normal_(self.timestep_embedder[0].weight, std=std)
            nn.init.normal_(self.timestep_embedder[2].weight, std=std)
        nn.init.normal_(self.context_embedder[1].weight, std=std)
        nn.init.constant_(self.proj_out.weight, 0.0)
        nn.init.constant_(self.proj_out.bias, 0.0)

    def _rotary(self, gh: int, gw: int, device, dtype):
        cfg, base = self.config, self.config["base_config"]
        kind, hd, theta = cfg["pos_embed"], base["head_dim"], base["rope_theta"]
        if kind == "ape":
            return None
        if kind == "1d-rope":
            cos, sin = gemma_cos_sin(torch.arange(gh * gw, device=device), hd, theta)
        else:
            rows = torch.arange(gh, device=device).repeat_interleave(gw)
            cols = torch.arange(gw, device=device).repeat(gh)
            if kind == "2d-rope":
                (rc, rs), (cc, cs) = gemma_cos_sin(rows, hd // 2, theta), gemma_cos_sin(cols, hd // 2, theta)
                parts = hd // 4
                # [row f0..f(q-1), col f0..f(q-1), row f0.., col f0..]
                cos = torch.cat([rc[:, :parts], cc[:, :parts], rc[:, parts:], cc[:, parts:]], dim=-1)
                sin = torch.cat([rs[:, :parts], cs[:, :parts], rs[:, parts:], cs[:, parts:]], dim=-1)
            else:  # m-rope: quarters alternate row / column
                (rc, rs), (cc, cs) = gemma_cos_sin(rows, hd, theta), gemma_cos_sin(cols, hd, theta)
                qc = [rc, cc, rc, cc]
                qs = [rs, cs, rs, cs]
                step = hd // 4
                cos = torch.cat([t[:, i * step : (i + 1) * step] for i, t in enumerate(qc)], dim=-1)
                sin = torch.cat([t[:, i * step : (i + 1) * step] for i, t in enumerate(qs)], dim=-1)
        return cos.to(dtype), sin.to(dtype)

    def _dense_mask(self, attention_mask: torch.Tensor, n: int, dtype) -> torch.Tensor:
        """B x 1 x N x K additive mask, K = L+N ("self") or L ("cross")."""
        keep = attention_mask.to(torch.bool)
        if self.config["attention"] == "self":
            keep = torch.cat([keep, torch.ones(keep.shape[0], n, dtype=torch.bool, device=keep.device)], dim=1)
        keep = keep[:, None, None, :].expand(keep.shape[0], 1, n, keep.shape[1])
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        return mask.masked_fill(~keep, torch.finfo(dtype).min)

    def forward(self, hidden_states, timestep, text_hidden_states, attention_mask=None):
        cfg = self.config
        p = cfg["patch_size"]
        gh, gw = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
        x = self.patch_embed(hidden_states)
        tc = cfg["timestep_conditioning"]
        if tc is not None:
            t_emb = self.timestep_embedder(sinusoid_timesteps(timestep).to(x.dtype))
            temb = self.t_block(t_emb) if tc == "adaln-single" else t_emb
        else:
            temb = torch.zeros_like(x[:, 0, :])
        if tc == "addition":
            x = x + temb.unsqueeze(1)
        cos_sin = self._rotary(gh, gw, x.device, x.dtype)
        text = self.context_embedder(text_hidden_states)
        if attention_mask is None:
            attention_mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
        mask = self._dense_mask(attention_mask, x.shape[1], text.dtype)
        for layer in self.layers:
            x = layer(x, temb, cos_sin, text, mask)
        if tc == "adaln-zero":
            x = self.norm_out(x, temb)
        else:
            x = self.norm_out(x)
        if tc == "adaln-single":
            shift, scale = (self.scale_shift_table + t_emb.repeat(1, 2)).chunk(2, dim=1)
            x = x * (1 + scale[:, None]) + shift[:, None]
        x = self.proj_out(x)
        c = cfg["out_channels"]
        x = x.view(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)
