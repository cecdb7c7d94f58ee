"""Dry-run planner: what a training config will cost, before any GPU, weight or shard is touched.

``python train.py -c CONFIG --dry-run [--world-size N] [--zero-stage 1|2]`` calls :func:`run_dry_run`.
A 500k-step run on 32 GPUs should not be the first place to learn that it does not fit in memory,
that a shard pattern has a typo, or how many FLOPs a step costs (the number an MFU needs). So the
planner:

* builds the DiT on the ``meta`` device (shapes only, no storage), so its parameter count is the
  real module's, not a second formula that could drift from it;
* sizes the frozen text encoder and VAE without the hub: local folders (the toy world) are built on
  meta from their own ``config.json``; known hub models come from the table below (Gemma-2B's
  published size; the VAEs are built on meta from their public configs);
* counts matmul FLOPs (``2*m*n*k``) per step, split into DiT forward/backward, text-encoder forward
  and VAE-encoder forward, and returns them as data (:class:`StepFlops`) for later MFU numbers;
* estimates per-GPU memory under ZeRO-0/1/2 for N GPUs, with and without gradient checkpointing;
* checks the shard patterns' brace syntax, counts shards and how many exist locally (a dry run
  does not fail when none do: planning usually happens before the download);
* writes ``<checkpoint_dir>/config.resolved.yaml`` and ``<checkpoint_dir>/plan.json``.

It never creates a process group and never imports DeepSpeed.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from common.config import ConfigError, save_config
from common.files import write_json_atomic
from common.shards import check_brace_syntax, is_remote
from common.vae_config import FAMILIES, Family, detect, family_of_class
from fusedit.config import TrainConfig, check_geometry, derive_batch
from fusedit.flops import (
    clip_text_arch,
    clip_text_forward_flops,
    decoder_arch,
    dit_forward_flops,
    text_encoder_forward_flops,
)
from fusedit.flow import schedule_shift
from fusedit.llm_architectures import GEMMA_2B as GEMMA_2B_ARCH
from fusedit.llm_architectures import KNOWN_LLMS, known_llm
from fusedit.train.ema import EMA_CHUNK_NUMEL

GIB = 1024**3

# --------------------------------------------------------------------------------------------
# Known hub architectures (the planner must work offline, so hub configs are never read)
# --------------------------------------------------------------------------------------------
# Gemma-2B as the reference uses it: AutoModel -> GemmaModel (decoder stack, no LM head), with its
# parameter count. docs/reference-facts.md, T2I-2.11 and T2I-2.12.
GEMMA_2B = {k: v for k, v in GEMMA_2B_ARCH.items() if k != "model_type"} | {"params": 2_506_172_416}
KNOWN_TEXT_ENCODERS = {"google/gemma-2b": GEMMA_2B}

# The public FLUX.1-dev vae/config.json (AutoencoderKL); SD3.5-large's VAE has the same layout.
FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SD35_VAE = {**FLUX_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
_E2E_NOTE = "assumed to keep the architecture of the VAE it was tuned from"
# The released representation autoencoders (diffusers AutoencoderRAE; docs/tokenizers.md): a frozen
# base-size encoder (its last tokens are the latent: 768 channels, 16x16 at 256 px) and the ViT-XL
# decoder (1152 wide, 28 layers, 16 heads, MLP 4096) with decoder patch 16; "n08" = trained with
# token noise up to 0.8 (noise_tau). The i512 release reads DINOv2-B at 448 px: a 32x32 latent.
RAE_VIT_XL_DECODER = {
    "decoder_hidden_size": 1152,
    "decoder_num_hidden_layers": 28,
    "decoder_num_attention_heads": 16,
    "decoder_intermediate_size": 4096,
    "patch_size": 16,
    "noise_tau": 0.8,
}
RAE_DINOV2_B = {
    "encoder_type": "dinov2",
    "encoder_hidden_size": 768,
    "encoder_patch_size": 14,
    "encoder_num_hidden_layers": 12,
    "encoder_input_size": 224,
    "image_size": 256,
    **RAE_VIT_XL_DECODER,
}
RAE_DINOV2_B_512 = {**RAE_DINOV2_B, "encoder_input_size": 448, "image_size": 512}
# No SigLIP-2 RAE: diffusers 0.42.1's AutoencoderRAE builds its SigLIP encoder through an attribute
# (`vision_model`) that the locked transformers 5.24's SiglipVisionModel no longer has, so it cannot
# be constructed here at all (tests/test_rae_tokenizer.py keeps that fact checked).
# key: lower-case hub name -> (diffusers class, constructor kwargs, where the architecture comes from)
KNOWN_VAES: dict[str, tuple[str, dict[str, Any], str]] = {
    "black-forest-labs/flux.1-dev": ("AutoencoderKL", FLUX_VAE, "public FLUX.1-dev VAE config"),
    "repa-e/e2e-flux-vae": ("AutoencoderKL", FLUX_VAE, f"FLUX.1-dev VAE config, {_E2E_NOTE}"),
    "stabilityai/stable-diffusion-3.5-large": ("AutoencoderKL", SD35_VAE, "public SD3.5-large VAE config"),
    "repa-e/e2e-sd3.5-vae": ("AutoencoderKL", SD35_VAE, f"SD3.5-large VAE config, {_E2E_NOTE}"),
    "qwen/qwen-image": ("AutoencoderKLQwenImage", {}, "diffusers AutoencoderKLQwenImage class defaults"),
    "repa-e/e2e-qwenimage-vae": ("AutoencoderKLQwenImage", {}, f"AutoencoderKLQwenImage defaults, {_E2E_NOTE}"),
    # FLUX.2's VAE: FLUX.1's encoder/decoder widths with 32 latent channels, which are the class defaults.
    "black-forest-labs/flux.2-dev": (
        "AutoencoderKLFlux2",
        {},
        "diffusers AutoencoderKLFlux2 class defaults (FLUX.2-dev)",
    ),
    "nyu-visionx/rae-dinov2-wreg-base-vitxl-n08": ("AutoencoderRAE", RAE_DINOV2_B, "RAE DINOv2-B + ViT-XL decoder"),
    "nyu-visionx/rae-dinov2-wreg-base-vitxl-n08-i512": (
        "AutoencoderRAE",
        RAE_DINOV2_B_512,
        "RAE DINOv2-B at 448 px input + ViT-XL decoder (512 px)",
    ),
}
# CLIP-L's text tower with its projection (CLIPTextModelWithProjection), the "fuse-dit-clip" type's
# pooled-text encoder: SD3-medium's text_encoder/ (the reference's clip_l) and OpenAI's CLIP-L.
CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
# key: (lower-case hub name, subfolder) -> CLIPTextConfig fields
KNOWN_CLIP_TEXT_ENCODERS: dict[tuple[str, str | None], dict[str, Any]] = {
    ("stabilityai/stable-diffusion-3-medium-diffusers", "text_encoder"): CLIP_L_TEXT,
    ("openai/clip-vit-large-patch14", None): CLIP_L_TEXT,
}


# --------------------------------------------------------------------------------------------
# Plan data
# --------------------------------------------------------------------------------------------
@dataclass
class Component:
    """Parameter counts of one model part; ``None`` when the architecture is unknown offline."""

    name: str
    trainable: int | None
    frozen: int | None
    source: str


@dataclass
class Tokens:
    """Sequence lengths every FLOP and activation number below is computed for."""

    image_tokens: int
    text_tokens: int
    latent_channels: int
    latent_size: int
    vae_factor: int
    patch_size: int
    text_tokens_source: str
    schedule_shift: float = 3.0  # the flow-matching sigma shift this latent trains with (fusedit.flow)
    shift_rule: str = "noise_scheduler.shift"


@dataclass
class StepFlops:
    """Matmul FLOPs (``2*m*n*k``, attention included) of one optimizer step.

    Per-sample numbers times ``samples_per_gpu`` (micro-batch x accumulation) give one GPU's step;
    times ``world_size`` the global step. Backward is taken as 2x forward (one matmul for the input
    gradient and one for the weight gradient per forward matmul). Frozen encoders run forward only.
    ``model`` totals are what MFU conventionally counts; ``hardware`` adds the block recompute
    that gradient checkpointing performs.
    """

    dit_forward_per_sample: int
    dit_blocks_forward_per_sample: int
    text_encoder_forward_per_sample: int | None
    vae_encoder_forward_per_sample: int | None
    samples_per_gpu: int
    world_size: int
    gradient_checkpointing: bool
    # a FuseDiT with trainer.train_llm: the LLM inside the model runs backward too (2x its forward)
    llm_backward_per_sample: int = 0
    # the "fuse-dit-clip" type: its frozen CLIP text encoder's forward (None: architecture unknown offline)
    clip_text_forward_per_sample: int | None = 0

    def per_sample(self) -> dict[str, int]:
        """The parts of one sample's step, plus the checkpoint recompute (0 when off)."""
        fwd = self.dit_forward_per_sample
        return {
            "dit_forward": fwd,
            "dit_backward": 2 * fwd,
            "text_encoder_forward": self.text_encoder_forward_per_sample or 0,
            "llm_backward": self.llm_backward_per_sample,
            "clip_text_forward": self.clip_text_forward_per_sample or 0,
            "vae_encoder_forward": self.vae_encoder_forward_per_sample or 0,
            "dit_recompute": self.dit_blocks_forward_per_sample if self.gradient_checkpointing else 0,
        }

    def model_per_sample(self) -> int:
        parts = self.per_sample()
        return sum(v for k, v in parts.items() if k != "dit_recompute")

    @property
    def model_per_gpu(self) -> int:
        return self.model_per_sample() * self.samples_per_gpu

    @property
    def model_global(self) -> int:
        return self.model_per_gpu * self.world_size

    @property
    def hardware_per_gpu(self) -> int:
        return (self.model_per_sample() + self.per_sample()["dit_recompute"]) * self.samples_per_gpu

    def mfu(self, step_seconds: float, peak_flops_per_gpu: float) -> float:
        """Model FLOPs utilisation of a measured step time against a GPU's dense peak."""
        return self.model_per_gpu / (step_seconds * peak_flops_per_gpu)

    def to_dict(self) -> dict[str, Any]:
        per_sample = self.per_sample()
        return {
            **asdict(self),
            "per_sample": per_sample,
            "per_gpu": {k: v * self.samples_per_gpu for k, v in per_sample.items()},
            "global": {k: v * self.samples_per_gpu * self.world_size for k, v in per_sample.items()},
            "model_per_gpu": self.model_per_gpu,
            "model_global": self.model_global,
            "hardware_per_gpu": self.hardware_per_gpu,
        }


@dataclass
class Activations:
    """DiT activation estimate in bytes per sample (see :func:`dit_activation_bytes`)."""

    per_layer: int
    outside_layers: int
    checkpointed_per_layer: int
    num_layers: int

    def total(self, checkpointing: bool) -> int:
        """Saved tensors at the end of the forward pass; with checkpointing one layer is rebuilt
        during backward, so its full activations come on top of the stored layer inputs."""
        if checkpointing:
            return self.num_layers * self.checkpointed_per_layer + self.per_layer + self.outside_layers
        return self.num_layers * self.per_layer + self.outside_layers


@dataclass
class MemoryPlan:
    """Per-GPU bytes for one ZeRO stage. ``static`` terms live all run; the activation peak
    (backward) and the step-time transient (EMA update) do not overlap, so the peak is
    ``static + max(activations, transient)``."""

    zero_stage: int
    world_size: int
    micro_batch: int
    static: dict[str, int]
    partitioned: list[str]
    transient: int
    activations: int
    activations_checkpointed: int

    @property
    def static_total(self) -> int:
        return sum(self.static.values())

    def peak(self, checkpointing: bool) -> int:
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.static_total + max(act, self.transient)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "static_total": self.static_total,
            "peak": self.peak(False),
            "peak_checkpointed": self.peak(True),
        }


@dataclass
class PatternReport:
    pattern: str
    shards: int
    local: bool
    existing: int | None


@dataclass
class Plan:
    config_path: str | None
    run: str
    checkpoint_dir: str
    mixed_precision: str
    world_size: int
    zero_stage: int
    micro_batch: int
    gradient_accumulation_steps: int
    components: list[Component]
    tokens: Tokens
    flops: StepFlops
    memory: dict[int, MemoryPlan]
    activations_per_sample: Activations
    data: list[PatternReport]
    notes: list[str] = field(default_factory=list)
    # trainer.init_from as configured (the dry run does not read the parent; the trainer checks it)
    init_from: dict[str, Any] | None = None
    family: str = "baseline-dit"  # or "fuse-dit": the LLM is part of the model

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["flops"] = self.flops.to_dict()
        out["memory"] = {f"zero{k}": v.to_dict() for k, v in self.memory.items()}
        return out


# --------------------------------------------------------------------------------------------
# Frozen components
# --------------------------------------------------------------------------------------------
@dataclass
class TextEncoderInfo:
    params: int | None
    hidden_size: int
    arch: dict[str, int] | None
    source: str


@dataclass
class VaeInfo:
    params: int | None
    latent_channels: int
    spatial_factor: int
    module: torch.nn.Module | None
    family: Family
    source: str
    native_resolution: int | None = None  # an RAE's one image side (common.vae_config.native_resolution)


def _local_folder(value: str, subfolder: str | None, field_name: str) -> Path | None:
    """The model folder when ``value`` is local (the trainer's rule), None for a hub name."""
    looks_local = value.startswith((".", "/", "~")) or Path(value).exists()
    if not looks_local:
        return None
    folder = Path(value).expanduser()
    if not folder.exists():
        raise ConfigError(f"{field_name}: local path {value!r} does not exist")
    return folder / subfolder if subfolder else folder


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_text_encoder(cfg: TrainConfig) -> TextEncoderInfo:
    """Size the frozen text encoder: local config.json built on meta, known table, or unknown."""
    m = cfg.model
    folder = _local_folder(m.base, m.base_subfolder, "model.base")
    if folder is not None:
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = AutoModel.from_config(config)
        info = TextEncoderInfo(_numel(model), int(config.hidden_size), decoder_arch(config), f"{folder}/config.json")
    elif m.base.lower() in KNOWN_TEXT_ENCODERS:
        known = KNOWN_TEXT_ENCODERS[m.base.lower()]
        arch = {k: v for k, v in known.items() if k not in ("params", "vocab_size")}
        info = TextEncoderInfo(known["params"], known["hidden_size"], arch, f"known architecture {m.base}")
    else:
        if not m.text_hidden_size:
            raise ConfigError(
                f"model.text_hidden_size: {m.base!r} is not a local folder nor a known architecture "
                f"({', '.join(KNOWN_TEXT_ENCODERS)}); set model.text_hidden_size so the DiT can be planned"
            )
        return TextEncoderInfo(None, m.text_hidden_size, None, f"unknown hub model {m.base}: not counted")
    if m.text_hidden_size and m.text_hidden_size != info.hidden_size:
        raise ConfigError(
            f"model.text_hidden_size: {m.text_hidden_size} but the text encoder {m.base} has hidden size "
            f"{info.hidden_size}; set it to null or match"
        )
    return info


def _vae_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _build_vae_on_meta(class_name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    with torch.device("meta"):
        return _vae_class(class_name)(**kwargs)


def _local_vae(cfg: TrainConfig, folder: Path) -> tuple[str, dict[str, Any]]:
    """Class and config of a local VAE folder, with the trainer's family rule (common.vae_config.detect)."""
    from diffusers import AutoencoderKL

    config = dict(AutoencoderKL.load_config(str(folder)))
    class_name = detect(cfg.vae.pretrained_model_name_or_path, cfg.vae.kind, config).class_name
    return class_name, {k: v for k, v in config.items() if not k.startswith("_")}


def known_vae_architecture(cfg: TrainConfig) -> tuple[str, dict[str, Any], str] | None:
    """(diffusers class, constructor kwargs, source) of the config's VAE without its weights: a local
    folder's config.json or a known public config; None for an unknown hub name."""
    v = cfg.vae
    folder = _local_folder(v.pretrained_model_name_or_path, v.subfolder, "vae.pretrained_model_name_or_path")
    if folder is not None:
        class_name, kwargs = _local_vae(cfg, folder)
        return class_name, kwargs, f"{folder}/config.json"
    return KNOWN_VAES.get(v.pretrained_model_name_or_path.lower())


def build_vae(class_name: str, kwargs: dict[str, Any], source: str = "") -> torch.nn.Module:
    """The VAE module with fresh (random) weights, on the current default device."""
    return _vae_class(class_name)(**kwargs)


def describe_vae(cfg: TrainConfig) -> VaeInfo:
    """Size the frozen VAE on meta: local config.json, a known public config, or unknown."""
    v = cfg.vae
    known = known_vae_architecture(cfg)
    if known is None:
        if not cfg.model.in_channels:
            raise ConfigError(
                f"model.in_channels: VAE {v.pretrained_model_name_or_path!r} is not local nor known "
                f"({', '.join(KNOWN_VAES)}); set model.in_channels (x8 down-sampling is then assumed)"
            )
        source = f"unknown hub VAE {v.pretrained_model_name_or_path}: not counted, x8 down-sampling assumed"
        return VaeInfo(None, cfg.model.in_channels, 8, None, FAMILIES["kl"], source)
    class_name, kwargs, source = known
    module = _build_vae_on_meta(class_name, kwargs)
    config = dict(module.config)
    family = family_of_class(class_name)
    return VaeInfo(
        _numel(module),
        family.latent_channels(config),
        family.spatial_factor(config),
        module,
        family,
        source,
        family.native_resolution(config),
    )


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
def vae_encoder_forward_flops(vae: VaeInfo, resolution: int) -> int | None:
    """Convolution + matmul FLOPs of ``vae.encode`` for one image, counted on meta tensors.

    A VAE is a deep conv net with no convenient closed form, so torch's FLOP counter walks the
    real module on shapes only (convolutions count as ``2 * out * in * k``, like a matmul).
    """
    if vae.module is None:
        return None
    from torch.utils.flop_counter import FlopCounterMode

    pixels = vae.family.to_vae(torch.empty(1, 3, resolution, resolution, device="meta"))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vae.module.encode(pixels)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------
# Activations and memory
# --------------------------------------------------------------------------------------------
def residual_is_contiguous(dit: torch.nn.Module) -> bool:
    """Whether the DiT's token stream is laid out (B, N, d) in memory, checked on meta.

    When it is not (a transposed conv output), every linear reading it saves its own contiguous
    copy for backward, which changes the activation estimate. Works on meta and real modules.
    """
    return patch_embed_is_contiguous(dit.patch_embed, dit.config.patch_size, dit.config.in_channels)


def patch_embed_is_contiguous(patch_embed: torch.nn.Module, patch_size: int, in_channels: int) -> bool:
    """Whether ``patch_embed`` (a DiT's or a FuseDiT's DiT side's) returns a (B, N, d)-contiguous stream."""
    weight = patch_embed.proj.weight
    probe = torch.zeros(1, in_channels, 2 * patch_size, 2 * patch_size, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        return patch_embed(probe).is_contiguous()


def dit_activation_bytes(
    kw: dict[str, Any], n_image: int, n_text: int, act_bytes: int, residual_contiguous: bool = True
) -> Activations:
    """Estimate the tensors autograd keeps for backward, per sample (bytes).

    Derived by listing what each op of ``fusedit.models.layers`` saves, with ``a`` the activation
    dtype size, ``f = 4`` (RMSNorm works in fp32), N image and L text tokens, Q = heads*head_dim,
    K = kv_heads*head_dim, I the MLP width. One layer ("self" attention, qk-norm):

    ``N*d*(4f + a*(4 + c_h + c_m)) + N*Q*(2f + 2a) + (N + L)*K*(2f + 2a) + 4a*N*I``
    ``+ N*f*(2 + 2*heads + kv_heads) + L*f*kv_heads``

    - each RMSNorm keeps its fp32 input and normalised value (2f) and the modulated output (a);
      two per layer; the gated attention and MLP outputs are kept for the gate gradients (2a);
    - the linears reading the modulated inputs keep those inputs: once when the token stream is
      contiguous, else one copy each (c_h = 3 for q/k/v, c_m = 2 for gate/up, else 1 and 1);
    - q: qk-norm fp32 state (2f), normalised q and the attention output (2a); k: norm state (2f);
      the concatenated text+image keys and values (2a); FlashAttention-style kernels keep only the
      log-sum-exp (heads*f per query), never the N x (L+N) probability matrix (a math-kernel
      fallback would);
    - MLP: gate, GELU(gate), up and their product (4a*I); the remaining terms are the per-row
      RMSNorm statistics (two block norms, q_norm per head, k_norm per kv head).

    "cross" attention adds its q path and text keys/values, sandwich norms add RMSNorms, and
    without qk-norm the fp32 norm states disappear. Outside the layers: the context embedder's
    norm (L*T*(f + a)) and output text (L*d*a, shared by all layers), the head norm and output
    projection input (N*d*(2f + 2a)), the patch-embed input. With gradient checkpointing each
    layer keeps only its input (N*d*a). Loss-side fp32 latents (a few x N*p^2*C) are ignored.
    """
    d, n, length, a, f = kw["hidden_size"], n_image, n_text, act_bytes, 4
    heads, kv_heads, hd = kw["num_attention_heads"], kw["num_key_value_heads"], kw["head_dim"]
    q_dim, kv_dim, qk, cross = heads * hd, kv_heads * hd, kw["qk_norm"], kw["attention"] == "cross"
    copies = 2 if residual_contiguous else 5  # c_h + c_m
    norm = 2 * f + a
    q_path = (2 * f if qk else 0) + 2 * a
    kv_path = (2 * f if qk else 0) + 2 * a
    q_stats = (heads + kv_heads) * f if qk else 0
    layer = n * d * (2 * norm + a * (2 + copies)) + 4 * a * n * kw["intermediate_size"]
    layer += n * q_dim * q_path + n * kv_dim * kv_path + length * kv_dim * kv_path
    layer += n * (2 * f + heads * f + q_stats) + (length * kv_heads * f if qk else 0)
    if cross:  # a second attention: its q path and un-normalised input, and its own statistics
        layer += n * q_dim * q_path + n * d * a + n * (heads * f + q_stats)
    if kw["sandwich_norm"]:
        layer += n * d * norm * (3 if cross else 2)
    p, c_in, t_dim = kw["patch_size"], kw["in_channels"], kw["text_hidden_size"]
    outside = length * t_dim * (f + a) + length * d * a + n * d * (2 * f + 2 * a) + n * p * p * c_in * a
    return Activations(layer, outside, n * d * a, kw["num_layers"])


def memory_plan(
    n_params: int,
    frozen: dict[str, int],
    acts: Activations,
    *,
    zero_stage: int,
    world_size: int,
    micro_batch: int,
    mixed_precision: str,
    trained: str = "DiT",
) -> MemoryPlan:
    """Per-GPU bytes under DeepSpeed ZeRO ``zero_stage`` (0, 1 or 2) with ``world_size`` ranks.

    bf16/fp16: 2-byte weights and gradients, fp32 master weights and Adam moments (12 bytes per
    parameter of optimizer state). fp32: 4-byte weights and gradients, and DeepSpeed still keeps an
    fp32 copy of each rank's partition as the optimizer's master. ZeRO-1 divides the optimizer
    state by N, ZeRO-2 the gradients too; ZeRO-0 replicates all. Under ZeRO-1/2 the EMA is kept
    per rank for the fp32 master partition that rank owns (``fusedit.train.ema.ShardedEMA``: 4
    bytes/param / N); under ZeRO-0 it is an fp32 replica. The transient is the EMA's largest
    temporary, bounded by its chunking: ZeRO-0 upcasts low-precision weights a 2^26-element group at a
    time; ZeRO-1/2 gather the EMA for a checkpoint through a buffer of 2^26 elements in all.
    ``trained`` names the trained weights in the table ("DiT", or "trained" for a FuseDiT whose
    trained set may include its LLM).
    """
    low = mixed_precision in ("bf16", "fp16")
    w = 2 if low else 4
    shard = world_size if zero_stage >= 1 else 1
    master = 4 * n_params // shard if (low or zero_stage >= 1) else 0
    precision = "bf16" if mixed_precision == "bf16" else ("fp16" if low else "fp32")
    static = {
        f"{trained} weights ({precision})": w * n_params,
        "fp32 master weights": master,
        "Adam moments (fp32)": 8 * n_params // shard,
        f"gradients ({precision})": w * n_params // (world_size if zero_stage >= 2 else 1),
        "EMA (fp32)": 4 * n_params // shard,
        **frozen,
    }
    partitioned = ["Adam moments (fp32)"]
    if zero_stage >= 1 and master:
        partitioned.append("fp32 master weights")
    if zero_stage >= 1:
        partitioned.append("EMA (fp32)")
    if zero_stage >= 2:
        partitioned.append(f"gradients ({precision})")
    transient = 4 * min(n_params, EMA_CHUNK_NUMEL) if (low or zero_stage >= 1) else 0
    return MemoryPlan(
        zero_stage,
        world_size,
        micro_batch,
        static,
        partitioned,
        transient,
        micro_batch * acts.total(False),
        micro_batch * acts.total(True),
    )


def check_data_paths(patterns: list[str]) -> list[PatternReport]:
    """Syntax-check and count every pattern; count existing files for local ones only."""
    import braceexpand

    reports = []
    for pattern in patterns:
        try:
            check_brace_syntax(pattern)
        except ValueError as err:
            raise ConfigError(f"data.data_path: {pattern!r}: {err}") from None
        urls = list(braceexpand.braceexpand(pattern))
        local = not is_remote(pattern)
        existing = sum(os.path.isfile(u.removeprefix("file://").removeprefix("file:")) for u in urls) if local else None
        reports.append(PatternReport(pattern, len(urls), local, existing))
    return reports


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
def _tokens(cfg: TrainConfig, vae: VaeInfo, text_tokens: int | None) -> Tokens:
    """Token counts; the resolution must map to whole patches (as the trainer checks)."""
    check_geometry(cfg, vae.spatial_factor, vae.latent_channels, vae.native_resolution)
    latent = cfg.data.resolution // vae.spatial_factor
    side = latent // cfg.model.patch_size
    if text_tokens is None:
        n_text, source = (
            cfg.data.max_prompt_length,
            "data.max_prompt_length; an upper bound, batches pad to their longest prompt",
        )
    else:
        n_text, source = text_tokens, "--text-tokens"
    numel = vae.latent_channels * latent * latent
    base = cfg.noise_scheduler.shift_base_dim
    shift = cfg.noise_scheduler.shift
    rule = "noise_scheduler.shift" if base is None else f"{shift:g} x sqrt({numel:,} / {base:,}), by latent dimension"
    return Tokens(
        side * side,
        n_text,
        vae.latent_channels,
        latent,
        vae.spatial_factor,
        cfg.model.patch_size,
        source,
        schedule_shift(cfg, numel),
        rule,
    )


def build_meta_dit(kw: dict[str, Any]) -> torch.nn.Module:
    """The DiT with shapes only: the count is the real module's, at no memory cost."""
    from fusedit.models.dit import DiT

    with torch.device("meta"):
        return DiT(**kw)


def _frozen_memory(cfg: TrainConfig, text: TextEncoderInfo, vae: VaeInfo) -> dict[str, int]:
    """Frozen weights in the dtype the trainer loads them in (bf16 only for bf16 runs).

    With a text-feature cache the trainer keeps the text encoder in host memory (it encodes only the
    sample grids' prompts), so it costs the accelerator nothing.
    """
    bf16 = cfg.trainer.mixed_precision == "bf16"
    size, name = (2, "bf16") if bf16 else (4, "fp32")
    on_device = not cfg.data.text_cache
    return {
        f"text encoder ({name}, frozen)": size * (text.params or 0) * on_device,
        f"VAE ({name}, frozen)": size * (vae.params or 0),
    }


def _text_encoder_flops(cfg: TrainConfig, text: TextEncoderInfo, n_text: int) -> int | None:
    """Per-sample encoder FLOPs; 0 with data.text_cache (it ran once, ahead of training)."""
    if cfg.data.text_cache:
        return 0
    return text_encoder_forward_flops(text.arch, n_text) if text.arch else None


def _step_flops(
    cfg: TrainConfig, kw: dict[str, Any], tokens: Tokens, text: TextEncoderInfo, vae: VaeInfo, world_size: int
) -> StepFlops:
    fwd, blocks = dit_forward_flops(kw, tokens.image_tokens, tokens.text_tokens)
    return StepFlops(
        dit_forward_per_sample=fwd,
        dit_blocks_forward_per_sample=blocks,
        text_encoder_forward_per_sample=_text_encoder_flops(cfg, text, tokens.text_tokens),
        # data.latent_cache: the encoder ran once, ahead of training (fusedit/data/latent_cache.py)
        vae_encoder_forward_per_sample=0
        if cfg.data.uses_latent_cache
        else vae_encoder_forward_flops(vae, cfg.data.resolution),
        samples_per_gpu=cfg.data.batch_size_per_gpu * cfg.trainer.gradient_accumulation_steps,
        world_size=world_size,
        gradient_checkpointing=cfg.trainer.enable_gradient_checkpointing,
    )


def _memory_plans(
    cfg: TrainConfig,
    n_trained: int,
    acts: Activations,
    frozen: dict[str, int],
    world_size: int,
    trained: str = "DiT",
) -> dict[int, MemoryPlan]:
    mp, micro = cfg.trainer.mixed_precision, cfg.data.batch_size_per_gpu
    return {
        stage: memory_plan(
            n_trained,
            frozen,
            acts,
            zero_stage=stage,
            world_size=world_size,
            micro_batch=micro,
            mixed_precision=mp,
            trained=trained,
        )
        for stage in (0, 1, 2)
    }


# --------------------------------------------------------------------------------------------
# The FuseDiT family: the LLM is part of the model
# --------------------------------------------------------------------------------------------
@dataclass
class LlmInfo:
    config: dict[str, Any]  # the transformers config dict a FuseDiT is built from
    source: str


def describe_llm(cfg: TrainConfig) -> LlmInfo:
    """The FuseDiT's LLM architecture: a local config.json (PaliGemma's text config), a known one,
    or an error naming model.base (a FuseDiT cannot be sized without its LLM)."""
    m = cfg.model
    folder = _local_folder(m.base, m.base_subfolder, "model.base")
    if folder is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
        config = getattr(config, "text_config", None) or config
        return LlmInfo(config.to_dict(), f"{folder}/config.json")
    known = known_llm(m.base)
    if known is None:
        raise ConfigError(
            f"model.base: {m.base!r} is not a local folder nor a known LLM ({', '.join(KNOWN_LLMS)}); "
            "a FuseDiT is planned from its LLM's architecture"
        )
    from transformers import Gemma2Config, GemmaConfig

    kind = Gemma2Config if known["model_type"] == "gemma2" else GemmaConfig
    fields = {k: v for k, v in known.items() if k != "model_type"}
    return LlmInfo(kind(**fields).to_dict(), f"known architecture {m.base}")


@dataclass
class ClipInfo:
    params: int | None
    arch: dict[str, int] | None  # fusedit.flops.clip_text_arch; None when unknown offline
    source: str


def describe_clip(cfg: TrainConfig) -> ClipInfo | None:
    """The "fuse-dit-clip" type's frozen CLIP text encoder, built on meta from a local config.json or a
    known architecture (CLIP-L); another hub name is planned as unknown (0 bytes, 0 FLOPs, a note)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    m = cfg.model
    if not m.clip_text_encoder:
        return None
    folder = _local_folder(m.clip_text_encoder, m.clip_text_encoder_subfolder, "model.clip_text_encoder")
    known = KNOWN_CLIP_TEXT_ENCODERS.get((m.clip_text_encoder.lower(), m.clip_text_encoder_subfolder))
    if folder is not None:
        config, source = CLIPTextConfig.from_pretrained(str(folder)), f"{folder}/config.json"
    elif known is not None:
        config, source = CLIPTextConfig(**known), f"known architecture CLIP-L ({m.clip_text_encoder})"
    else:
        return ClipInfo(None, None, f"unknown hub model {m.clip_text_encoder}: not counted")
    if config.projection_dim != m.text_modulation_embeds_dim:
        raise ConfigError(
            f"model.text_modulation_embeds_dim: {m.text_modulation_embeds_dim}, but the CLIP text encoder "
            f"{m.clip_text_encoder} gives pooled embeddings of width {config.projection_dim}; set it to that"
        )
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    return ClipInfo(_numel(model), clip_text_arch(config), source)


def fuse_dit_activation_bytes(
    config: dict[str, Any], n_image: int, n_text: int, act_bytes: int, train_llm: bool, contiguous: bool
) -> Activations:
    """Per-sample activations of a FuseDiT: its DiT layers as :func:`dit_activation_bytes` counts
    them (with the LLM's heads; no context embedder), plus, with ``train_llm``, the LLM layers it
    runs (:func:`_llm_activation_bytes`). The LLM's share sits outside the DiT layers: gradient
    checkpointing recomputes the DiT layers only. A frozen LLM keeps nothing for backward beyond
    the text keys/values the DiT's attention reads (counted in the DiT layers).
    """
    from fusedit.flops import fuse_dit_llm_arch

    llm, arch = config["llm_config"], fuse_dit_llm_arch(config)
    heads = {k: arch[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim")}
    dit_kw = {
        **heads,
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "qk_norm": config["qk_norm"],
        "attention": config["attention"],
        "sandwich_norm": config["sandwich_norm"],
        "patch_size": config["patch_size"],
        "in_channels": config["in_channels"],
        "text_hidden_size": 0,
        "num_layers": config["num_layers"],
    }
    acts = dit_activation_bytes(dit_kw, n_image, n_text, act_bytes, contiguous)
    if not train_llm:
        return acts
    llm_total = _llm_activation_bytes(dit_kw, arch, llm["model_type"] == "gemma2", n_text, act_bytes)
    return Activations(acts.per_layer, acts.outside_layers + llm_total, acts.checkpointed_per_layer, acts.num_layers)


def _llm_activation_bytes(dit_kw: dict[str, Any], arch: dict[str, int], gemma2: bool, n_text: int, a: int) -> int:
    """What a trained FuseDiT LLM keeps for backward, per sample: a decoder layer is a DiT layer
    over the L text tokens without modulation (no modulated norm outputs, no gated branch outputs:
    4*L*h*a less); of the last shared layer only the input norm feeds its keys/values (its fp32
    state and output, L*h*(2f + a)); plus the scaled token embeddings (L*h*a)."""
    h, f = arch["hidden_size"], 4
    kw = {
        **dit_kw,
        "hidden_size": h,
        "intermediate_size": arch["intermediate_size"],
        "qk_norm": False,
        "attention": "self",
        "sandwich_norm": gemma2,
    }
    layer = dit_activation_bytes(kw, n_text, 0, a).per_layer - 4 * n_text * h * a
    return (arch["num_hidden_layers"] - 1) * layer + n_text * h * (2 * f + a) + n_text * h * a


def _numel_split(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of a module after ``set_trainable``."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, _numel(module) - trainable


def build_fuse_dit_plan(
    cfg: TrainConfig, config_path: str | None, world_size: int, zero_stage: int, text_tokens: int | None
) -> Plan:
    """The dry run of a FuseDiT config: the same sections as the baseline's, with the LLM inside
    the model (trained or frozen by ``trainer.train_llm``) instead of a separate text encoder."""
    from fusedit.config import check_fuse_dit_heads
    from fusedit.flops import fuse_dit_forward_flops, fuse_dit_layer_flops
    from fusedit.models.fuse_dit import FuseDiT

    llm, vae, clip = describe_llm(cfg), describe_vae(cfg), describe_clip(cfg)
    check_fuse_dit_heads(cfg, llm.config)
    tokens = _tokens(cfg, vae, text_tokens)
    config = {**cfg.fuse_dit_kwargs(vae.latent_channels), "llm_config": llm.config}
    with torch.device("meta"):
        model = FuseDiT(**config)
    model.set_trainable(train_dit=cfg.trainer.train_dit, train_llm=cfg.trainer.train_llm)
    (dit_train, dit_frozen), (llm_train, llm_frozen) = _numel_split(model.dit), _numel_split(model.llm)
    components = [
        Component("DiT side", dit_train, dit_frozen, "meta build of the FuseDiT (trainer.train_dit)"),
        Component("LLM", llm_train, llm_frozen, f"{llm.source}; cut after its last shared layer (trainer.train_llm)"),
        Component("VAE", 0, vae.params, vae.source),
    ]
    if clip is not None:
        components.append(Component("CLIP text", 0, clip.params, clip.source))
    n, length = tokens.image_tokens, tokens.text_tokens
    dit_fwd, llm_fwd = fuse_dit_forward_flops(config, n, length)
    flops = StepFlops(
        dit_forward_per_sample=dit_fwd,
        dit_blocks_forward_per_sample=fuse_dit_layer_flops(config, n, length),
        text_encoder_forward_per_sample=llm_fwd,
        vae_encoder_forward_per_sample=0
        if cfg.data.uses_latent_cache
        else vae_encoder_forward_flops(vae, cfg.data.resolution),
        samples_per_gpu=cfg.data.batch_size_per_gpu * cfg.trainer.gradient_accumulation_steps,
        world_size=world_size,
        gradient_checkpointing=cfg.trainer.enable_gradient_checkpointing,
        llm_backward_per_sample=2 * llm_fwd if cfg.trainer.train_llm else 0,
        clip_text_forward_per_sample=_clip_flops(clip),
    )
    act_bytes = 2 if cfg.trainer.mixed_precision in ("bf16", "fp16") else 4
    contiguous = patch_embed_is_contiguous(model.dit.patch_embed, config["patch_size"], config["in_channels"])
    acts = fuse_dit_activation_bytes(config, n, length, act_bytes, cfg.trainer.train_llm, contiguous)
    size, name = (2, "bf16") if cfg.trainer.mixed_precision == "bf16" else (4, "fp32")
    frozen = {f"LLM ({name}, frozen)": size * llm_frozen}
    if dit_frozen:  # trainer.train_dit: false
        frozen[f"DiT side ({name}, frozen)"] = size * dit_frozen
    frozen[f"VAE ({name}, frozen)"] = size * (vae.params or 0)
    if clip is not None:
        frozen[f"CLIP text encoder ({name}, frozen)"] = size * (clip.params or 0)
    memory = _memory_plans(cfg, dit_train + llm_train, acts, frozen, world_size, trained="trained")
    plan = _plan(cfg, config_path, world_size, zero_stage, components, tokens, flops, memory, acts, "fuse-dit")
    plan.notes = _fuse_dit_notes(plan, cfg, clip) + _notes(plan, None, vae, contiguous)[1:]
    return plan


def _plan(
    cfg: TrainConfig,
    config_path: str | None,
    world_size: int,
    zero_stage: int,
    components: list[Component],
    tokens: Tokens,
    flops: StepFlops,
    memory: dict[int, MemoryPlan],
    acts: Activations,
    family: str,
) -> Plan:
    """The plan of either family from its computed parts, with the run's identity and data checks."""
    plan = Plan(
        config_path=config_path,
        run=cfg.trainer.run,
        checkpoint_dir=cfg.trainer.checkpoint_dir,
        mixed_precision=cfg.trainer.mixed_precision,
        world_size=world_size,
        zero_stage=zero_stage,
        micro_batch=cfg.data.batch_size_per_gpu,
        gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
        components=components,
        tokens=tokens,
        flops=flops,
        memory=memory,
        activations_per_sample=acts,
        data=check_data_paths(list(cfg.data.data_path)),
        family=family,
    )
    if cfg.trainer.init_from is not None:
        plan.init_from = asdict(cfg.trainer.init_from)
    return plan


def _clip_flops(clip: ClipInfo | None) -> int | None:
    """Per-sample CLIP text forward: 0 without CLIP, None when its architecture is unknown offline."""
    from fusedit.text import CLIP_MAX_LENGTH

    if clip is None:
        return 0
    return None if clip.arch is None else clip_text_forward_flops(clip.arch, CLIP_MAX_LENGTH)


def _clip_note(clip: ClipInfo | None) -> list[str]:
    if clip is None:
        return []
    if clip.arch is None:
        return [f"CLIP text encoder: {clip.source}; a frozen component unknown offline counts as 0 bytes and 0 FLOPs."]
    return [
        "CLIP text encoder (fuse-dit-clip): frozen, forward only, every caption padded to CLIP's 77 tokens "
        "(as the reference); its pooled embedding enters the timestep embedding, so nothing flows back into it."
    ]


def _fuse_dit_notes(plan: Plan, cfg: TrainConfig, clip: ClipInfo | None = None) -> list[str]:
    trained = (
        "trained (trainer.train_llm): forward, backward and activations"
        if cfg.trainer.train_llm
        else ("frozen: forward only, every step (the text stream does not depend on the image, so no backward)")
    )
    return [
        "FLOPs: matmul/conv FLOPs only (2*m*n*k), DiT side backward = 2x forward; text tokens = "
        f"{plan.tokens.text_tokens} ({plan.tokens.text_tokens_source}).",
        f"FuseDiT: the LLM runs inside the model and is {trained}. Gradient checkpointing recomputes the "
        "DiT layers only. Its unused weights (final norm; the last shared layer's query, output and MLP) "
        "stay frozen even when the LLM trains.",
    ] + _clip_note(clip)


def build_plan(
    cfg: TrainConfig,
    config_path: str | None = None,
    world_size: int = 8,
    zero_stage: int = 2,
    text_tokens: int | None = None,
) -> Plan:
    """Everything the dry run reports, as data. Builds only meta modules; reads only local configs."""
    from fusedit.models.dit import count_parameters

    if world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world_size}")
    if cfg.data.global_batch_size is not None:  # the split the trainer derives for this world size
        cfg = copy.deepcopy(cfg)
        derive_batch(cfg, world_size)
    if cfg.model.is_fuse_dit:
        return build_fuse_dit_plan(cfg, config_path, world_size, zero_stage, text_tokens)
    text, vae = describe_text_encoder(cfg), describe_vae(cfg)
    tokens = _tokens(cfg, vae, text_tokens)
    kw = cfg.dit_kwargs(vae.latent_channels, text.hidden_size)
    dit = build_meta_dit(kw)
    n_dit = _numel(dit)
    if n_dit != count_parameters(kw):  # two independent counts of one architecture must agree
        raise RuntimeError(f"DiT meta build has {n_dit:,} parameters, count_parameters says {count_parameters(kw):,}")
    components = [
        Component("DiT", n_dit, 0, "meta build (= fusedit.models.dit.count_parameters)"),
        Component("text encoder", 0, text.params, text.source),
        Component("VAE", 0, vae.params, vae.source),
    ]
    act_bytes = 2 if cfg.trainer.mixed_precision in ("bf16", "fp16") else 4
    contiguous = residual_is_contiguous(dit)
    acts = dit_activation_bytes(kw, tokens.image_tokens, tokens.text_tokens, act_bytes, contiguous)
    flops = _step_flops(cfg, kw, tokens, text, vae, world_size)
    memory = _memory_plans(cfg, n_dit, acts, _frozen_memory(cfg, text, vae), world_size)
    plan = _plan(cfg, config_path, world_size, zero_stage, components, tokens, flops, memory, acts, "baseline-dit")
    plan.notes = _notes(plan, text, vae, contiguous)
    return plan


def _notes(plan: Plan, text: TextEncoderInfo | None, vae: VaeInfo, contiguous: bool) -> list[str]:
    """Assumptions a reader of the numbers should know, in the order they matter."""
    notes = [
        "FLOPs: matmul/conv FLOPs only (2*m*n*k), DiT backward = 2x forward; text tokens = "
        f"{plan.tokens.text_tokens} ({plan.tokens.text_tokens_source}).",
        "Memory: estimates, not measurements. Not included: CUDA context and NCCL buffers (~1-3 GiB), "
        "allocator fragmentation, DeepSpeed bucket buffers, data-loader pinned memory, the frozen "
        "encoders' forward transients (freed before the DiT forward).",
        "Activations assume a FlashAttention/memory-efficient kernel (no N x (L+N) probability matrix kept).",
    ]
    if plan.memory[plan.zero_stage].transient:
        notes.append(
            "EMA transient: at most 2^26 fp32 elements (256 MiB): the ZeRO-0 EMA upcasts bf16 weights a "
            "group at a time; the sharded ZeRO-1/2 EMA is gathered to rank 0's host memory through a buffer "
            "of that size when a checkpoint or sample grid is written."
        )
    if not contiguous:
        notes.append(
            "The DiT token stream is channel-major after PatchEmbed (transpose without .contiguous()): "
            "q/k/v and gate/up each keep their own input copy; the estimate includes these copies."
        )
    if (text is not None and text.params is None) or vae.params is None:
        notes.append("A frozen component is unknown offline and counted as 0 bytes and 0 FLOPs.")
    return notes


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _n(x: int | None) -> str:
    return "unknown" if x is None else f"{x:,}"


def _flop(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} FLOP"


def _memory_unit(plan: Plan) -> tuple[str, int]:
    """GiB for real runs, MiB when the whole plan is smaller than a GiB (toy configs)."""
    largest = max(m.peak(False) for m in plan.memory.values())
    return ("GiB", GIB) if largest >= GIB else ("MiB", 1024**2)


def _render_params(plan: Plan) -> list[str]:
    lines = ["Parameters", f"  {'component':<14}{'trainable':>16}{'frozen':>16}   source"]
    for c in plan.components:
        lines.append(f"  {c.name:<14}{_n(c.trainable):>16}{_n(c.frozen):>16}   {c.source}")
    trainable = sum(c.trainable or 0 for c in plan.components)
    frozen = sum(c.frozen or 0 for c in plan.components)
    lines.append(f"  {'total':<14}{trainable:>16,}{frozen:>16,}")
    return lines


def _render_tokens(plan: Plan) -> list[str]:
    t = plan.tokens
    side = t.latent_size // t.patch_size
    return [
        f"Tokens per sample: {t.image_tokens} image ({t.latent_size * t.vae_factor} px / VAE x{t.vae_factor} / "
        f"patch {t.patch_size} = {side} x {side}; {t.latent_channels} latent channels), "
        f"{t.text_tokens} text ({t.text_tokens_source})",
        f"Noise schedule: shift {t.schedule_shift:.2f} ({t.shift_rule})",
    ]


def _render_flops(plan: Plan) -> list[str]:
    f = plan.flops
    lines = [
        f"FLOPs per optimizer step ({f.samples_per_gpu} samples/GPU x {f.world_size} GPUs)",
        f"  {'part':<28}{'per sample':>16}{'per GPU':>16}{'global':>16}",
    ]
    labels = {
        "dit_forward": "DiT forward",
        "dit_backward": "DiT backward (2x fwd)",
        "text_encoder_forward": "text encoder forward",
        "vae_encoder_forward": "VAE encoder forward",
    }
    if plan.family == "fuse-dit":
        labels = {
            "dit_forward": "DiT side forward",
            "dit_backward": "DiT side backward (2x fwd)",
            "text_encoder_forward": "LLM forward (in the model)",
            "llm_backward": "LLM backward (train_llm)",
            "vae_encoder_forward": "VAE encoder forward",
        }
        if any(c.name == "CLIP text" for c in plan.components):
            labels["clip_text_forward"] = "CLIP text forward"
    per_sample = f.per_sample()
    for key, label in labels.items():
        gpu = per_sample[key] * f.samples_per_gpu
        lines.append(f"  {label:<28}{_flop(per_sample[key]):>16}{_flop(gpu):>16}{_flop(gpu * f.world_size):>16}")
    total = f.model_per_sample()
    lines.append(f"  {'total':<28}{_flop(total):>16}{_flop(f.model_per_gpu):>16}{_flop(f.model_global):>16}")
    recompute = f.dit_blocks_forward_per_sample * f.samples_per_gpu
    verb = "(on) adds" if f.gradient_checkpointing else "(off) would add"
    lines.append(
        f"  gradient checkpointing {verb} a block recompute of {_flop(recompute)} per GPU "
        "(executed, not counted as model FLOPs)"
    )
    return lines


def _render_memory(plan: Plan) -> list[str]:
    stages = sorted(plan.memory)
    first = plan.memory[stages[0]]
    unit, scale = _memory_unit(plan)
    head = "".join(f"{'ZeRO-' + str(s) + ('*' if s == plan.zero_stage else ''):>10}" for s in stages)

    def cells(get) -> str:
        return "".join(f"{get(plan.memory[s]) / scale:10.2f}" for s in stages)

    lines = [
        f"Memory per GPU in {unit} (N = {plan.world_size} GPUs, micro-batch {plan.micro_batch}, "
        f"mixed_precision {plan.mixed_precision}; * = selected stage)",
        f"  {'term':<40}{head}",
    ]
    for name in first.static:
        mark = " /N" if name in plan.memory[2].partitioned else ""
        lines.append(f"  {name + mark:<40}" + cells(lambda m, name=name: m.static[name]))
    rows = [
        ("static total", lambda m: m.static_total),
        ("activations, no checkpointing", lambda m: m.activations),
        ("activations, gradient checkpointing", lambda m: m.activations_checkpointed),
        ("EMA transient (upcast / gather)", lambda m: m.transient),
        ("PEAK, no checkpointing", lambda m: m.peak(False)),
        ("PEAK, gradient checkpointing", lambda m: m.peak(True)),
    ]
    for label, get in rows:
        lines.append(f"  {label:<40}" + cells(get))
    return lines


def _render_data(plan: Plan) -> list[str]:
    total = sum(r.shards for r in plan.data)
    local = [r for r in plan.data if r.local]
    lines = [f"Data: {len(plan.data)} pattern(s), {total:,} shards (brace syntax OK)"]
    for r in plan.data:
        where = f"{r.existing:,} exist locally" if r.local else "remote, not checked"
        lines.append(f"  {r.shards:>7,}  {r.pattern}  ({where})")
    if local:
        have, want = sum(r.existing or 0 for r in local), sum(r.shards for r in local)
        verdict = "all present" if have == want else "training will refuse to start until they exist; not an error here"
        lines.append(f"  local shards present: {have:,} of {want:,} ({verdict})")
    return lines


def _render_init_from(plan: Plan) -> list[str]:
    i = plan.init_from
    if i is None:
        return []
    return [
        f"Starts from: {i['checkpoint']} tag {i['tag']} ({i['weights']} weights; trainer.init_from): fresh optimizer, "
        "step 0, new data stream. Not read here: the trainer checks the folder, the tag and the architecture "
        "before launch (a checkpoint of this run, if any, is resumed instead)"
    ]


def render(plan: Plan) -> str:
    """The human-readable plan printed by ``train.py --dry-run``."""
    head = [f"Dry-run plan for {plan.config_path or plan.run} (run {plan.run!r}): meta device only, nothing loaded"]
    sections = [
        head + _render_init_from(plan),
        _render_params(plan),
        _render_tokens(plan),
        _render_flops(plan),
        _render_memory(plan),
        _render_data(plan),
        ["Assumptions"] + [f"  - {n}" for n in plan.notes],
    ]
    return "\n\n".join("\n".join(s) for s in sections)


def write_outputs(plan: Plan, cfg: TrainConfig) -> tuple[Path, Path]:
    """``config.resolved.yaml`` and ``plan.json`` in the run's checkpoint directory."""
    out = Path(cfg.trainer.checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file, plan_file = out / "config.resolved.yaml", out / "plan.json"
    save_config(cfg, config_file)
    write_json_atomic(plan_file, plan.to_dict(), sort_keys=False)
    return config_file, plan_file


def default_zero_stage(deepspeed_config_path: str | None) -> int:
    """The stage a real launch would use: the DeepSpeed JSON's, else the built-in ZeRO-2."""
    from fusedit.train.deepspeed_config import load_deepspeed_json

    stage = load_deepspeed_json(deepspeed_config_path).get("zero_optimization", {}).get("stage", 0)
    return int(stage)


def run_dry_run(
    cfg: TrainConfig,
    config_path: str | None = None,
    world_size: int = 8,
    zero_stage: int | None = None,
    text_tokens: int | None = None,
    deepspeed_config_path: str | None = None,
    stream: TextIO | None = None,
) -> Plan:
    """Plan, print (to ``stream``, default stdout) and write the plan files: ``train.py --dry-run``."""
    stream = stream or sys.stdout
    if zero_stage is None:
        zero_stage = default_zero_stage(deepspeed_config_path or cfg.trainer.deepspeed_config)
    plan = build_plan(cfg, config_path, world_size, zero_stage, text_tokens)
    config_file, plan_file = write_outputs(plan, cfg)
    print(render(plan), file=stream)
    print(f"\nWrote {config_file} and {plan_file}", file=stream)
    return plan
