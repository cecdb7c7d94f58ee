"""Frozen vision encoders whose patch tokens are the REPA alignment targets (docs/reference-facts.md, REPAE-3).

The reference pulls each encoder from a different place (torch.hub/GitHub for DINOv2, the OpenAI
CDN for CLIP, hand-placed pickles for MAE / I-JEPA / MoCo v3, and a module that does not exist for
DINOv1; reference defect REPAE-D5). Here every encoder is a timm ``VisionTransformer``:

* hub names (``dinov2-vit-b`` ...) load timm's published weights through the Hugging Face cache
  (``HF_HOME`` / ``HF_HUB_CACHE``, or ``cache_dir=``); with ``HF_HUB_OFFLINE=1`` only the cache is
  read, and a miss raises an error that says how to fix it. I-JEPA has no HF mirror in timm:
  it comes from its original URL through the torch hub cache (``TORCH_HOME``), restricted
  unpickling included;
* ``checkpoint=`` loads a local ``.safetensors`` / ``.pth`` / ``.bin`` file offline, with
  ``torch.load(weights_only=True)`` only, in the original release layout (DINOv2 hub files,
  OpenAI CLIP state dicts, MAE ``model``, I-JEPA ``encoder``, MoCo v3 ``state_dict``) or timm's;
  keys are converted by timm's own filter and loaded strictly;
* ``local:<folder>`` is a self-describing encoder (``encoder.json`` + ``model.safetensors``), which
  is how the toy world ships its small semantic encoder (:mod:`repae.toy`).

Preprocessing lives inside :meth:`VisionEncoder.forward`, because the order and constants differ
per encoder and getting them wrong silently degrades alignment: uint8 -> x/255 -> ImageNet or CLIP
mean/std, with a bicubic, non-antialiased resize to 224*res/256 for DINOv2, CLIP and I-JEPA
(normalise-then-resize for DINOv2 and I-JEPA, resize-then-normalise for CLIP, as in the reference).
The position embedding is resampled once, at load time, to the grid of the configured
resolution (DINOv2: 16x16 at 256 and 32x32 at 512; the patch-16 encoders: 16x16 at 256), so the
token count matches the SiT's without any run-time interpolation.

Departures from the reference, all at resolutions it does not accept: the 224*res/256 rule is
applied to CLIP and I-JEPA too (the reference only runs them at 256, where it is the same), and
any resolution whose encoder input is a multiple of the patch size is allowed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.weights import strip_prefixes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LOCAL_PREFIX = "local:"
LOCAL_CONFIG = "encoder.json"
LOCAL_WEIGHTS = "model.safetensors"
# Keys of released checkpoints that the frozen trunk never uses: classification / projection heads
# (MoCo v3 "head." and "fc.", the CLIP projection that timm maps to "head."), MAE's decoder.
_UNUSED_PREFIXES = ("head.", "fc.", "decoder", "mask_token")


@dataclass(frozen=True)
class EncoderRecipe:
    """How one ``--enc-type`` maps onto timm, and how its inputs and outputs are treated.

    ``hub_tag`` None means no published timm weights (MoCo v3): a ``checkpoint`` is required.
    ``resize`` True resizes images to 224*res/256 (else the encoder sees them at ``res``).
    ``final_norm`` False returns the last block's output without the trunk's final LayerNorm
    (MAE; CLIP's ``ln_post``), exactly as the reference takes its tokens.
    """

    timm_name: str
    hub_tag: str | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: bool = False
    resize_first: bool = False
    final_norm: bool = True
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_format: str = "timm"  # "mocov3": module.base_encoder.* keys with naming typos

    @property
    def hub_name(self) -> str | None:
        return f"{self.timm_name}.{self.hub_tag}" if self.hub_tag else None


def _dinov2(size: str, registers: bool) -> EncoderRecipe:
    arch = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    name = f"vit_{arch}_patch14_reg4_dinov2" if registers else f"vit_{arch}_patch14_dinov2"
    return EncoderRecipe(name, "lvd142m", resize=True, resize_first=False)


def _mocov3(size: str) -> EncoderRecipe:
    # MoCo v3's ViT-S uses 12 heads where timm's ViT-S has 6; B and L match timm's defaults.
    arch = {"s": "small", "b": "base", "l": "large"}[size]
    kwargs = {"num_heads": 12} if size == "s" else {}
    return EncoderRecipe(f"vit_{arch}_patch16_224", None, timm_kwargs=kwargs, checkpoint_format="mocov3")


ENCODERS: dict[str, EncoderRecipe] = {
    **{f"dinov2-vit-{s}": _dinov2(s, registers=False) for s in "sblg"},
    **{f"dinov2-vit-{s}-reg": _dinov2(s, registers=True) for s in "sblg"},
    "dinov1-vit-b": EncoderRecipe("vit_base_patch16_224", "dino"),
    "clip-vit-L": EncoderRecipe(
        "vit_large_patch14_clip_224", "openai", CLIP_MEAN, CLIP_STD, resize=True, resize_first=True, final_norm=False
    ),
    "mae-vit-l": EncoderRecipe("vit_large_patch16_224", "mae", final_norm=False),
    "jepa-vit-h": EncoderRecipe("vit_huge_patch14_gap_224", "in1k_ijepa", resize=True, resize_first=False),
    **{f"mocov3-vit-{s}": _mocov3(s) for s in "sbl"},
}
# The reference spells DINOv2-with-registers as a type containing "reg" ("dinov2reg-vit-b").
_ALIASES = {f"dinov2reg-vit-{s}": f"dinov2-vit-{s}-reg" for s in "sblg"}


class VisionEncoder(nn.Module):
    """A frozen timm ViT plus its preprocessing: uint8 images in, patch tokens (B, N, D) out.

    The module stays in eval mode whatever ``.train()`` says (it is a fixed target; dropout or
    drop-path would make the target noisy) and every parameter has ``requires_grad=False``.
    ``forward`` runs under ``no_grad`` itself, so it is safe in plain, ``no_grad`` and
    ``inference_mode`` contexts, and returns float32 whatever autocast the caller uses.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        resolution: int,
        mean: Iterable[float],
        std: Iterable[float],
        input_size: int | None = None,
        resize_first: bool = False,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.resolution = int(resolution)
        self.input_size = int(input_size or resolution)
        self.resize_first = resize_first
        self.final_norm = final_norm
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VisionEncoder:
        """Always eval: a frozen alignment target must not change with the trainer's mode."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, resolution={self.resolution}, input_size={self.input_size}, "
            f"tokens={self.num_tokens}, embed_dim={self.embed_dim}, final_norm={self.final_norm}"
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,R,R) -> float32 encoder input: x/255, mean/std, bicubic resize (no antialias)."""
        self._check_input(images)
        x = images.to(device=self.mean.device, dtype=torch.float32) / 255.0
        if self.resize_first:
            x = self._resize(x)
        x = (x - self.mean) / self.std
        if not self.resize_first:
            x = self._resize(x)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) in float32, without CLS / register tokens."""
        x = self.preprocess(images)
        tokens = self.model.forward_intermediates(
            x, indices=1, norm=self.final_norm, output_fmt="NLC", intermediates_only=True
        )[-1]
        return tokens.float()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.input_size:
            return x
        size = (self.input_size, self.input_size)
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)

    def _check_input(self, images: torch.Tensor) -> None:
        # Strict on purpose: a float image in [-1, 1] passed by mistake would give plausible-looking
        # but meaningless targets.
        if images.dtype != torch.uint8:
            raise TypeError(f"{self.name}: expected uint8 images in [0, 255], got {images.dtype}")
        expected = (3, self.resolution, self.resolution)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{self.name}: expected images (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def encoder_choices() -> list[str]:
    """Every accepted spec (``local:<folder>`` stands for any local encoder folder)."""
    return [*ENCODERS, f"{LOCAL_PREFIX}<folder>"]


def resolve_spec(spec: str) -> str:
    """Canonical spelling of a spec (case-insensitive; reference aliases accepted); ValueError if unknown."""
    spec = spec.strip()
    if spec.startswith(LOCAL_PREFIX):
        return spec
    lowered = {name.lower(): name for name in ENCODERS}
    key = _ALIASES.get(spec.lower(), spec.lower())
    if key.lower() not in lowered:
        raise ValueError(f"unknown encoder {spec!r}; choose from: {', '.join(encoder_choices())}")
    return lowered[key.lower()]


def encoder_input_size(recipe: EncoderRecipe, resolution: int, patch_size: int) -> int:
    """Side of the image the encoder sees: 224*res/256 for resized encoders, else ``res``."""
    if recipe.resize:
        if (224 * resolution) % 256:
            raise ValueError(f"resolution {resolution}: 224*res/256 is not an integer; use a multiple of 32")
        size = 224 * resolution // 256
    else:
        size = resolution
    if size % patch_size:
        raise ValueError(
            f"encoder input {size}px (resolution {resolution}) is not a multiple of the patch {patch_size}"
        )
    return size


def load_encoder(
    spec: str,
    resolution: int = 256,
    checkpoint: str | os.PathLike | None = None,
    *,
    pretrained: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> VisionEncoder:
    """Build one frozen encoder for images of ``resolution`` pixels.

    ``checkpoint`` (a local weights file) takes precedence over the hub. ``pretrained=False``
    builds the randomly initialised architecture (shape checks, or reading ``embed_dim``) and is
    the only way to get a MoCo v3 encoder without a checkpoint. ``cache_dir`` overrides timm's
    Hugging Face / torch hub cache folder.
    """
    name = resolve_spec(spec)
    if name.startswith(LOCAL_PREFIX):
        return _load_local(name, resolution, checkpoint, pretrained)
    recipe = ENCODERS[name]
    use_hub = pretrained and checkpoint is None
    if use_hub and recipe.hub_name is None:
        raise ValueError(f"{name} has no published timm weights: pass checkpoint=<the reference .pth file>")
    model = _create(recipe, resolution, use_hub, cache_dir)
    if checkpoint is not None:
        state = prepare_checkpoint(read_checkpoint(checkpoint), recipe.checkpoint_format)
        load_into(model, state, source=str(checkpoint))
    return VisionEncoder(
        model,
        name=name,
        resolution=resolution,
        mean=recipe.mean,
        std=recipe.std,
        input_size=model.patch_embed.img_size[0],
        resize_first=recipe.resize_first,
        final_norm=recipe.final_norm,
    )


def load_encoders(
    specs: list[str] | str,
    resolution: int = 256,
    checkpoints: Mapping[str, str] | None = None,
    *,
    pretrained: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> list[VisionEncoder]:
    """Encoders for a list or a comma-separated string (reference ``--enc-type`` style).

    ``checkpoints`` maps a spec (as written, or its canonical spelling) to a local weights file.
    An empty string or ``"none"`` gives no encoders (the reference accepted ``None`` but crashed).
    """
    names = split_specs(specs)
    checkpoints = dict(checkpoints or {})
    by_name = {resolve_spec(k): v for k, v in checkpoints.items()}
    return [
        load_encoder(s, resolution, by_name.get(resolve_spec(s)), pretrained=pretrained, cache_dir=cache_dir)
        for s in names
    ]


def split_specs(specs: list[str] | str) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``; ``""`` / ``"none"`` -> ``[]``."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    items = [s.strip() for s in items if s and s.strip()]
    return [] if [s.lower() for s in items] == ["none"] else items


def encoder_dim(spec: str, resolution: int = 256) -> int:
    """Token width of an encoder without loading weights (built on the meta device).

    ``generate.py`` needs only this number to build the projectors; the reference instantiated the
    whole encoder, downloads included, for it.
    """
    with torch.device("meta"):
        return load_encoder(spec, resolution, pretrained=False).embed_dim


def _create(recipe: EncoderRecipe, resolution: int, use_hub: bool, cache_dir: str | os.PathLike | None) -> nn.Module:
    import timm

    patch = _patch_size(recipe.timm_name)
    size = encoder_input_size(recipe, resolution, patch)
    kwargs = dict(recipe.timm_kwargs, num_classes=0, img_size=size)
    if not use_hub:
        return timm.create_model(recipe.timm_name, pretrained=False, **kwargs)
    try:
        return timm.create_model(recipe.hub_name, pretrained=True, cache_dir=cache_dir, **kwargs)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"could not load the pretrained weights of {recipe.hub_name} ({type(error).__name__}: {error}). "
            "They come from the Hugging Face hub cache (HF_HOME / HF_HUB_CACHE; I-JEPA: the torch hub cache, "
            "TORCH_HOME); with HF_HUB_OFFLINE=1 only the cache is read. Download them once with network access "
            "(timm.create_model(name, pretrained=True)), or pass checkpoint=<local weights file>."
        ) from error


def _patch_size(timm_name: str) -> int:
    match = re.search(r"patch(\d+)", timm_name)
    if match is None:
        raise ValueError(f"cannot read the patch size from the timm name {timm_name!r}")
    return int(match.group(1))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """Raw content of a weights file: safetensors, or ``torch.load(weights_only=True)`` (never a full unpickle)."""
    from common.weights import load_weights_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint not found: {path}")
    content = load_weights_file(path)
    if not isinstance(content, Mapping):
        raise ValueError(f"{path}: expected a dict of weights, got {type(content).__name__}")
    return content


def prepare_checkpoint(content: Mapping[str, Any], checkpoint_format: str = "timm") -> dict[str, Any]:
    """Bring a release checkpoint to a state dict that timm's key filter understands.

    MoCo v3 files keep the online ViT under ``state_dict`` / ``module.base_encoder.`` next to the
    momentum encoder and predictor; only the online ViT is kept, and two typos of that release
    (block norms / MLP layers saved as ``norm13``/``norm14``, ``fc13``/``fc14``) are repaired. Other
    formats pass through (timm's filter unwraps ``model``, ``state_dict``, I-JEPA's ``encoder``).
    """
    state = dict(content)
    if checkpoint_format != "mocov3":
        return state
    state = dict(state.get("state_dict", state))
    prefix = "module.base_encoder."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    typos = {".norm13.": ".norm1.", ".norm14.": ".norm2.", ".fc13.": ".fc1.", ".fc14.": ".fc2."}
    fixed = {}
    for key, value in state.items():
        for wrong, right in typos.items():
            key = key.replace(wrong, right)
        fixed[key] = value
    return fixed


def load_into(model: nn.Module, content: Mapping[str, Any], *, source: str) -> None:
    """Convert with timm's ViT filter (layouts, pos-embed resampling), drop unused heads, load strictly."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = dict(content)
    state = strip_prefixes(state, ("module.",))  # a bare DDP-wrapped state dict
    state = checkpoint_filter_fn(state, model)
    state = {k: v for k, v in state.items() if not k.startswith(_UNUSED_PREFIXES)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise RuntimeError(
            f"{source} does not match the encoder architecture: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, shape mismatch {_few(wrong_shape)}"
        )
    model.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 6) -> str:
    if not items:
        return "none"
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return f"{len(items)} [{', '.join(items[:n])}{more}]"


# --------------------------------------------------------------------------------------------
# Local encoders (encoder.json + model.safetensors)
# --------------------------------------------------------------------------------------------
def build_timm_model(config: Mapping[str, Any], img_size: int) -> nn.Module:
    """The architecture an ``encoder.json`` describes: ``timm_name`` (+ ``timm_kwargs``) or a bare
    ``VisionTransformer(**timm_kwargs)``, headless and built for ``img_size``."""
    kwargs = dict(config.get("timm_kwargs") or {}, num_classes=0, img_size=img_size)
    if config.get("timm_name"):
        import timm

        return timm.create_model(config["timm_name"], pretrained=False, **kwargs)
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**kwargs)


def _load_local(spec: str, resolution: int, checkpoint: str | os.PathLike | None, pretrained: bool) -> VisionEncoder:
    folder = Path(spec[len(LOCAL_PREFIX) :]).expanduser()
    config_path = folder / LOCAL_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{spec}: no {LOCAL_CONFIG} in {folder}")
    config = json.loads(config_path.read_text())
    input_size = int(config.get("resize") or resolution)
    model = build_timm_model(config, input_size)
    if config.get("num_prefix_tokens") is not None and int(config["num_prefix_tokens"]) != model.num_prefix_tokens:
        raise ValueError(f"{config_path}: num_prefix_tokens {config['num_prefix_tokens']} != {model.num_prefix_tokens}")
    if pretrained or checkpoint is not None:
        weights = Path(checkpoint) if checkpoint is not None else folder / LOCAL_WEIGHTS
        load_into(model, read_checkpoint(weights), source=str(weights))
    return VisionEncoder(
        model,
        name=spec,
        resolution=resolution,
        mean=config.get("mean", IMAGENET_MEAN),
        std=config.get("std", IMAGENET_STD),
        input_size=input_size,
        resize_first=bool(config.get("resize_first", False)),
        final_norm=bool(config.get("final_norm", True)),
    )
