"""Building blocks of the baseline DiT (docs/reference-facts.md, T2I-2.3 to T2I-2.8).

Everything here is written for the hot path of training: no dense float masks, no materialised
``repeat_kv`` copies, positional tables computed in fp32 on the fly. Parameter names follow the
reference key layout (T2I-2.10) so checkpoints of the reference load without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

RotaryTables = tuple[torch.Tensor, torch.Tensor]

TIMESTEP_CHANNELS = 256  # width of the sinusoidal timestep features

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Gemma-style RMSNorm: ``x / sqrt(mean(x^2) + eps) * (1 + w)`` with ``w`` initialised to 0.

    The statistics are computed in fp32 even under bf16 autocast because the mean of squares of
    a 2048-wide bf16 vector loses too many bits; the result is cast back to the input dtype so
    that the residual stream keeps the dtype the caller chose (this mirrors the reference).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN affine: per-sample ``x * (1 + scale) + shift`` broadcast over the token axis."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNZero(nn.Module):
    """Block input norm with adaLN-zero modulation (``input_layernorm.{linear,norm}``).

    Produces the six modulation vectors in the reference order shift_msa, scale_msa, gate_msa,
    shift_mlp, scale_mlp, gate_mlp and already applies the attention-side shift/scale. The
    reference then applies a second modulation with zero tensors, which is numerically the identity
    and is therefore omitted here.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim, bias=True)
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(6, dim=1)
        h = modulate(self.norm(x), shift_msa, scale_msa)
        return h, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLNOut(nn.Module):
    """Output-head adaLN (``norm_out.{linear,norm}``): note the chunk order is scale THEN shift,
    unlike the blocks; swapping it would silently break converted checkpoints."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim, bias=True)
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------
def timestep_sinusoid(t: torch.Tensor, channels: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of float timesteps in [0, 1000], laid out [cos, sin] (flip_sin_to_cos).

    Always computed in fp32: ``t * f`` reaches 1000 rad and bf16 would quantise it to a few units.
    """
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def timestep_mlp(dim: int, channels: int = 256) -> nn.Sequential:
    """``timestep_embedder``: Linear(256->d), SiLU, Linear(d->d); state keys ``{0,2}``."""
    return nn.Sequential(nn.Linear(channels, dim), nn.SiLU(), nn.Linear(dim, dim))


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos features ``[sin(p w_k), cos(p w_k)]``, ``w_k = 10000^(-k/(dim/2))``, in fp64."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.double().reshape(-1, 1) * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_table(dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """SD3-style (grid_size^2, dim) APE table; row-major tokens, first half encodes the column.

    Coordinates are ``k / (grid_size / base_size)``, so a crop of the centre of the big table
    reproduces the coordinates a ``base_size`` grid would get (T2I-2.4).
    """
    coords = torch.arange(grid_size, dtype=torch.float64) / (grid_size / base_size)
    rows = coords.repeat_interleave(grid_size)  # token n = r * grid + c
    cols = coords.repeat(grid_size)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv patchifier plus optional cropped APE (``patch_embed.proj`` / ``patch_embed.pos_embed``).

    The APE table is a persistent buffer only because the reference saves it in every state dict;
    keeping it persistent keeps the key sets identical for strict loading.
    """

    def __init__(
        self, in_channels: int, dim: int, patch_size: int, ape_max_size: int | None, ape_base_size: int
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.ape_max_size = ape_max_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)
        if ape_max_size is not None:
            table = sincos_2d_table(dim, ape_max_size, ape_base_size)
            self.register_buffer("pos_embed", table.unsqueeze(0), persistent=True)
        else:
            self.pos_embed = None

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Centre crop of the (max x max) table for an h x w token grid, flattened row-major."""
        m = self.ape_max_size
        if h > m or w > m:
            raise ValueError(f"token grid {h}x{w} exceeds pos_embed_max_size={m}")
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.reshape(1, m, m, -1)[:, top : top + h, left : left + w]
        return table.reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2).contiguous()  # contiguous: later Linears save one copy
        if self.pos_embed is None:
            return tokens
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return (tokens + self.cropped_pos_embed(h, w)).to(tokens.dtype)


# --------------------------------------------------------------------------------------------
# Rotary embeddings (Gemma rotate_half convention: dim i pairs with dim i + head_dim/2)
# --------------------------------------------------------------------------------------------
def _rope_table(pos: torch.Tensor, dim: int, theta: float) -> RotaryTables:
    """Gemma tables for a ``dim``-wide rotary: ``cat(freqs, freqs)`` with ``theta^(-2j/dim)``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    freqs = pos.float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rope_tables(kind: str, height: int, width: int, head_dim: int, theta: float, device) -> RotaryTables:
    """(cos, sin), each (N, head_dim) fp32, for an image grid of ``height x width`` tokens.

    - "1d-rope": positions 0..N-1 over the row-major flattened grid.
    - "2d-rope": half-width tables for row and column ids interleaved in 32-dim groups
      [row, col, row, col] so the rotate_half partner (i + hd/2) carries the same axis.
    - "m-rope": full-width tables; quarters alternate row/col, so rows drive the higher
      frequencies (index 0..hd/4-1) and columns the lower ones.
    Computed on the fly in fp32 (not a buffer) so ``model.to(bfloat16)`` cannot degrade them.
    """
    idx = torch.arange(height * width, device=device)
    if kind == "1d-rope":
        return rope_tables_at(kind, idx, None, head_dim, theta)
    return rope_tables_at(kind, idx // width, idx % width, head_dim, theta)


def rope_tables_at(
    kind: str, rows: torch.Tensor, cols: torch.Tensor | None, head_dim: int, theta: float
) -> RotaryTables:
    """(cos, sin) of shape ``(*rows.shape, head_dim)`` for explicit integer position ids.

    Same layouts as :func:`rope_tables`, but the caller chooses the ids, so they may carry a
    per-sample offset (a batch of shifted grids) or describe a text sequence. For "1d-rope"
    ``rows`` holds the positions and ``cols`` is ignored; "2d-rope"/"m-rope" need both.
    """
    shape = rows.shape
    r = rows.reshape(-1)
    if kind == "1d-rope":
        cos, sin = _rope_table(r, head_dim, theta)
    elif kind in ("2d-rope", "m-rope"):
        c = cols.reshape(-1)
        q = head_dim // 4
        if kind == "2d-rope":
            rc, rs = _rope_table(r, head_dim // 2, theta)
            cc, cs = _rope_table(c, head_dim // 2, theta)

            def mix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return torch.cat([a[:, :q], b[:, :q], a[:, q:], b[:, q:]], dim=-1)

        else:
            rc, rs = _rope_table(r, head_dim, theta)
            cc, cs = _rope_table(c, head_dim, theta)

            def mix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return torch.cat([a[:, :q], b[:, q : 2 * q], a[:, 2 * q : 3 * q], b[:, 3 * q :]], dim=-1)

        cos, sin = mix(rc, cc), mix(rs, cs)
    else:
        raise ValueError(f"unknown rotary kind {kind!r}")
    return cos.reshape(*shape, head_dim), sin.reshape(*shape, head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, rope: RotaryTables) -> torch.Tensor:
    """Rotate (B, heads, N, hd) by (N, hd) tables; tables are cast to x's dtype like Gemma does."""
    cos, sin = (t.to(x.dtype) for t in rope)
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------
# Attention and MLP
# --------------------------------------------------------------------------------------------
def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, heads*hd) -> (B, heads, S, hd)."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, hd) -> (B, S, heads*hd)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with native grouped-query attention.

    ``enable_gqa`` lets the kernel index the shared K/V heads instead of materialising a
    ``repeat_kv`` copy (4x the K/V memory). ``key_mask`` is a boolean (B, 1, 1, S) "may attend"
    mask or None; a boolean key mask broadcast over queries is all padding needs, and passing
    None when nothing is padded keeps the flash / memory-efficient kernels eligible.
    """
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=gqa)


class SelfAttention(nn.Module):
    """Image-query attention (``self_attn``); with ``joint_text`` the keys are [text; image].

    In "self" mode the text is NOT updated: each layer projects the shared context-embedded text
    into a key/value prefix (``text_k_proj``/``text_v_proj``) and only image tokens query. The
    text keys go through the same ``k_norm`` as image keys, because they are compared against
    the same queries: normalising only one group would let the other dominate the logits. Text
    keys never get RoPE (they have no image position).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        qk_norm: bool,
        joint_text: bool,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        if joint_text:
            self.text_k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
            self.text_v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.joint_text = joint_text
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)

    def image_qkv(self, x: torch.Tensor, rope: RotaryTables | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The image tokens' heads: q/k normalised (qk_norm) then rotated (RoPE), v as projected."""
        q = split_heads(self.q_proj(x), self.heads)
        k = split_heads(self.k_proj(x), self.kv_heads)
        v = split_heads(self.v_proj(x), self.kv_heads)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryTables | None = None,
        text: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.image_qkv(x, rope)
        if self.joint_text:
            tk = split_heads(self.text_k_proj(text), self.kv_heads)
            tv = split_heads(self.text_v_proj(text), self.kv_heads)
            if self.qk_norm:
                tk = self.k_norm(tk)
            k, v = torch.cat([tk, k], dim=2), torch.cat([tv, v], dim=2)
        return self.o_proj(merge_heads(attend(q, k, v, key_mask)))


class CrossAttention(nn.Module):
    """Image-to-text cross-attention (``cross_attn``) of the "cross" variant (T2I-2.8).

    Its text projections take the context-embedded text (width ``text_dim``, which the DiT sets
    to its hidden size; the reference declares ``text_hidden_size`` here, identical in every
    runnable configuration). No RoPE: the keys are text tokens without image positions.
    """

    def __init__(
        self,
        dim: int,
        text_dim: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        qk_norm: bool,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.text_k_proj = nn.Linear(text_dim, kv_heads * head_dim, bias=bias)
        self.text_v_proj = nn.Linear(text_dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, text: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.heads)
        k = split_heads(self.text_k_proj(text), self.kv_heads)
        v = split_heads(self.text_v_proj(text), self.kv_heads)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(merge_heads(attend(q, k, v, key_mask)))


class GatedMLP(nn.Module):
    """Gemma GeGLU MLP ``down(act(gate(x)) * up(x))`` without biases (``mlp.{gate,up,down}_proj``)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu_pytorch_tanh") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}; choose from {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------------------------
# Conditioning, output head and unpatchify: shared by the DiT and the FuseDiT
# --------------------------------------------------------------------------------------------
def timestep_conditioning(
    kind: str | None,
    timestep_embedder: nn.Module | None,
    t_block: nn.Module | None,
    timestep: torch.Tensor,
    batch: int,
    dtype: torch.dtype,
    extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(t_emb, per-block conditioning) for ``kind`` (adaln-zero | adaln-single | addition | None).

    The sinusoid is computed in fp32 and cast to the token dtype like the reference does (under
    autocast the MLP runs in bf16 either way). ``extra`` (a FuseDiT's pooled-text embedding) is
    added to the timestep embedding before ``t_block``.
    """
    if kind is None:
        return None, None
    t = timestep.reshape(-1)
    if t.numel() == 1 and batch > 1:
        t = t.expand(batch)
    temb = timestep_embedder(timestep_sinusoid(t, TIMESTEP_CHANNELS).to(dtype))
    if extra is not None:
        temb = temb + extra
    if kind == "adaln-zero":
        return temb, temb
    if kind == "adaln-single":
        return temb, t_block(temb)
    return temb, None


def output_head(
    kind: str | None, norm_out: nn.Module, scale_shift_table: torch.Tensor | None, x: torch.Tensor, temb
) -> torch.Tensor:
    """Final norm (+ modulation). adaLN-single adds the raw timestep embedding, duplicated,
    to its 2d table and splits shift-then-scale (the adaLN-zero head is scale-then-shift)."""
    if kind == "adaln-zero":
        return norm_out(x, temb)
    x = norm_out(x)
    if kind == "adaln-single":
        shift, scale = (scale_shift_table + torch.cat([temb, temb], dim=1)).chunk(2, dim=1)
        x = modulate(x, shift, scale)
    return x


def unpatchify(x: torch.Tensor, h: int, w: int, patch_size: int, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) with channel-last patches -> (B, C, h*p, w*p)."""
    p, c = patch_size, channels
    x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(x.shape[0], c, h * p, w * p)


# --------------------------------------------------------------------------------------------
# The adaLN block skeleton shared by the DiT and the FuseDiT
# --------------------------------------------------------------------------------------------
class AdaLNBlock(nn.Module):
    """One DiT layer around its attention (T2I-2.5 / T2I-2.8): adaLN attention, optional
    cross-attention, adaLN MLP, with the reference's norm and parameter names.

    The two model families differ only in what their attentions read (encoder features, or a
    fused LLM layer's keys/values), so they pass builders of their attention modules in and call
    :meth:`residual` with closures over their text inputs. Modules are registered in the order
    the DiT always used (it fixes the parameter order, and with it ZeRO's flat buffers).
    ``cond``: ``temb`` (B, d) for adaLN-zero, the ``t_block`` output (B, 6d) for adaLN-single, None
    for "addition"/None, where shift and scale are zero and gates one - skipped instead of
    multiplied, which is bit-identical.
    """

    def __init__(
        self,
        dim: int,
        eps: float,
        conditioning: str | None,
        sandwich_norm: bool,
        make_self_attn: Callable[[], nn.Module],
        make_cross_attn: Callable[[], nn.Module] | None,
        intermediate_size: int,
        hidden_act: str,
    ) -> None:
        super().__init__()
        self.conditioning = conditioning
        self.sandwich = sandwich_norm
        self.cross = make_cross_attn is not None
        if conditioning == "adaln-zero":
            self.input_layernorm = AdaLNZero(dim, eps)
        else:
            self.input_layernorm = RMSNorm(dim, eps)
            if conditioning == "adaln-single":
                self.scale_shift_table = nn.Parameter(torch.randn(6 * dim) / dim**0.5)
        self.self_attn = make_self_attn()  # built here, in this order: it fixes the random init stream too
        if make_cross_attn is not None:
            self.cross_attn = make_cross_attn()
        self.post_attention_layernorm = RMSNorm(dim, eps)
        if sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(dim, eps)
            self.post_feedforward_layernorm = RMSNorm(dim, eps)
            if self.cross:
                self.post_cross_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = GatedMLP(dim, intermediate_size, hidden_act)

    def _modulations(self, x: torch.Tensor, cond: torch.Tensor | None) -> tuple:
        """Normalised+modulated attention input and the (gate_msa, shift/scale/gate_mlp) tuple."""
        if self.conditioning == "adaln-zero":
            h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.input_layernorm(x, cond)
            return h, (gate_msa, shift_mlp, scale_mlp, gate_mlp)
        h = self.input_layernorm(x)
        if self.conditioning == "adaln-single":
            shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table + cond).chunk(6, dim=1)
            return modulate(h, shift, scale), (gate_msa, shift_mlp, scale_mlp, gate_mlp)
        return h, None

    def residual(self, x: torch.Tensor, cond: torch.Tensor | None, attend, cross_attend) -> torch.Tensor:
        """The layer given ``attend(h)`` (self-attention of the modulated input) and
        ``cross_attend(x)`` (cross-attention from the un-normalised residual stream; unused
        without ``cross_attn``)."""
        h, mods = self._modulations(x, cond)
        attn = attend(h)
        if self.sandwich:
            attn = self.post_attention_layernorm(attn)
        x = x + (attn if mods is None else mods[0][:, None] * attn)
        if self.cross:
            # un-normalised input, un-gated plain residual (reference behaviour)
            cross = cross_attend(x)
            if self.sandwich:
                cross = self.post_cross_attention_layernorm(cross)
            x = x + cross
        h = self.pre_feedforward_layernorm(x) if self.sandwich else self.post_attention_layernorm(x)
        if mods is not None:
            h = modulate(h, mods[1], mods[2])
        out = self.mlp(h)
        if self.sandwich:
            out = self.post_feedforward_layernorm(out)
        return x + (out if mods is None else mods[3][:, None] * out)
