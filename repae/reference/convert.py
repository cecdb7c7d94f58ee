"""Lossless conversion between reference (CompVis/LDM) VAE weights and diffusers `AutoencoderKL`.

The reference trains and ships its VAEs as plain LDM-layout state dicts (docs/reference-facts.md, REPAE-1.4); we train
diffusers models (so FLUX/SD3.5/Qwen-Image VAEs go through the same code). This module is the
bridge, and it is deliberately strict, because the reference loaded VAE weights with
`strict=False` and so silently ignored typos and architecture mismatches (reference defect REPAE-D4):

* every key must map; an unknown key raises `VAEKeyError` naming it (and its neighbours);
* one table of key templates serves both directions, so the mapping is a bijection by
  construction (two keys can never collapse onto one) and converting back restores every key;
* values are copied bit-for-bit; the only change is the reshape of attention projections between
  1x1-conv weights `[C, C, 1, 1]` (LDM) and linear weights `[C, C]` (diffusers).

`num_levels` (the length of `ch_mult` / `block_out_channels`) is needed because the decoder's
resolution levels are numbered from opposite ends: LDM `decoder.up.{i}` is diffusers
`decoder.up_blocks.{L-1-i}`.

Reference `.pt` files are pickles and therefore untrusted: `load_reference_vae` reads them with
`torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import torch

from common.weights import safe_torch_load, strip_key

RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
ATTN_LINEAR = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers attention parts stored as Linear
PREFIXES = ("first_stage_model.", "module.", "_orig_mod.")
_RESNET_BACK = {v: k for k, v in RESNET_PARTS.items()}
_ATTN_BACK = {v: k for k, v in ATTN_PARTS.items()}
_SHOWN = 8


class VAEKeyError(ValueError):
    """A VAE state dict has keys that do not belong, or lacks keys that must be there."""


# --------------------------------------------------------------------------------------------
# Key mapping. One table of module-path templates serves both directions; `{i}` is a resolution
# level (flipped for the decoder), `{j}` a block index, `{r}` / `{a}` a resnet / attention part.
# --------------------------------------------------------------------------------------------
_RULES: tuple[tuple[str, str], ...] = (
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
    ("{side}.conv_in", "{side}.conv_in"),
    ("{side}.conv_out", "{side}.conv_out"),
    ("{side}.norm_out", "{side}.conv_norm_out"),
    ("{side}.mid.block_1.{r}", "{side}.mid_block.resnets.0.{r}"),
    ("{side}.mid.block_2.{r}", "{side}.mid_block.resnets.1.{r}"),
    ("{side}.mid.attn_1.{a}", "{side}.mid_block.attentions.0.{a}"),
    ("encoder.down.{i}.block.{j}.{r}", "encoder.down_blocks.{i}.resnets.{j}.{r}"),
    ("encoder.down.{i}.attn.{j}.{a}", "encoder.down_blocks.{i}.attentions.{j}.{a}"),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("decoder.up.{i}.block.{j}.{r}", "decoder.up_blocks.{i}.resnets.{j}.{r}"),
    ("decoder.up.{i}.attn.{j}.{a}", "decoder.up_blocks.{i}.attentions.{j}.{a}"),
    ("decoder.up.{i}.upsample.conv", "decoder.up_blocks.{i}.upsamplers.0.conv"),
)


def _alternatives(names: Iterable[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def _compile(template: str, ldm_side: bool) -> re.Pattern:
    """A template as a regex with named groups; `{r}`/`{a}` accept only that layout's part names."""
    resnet = RESNET_PARTS.keys() if ldm_side else RESNET_PARTS.values()
    attn = ATTN_PARTS.keys() if ldm_side else ATTN_PARTS.values()
    groups = {
        "side": "(?P<side>encoder|decoder)",
        "i": r"(?P<i>\d+)",
        "j": r"(?P<j>\d+)",
        "r": f"(?P<r>{_alternatives(resnet)})",
        "a": f"(?P<a>{_alternatives(attn)})",
    }
    pattern = re.escape(template)
    for name, group in groups.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + r"\.(?P<param>weight|bias)")


_COMPILED = tuple((_compile(ldm, True), _compile(dif, False), ldm, dif) for ldm, dif in _RULES)


def _map_key(key: str, num_levels: int, to_diffusers: bool) -> str | None:
    """The key in the other layout, or None if `key` is not a valid key of this layout."""
    for ldm_re, dif_re, ldm_t, dif_t in _COMPILED:
        m = (ldm_re if to_diffusers else dif_re).fullmatch(key)
        if m is None:
            continue
        fields = m.groupdict()
        if fields.get("i") is not None:
            level = int(fields["i"])
            if not 0 <= level < num_levels:
                return None
            flip = ldm_t.startswith("decoder.")  # decoder levels count from opposite ends
            fields["i"] = str(num_levels - 1 - level if flip else level)
        if fields.get("r") is not None:
            fields["r"] = (RESNET_PARTS if to_diffusers else _RESNET_BACK)[fields["r"]]
        if fields.get("a") is not None:
            fields["a"] = (ATTN_PARTS if to_diffusers else _ATTN_BACK)[fields["a"]]
        target = dif_t if to_diffusers else ldm_t
        return target.format(**{k: v for k, v in fields.items() if v is not None}) + "." + fields["param"]
    return None


def _is_attention_projection(diffusers_key: str) -> bool:
    """A q/k/v/out weight: 1x1 conv [C,C,1,1] in LDM, linear [C,C] in diffusers (biases agree)."""
    return ".attentions." in diffusers_key and diffusers_key.endswith(tuple(f".{p}.weight" for p in ATTN_LINEAR))


def _describe(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def _convert(sd: Mapping[str, torch.Tensor], num_levels: int, to_diffusers: bool) -> dict[str, torch.Tensor]:
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        new = _map_key(key, num_levels, to_diffusers)
        if new is None:
            unknown.append(key)
            continue
        dif_key = new if to_diffusers else key
        if _is_attention_projection(dif_key):
            value = _reshape_projection(key, value, to_diffusers)
        out[new] = value
    if unknown:
        layout = "reference (LDM)" if to_diffusers else "diffusers"
        raise VAEKeyError(f"unexpected keys for a {num_levels}-level {layout} VAE: {_describe(sorted(unknown))}")
    return out


def _reshape_projection(key: str, value: torch.Tensor, to_diffusers: bool) -> torch.Tensor:
    """[C,C,1,1] <-> [C,C], refusing anything that is not a 1x1 kernel (a reshape would hide it)."""
    if to_diffusers:
        if value.dim() != 4 or tuple(value.shape[2:]) != (1, 1):
            raise VAEKeyError(f"{key}: expected a 1x1 conv weight [C,C,1,1], got {tuple(value.shape)}")
        return value.reshape(value.shape[0], value.shape[1])
    if value.dim() != 2:
        raise VAEKeyError(f"{key}: expected a linear weight [C,C], got {tuple(value.shape)}")
    return value.reshape(*value.shape, 1, 1)


def ldm_to_diffusers_vae(sd: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Reference (LDM-layout) VAE state dict -> diffusers `AutoencoderKL` state dict.

    `num_levels` = `len(ch_mult)` = `len(block_out_channels)`. Raises `VAEKeyError` naming every
    key that has no diffusers counterpart (e.g. `loss.*` left in, or a level beyond `num_levels`).
    Tensors are not copied; attention projections are reshaped views.
    """
    return _convert(sd, num_levels, to_diffusers=True)


def diffusers_to_ldm_vae(sd: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Diffusers `AutoencoderKL` state dict -> reference (LDM-layout) state dict; inverse of the above."""
    return _convert(sd, num_levels, to_diffusers=False)


def check_keys(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Raise `VAEKeyError` naming missing and unexpected keys, or any shape mismatch.

    `expected` is the target model's state dict; `source` (a path, say) is put in the message.
    """
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if wrong:
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong]
        problems.append(f"shape mismatches: {_describe(shapes)}")
    if problems:
        where = f" in {source}" if source else ""
        raise VAEKeyError(f"VAE weights{where} do not match the model: " + "; ".join(problems))


def load_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str = "") -> None:
    """`model.load_state_dict(sd, strict=True)` after `check_keys`, so a mismatch is named clearly."""
    check_keys(sd, model.state_dict(), source)
    model.load_state_dict(sd, strict=True)


def load_reference_vae(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A reference VAE `.pt` (a plain LDM-layout state dict) as a dict of tensors.

    Read with `weights_only=True` (never a full unpickle). Accepted wrappers: a Lightning-style
    `{"state_dict": ...}`; a whole latent-diffusion checkpoint, of which only the
    `first_stage_model.*` entries are kept; `module.`/`_orig_mod.` prefixes (DDP, torch.compile).
    `loss.*` entries (the LPIPS/discriminator of a CompVis autoencoder checkpoint) are dropped.
    """
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise VAEKeyError(f"{path}: expected a state dict, got {type(obj).__name__}")
    whole_ldm = any(str(k).startswith("first_stage_model.") for k in obj)
    sd: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if whole_ldm and not key.startswith("first_stage_model."):
            continue
        key = strip_key(key, PREFIXES)
        if key.startswith("loss."):
            continue
        if not isinstance(value, torch.Tensor):
            raise VAEKeyError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        sd[key] = value
    return sd


def diffusers_config_from_ldm(
    *,
    ch: int = 128,
    ch_mult: tuple[int, ...] = (1, 2, 4, 4),
    z_channels: int = 4,
    attn_resolutions: tuple[int, ...] = (16,),
    resolution: int = 256,
    num_res_blocks: int = 2,
) -> dict:
    """The `AutoencoderKL` config equivalent to an LDM autoencoder with these constructor values.

    A level gets the `Attn*` block type when its nominal size is in `attn_resolutions` (the same
    structural rule the reference uses); decoder block types are listed lowest resolution first,
    as diffusers builds them. Scaling is neutral (1.0, no shift): REPA-E normalises per channel.
    """
    attention = [resolution // 2**i in attn_resolutions for i in range(len(ch_mult))]
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)],
        block_out_channels=[ch * m for m in ch_mult],
        layers_per_block=num_res_blocks,
        act_fn="silu",
        latent_channels=z_channels,
        norm_num_groups=32,
        sample_size=resolution,
        scaling_factor=1.0,
        shift_factor=None,
    )
