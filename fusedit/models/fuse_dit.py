"""FuseDiT: a DiT whose layers share attention with the layers of a Gemma / Gemma-2 decoder.

Deep fusion instead of a frozen text encoder: LLM layer ``i`` and DiT layer ``i - initial_layers``
form one *shared layer* with a single attention over ``[text; image]``. Each side keeps its own
norms, projections and MLP (the LLM side uses the LLM layer's own weights), only the attention
is joint. The mask of that joint attention makes text rows causal over the text and blind to
the image, and lets image rows see all real text tokens and the whole image.

Because text rows never look at image columns, the text stream (LLM hidden states and every
shared layer's text keys/values) is a function of the prompt alone. This module exploits that
twice:

- The joint attention is computed as two attentions with identical results: the text rows
  (text-only, causal) inside :meth:`FuseDiT.encode_text`, and the image rows (over
  ``[text keys; image keys]``) inside the image stream. Softmax rows are independent, so this
  is the same function as one masked attention, without computing the text x image block that
  the mask discards, and with a frozen LLM the text stream builds no autograd graph at all.
- :meth:`FuseDiT.encode_text` returns a :class:`TextCache` of every shared layer's text
  keys/values; ``forward(..., text_cache=cache)`` skips the LLM. The uncached forward runs the
  very same two steps, so cached and uncached outputs are equal for every option.

Fixes relative to the formulation this was reproduced from: DiT layers without an LLM partner
(more DiT layers than LLM layers, or gaps in ``shared_attention_layers``) work instead of
crashing; "cross" with "1d-rope" works; the cache works for every option, including
"self" + "1d-rope", ``initial_layers > 0`` and several KV heads, and keeps the image position
offset (the original dropped it for 2d/m-RoPE; ``reference_cached_positions=True`` reproduces
that for sampling checkpoints the way they were sampled).

State-dict keys follow the original layout: ``llm.*`` is a transformers ``GemmaModel`` /
``Gemma2Model`` (``llm.norm`` is kept so pretrained weights load strictly, but is never used),
``dit.*`` holds the image side with the key names of :mod:`fusedit.models.dit` minus the text
key/value projections and the cross-attention key norm (the LLM layers provide the text keys).
One layout difference: only *paired* blocks of the "cross" variant own a ``cross_attn``; the
original builds one in every block, but configurations with unpaired blocks crash there, so
every configuration it can run has the same parameter set here.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .dit import ATTENTIONS, CONDITIONINGS, POS_EMBEDS
from .layers import (
    ACTIVATIONS,
    TIMESTEP_CHANNELS,
    AdaLNBlock,
    AdaLNOut,
    PatchEmbed,
    RMSNorm,
    RotaryTables,
    SelfAttention,
    apply_rope,
    attend,
    merge_heads,
    output_head,
    rope_tables,
    rope_tables_at,
    split_heads,
    timestep_conditioning,
    timestep_mlp,
    unpatchify,
)

LLM_TYPES = ("gemma", "gemma2")
_DROPPED_LLM_KEYS = ("transformers_version", "dtype", "torch_dtype")


# --------------------------------------------------------------------------------------------
# Text cache
# --------------------------------------------------------------------------------------------
@dataclass
class TextCache:
    """Everything the image stream needs from one batch of prompts; independent of image and t.

    ``keys``/``values`` have one entry per DiT layer: the paired LLM layer's text keys/values,
    (B, kv_heads, L, head_dim), or None for a DiT layer without an LLM partner. In "self" mode
    the keys are already rotated (text positions 0..L-1); in "cross" mode they are the raw
    projections (the cross-attention uses no RoPE). ``attention_mask`` is the (B, L) prompt
    mask (1 = real token, right padding); ``pooled_text`` the optional modulation input.
    """

    keys: tuple[torch.Tensor | None, ...]
    values: tuple[torch.Tensor | None, ...]
    attention_mask: torch.Tensor
    pooled_text: torch.Tensor | None
    attention: str

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    def _map(self, fn) -> TextCache:
        return replace(
            self,
            keys=tuple(None if k is None else fn(k) for k in self.keys),
            values=tuple(None if v is None else fn(v) for v in self.values),
            attention_mask=fn(self.attention_mask),
            pooled_text=None if self.pooled_text is None else fn(self.pooled_text),
        )

    def repeat_interleave(self, repeats: int) -> TextCache:
        """Each prompt ``repeats`` times in a row (several images per prompt)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    @classmethod
    def cat(cls, caches: list[TextCache]) -> TextCache:
        """Batch-concatenate caches of equal text length (e.g. conditional + unconditional for CFG)."""
        first = caches[0]
        if any(c.attention != first.attention or len(c.keys) != len(first.keys) for c in caches):
            raise ValueError("TextCache.cat: caches come from different model configurations")
        if len({c.attention_mask.shape[1] for c in caches}) != 1:
            raise ValueError("TextCache.cat: caches have different text lengths; pad the prompts alike")

        def join(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat(ts, dim=0)

        return cls(
            keys=tuple(join([c.keys[j] for c in caches]) for j in range(len(first.keys))),
            values=tuple(join([c.values[j] for c in caches]) for j in range(len(first.values))),
            attention_mask=torch.cat([c.attention_mask for c in caches], dim=0),
            pooled_text=join([c.pooled_text for c in caches]),
            attention=first.attention,
        )


# --------------------------------------------------------------------------------------------
# DiT side
# --------------------------------------------------------------------------------------------
class FusedSelfAttention(SelfAttention):
    """Image-query attention of a FuseDiT block (``self_attn``): q/k/v/o and optional q/k norms.

    The keys are ``[text; image]`` when the paired LLM layer's text keys/values are given (a
    shared layer in "self" mode) and image-only otherwise. The text keys are used as the LLM
    made them: the LLM never normalises its keys, so ``k_norm`` applies to image keys only,
    and in "self" mode they arrive already rotated with the text positions.
    """

    def __init__(
        self, dim: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool, bias: bool, eps: float
    ) -> None:
        super().__init__(dim, heads, kv_heads, head_dim, qk_norm, joint_text=False, bias=bias, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryTables | None,
        text_k: torch.Tensor | None = None,
        text_v: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.image_qkv(x, rope)
        if text_k is None:
            key_mask = None
        else:
            # the LLM may run in another dtype than the DiT (e.g. a bf16 LLM next to an fp32 DiT)
            k = torch.cat([text_k.to(k.dtype), k], dim=2)
            v = torch.cat([text_v.to(v.dtype), v], dim=2)
        return self.o_proj(merge_heads(attend(q, k, v, key_mask)))


class FusedCrossAttention(nn.Module):
    """Image-to-text attention of the "cross" variant (``cross_attn``): q_proj, o_proj, q_norm.

    Keys and values are the paired LLM layer's raw k/v projections (no RoPE, no key norm), so
    the module owns no key/value weights; GQA is handled by SDPA, never by repeating heads.
    """

    def __init__(
        self, dim: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool, bias: bool, eps: float
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)

    def forward(
        self, x: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.heads)
        if self.qk_norm:
            q = self.q_norm(q)
        return self.o_proj(merge_heads(attend(q, text_k.to(q.dtype), text_v.to(q.dtype), key_mask)))


class FuseDiTBlock(AdaLNBlock):
    """The DiT half of one layer, in the DiT's adaLN skeleton (layers.AdaLNBlock).

    Head geometry is the LLM's (the two halves meet in one attention). A block is *paired* when
    an LLM layer shares its attention; only paired blocks of the "cross" variant own a
    ``cross_attn``. Unpaired blocks run image-only self-attention: the image tokens already
    carry what earlier shared layers read from the text, and attending to a stale text prefix
    would tie the block to a layer it is not paired with.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        hidden_act: str,
        eps: float,
        bias: bool,
        conditioning: str | None,
        qk_norm: bool,
        sandwich_norm: bool,
        cross: bool,
    ) -> None:
        geometry = (dim, heads, kv_heads, head_dim, qk_norm, bias, eps)
        super().__init__(
            dim,
            eps,
            conditioning,
            sandwich_norm,
            lambda: FusedSelfAttention(*geometry),
            (lambda: FusedCrossAttention(*geometry)) if cross else None,
            intermediate_size,
            hidden_act,
        )

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None,
        rope: RotaryTables | None,
        text_k: torch.Tensor | None,
        text_v: torch.Tensor | None,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.cross:
            return self.residual(
                x, cond, lambda h: self.self_attn(h, rope), lambda r: self.cross_attn(r, text_k, text_v, key_mask)
            )
        return self.residual(x, cond, lambda h: self.self_attn(h, rope, text_k, text_v, key_mask), None)


class DiTTower(nn.Module):
    """The image side of FuseDiT (``dit.*``): embedders, blocks, output head. Trainable part."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        patch_size: int,
        dim: int,
        blocks: list[FuseDiTBlock],
        eps: float,
        conditioning: str | None,
        ape: bool,
        pos_embed_max_size: int,
        sample_size: int,
        text_modulation_embeds_dim: int | None,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(
            in_channels, dim, patch_size, pos_embed_max_size if ape else None, sample_size // patch_size
        )
        if conditioning is not None:
            self.timestep_embedder = timestep_mlp(dim, TIMESTEP_CHANNELS)
        if conditioning == "adaln-single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
            self.scale_shift_table = nn.Parameter(torch.randn(2 * dim) / dim**0.5)
        if text_modulation_embeds_dim is not None:
            t = text_modulation_embeds_dim
            self.condition_embedder = nn.Sequential(RMSNorm(t, eps), nn.Linear(t, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList(blocks)
        self.norm_out = AdaLNOut(dim, eps) if conditioning == "adaln-zero" else RMSNorm(dim, eps)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class FuseDiT(ModelMixin, ConfigMixin):
    """DiT deep-fused with a Gemma / Gemma-2 decoder (see the module docstring).

    ``forward(hidden_states (B,C,H,W), timestep (B,) in [0,1000], input_ids (B,L),
    attention_mask (B,L), pooled_text=None, text_cache=None) -> (B,out_channels,H,W)``;
    ``encode_text(input_ids, attention_mask, pooled_text=None) -> TextCache`` once per prompt
    batch lets sampling skip the LLM. The LLM is frozen after construction; see
    :meth:`set_trainable` and :meth:`from_llm`.

    Args:
        llm_config: the LLM's transformers config as a dict (``config.to_dict()``); model_type
            "gemma" or "gemma2" (PaliGemma's language model is a "gemma"). Head count, KV heads,
            head_dim, RoPE theta, norm eps, attention bias, activation and (by default) the MLP
            width of the DiT come from it: the two halves meet in one attention.
        hidden_size: DiT width; None = the LLM's hidden size.
        num_layers: DiT depth. DiT layer ``j`` pairs with LLM layer ``j + initial_layers`` when
            that layer is shared; other DiT layers run image-only.
        intermediate_size: DiT MLP width; None = the LLM's.
        attention: "self" (one joint attention per shared layer) or "cross" (the LLM attends
            text-only; the DiT attends image-only, then cross-attends to the LLM layer's raw k/v).
        qk_norm: RMSNorm on DiT queries/keys (never on the LLM's).
        sandwich_norm: extra norms on the attention/MLP outputs of DiT blocks.
        timestep_conditioning: "adaln-zero", "adaln-single", "addition" or None.
        pos_embed: "ape" (sin-cos APE on the image, RoPE on the text only), "1d-rope", "2d-rope"
            or "m-rope". In "self" mode image position ids start after the prompt's last real
            token (offset L - #pad per sample), text ids are 0..L-1 (pads included).
        pos_embed_max_size / sample_size: APE table size and base grid (as in the DiT).
        initial_layers: LLM layers that run alone (the plain transformers decoder layer) first.
        shared_attention_layers: "all" (every LLM layer from ``initial_layers`` on that has a DiT
            partner) or a list of LLM layer indices. The LLM is truncated after the last one.
        text_modulation_embeds_dim: width of a pooled text embedding added (through
            ``condition_embedder``) to the timestep embedding; None disables it.
        reference_cached_positions: when True, cached calls in "self" mode with 2d/m-RoPE drop
            the image position offset as the original sampler did (cached and uncached outputs
            then differ); only for sampling checkpoints trained and evaluated that way.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["FuseDiTBlock", "GemmaDecoderLayer", "Gemma2DecoderLayer"]

    @register_to_config
    def __init__(
        self,
        llm_config: dict[str, Any] | None = None,
        in_channels: int = 16,
        out_channels: int = 16,
        patch_size: int = 2,
        hidden_size: int | None = None,
        num_layers: int = 18,
        intermediate_size: int | None = None,
        attention: str = "self",
        qk_norm: bool = False,
        sandwich_norm: bool = False,
        timestep_conditioning: str | None = "adaln-zero",
        pos_embed: str = "1d-rope",
        pos_embed_max_size: int = 64,
        sample_size: int = 32,
        initial_layers: int = 0,
        shared_attention_layers: str | list[int] = "all",
        text_modulation_embeds_dim: int | None = None,
        reference_cached_positions: bool = False,
    ) -> None:
        super().__init__()
        full_llm = _llm_config_object(llm_config)
        self._shared = _validate(self.config, full_llm)
        num_llm_layers = self._shared[-1] + 1
        llm_cfg = _llm_config_object(llm_config, num_llm_layers)
        self._gemma2 = llm_cfg.model_type == "gemma2"
        self._heads = llm_cfg.num_attention_heads
        self._kv_heads = llm_cfg.num_key_value_heads
        self._head_dim = llm_cfg.head_dim
        self._theta = _rope_theta(llm_cfg)
        self._llm_hidden = llm_cfg.hidden_size
        self._initializer_range = llm_cfg.initializer_range
        # _pairs[j]: the LLM layer sharing DiT layer j's attention, or None
        self._pairs = tuple(
            j + initial_layers if j + initial_layers in self._shared else None for j in range(num_layers)
        )
        self.gradient_checkpointing = False

        # transformers is imported lazily: importing fusedit.models stays cheap for DiT-only users
        from transformers import Gemma2Model, GemmaModel

        self.llm = (Gemma2Model if self._gemma2 else GemmaModel)(llm_cfg)
        self.llm.requires_grad_(False)

        dim = hidden_size or llm_cfg.hidden_size
        eps = llm_cfg.rms_norm_eps
        blocks = [
            FuseDiTBlock(
                dim,
                self._heads,
                self._kv_heads,
                self._head_dim,
                intermediate_size or llm_cfg.intermediate_size,
                _llm_activation(llm_cfg),
                eps,
                llm_cfg.attention_bias,
                timestep_conditioning,
                qk_norm,
                sandwich_norm,
                cross=attention == "cross" and pair is not None,
            )
            for pair in self._pairs
        ]
        self.dit = DiTTower(
            in_channels=in_channels,
            out_channels=out_channels,
            patch_size=patch_size,
            dim=dim,
            blocks=blocks,
            eps=eps,
            conditioning=timestep_conditioning,
            ape=pos_embed == "ape",
            pos_embed_max_size=pos_embed_max_size,
            sample_size=sample_size,
            text_modulation_embeds_dim=text_modulation_embeds_dim,
        )
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """DiT-side initialisation as in :class:`fusedit.models.dit.DiT` (output exactly 0, blocks
        identities at step 0). The LLM keeps its own (pretrained, via :meth:`from_llm`) weights."""
        std = self._initializer_range
        tc = self.config.timestep_conditioning
        dit = self.dit
        for m in dit.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.zeros_(m.weight)
        if tc == "adaln-zero":
            for layer in dit.layers:
                nn.init.zeros_(layer.input_layernorm.linear.weight)
                nn.init.zeros_(layer.input_layernorm.linear.bias)
            nn.init.zeros_(dit.norm_out.linear.weight)
            nn.init.zeros_(dit.norm_out.linear.bias)
        elif tc == "adaln-single":
            nn.init.normal_(dit.t_block[1].weight, std=std)
        w = dit.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(dit.patch_embed.proj.bias)
        if tc is not None:
            nn.init.normal_(dit.timestep_embedder[0].weight, std=std)
            nn.init.normal_(dit.timestep_embedder[2].weight, std=std)
        if self.config.text_modulation_embeds_dim is not None:
            nn.init.normal_(dit.condition_embedder[1].weight, std=std)
            nn.init.normal_(dit.condition_embedder[3].weight, std=std)
        nn.init.zeros_(dit.proj_out.weight)
        nn.init.zeros_(dit.proj_out.bias)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_llm(cls, llm: str | os.PathLike | nn.Module, **kwargs: Any) -> FuseDiT:
        """Build a FuseDiT around pretrained LLM weights.

        Args:
            llm: a transformers folder or hub id (Gemma, Gemma-2, a causal-LM checkpoint of either,
                or PaliGemma, whose language model is taken), or a loaded module containing a
                ``GemmaModel``/``Gemma2Model``.
            **kwargs: the other constructor arguments.

        Returns:
            The model with ``llm`` holding the first ``max(shared) + 1`` pretrained layers (frozen)
            and a freshly initialised DiT side.
        """
        source = _find_llm(llm)
        model = cls(llm_config=_clean_llm_config(source.config.to_dict()), **kwargs)
        state = source.state_dict()
        own = model.llm.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"FuseDiT.from_llm: the LLM lacks {len(missing)} weights, e.g. {missing[:3]}")
        model.llm.load_state_dict({k: state[k] for k in own}, strict=True)
        return model

    def unused_llm_parameter_names(self) -> set[str]:
        """LLM parameters that cannot influence the output (names relative to ``llm``).

        ``llm.norm`` is never applied, and of the last (shared) LLM layer only the input norm
        and the key/value projections matter: its attention output and MLP would only feed
        layers that do not exist. They are computed nowhere and must stay out of optimisers
        (an unused parameter breaks DDP's gradient reducer).
        """
        last = len(self.llm.layers) - 1
        keep = ("input_layernorm.", "self_attn.k_proj.", "self_attn.v_proj.")
        names = set()
        for name, _ in self.llm.named_parameters():
            if name.startswith("norm."):
                names.add(name)
            elif name.startswith(f"layers.{last}.") and not name[len(f"layers.{last}.") :].startswith(keep):
                names.add(name)
        return names

    def set_trainable(self, train_dit: bool = True, train_llm: bool = False) -> list[nn.Parameter]:
        """Set ``requires_grad`` on the two sides and return the parameters an optimiser should hold.

        Args:
            train_dit: train the DiT side (``dit.*``).
            train_llm: train the LLM side, except :meth:`unused_llm_parameter_names`, which stay frozen.

        Returns:
            The parameters with ``requires_grad`` set, in ``named_parameters`` order.
        """
        self.dit.requires_grad_(train_dit)
        unused = self.unused_llm_parameter_names()
        for name, p in self.llm.named_parameters():
            p.requires_grad_(train_llm and name not in unused)
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that currently require gradients."""
        return [p for p in self.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(hidden), as Gemma does (newer transformers scale inside
        the embedding module, older ones in the model's forward, which is not called here)."""
        emb = self.llm.embed_tokens
        h = emb(input_ids)
        if getattr(emb, "embed_scale", None) is None:
            h = h * torch.tensor(self._llm_hidden**0.5, dtype=h.dtype)
        return h

    def _text_attention_layer(
        self,
        layer: nn.Module,
        h: torch.Tensor,
        rope: RotaryTables,
        full: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The LLM half of a shared layer: (next hidden states or None, cached keys, values).

        The text rows of the joint attention: causal over the text, 1/sqrt(head_dim) scaling,
        no soft-capping and no sliding window even for Gemma-2 (the joint attention of the
        original is a plain SDPA). A causal mask is the whole mask: with right padding every
        pad key sits after every real query, and what pad rows compute is never read (their
        keys are masked for image rows). ``full=False`` stops after the key/value projections:
        in the last layer nothing reads the text stream's output.
        """
        attn = layer.self_attn
        n = layer.input_layernorm(h)
        k = split_heads(attn.k_proj(n), self._kv_heads)
        v = split_heads(attn.v_proj(n), self._kv_heads)
        k_rot = apply_rope(k, rope)
        cached_k = k_rot if self.config.attention == "self" else k
        if not full:
            return None, cached_k, v
        q = apply_rope(split_heads(attn.q_proj(n), self._heads), rope)
        o = F.scaled_dot_product_attention(q, k_rot, v, is_causal=True, enable_gqa=self._heads != self._kv_heads)
        o = attn.o_proj(merge_heads(o))
        if self._gemma2:
            o = layer.post_attention_layernorm(o)
        h = h + o
        m = layer.pre_feedforward_layernorm(h) if self._gemma2 else layer.post_attention_layernorm(h)
        m = layer.mlp(m)
        if self._gemma2:
            m = layer.post_feedforward_layernorm(m)
        return h + m, cached_k, v

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pooled_text: torch.Tensor | None = None,
    ) -> TextCache:
        """Run the text stream once: the per-layer text keys/values every denoising step reuses.

        Args:
            input_ids: (B, L) token ids, right-padded, at least one real token each.
            attention_mask: (B, L), 1 for real tokens; None = nothing padded.
            pooled_text: (B, text_modulation_embeds_dim) or None; stored for later calls.

        Returns:
            A :class:`TextCache`; pass it as ``text_cache`` to :meth:`forward`.
        """
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        device = input_ids.device
        keep = attention_mask.to(torch.bool)
        # one host sync: right padding (positions assume it) and a real first token (an empty
        # prompt would leave cross-attention rows with no key at all); Gemma prompts start with BOS
        if not torch.compiler.is_compiling() and bool((keep[:, 1:] & ~keep[:, :-1]).any() | (~keep[:, 0]).any()):
            raise ValueError("attention_mask must be right-padded with at least one real token per prompt")
        h = self._embed(input_ids)
        pos = torch.arange(length, device=device)
        rope = rope_tables_at("1d-rope", pos, None, self._head_dim, self._theta)
        hf_args = None
        keys: list[torch.Tensor | None] = [None] * len(self._pairs)
        values: list[torch.Tensor | None] = [None] * len(self._pairs)
        last = len(self.llm.layers) - 1
        for i, layer in enumerate(self.llm.layers):
            if i in self._shared:
                out, k, v = self._text_attention_layer(layer, h, rope, full=i < last)
                j = i - self.config.initial_layers
                keys[j], values[j] = k, v
                if out is not None:
                    h = out
            else:
                if hf_args is None:
                    # LLM-only layers go through transformers itself (Gemma-2 soft-capping and
                    # scaling included); causal suffices (see _text_attention_layer), given as an
                    # additive mask every backend accepts, so no sliding window applies either
                    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
                    additive = torch.zeros(length, length, dtype=h.dtype, device=device)
                    additive = additive.masked_fill(~causal, torch.finfo(h.dtype).min)
                    position_ids = pos[None].expand(b, -1)
                    hf_args = dict(
                        attention_mask=additive.expand(b, 1, length, length),
                        position_ids=position_ids,
                        position_embeddings=self.llm.rotary_emb(h, position_ids),
                    )
                out = layer(h, **hf_args)
                h = out[0] if isinstance(out, tuple) else out
        return TextCache(tuple(keys), tuple(values), attention_mask, pooled_text, self.config.attention)

    # ----------------------------------------------------------------------------------------
    def _param_dtype(self) -> torch.dtype:
        return self.dit.patch_embed.proj.weight.dtype

    def _conditioning(self, timestep: torch.Tensor, batch: int, dtype: torch.dtype, pooled: torch.Tensor | None):
        """(embedding for the head, per-block conditioning), as in the DiT; the pooled text is
        added to the timestep embedding before ``t_block``, and the adaLN-single head uses the
        embedding from before ``t_block``."""
        d = self.dit
        extra = d.condition_embedder(pooled.to(dtype)) if self.config.text_modulation_embeds_dim is not None else None
        embedder, t_block = getattr(d, "timestep_embedder", None), getattr(d, "t_block", None)
        return timestep_conditioning(
            self.config.timestep_conditioning, embedder, t_block, timestep, batch, dtype, extra
        )

    def _image_rope(
        self, h: int, w: int, real_len: torch.Tensor, cached: bool, device: torch.device
    ) -> RotaryTables | None:
        """Image rotary tables: (S, hd), or (B, 1, S, hd) when ids carry the per-sample offset.

        Only "self" mode needs the offset (image and text share one attention); image-only
        attention is invariant to a common shift of all ids, so "cross" mode uses plain grids.
        """
        kind, cfg = self.config.pos_embed, self.config
        if kind == "ape":
            return None
        drop = cached and cfg.reference_cached_positions and kind in ("2d-rope", "m-rope")
        if cfg.attention == "cross" or drop:
            return rope_tables(kind, h, w, self._head_dim, self._theta, device)
        idx = torch.arange(h * w, device=device)
        off = real_len.to(device)[:, None]
        if kind == "1d-rope":
            cos, sin = rope_tables_at(kind, idx[None] + off, None, self._head_dim, self._theta)
        else:
            rows, cols = idx // w, idx % w
            cos, sin = rope_tables_at(kind, rows[None] + off, cols[None] + off, self._head_dim, self._theta)
        return cos[:, None], sin[:, None]

    def _key_mask(self, attention_mask: torch.Tensor, n_image: int) -> torch.Tensor | None:
        """Boolean (B,1,1,keys) "may attend" mask for the image queries, or None when no text key
        is padded (one host sync per forward; skipped under torch.compile)."""
        keep = attention_mask.to(torch.bool)
        if not torch.compiler.is_compiling() and bool(keep.all()):
            return None
        if self.config.attention == "self":
            keep = F.pad(keep, (0, n_image), value=True)
        return keep[:, None, None, :]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pooled_text: torch.Tensor | None = None,
        text_cache: TextCache | None = None,
    ) -> torch.Tensor:
        """Predict the flow/noise target for a batch of latents.

        Args:
            hidden_states: (B, C, H, W) latents.
            timestep: (B,) or scalar, in [0, 1000].
            input_ids: (B, L) prompt tokens (right-padded); unused when ``text_cache`` is given.
            attention_mask: (B, L), 1 for real tokens; the cache carries its own.
            pooled_text: (B, text_modulation_embeds_dim) when that option is set; overrides the
                one stored in the cache.
            text_cache: the output of :meth:`encode_text` for these prompts; skips the LLM.

        Returns:
            (B, out_channels, H, W).
        """
        cfg = self.config
        cached = text_cache is not None
        if cached:
            if text_cache.attention != cfg.attention or len(text_cache.keys) != len(self._pairs):
                raise ValueError("text_cache was made by a differently configured model")
            if attention_mask is not None and attention_mask.shape != text_cache.attention_mask.shape:
                raise ValueError("attention_mask does not match the text_cache")
        else:
            if input_ids is None:
                raise ValueError("FuseDiT.forward needs input_ids or text_cache")
            text_cache = self.encode_text(input_ids, attention_mask)
        pooled = pooled_text if pooled_text is not None else text_cache.pooled_text
        if cfg.text_modulation_embeds_dim is not None and pooled is None:
            raise ValueError("pooled_text is required when text_modulation_embeds_dim is set")
        if cfg.text_modulation_embeds_dim is None and pooled is not None:
            raise ValueError("pooled_text given but text_modulation_embeds_dim is None")

        b, _, height, width = hidden_states.shape
        if text_cache.batch_size != b:
            raise ValueError(f"text batch {text_cache.batch_size} != image batch {b}")
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch_size={p}")
        h, w = height // p, width // p
        x = self.dit.patch_embed(hidden_states.to(self._param_dtype()))
        temb, cond = self._conditioning(timestep, b, x.dtype, pooled)
        if cfg.timestep_conditioning == "addition":
            x = x + temb[:, None]
        mask = text_cache.attention_mask
        rope = self._image_rope(h, w, mask.sum(-1), cached, x.device)
        key_mask = self._key_mask(mask, x.shape[1])
        for layer, k, v in zip(self.dit.layers, text_cache.keys, text_cache.values):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(layer, x, cond, rope, k, v, key_mask)
            else:
                x = layer(x, cond, rope, k, v, key_mask)
        tc, d = cfg.timestep_conditioning, self.dit
        x = d.proj_out(output_head(tc, d.norm_out, getattr(d, "scale_shift_table", None), x, temb))
        return unpatchify(x, h, w, p, cfg.out_channels)


# --------------------------------------------------------------------------------------------
# Configuration helpers
# --------------------------------------------------------------------------------------------
def _clean_llm_config(d: dict[str, Any]) -> dict[str, Any]:
    """A transformers config dict reduced to what rebuilds the architecture (JSON-safe)."""
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in _DROPPED_LLM_KEYS}


def _llm_config_object(llm_config: dict[str, Any] | None, num_layers: int | None = None):
    """The transformers config for ``llm_config``, optionally truncated to ``num_layers`` layers."""
    from transformers import Gemma2Config, GemmaConfig

    if not isinstance(llm_config, dict):
        raise ValueError("FuseDiT config: llm_config must be a dict (a transformers config's to_dict())")
    model_type = llm_config.get("model_type")
    if model_type not in LLM_TYPES:
        raise ValueError(f"FuseDiT config: llm_config model_type must be one of {LLM_TYPES}, got {model_type!r}")
    d = _clean_llm_config(llm_config)
    # the text stream is always causal, as in the original, also for PaliGemma's language model
    # (whose config asks for bidirectional attention over its prefix)
    d["use_bidirectional_attention"] = False
    if num_layers is not None:
        d["num_hidden_layers"] = num_layers
        if d.get("layer_types"):
            d["layer_types"] = list(d["layer_types"])[:num_layers]
    return (Gemma2Config if model_type == "gemma2" else GemmaConfig).from_dict(d)


def _rope_theta(llm_cfg: Any) -> float:
    params = getattr(llm_cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(llm_cfg.rope_theta)


def _rope_type(llm_cfg: Any) -> str:
    params = getattr(llm_cfg, "rope_parameters", None) or getattr(llm_cfg, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def _llm_activation(llm_cfg: Any) -> str:
    if llm_cfg.model_type == "gemma2":
        return getattr(llm_cfg, "hidden_activation", None) or llm_cfg.hidden_act
    return llm_cfg.hidden_act


def _validate(cfg: Any, llm_cfg: Any) -> tuple[int, ...]:
    """Reject option values the model cannot honour; return the sorted shared LLM layer indices.

    Every message starts with the option's name.
    """

    def fail(msg: str) -> None:
        raise ValueError(f"FuseDiT config: {msg}")

    if cfg.attention not in ATTENTIONS:
        fail(f"attention must be one of {ATTENTIONS}, got {cfg.attention!r}")
    if cfg.timestep_conditioning not in CONDITIONINGS:
        fail(f"timestep_conditioning must be one of {CONDITIONINGS}, got {cfg.timestep_conditioning!r}")
    if cfg.pos_embed not in POS_EMBEDS:
        fail(f"pos_embed must be one of {POS_EMBEDS}, got {cfg.pos_embed!r}")
    hd = llm_cfg.head_dim
    if hd % 2:
        fail(f"llm_config head_dim must be even, got {hd}")
    if cfg.pos_embed in ("2d-rope", "m-rope") and hd % 4:
        fail(f"pos_embed {cfg.pos_embed!r} needs head_dim % 4 == 0, got head_dim={hd}")
    if _rope_type(llm_cfg) != "default":
        fail(f"llm_config rope type must be 'default', got {_rope_type(llm_cfg)!r}")
    if _llm_activation(llm_cfg) not in ACTIVATIONS:
        fail(f"llm_config activation must be one of {sorted(ACTIVATIONS)}")
    if llm_cfg.num_attention_heads % llm_cfg.num_key_value_heads:
        fail("llm_config num_attention_heads % num_key_value_heads != 0")
    if cfg.num_layers < 1:
        fail(f"num_layers must be >= 1, got {cfg.num_layers}")
    for name in ("hidden_size", "intermediate_size", "text_modulation_embeds_dim"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            fail(f"{name} must be a positive int or None, got {value!r}")
    if cfg.text_modulation_embeds_dim is not None and cfg.timestep_conditioning is None:
        fail("text_modulation_embeds_dim needs a timestep_conditioning (it modulates the timestep embedding)")
    n_llm, first = llm_cfg.num_hidden_layers, cfg.initial_layers
    if not isinstance(first, int) or not 0 <= first < n_llm:
        fail(f"initial_layers must be in [0, {n_llm}) for an LLM of {n_llm} layers, got {first!r}")
    shared = cfg.shared_attention_layers
    if shared == "all":
        return tuple(range(first, min(n_llm, first + cfg.num_layers)))
    if isinstance(shared, str) or not all(isinstance(i, int) for i in shared):
        fail(f"shared_attention_layers must be 'all' or a list of LLM layer indices, got {shared!r}")
    if len(shared) == 0:
        fail("shared_attention_layers must name at least one layer")
    if len(set(shared)) != len(shared):
        fail(f"shared_attention_layers has duplicates: {list(shared)}")
    for i in shared:
        if i >= n_llm:
            fail(f"shared_attention_layers index {i} is beyond the LLM's {n_llm} layers")
        if i < first:
            fail(f"shared_attention_layers index {i} is below initial_layers={first} (those run alone)")
        if i - first >= cfg.num_layers:
            fail(
                f"shared_attention_layers index {i} pairs with DiT layer {i - first}, "
                f"beyond num_layers={cfg.num_layers}"
            )
    return tuple(sorted(shared))


def shared_llm_layers(config: dict[str, Any]) -> tuple[int, ...]:
    """The sorted LLM layer indices that share an attention with a DiT layer, for a saved FuseDiT config.

    For readers that must not build the model (the FLOP count of the trainer's log, the planner).
    """
    from types import SimpleNamespace

    defaults = {k: v.default for k, v in inspect.signature(FuseDiT.__init__).parameters.items() if k != "self"}
    cfg = SimpleNamespace(**{**defaults, **{k: v for k, v in config.items() if k in defaults}})
    return _validate(cfg, _llm_config_object(cfg.llm_config))


def _find_llm(llm: str | os.PathLike | nn.Module) -> nn.Module:
    """The GemmaModel / Gemma2Model inside ``llm`` (a module, or a folder / hub id to load)."""
    from transformers import AutoModel, Gemma2Model, GemmaModel

    module = llm if isinstance(llm, nn.Module) else AutoModel.from_pretrained(llm)
    for m in module.modules():
        if isinstance(m, (GemmaModel, Gemma2Model)):
            return m
    raise ValueError(f"no Gemma / Gemma-2 decoder found in {type(module).__name__}")


def fuse_dit_parameter_counts(config: dict[str, Any]) -> dict[str, int]:
    """Parameter counts ``{"dit": ..., "llm": ...}`` of ``FuseDiT(**config)`` from a meta-device build.

    Nothing is allocated, so real sizes (billions of parameters) are counted instantly; keys
    starting with "_" (diffusers bookkeeping) are ignored. The LLM count is of the truncated LLM
    and includes its unused final norm (it exists in the checkpoint).
    """
    kwargs = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = FuseDiT(**kwargs)
    return {
        "dit": sum(p.numel() for p in model.dit.parameters()),
        "llm": sum(p.numel() for p in model.llm.parameters()),
    }
