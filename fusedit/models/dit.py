"""The baseline text-to-image DiT (docs/reference-facts.md, T2I-2.1 to T2I-2.12), as a diffusers ``ModelMixin``.

Numerically the same function as the reference (``reference_dit.py``), but with the hot-path
fixes of reference defects T2I-D17, T2I-D19 and T2I-D20: a boolean key mask (or none at all)
instead of a dense float mask, native GQA in SDPA instead of ``repeat_kv``, and no redundant zero
modulation.

State-dict keys equal the reference layout (T2I-2.10). Variants not used by the shipped
configs use the reference's own names as well:

- cross attention: ``layers.{i}.cross_attn.{q_proj,text_k_proj,text_v_proj,o_proj,q_norm,k_norm}``
  (``self_attn`` then has no text projections);
- sandwich norm: ``layers.{i}.post_attention_layernorm`` normalises the attention output,
  ``pre_feedforward_layernorm`` is the (modulated) MLP input norm, ``post_feedforward_layernorm``
  normalises the MLP output, and in "cross" mode ``post_cross_attention_layernorm`` the
  cross-attention output;
- adaLN-single: ``t_block.1.{weight,bias}`` (global SiLU+Linear d->6d), ``layers.{i}.scale_shift_table``
  (6d), top-level ``scale_shift_table`` (2d) for the output head;
- whenever the conditioning is not adaLN-zero the block input norm is a plain RMSNorm
  (``layers.{i}.input_layernorm.weight``) and the head norm is ``norm_out.weight``;
- ``timestep_conditioning=None``: no ``timestep_embedder`` at all.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .layers import (
    ACTIVATIONS,
    TIMESTEP_CHANNELS,
    AdaLNBlock,
    AdaLNOut,
    CrossAttention,
    PatchEmbed,
    RMSNorm,
    RotaryTables,
    SelfAttention,
    output_head,
    rope_tables,
    timestep_conditioning,
    timestep_mlp,
    unpatchify,
)

ATTENTIONS = ("self", "cross")
CONDITIONINGS = ("adaln-zero", "adaln-single", "addition", None)
POS_EMBEDS = ("ape", "1d-rope", "2d-rope", "m-rope")


class DiTBlock(AdaLNBlock):
    """One baseline DiT layer: image queries over the text prefix ("self") or image self-attention
    then cross-attention to the text ("cross"), in the shared adaLN skeleton (layers.AdaLNBlock)."""

    def __init__(self, cfg: Any) -> None:
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        cross = cfg.attention == "cross"
        heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        bias, qk = cfg.attention_bias, cfg.qk_norm
        super().__init__(
            d,
            eps,
            cfg.timestep_conditioning,
            cfg.sandwich_norm,
            lambda: SelfAttention(d, *heads, qk_norm=qk, joint_text=not cross, bias=bias, eps=eps),
            (lambda: CrossAttention(d, d, *heads, qk_norm=qk, bias=bias, eps=eps)) if cross else None,
            cfg.intermediate_size,
            cfg.hidden_act,
        )

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None,
        rope: RotaryTables | None,
        text: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.cross:
            return self.residual(
                x, cond, lambda h: self.self_attn(h, rope), lambda r: self.cross_attn(r, text, key_mask)
            )
        return self.residual(x, cond, lambda h: self.self_attn(h, rope, text, key_mask), None)


class DiT(ModelMixin, ConfigMixin):
    """Text-conditioned DiT with image-only queries over a per-layer text key/value prefix.

    ``forward(hidden_states (B,C,H,W), timestep (B,) in [0,1000], encoder_hidden_states (B,L,T),
    encoder_attention_mask (B,L) or None) -> (B,out_channels,H,W)``.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        patch_size: int = 2,
        hidden_size: int = 2048,
        num_layers: int = 30,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int = 128,
        intermediate_size: int = 8192,
        hidden_act: str = "gelu_pytorch_tanh",
        rms_norm_eps: float = 1e-6,
        attention_bias: bool = False,
        text_hidden_size: int = 2048,
        attention: str = "self",
        qk_norm: bool = True,
        sandwich_norm: bool = False,
        timestep_conditioning: str | None = "adaln-zero",
        pos_embed: str = "ape",
        pos_embed_max_size: int = 64,
        sample_size: int = 32,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
    ) -> None:
        super().__init__()
        _validate(self.config)
        d = hidden_size
        self.gradient_checkpointing = False
        ape = pos_embed == "ape"
        self.patch_embed = PatchEmbed(
            in_channels, d, patch_size, pos_embed_max_size if ape else None, sample_size // patch_size
        )
        if timestep_conditioning is not None:
            self.timestep_embedder = timestep_mlp(d, TIMESTEP_CHANNELS)
        if timestep_conditioning == "adaln-single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
            self.scale_shift_table = nn.Parameter(torch.randn(2 * d) / d**0.5)
        self.context_embedder = nn.Sequential(RMSNorm(text_hidden_size, rms_norm_eps), nn.Linear(text_hidden_size, d))
        self.layers = nn.ModuleList([DiTBlock(self.config) for _ in range(num_layers)])
        if timestep_conditioning == "adaln-zero":
            self.norm_out = AdaLNOut(d, rms_norm_eps)
        else:
            self.norm_out = RMSNorm(d, rms_norm_eps)
        self.proj_out = nn.Linear(d, patch_size * patch_size * out_channels)
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Reference initialisation (T2I-2.9): the output is exactly 0 and blocks are identities
        at step 0 (all modulation and the output projection are zero)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.zeros_(m.weight)
        if self.config.timestep_conditioning == "adaln-zero":
            for layer in self.layers:
                nn.init.zeros_(layer.input_layernorm.linear.weight)
                nn.init.zeros_(layer.input_layernorm.linear.bias)
            nn.init.zeros_(self.norm_out.linear.weight)
            nn.init.zeros_(self.norm_out.linear.bias)
        elif self.config.timestep_conditioning == "adaln-single":
            nn.init.normal_(self.t_block[1].weight, std=std)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.config.timestep_conditioning is not None:
            nn.init.normal_(self.timestep_embedder[0].weight, std=std)
            nn.init.normal_(self.timestep_embedder[2].weight, std=std)
        nn.init.normal_(self.context_embedder[1].weight, std=std)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    # ----------------------------------------------------------------------------------------
    def _param_dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def _conditioning(self, timestep: torch.Tensor, batch: int, dtype: torch.dtype):
        """(t_emb, per-block conditioning): :func:`layers.timestep_conditioning`."""
        tc = self.config.timestep_conditioning
        embedder, t_block = getattr(self, "timestep_embedder", None), getattr(self, "t_block", None)
        return timestep_conditioning(tc, embedder, t_block, timestep, batch, dtype)

    def _key_mask(self, mask: torch.Tensor | None, n_image: int) -> torch.Tensor | None:
        """Boolean (B,1,1,S) "may attend" key mask, or None when no text key is padded.

        A key-only boolean mask is all padding needs (every query sees the same keys), it costs
        S bytes per sample instead of an N x S float tensor, and returning None for unpadded
        batches lets SDPA pick the flash / memory-efficient kernels. The ``all()`` check is one
        host sync per forward, not per layer. Under ``torch.compile`` the check is skipped (it would
        break the graph in two): an all-True mask gives the same result.
        """
        if mask is None:
            return None
        keep = mask.to(torch.bool)
        if not torch.compiler.is_compiling() and bool(keep.all()):
            return None
        if self.config.attention == "self":
            keep = F.pad(keep, (0, n_image), value=True)  # image keys follow the text keys
        return keep[:, None, None, :]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        b, _, height, width = hidden_states.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch_size={p}")
        h, w = height // p, width // p
        # Inputs may arrive fp32 while the weights are bf16 (no autocast) or fp32 (autocast):
        # cast to the parameter dtype and let autocast, if active, pick the compute dtype.
        pdtype = self._param_dtype()
        x = self.patch_embed(hidden_states.to(pdtype))
        temb, cond = self._conditioning(timestep, b, x.dtype)
        if cfg.timestep_conditioning == "addition":
            x = x + temb[:, None]
        rope = None
        if cfg.pos_embed != "ape":
            rope = rope_tables(cfg.pos_embed, h, w, cfg.head_dim, cfg.rope_theta, x.device)
        text = self.context_embedder(encoder_hidden_states.to(pdtype))
        key_mask = self._key_mask(encoder_attention_mask, x.shape[1])
        for layer in self.layers:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(layer, x, cond, rope, text, key_mask)
            else:
                x = layer(x, cond, rope, text, key_mask)
        tc = cfg.timestep_conditioning
        x = self.proj_out(output_head(tc, self.norm_out, getattr(self, "scale_shift_table", None), x, temb))
        return unpatchify(x, h, w, p, cfg.out_channels)


# --------------------------------------------------------------------------------------------
def _validate(cfg: Any) -> None:
    """Reject option values the model cannot honour, with the allowed values in the message."""
    checks = [
        (cfg.attention in ATTENTIONS, f"attention must be one of {ATTENTIONS}"),
        (cfg.timestep_conditioning in CONDITIONINGS, f"timestep_conditioning must be one of {CONDITIONINGS}"),
        (cfg.pos_embed in POS_EMBEDS, f"pos_embed must be one of {POS_EMBEDS}"),
        (cfg.hidden_act in ACTIVATIONS, f"hidden_act must be one of {sorted(ACTIVATIONS)}"),
        (cfg.num_attention_heads % cfg.num_key_value_heads == 0, "num_attention_heads % num_key_value_heads != 0"),
        (cfg.pos_embed in ("ape", "1d-rope") or cfg.head_dim % 4 == 0, "2d/m-rope need head_dim % 4 == 0"),
        (cfg.head_dim % 2 == 0, "head_dim must be even"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"DiT config: {msg}")


def _defaults() -> dict[str, Any]:
    sig = inspect.signature(DiT.__init__)
    return {k: v.default for k, v in sig.parameters.items() if k != "self"}


def count_parameters(config: dict[str, Any]) -> int:
    """Trainable parameter count of ``DiT(**config)`` by formula, without building the model.

    ``config`` uses DiT's keyword names; missing keys take DiT's defaults (unknown keys such as
    diffusers' ``_class_name`` are ignored). The APE table is a buffer and is not counted.
    """
    c = {**_defaults(), **{k: v for k, v in dict(config).items() if not k.startswith("_")}}
    d, hd, heads, kv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    tc, cross, bias = c["timestep_conditioning"], c["attention"] == "cross", int(bool(c["attention_bias"]))

    def linear(i: int, o: int, with_bias: bool = True) -> int:
        return i * o + (o if with_bias else 0)

    q_o = linear(d, heads * hd, bias) + linear(heads * hd, d, bias)
    kv_proj = linear(d, kv * hd, bias)
    qk = 2 * hd if c["qk_norm"] else 0
    block = {"adaln-zero": linear(d, 6 * d) + d, "adaln-single": 6 * d + d}.get(tc, d)
    block += q_o + 2 * kv_proj + qk  # self_attn: q, o, k, v, norms
    block += q_o + 2 * kv_proj + qk if cross else 2 * kv_proj  # cross_attn, or text_k/text_v
    block += d  # post_attention_layernorm
    if c["sandwich_norm"]:
        block += 2 * d + (d if cross else 0)
    block += 3 * d * c["intermediate_size"]

    p, t = c["patch_size"], c["text_hidden_size"]
    total = c["num_layers"] * block
    total += c["in_channels"] * p * p * d + d  # patch conv
    total += t + linear(t, d)  # context embedder
    if tc is not None:
        total += linear(TIMESTEP_CHANNELS, d) + linear(d, d)
    if tc == "adaln-single":
        total += linear(d, 6 * d) + 2 * d
    total += linear(d, 2 * d) + d if tc == "adaln-zero" else d  # norm_out
    total += linear(d, p * p * c["out_channels"])
    return total
