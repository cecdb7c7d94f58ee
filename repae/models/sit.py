"""The class-conditional SiT of the REPA-E stage (REPAE-2.1 to REPAE-2.8), with its REPA projectors and BN.

Why this shape: the joint-tuning recipe needs three things from the diffusion transformer besides
the velocity prediction, and they live here so trainer, sampler and exporter agree on them:

* REPA projectors read the hidden state after block ``encoder_depth`` (1-based). The VAE's
  alignment pass only needs those features, so ``align_only=True`` stops there and returns no
  output (the reference still ran the final layer on block-8 features; REPAE-D14).
* A non-affine ``BatchNorm2d`` (``bn``) turns raw VAE latents into the normalised space the SiT
  sees. In train mode it tracks the drifting latent distribution; in eval mode it is a fixed
  affine map that gradients pass through, which is how the frozen SiT sends REPA gradients into
  the VAE. ``init_bn`` / ``latents_stats`` / ``denormalize`` all use the *same* eps as the
  normalisation, so ``denormalize(normalize(z)) == z`` (the reference mixed eps and no eps;
  REPAE-D7).
* The state-dict keys equal the reference layout (REPAE-2.8), so released checkpoints load with
  ``strict=True`` (``load_reference_sit`` reads them without full unpickling).

Other reference defects fixed: SiT-S builds (final layer width = hidden size), ``encoder_depth``
outside [1, depth] and wrongly sized inputs raise a clear ``ValueError`` (REPAE-D6). The IDs in
this file are entries of docs/reference-facts.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import nn

from common.weights import TRAINING_ARGS, load_weights_file, strip_prefixes

TIMESTEP_FREQ_DIM = 256
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Registry of REPAE-2.1: depth, width and heads per size; every size is registered for patch 1/2/4/8.
_SIZES = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}
SIT_ARCHS: dict[str, dict] = {
    f"SiT-{size}/{patch}": {**dims, "patch_size": patch} for size, dims in _SIZES.items() for patch in (1, 2, 4, 8)
}


class SiTOutput(NamedTuple):
    """``output``: predicted velocity (B,C,H,W), None for ``align_only``; ``zs_tilde``: (B,T,z_dim_k) per projector."""

    output: torch.Tensor | None
    zs_tilde: list[torch.Tensor]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of token states (B,T,D) by per-sample (B,D) shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim): first dim/2 channels sin(pos w_k), next dim/2 cos, w_k = 10000^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int, device: torch.device | None = None) -> torch.Tensor:
    """MAE-style 2-D sin-cos table (grid_size**2, dim), float32, tokens in row-major order.

    Channels [0, dim/2) encode the *column* index and [dim/2, dim) the row index: the MAE code
    builds its grid with the column coordinate first, and reference checkpoints were trained with
    that layout (REPAE-2.2).
    """
    idx = torch.arange(grid_size, device=device)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.to(torch.float32)


def timestep_frequencies(t: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM) -> torch.Tensor:
    """(B,) continuous t in [0,1] (not x1000) -> (B, dim) features [cos(t f_k), sin(t f_k)], cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by Linear -> SiLU -> Linear (keys ``mlp.0`` / ``mlp.2``)."""

    def __init__(self, hidden_size: int, freq_dim: int = TIMESTEP_FREQ_DIM) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freqs)


class LabelEmbedder(nn.Module):
    """Class table with an extra null row (index ``num_classes``) when classifier-free dropout is on.

    Dropout replaces labels by the null class only in train mode; ``force_drop_ids`` (1 = drop)
    overrides the random draw in any mode, which is how a caller gets reproducible dropout from
    its own generator.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None) -> torch.Tensor:
        if force_drop_ids is not None:
            drop_ids = force_drop_ids.to(labels.device) == 1
        elif self.training and self.dropout_prob > 0:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            return labels
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedding_table(self.drop(labels, force_drop_ids))


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block: parameter-free LayerNorms, timm attention and GELU(tanh) MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, fused_attn: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
        self.attn.fused_attn = fused_attn
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = Mlp(hidden_size, mlp_hidden, act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm -> adaLN (shift, scale) -> Linear(D -> p*p*C); width D for every size (fixes SiT-S)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA head: Linear(D->P), SiLU, Linear(P->P), SiLU, Linear(P->z_dim) (keys 0, 2, 4)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def _validate(input_size: int, patch_size: int, hidden_size: int, depth: int, num_heads: int, encoder_depth: int):
    """Raise ValueError for configurations the reference let crash late or silently mis-built."""
    if not 1 <= encoder_depth <= depth:
        raise ValueError(f"encoder_depth must be in [1, depth={depth}] (1-based SiT block index), got {encoder_depth}")
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of 4 for the 2-D sin-cos pos_embed")


class SiT(nn.Module):
    """Class-conditional SiT predicting the velocity of normalised latents (REPAE-2.1 to REPAE-2.6).

    ``forward`` takes latents that are already normalised (``normalize`` is a separate call so the
    trainer decides when BN runs in train or eval mode); t in [0,1] with t=1 pure noise.
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        z_dims: Sequence[int] = (768,),
        encoder_depth: int = 8,
        projector_dim: int = 2048,
        qk_norm: bool = False,
        fused_attn: bool = True,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        _validate(input_size, patch_size, hidden_size, depth, num_heads, encoder_depth)
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.hidden_size, self.depth, self.encoder_depth = hidden_size, depth, encoder_depth
        self.num_classes = num_classes
        self.null_class = num_classes
        self.z_dims = tuple(int(z) for z in z_dims)
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size**2

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, fused_attn) for _ in range(depth)
        )
        self.projectors = nn.ModuleList(build_projector(hidden_size, projector_dim, z) for z in self.z_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.bn = nn.BatchNorm2d(in_channels, eps=bn_eps, momentum=bn_momentum, affine=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """REPAE-2.4: Xavier linears with zero bias, N(0,0.02) tables, zero adaLN and final layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.hidden_size, self.grid_size, self.pos_embed.device).unsqueeze(0))
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ----- latent normalisation (REPAE-2.6, with the eps made consistent) -----
    def _bn_eps(self) -> float:
        return float(self.bn.eps)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> SiT space: batch stats (and a running-stat update) in train mode,
        the fixed map (z - running_mean) / sqrt(running_var + eps) in eval mode. Differentiable in z."""
        return self.bn(z)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of eval-mode ``normalize``: x * sqrt(running_var + eps) + running_mean (same eps)."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # never apply the stats in bf16/fp16
        std = (self.bn.running_var.to(dtype) + self._bn_eps()).sqrt().view(1, -1, 1, 1)
        mean = self.bn.running_mean.to(dtype).view(1, -1, 1, 1)
        return (x.to(dtype) * std + mean).to(x.dtype)

    @torch.no_grad()
    def init_bn(self, scale: torch.Tensor, bias: torch.Tensor) -> None:
        """Set running stats so eval ``normalize(z) == (z - bias) * scale`` (up to float rounding).

        running_var = 1/scale^2 - eps (clamped at 0; a channel with std below sqrt(eps) then gets
        scale 1/sqrt(eps)). Accepts (C,) or (1,C,1,1) tensors, e.g. a ``-latents-stats.pt`` pair.
        """
        scale = self._channel_vector(scale, "scale").double()
        bias = self._channel_vector(bias, "bias").double()
        var = (1.0 / scale.square() - self._bn_eps()).clamp_min(0.0)
        self.bn.running_mean.copy_(bias)
        self.bn.running_var.copy_(var)

    @torch.no_grad()
    def latents_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, bias) float32 (C,) on CPU: scale = 1/sqrt(running_var + eps), bias = running_mean."""
        var = self.bn.running_var.double()
        scale = (var + self._bn_eps()).rsqrt()
        return scale.float().cpu(), self.bn.running_mean.float().cpu().clone()

    def _channel_vector(self, value: torch.Tensor, name: str) -> torch.Tensor:
        value = torch.as_tensor(value).reshape(-1)
        if value.numel() != self.in_channels:
            raise ValueError(f"{name} must have {self.in_channels} entries (one per channel), got {value.numel()}")
        return value.to(self.bn.running_mean.device)

    # ----- forward -----
    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"SiT expects normalised latents of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )

    def _time_vector(self, t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        """Accept a scalar, (B,) or (B,1,1,1) time and return (B,)."""
        t = torch.as_tensor(t, device=device)
        if t.numel() == 1:
            return t.reshape(1).expand(batch)
        if t.numel() != batch:
            raise ValueError(f"t must have 1 or {batch} entries, got shape {tuple(t.shape)}")
        return t.reshape(batch)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W) with tokens row-major and (p, p, C) inside each token."""
        b, g, p, c = x.shape[0], self.grid_size, self.patch_size, self.in_channels
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        y: torch.Tensor,
        *,
        align_only: bool = False,
        force_drop_ids: torch.Tensor | None = None,
    ) -> SiTOutput:
        """Velocity for normalised noisy latents ``x`` (B,C,H,W) at time ``t`` with labels ``y`` (B,).

        Projector features come from the state after block ``encoder_depth``; with ``align_only``
        the remaining blocks and the final layer are skipped and ``output`` is None.
        """
        self._check_input(x)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(self._time_vector(t, x.shape[0], x.device)) + self.y_embedder(y, force_drop_ids)
        zs_tilde: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if i == self.encoder_depth:
                zs_tilde = [projector(h) for projector in self.projectors]
                if align_only:
                    return SiTOutput(None, zs_tilde)
        return SiTOutput(self.unpatchify(self.final_layer(h, c)), zs_tilde)


def build_sit(arch: str, **kwargs) -> SiT:
    """Build a registered architecture (``SIT_ARCHS``); kwargs give the rest (input_size, in_channels, ...)."""
    if arch not in SIT_ARCHS:
        raise ValueError(f"unknown SiT arch {arch!r}; choices: {', '.join(SIT_ARCHS)}")
    return SiT(**{**SIT_ARCHS[arch], **kwargs})


def load_reference_sit(path: str | Path, key: str = "ema") -> dict[str, torch.Tensor]:
    """SiT state dict from a reference checkpoint (``checkpoints/0400000.pt``) or a .safetensors file.

    The .pt pickle is read with ``weights_only=True``; its embedded ``argparse.Namespace`` (the
    training args) is the one non-tensor class allow-listed. ``key`` picks ``ema`` (what the
    reference samples with) or ``model``; a file that already is a flat state dict is accepted.
    """
    path = Path(path)
    obj = load_weights_file(path, allow=TRAINING_ARGS)
    if path.suffix == ".safetensors":
        return strip_prefixes(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if key in obj and isinstance(obj[key], dict):
        state = obj[key]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise KeyError(f"{path}: no SiT state dict under {key!r}; top-level keys: {sorted(map(str, obj))}")
    return strip_prefixes(state)
