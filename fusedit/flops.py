"""Matmul FLOPs of the text-to-image step, shared by the trainer's MFU log, the planner and the bench.

Counting convention (the one MFU papers use): ``2*m*n*k`` per matmul, attention scores and values
included, element-wise work excluded; a training step is the DiT forward plus a backward of twice
its FLOPs, plus the forward of each frozen encoder that really ran (none with the caches).
Recompute under gradient checkpointing is hardware work, not model work, and is not counted.
"""

from __future__ import annotations

from typing import Any


def matmul_flops(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def dit_forward_flops(kw: dict[str, Any], n_image: int, n_text: int) -> tuple[int, int]:
    """(whole forward, blocks only) matmul FLOPs of one sample through ``DiT(**kw)``.

    "self" attention: N image queries over L text + N image keys; text keys/values are projected
    per layer from the context-embedded text. "cross": image self-attention (N x N) plus a
    cross-attention (N x L). Per-sample conditioning matmuls (adaLN, timestep MLP) are one row each.
    """
    from fusedit.models.dit import TIMESTEP_CHANNELS

    d, c_in, c_out, p = kw["hidden_size"], kw["in_channels"], kw["out_channels"], kw["patch_size"]
    q_dim = kw["num_attention_heads"] * kw["head_dim"]
    kv_dim = kw["num_key_value_heads"] * kw["head_dim"]
    n, length, tc = n_image, n_text, kw["timestep_conditioning"]
    image_attn = 2 * matmul_flops(n, d, q_dim) + 2 * matmul_flops(n, d, kv_dim)  # q, o, k, v
    text_kv = 2 * matmul_flops(length, d, kv_dim)
    if kw["attention"] == "self":
        block = image_attn + text_kv + 2 * 2 * n * (n + length) * q_dim
    else:
        block = image_attn + 4 * n * n * q_dim + 2 * matmul_flops(n, d, q_dim) + text_kv + 4 * n * length * q_dim
    block += 3 * matmul_flops(n, d, kw["intermediate_size"])
    if tc == "adaln-zero":
        block += matmul_flops(1, d, 6 * d)
    blocks = kw["num_layers"] * block
    outside = (
        matmul_flops(n, c_in * p * p, d)
        + matmul_flops(length, kw["text_hidden_size"], d)
        + matmul_flops(n, d, p * p * c_out)
    )
    if tc is not None:
        outside += matmul_flops(1, TIMESTEP_CHANNELS, d) + matmul_flops(1, d, d)
    outside += {"adaln-zero": matmul_flops(1, d, 2 * d), "adaln-single": matmul_flops(1, d, 6 * d)}.get(tc, 0)
    return blocks + outside, blocks


def text_encoder_forward_flops(arch: dict[str, int], n_text: int) -> int:
    """Matmul FLOPs of one prompt through a decoder-only LLM with a gated MLP (Gemma/LLaMA).

    The attention is counted over the full L x L square: the encoder runs with a key-padding
    mask, so the kernels compute the masked half too. No LM head (AutoModel is the decoder stack).
    """
    h, length = arch["hidden_size"], n_text
    q_dim = arch["num_attention_heads"] * arch["head_dim"]
    kv_dim = arch["num_key_value_heads"] * arch["head_dim"]
    layer = 2 * matmul_flops(length, h, q_dim) + 2 * matmul_flops(length, h, kv_dim) + 2 * 2 * length * length * q_dim
    layer += 3 * matmul_flops(length, h, arch["intermediate_size"])
    return arch["num_hidden_layers"] * layer


def decoder_arch(config: Any) -> dict[str, int] | None:
    """The fields the FLOP formula needs from a decoder-only LLM config (Gemma/LLaMA naming);
    None for other architectures, whose FLOPs are then reported as unknown."""
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    if not all(getattr(config, n, None) for n in names):
        return None
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "intermediate_size": int(config.intermediate_size),
    }


def clip_text_arch(config: Any) -> dict[str, int]:
    """The fields :func:`clip_text_forward_flops` needs from a ``CLIPTextConfig`` (or its dict)."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name)
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "projection_dim")
    return {name: int(get(name)) for name in names}


def clip_text_forward_flops(arch: dict[str, int], n_text: int) -> int:
    """Matmul FLOPs of one prompt through a CLIP text model with projection (the "fuse-dit-clip" type).

    Prompts are padded to CLIP's context (77 tokens, as the reference does), so every layer
    computes all ``n_text`` rows: q/k/v/o projections, the full L x L attention square, a two-matmul
    MLP; then the projection of the one pooled (EOS) row.
    """
    h, length = arch["hidden_size"], n_text
    layer = 4 * matmul_flops(length, h, h) + 2 * 2 * length * length * h
    layer += 2 * matmul_flops(length, h, arch["intermediate_size"])
    return arch["num_hidden_layers"] * layer + matmul_flops(1, h, arch["projection_dim"])


def _fuse_dit_geometry(config: dict[str, Any]) -> dict[str, Any]:
    """Sizes a FuseDiT's FLOPs depend on: the attention's are the LLM's, the widths the DiT side's."""
    llm = config["llm_config"]
    heads = llm["num_attention_heads"]
    head_dim = llm.get("head_dim") or llm["hidden_size"] // heads
    return {
        "heads": heads,
        "kv_heads": llm["num_key_value_heads"],
        "head_dim": head_dim,
        "d": config.get("hidden_size") or llm["hidden_size"],
        "inter": config.get("intermediate_size") or llm["intermediate_size"],
    }


def fuse_dit_layer_flops(config: dict[str, Any], n_image: int, n_text: int) -> int:
    """Forward matmul FLOPs of one sample through a FuseDiT's DiT layers (what gradient
    checkpointing recomputes): see :func:`fuse_dit_forward_flops` for the attention rule."""
    from fusedit.models.fuse_dit import shared_llm_layers

    g = _fuse_dit_geometry(config)
    d, n, length = g["d"], n_image, n_text
    q_dim, kv_dim = g["heads"] * g["head_dim"], g["kv_heads"] * g["head_dim"]
    shared, initial = shared_llm_layers(config), config.get("initial_layers", 0)
    tc, cross = config.get("timestep_conditioning"), config["attention"] == "cross"
    projections = 2 * matmul_flops(n, d, q_dim) + 2 * matmul_flops(n, d, kv_dim)  # q, o, k, v
    common = projections + 3 * matmul_flops(n, d, g["inter"]) + (matmul_flops(1, d, 6 * d) if tc == "adaln-zero" else 0)
    total = 0
    for j in range(config["num_layers"]):
        if j + initial not in shared:
            total += common + 4 * n * n * q_dim
        elif cross:
            total += common + 4 * n * n * q_dim + 2 * matmul_flops(n, d, q_dim) + 4 * n * length * q_dim
        else:
            total += common + 4 * n * (n + length) * q_dim
    return total


def fuse_dit_llm_arch(config: dict[str, Any]) -> dict[str, int]:
    """The decoder geometry of the LLM layers a FuseDiT runs (initial and shared ones; it is cut
    after the last shared layer), in :func:`text_encoder_forward_flops`'s naming."""
    from fusedit.models.fuse_dit import shared_llm_layers

    llm, g = config["llm_config"], _fuse_dit_geometry(config)
    return {
        "hidden_size": llm["hidden_size"],
        "num_hidden_layers": shared_llm_layers(config)[-1] + 1,
        "num_attention_heads": g["heads"],
        "num_key_value_heads": g["kv_heads"],
        "head_dim": g["head_dim"],
        "intermediate_size": llm["intermediate_size"],
    }


def fuse_dit_llm_flops(config: dict[str, Any], n_text: int) -> int:
    """Forward matmul FLOPs of a FuseDiT's LLM side for one prompt of ``n_text`` tokens.

    Every layer but the last runs whole (attention over the full L x L square, as for a text
    encoder); of the last shared layer only the key/value projections run, because nothing reads
    its queries, attention output or MLP.
    """
    arch = fuse_dit_llm_arch(config)
    kv_dim = arch["num_key_value_heads"] * arch["head_dim"]
    whole = text_encoder_forward_flops({**arch, "num_hidden_layers": arch["num_hidden_layers"] - 1}, n_text)
    return whole + 2 * matmul_flops(n_text, arch["hidden_size"], kv_dim)


def fuse_dit_forward_flops(config: dict[str, Any], n_image: int, n_text: int) -> tuple[int, int]:
    """(DiT side, LLM side) forward matmul FLOPs of one sample through a saved FuseDiT ``config``.

    The LLM side is the decoder layers the model runs (initial and shared ones; the text rows
    never attend to the image; see :func:`fuse_dit_llm_flops`). The DiT side: in a shared "self"
    layer the N image queries attend over the L text keys (the LLM layer's) and the N image keys;
    in a "cross" layer the image self-attends (N x N) and then cross-attends (N x L) with its own
    query/output projections; an unpaired DiT layer attends over the image only. Per-sample conditioning
    matmuls are one row each.
    """
    from fusedit.models.dit import TIMESTEP_CHANNELS

    d, n, tc = _fuse_dit_geometry(config)["d"], n_image, config.get("timestep_conditioning")
    llm_flops = fuse_dit_llm_flops(config, n_text)
    dit = fuse_dit_layer_flops(config, n_image, n_text)
    p, c_in, c_out = config["patch_size"], config["in_channels"], config["out_channels"]
    dit += matmul_flops(n, c_in * p * p, d) + matmul_flops(n, d, p * p * c_out)
    if tc is not None:
        dit += matmul_flops(1, TIMESTEP_CHANNELS, d) + matmul_flops(1, d, d)
    dit += {"adaln-zero": matmul_flops(1, d, 2 * d), "adaln-single": matmul_flops(1, d, 6 * d)}.get(tc, 0)
    return dit, llm_flops


class TrainingFlops:
    """Model FLOPs of one training sample as a function of its batch's padded text length.

    ``text_arch`` is None when the text encoder does not run per step (text-feature cache) or its
    architecture is unknown; ``vae_encoder_flops`` is 0 with a latent cache. ``clip_flops``: the
    per-sample forward of a "fuse-dit-clip" model's CLIP text encoder (fixed length), else 0.
    """

    def __init__(
        self,
        dit_kwargs: dict[str, Any],
        image_tokens: int,
        text_arch: dict[str, int] | None,
        vae_encoder_flops: int,
        clip_flops: int = 0,
    ) -> None:
        self.dit_kwargs, self.image_tokens = dit_kwargs, image_tokens
        self.text_arch, self.vae_encoder_flops = text_arch, vae_encoder_flops
        self.clip_flops = clip_flops
        self._cache: dict[int, int] = {}

    def per_sample(self, text_tokens: int) -> int:
        """DiT forward + backward (3x forward) + frozen encoders' forward, for one sample.

        A FuseDiT's LLM counts once (forward) when frozen and three times when trained
        (``train_llm``, read from the config dict the trainer passes as ``dit_kwargs``).
        """
        if text_tokens not in self._cache and self.dit_kwargs.get("_class_name") == "FuseDiT":
            dit, llm = fuse_dit_forward_flops(self.dit_kwargs, self.image_tokens, text_tokens)
            llm_passes = 3 if self.dit_kwargs.get("train_llm") else 1
            self._cache[text_tokens] = 3 * dit + llm_passes * llm + self.vae_encoder_flops + self.clip_flops
        if text_tokens not in self._cache:
            fwd, _ = dit_forward_flops(self.dit_kwargs, self.image_tokens, text_tokens)
            text = text_encoder_forward_flops(self.text_arch, text_tokens) if self.text_arch else 0
            self._cache[text_tokens] = 3 * fwd + text + self.vae_encoder_flops
        return self._cache[text_tokens]
