"""Typed training configuration: schema, YAML loading, ``key=value`` overrides and validation.

One place decides what a run may say. A YAML file is merged onto the dataclass schema
below (OmegaConf structured configs), then command-line ``key=value`` overrides are merged on
top, and the result is checked by :func:`validate` *before* any model, data or process group
is created. Every error names the offending field and what it accepts, so a typo in a
500k-step run fails in a second instead of after the first checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from common.config import (
    Alias,
    AliasTable,
    ConfigError,
    SharedSample,
    SharedTrainer,
    check_choice,
    check_positive,
    check_rate,
    check_trainer,
    config_notice,
    file_layers,
    merge_structured,
    normalise_trainer,
    parse_override,
    raise_config_errors,
    resolve_alias_key,
)
from common.vae_config import VAE_KINDS
from fusedit.llm_architectures import KNOWN_LLMS, known_llm

ATTENTION_KINDS = ("self", "cross")
BASELINE_NAMES = ("baseline-dit", "DiT")
FUSE_DIT_NAMES = ("FuseDiT", "fuse-dit")
TIMESTEP_CONDITIONING = ("adaln-zero", "adaln-single", "addition", "none")
POS_EMBED_KINDS = ("ape", "1d-rope", "2d-rope", "m-rope")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
INIT_FROM_WEIGHTS = ("ema", "raw")
# "clip-llm": the LLM plus a CLIP text encoder's pooled embedding (model.clip_text_encoder), the reference's name
ENCODER_TYPES = ("llm", "clip-llm")


@dataclass
class InitFromConfig:
    """Start a *new* run from another run's weights (e.g. the 512 px stage from the 256 px run).

    Fresh optimizer, LR schedule, step 0 and data stream; the DiT and its EMA both start from the
    chosen weights (EMA == those weights at step 0). Only the safetensors folder
    ``<checkpoint>/<tag>/ema/`` (``weights: ema``) or ``<tag>/model/`` (``raw``) is read. The folder,
    the tag and the architecture (its ``config.json`` against ``model``) are checked by the trainer
    before any process group; ``load_config`` and the dry run do not need the folder to exist.
    When ``trainer.resume_from`` finds a checkpoint of this run, it wins: a restarted continuation
    resumes itself instead of starting over from the parent.
    """

    # The parent run directory (its trainer.checkpoint_dir).
    checkpoint: str = MISSING
    # "latest" or a step number (the parent's checkpoint tag).
    tag: str = "latest"
    # "ema" (the EMA weights, <tag>/ema/) or "raw" (the trained weights, <tag>/model/).
    weights: str = "ema"


@dataclass
class TrainerConfig(SharedTrainer):
    """How the run is driven. The fields both stages share (steps, precision, checkpoints,
    logging, resume, trackers, the non-finite guard) are declared once in
    :class:`common.config.SharedTrainer`; these are the text-to-image stage's own."""

    # The reference's wandb project, so a run here sits beside the reference's runs.
    project: str = "FuseDiT"
    # Images per optimizer step = data.batch_size_per_gpu x this x GPUs.
    gradient_accumulation_steps: int = 1
    # Null, or {checkpoint: RUN_DIR, tag: latest|<step>, weights: ema|raw}: a new run that starts
    # from another run's weights (see InitFromConfig). A checkpoint of this run (resume_from) wins.
    init_from: Optional[InitFromConfig] = None
    enable_gradient_checkpointing: bool = False
    # FuseDiT: which side trains. The LLM inside the model is frozen unless train_llm (its
    # parameters then join the optimizer and the EMA); train_dit: false trains the LLM alone.
    train_dit: bool = True
    train_llm: bool = False
    # (trainer.compile: through DeepSpeed's engine.compile. Each new text length may recompile
    # until the padding buckets, data.pad_to_multiple_of, have all been seen.)
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    # DeepSpeed JSON; `train.py --deepspeed-config-path` sets it too. Null = ZeRO-2 defaults.
    deepspeed_config: Optional[str] = None
    # Deterministic kernels cost speed on GPUs; off unless asked (the reference forced them on).
    deterministic: bool = False
    # Dense peak of one accelerator in TFLOP/s for the MFU in the training log. Null: H100/H200/A100
    # are recognised; on CPU (or an unknown GPU) MFU is omitted and the log says why.
    peak_tflops: Optional[float] = None


@dataclass
class ModelConfig:
    """The DiT and the frozen text encoder it reads. Mirrors the reference 'baseline-dit'."""

    name: str = "baseline-dit"
    # Text encoder (and default tokenizer): a hub name such as google/gemma-2b or a local folder.
    base: str = MISSING
    base_subfolder: Optional[str] = None
    encoder_type: str = "llm"
    text_hidden_states_index: int = -1
    # Null: read from the text encoder's config.
    text_hidden_size: Optional[int] = None
    attention: str = "self"
    # Null: the VAE's latent channels.
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    patch_size: int = 2
    pos_embed: str = "ape"
    pos_embed_max_size: int = 64
    # Latent side length the APE table is centred for (the reference's base size is sample_size/patch).
    # With pos_embed_max_size it fixes the table's coordinates (k * base / max): a later stage at a
    # higher resolution keeps both and uses a larger centred crop (trainer.init_from checks this).
    sample_size: int = 32
    qk_norm: bool = True
    sandwich_norm: bool = False
    # adaln-zero | adaln-single | addition | none (a YAML null, the reference's spelling of none, is read as none)
    timestep_conditioning: Optional[str] = "adaln-zero"
    hidden_size: int = 2048
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 8192
    hidden_act: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    initializer_range: float = 0.02
    # FuseDiT only (model.name: FuseDiT, fusedit/models/fuse_dit.py; docs/fusedit-family.md): the LLM
    # (model.base) runs inside the model. Its first `initial_layers` layers run alone; the layers in
    # `shared_attention_layers` ("all" = every later one, or a list of LLM layer indices) each share
    # one joint attention with the next DiT layer. `text_modulation_embeds_dim`: width of a pooled
    # text embedding (CLIP-L: 768) added to the timestep embedding, the "fuse-dit-clip" type.
    initial_layers: int = 0
    shared_attention_layers: Any = "all"
    text_modulation_embeds_dim: Optional[int] = None
    # Cached sampling of 2d/m-rope FuseDiTs: true reproduces the reference sampler, which drops the
    # image positions' text offset on cached steps (to sample its checkpoints as it did).
    reference_cached_positions: bool = False
    # The "fuse-dit-clip" type (encoder_type: clip-llm, the reference's clip_l section): a frozen CLIP
    # text model with projection (hub id or folder, e.g. SD3's repository with subfolder text_encoder)
    # whose pooled embedding of each caption is the text_modulation_embeds_dim input. Required
    # exactly when text_modulation_embeds_dim is set; its tokenizer: data.clip_tokenizer.
    clip_text_encoder: Optional[str] = None
    clip_text_encoder_subfolder: Optional[str] = None

    @property
    def is_fuse_dit(self) -> bool:
        """Whether this is the deep-fusion family (the LLM inside the model) rather than the baseline DiT."""
        return self.name in FUSE_DIT_NAMES


@dataclass
class EmaConfig:
    decay: float = 0.9999
    update_steps: int = 1


@dataclass
class VaeConfig:
    pretrained_model_name_or_path: str = MISSING
    subfolder: Optional[str] = None
    # auto: the family a hint in the path ("qwen", "flux.2"/"flux2") or the saved config's class names,
    # else AutoencoderKL; or one of kl | qwen | flux2 | rae outright (docs/tokenizers.md).
    kind: str = "auto"
    # Train on posterior samples (reference) or on the posterior mean.
    sample_posterior: bool = True


@dataclass
class NoiseSchedulerConfig:
    """Flow-matching sigma table. Null path = built from the two numbers (no hub needed)."""

    pretrained_model_name_or_path: Optional[str] = None
    subfolder: Optional[str] = "scheduler"
    num_train_timesteps: int = 1000
    shift: float = 3.0
    # Shift by latent dimension (docs/tokenizers.md, "Noise schedule for wide latents"): when set, the
    # latent size `shift` is meant for; a DiT latent (C * h * w at data.resolution) k times larger
    # trains with sqrt(k) x `shift`. The RAE recipe is shift 1.0 at 4096 (6.93 for a DINOv2-B RAE at
    # 256 px); null keeps the fixed shift every other config uses.
    shift_base_dim: Optional[int] = None


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class LrSchedulerConfig:
    name: str = "constant"
    num_warmup_steps: int = 0


@dataclass
class CaptionColumns:
    original: str = ""
    synthetic: str = "txt"


@dataclass
class DataConfig:
    # Shard patterns (brace ranges expand). One string is read as a list: the reference's "::"-joined form.
    data_path: Any = MISSING
    # Images per GPU per micro-step (DeepSpeed's train_micro_batch_size_per_gpu). The global batch is
    # batch_size_per_gpu x trainer.gradient_accumulation_steps x GPUs (the reference: 32 x 1 x 32 = 1024).
    # With data.global_batch_size set, this is the largest micro-batch a GPU takes (see below).
    batch_size_per_gpu: int = 32
    # Samples per optimizer step over all GPUs, kept whatever the number of GPUs: the per-GPU
    # micro-batch (at most batch_size_per_gpu) and trainer.gradient_accumulation_steps are derived
    # for the world size at hand (fusedit.config.derive_batch). Null: the per-GPU spelling above.
    global_batch_size: Optional[int] = None
    # Independent sample streams that make up the global order (fusedit/data/webdata.py): global
    # batch s takes global_batch / num_streams samples from each in turn, whatever the GPUs and
    # workers. Must divide the global batch and be divisible by the number of GPUs. Null: one
    # stream per sample of the global batch. The demo's toy.yaml pins 1 (the order its verdict was
    # measured on).
    num_streams: Optional[int] = None
    resolution: int = 256
    center_crop: bool = True
    image_column: str = "jpg"
    caption_column: CaptionColumns = field(default_factory=CaptionColumns)
    original_caption_rate: float = 0.0
    random_dropping_rate: float = 0.1
    instruction: str = ""
    max_prompt_length: int = 256
    # Text is padded to the batch's longest prompt, rounded up to this multiple (reference: always 256).
    pad_to_multiple_of: int = 8
    dataloader_num_workers: int = 8
    num_open_shards: int = 4
    # Null: the text encoder's folder (model.base).
    tokenizer: Optional[str] = None
    # The CLIP tokenizer of model.clip_text_encoder (the reference's data.tokenizer.clip). Both null: the
    # CLIP model's own folder and subfolder; SD3's layout: the repository with subfolder "tokenizer".
    clip_tokenizer: Optional[str] = None
    clip_tokenizer_subfolder: Optional[str] = None
    # A folder written by `python -m fusedit.data.latent_cache` for the shards of data_path (their VAE
    # posterior moments instead of the images): training reads the cache's shards and skips the VAE
    # encoder. Its cache.json must name data_path's shards as its sources and match `vae`.
    latent_cache: Optional[str] = None
    # A folder written by `python -m fusedit.data.text_cache` for these shards (both captions'
    # text-encoder features, real tokens only): training skips the text encoder. Its cache.json
    # must match `model` and `data`. (Spelled data.cached_text_features before.)
    text_cache: Optional[str] = None
    # The old spelling of a latent cache: true = data_path already names the cache's shards
    # (latents-NNNNNN.tar). Still read; data.latent_cache is the folder form of the same thing.
    cached_latents: bool = False

    @property
    def uses_latent_cache(self) -> bool:
        """Whether batches hold cached posterior moments instead of images (either spelling)."""
        return bool(self.latent_cache) or self.cached_latents


@dataclass
class SampleConfig(SharedSample):
    """Preview grids of fixed prompts during training (samples/<step>.png), and the run's sampler
    settings that evaluation and the demo reuse. (Spelled ``gen.*`` before: see ALIASES.)"""

    # Prompts of the grid; when empty, a JSON list of prompts (strings or {"prompt": ...}) in prompt_file.
    prompts: list[str] = field(default_factory=list)
    prompt_file: Optional[str] = None
    height: int = 256
    width: int = 256
    # Images per prompt (rank 0 draws the whole grid).
    num_images_per_prompt: int = 1
    # The reference Fuse-DiT's preview sampler: 25 Euler steps at guidance 6.
    num_steps: int = 25
    cfg_scale: float = 6.0
    negative_prompt: Optional[str] = None
    seed: int = 114514
    # Sample with the EMA weights (the reference sampled the raw weights).
    use_ema: bool = True


@dataclass
class TrainConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    noise_scheduler: NoiseSchedulerConfig = field(default_factory=NoiseSchedulerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LrSchedulerConfig = field(default_factory=LrSchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable dict (what a run records next to its checkpoints)."""
        return dataclasses.asdict(self)

    def dit_kwargs(self, in_channels: int, text_hidden_size: int) -> dict[str, Any]:
        """Arguments of :class:`fusedit.models.dit.DiT` once VAE and text encoder sizes are known."""
        m = self.model
        return dict(
            in_channels=m.in_channels or in_channels,
            out_channels=m.out_channels or m.in_channels or in_channels,
            patch_size=m.patch_size,
            hidden_size=m.hidden_size,
            num_layers=m.num_hidden_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads,
            head_dim=m.head_dim,
            intermediate_size=m.intermediate_size,
            hidden_act=m.hidden_act,
            rms_norm_eps=m.rms_norm_eps,
            text_hidden_size=m.text_hidden_size or text_hidden_size,
            attention=m.attention,
            qk_norm=m.qk_norm,
            sandwich_norm=m.sandwich_norm,
            timestep_conditioning=None if m.timestep_conditioning == "none" else m.timestep_conditioning,
            pos_embed=m.pos_embed,
            pos_embed_max_size=m.pos_embed_max_size,
            sample_size=m.sample_size,
            rope_theta=m.rope_theta,
            initializer_range=m.initializer_range,
        )

    def fuse_dit_kwargs(self, in_channels: int) -> dict[str, Any]:
        """Arguments of ``FuseDiT.from_llm`` besides the LLM: the DiT side's sizes and the fusion options.

        Heads, KV heads, head size, norm epsilon, RoPE theta and activation are the LLM's (the two
        halves meet in one attention), so the matching model.* fields are not passed
        (:func:`fusedit.train.trainer.build_fuse_dit` refuses values that contradict the LLM).
        """
        m = self.model
        shared = m.shared_attention_layers
        return {
            "in_channels": m.in_channels or in_channels,
            "out_channels": m.out_channels or m.in_channels or in_channels,
            "patch_size": m.patch_size,
            "hidden_size": m.hidden_size,
            "num_layers": m.num_hidden_layers,
            "intermediate_size": m.intermediate_size,
            "attention": m.attention,
            "qk_norm": m.qk_norm,
            "sandwich_norm": m.sandwich_norm,
            "timestep_conditioning": None if m.timestep_conditioning == "none" else m.timestep_conditioning,
            "pos_embed": m.pos_embed,
            "pos_embed_max_size": m.pos_embed_max_size,
            "sample_size": m.sample_size,
            "initial_layers": m.initial_layers,
            "shared_attention_layers": shared if isinstance(shared, str) else [int(i) for i in shared],
            "text_modulation_embeds_dim": m.text_modulation_embeds_dim,
            "reference_cached_positions": m.reference_cached_positions,
        }


# Accepted spellings of the reference Fuse-DiT YAML (docs/reference-facts.md, T2I-1.2) and of older configs of this
# repository: old dotted key -> schema key (see common.config.Alias). Each one used prints a notice.
_XLA_ONLY = "XLA/TPU trainer only; no effect on GPUs"
_CLIP_KEYS = (
    "the reference's clip-llm type passes only pretrained_model_name_or_path and subfolder to from_pretrained, "
    "here model.clip_text_encoder[_subfolder] and data.clip_tokenizer[_subfolder]"
)
ALIASES: dict[str, str | Alias] = {
    "data.batch_size": Alias("data.batch_size_per_gpu", note="per GPU, as the reference's data.batch_size"),
    # model: the reference builds the DiT from the text encoder's HF config plus base_config_override.
    "model.dit_num_hidden_layers": "model.num_hidden_layers",
    "model.dit_hidden_size": "model.hidden_size",
    "model.base_config_override.hidden_activation": "model.hidden_act",
    **{
        f"model.base_config_override.{name}": f"model.{name}"
        for name in (
            "head_dim",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
            "initializer_range",
        )
    },
    "model.base_config_override.attention_bias": Alias(
        None, note="the DiT's attention has no biases", allowed=(False,), unsupported="the DiT has no attention biases"
    ),
    "model.base_config_override.*": Alias(
        None,
        allowed=(),
        unsupported="only the DiT's own sizes map onto model.*: hidden_activation, head_dim, hidden_size, "
        "intermediate_size, num_attention_heads, num_key_value_heads, rms_norm_eps, rope_theta, initializer_range; "
        "the frozen text encoder is loaded unmodified",
    ),
    # Reference keys without effect in its GPU trainer (T2I-1.2 and T2I-4).
    "trainer.cache_dir": Alias(None, note="XLA compile cache only; no effect on GPUs"),
    "trainer.validation_steps": Alias(None, note="never read by the reference trainer"),
    "trainer.consolidation_steps": Alias(
        None, note="compressed EMA export; every checkpoint here holds the EMA weights"
    ),
    "trainer.hard_skip_resume": Alias(
        None,
        note="false: resume restores the data position and the RNG state",
        allowed=(False,),
        unsupported="a resume always restores the data position and the RNG state",
    ),
    "data.device_prefetch_size": Alias(None, note=_XLA_ONLY),
    "data.loader_prefetch_size": Alias(None, note=_XLA_ONLY),
    "data.apply_chat_template": Alias(
        None, note="prompts are tokenised without a chat template", allowed=(False,), unsupported="no chat template"
    ),
    # Preview sampling was `gen` (the reference's section); both stages now say `sample`.
    "gen.*": "sample.*",
    "gen.val_prompt": "sample.prompts",
    "gen.val_prompt_file": "sample.prompt_file",
    "gen.H": "sample.height",
    "gen.W": "sample.width",
    "gen.n_samples": Alias("sample.num_images_per_prompt", note="images per prompt"),
    "gen.scale": "sample.cfg_scale",
    "gen.steps": "sample.num_steps",
    "gen.model_type": Alias(None, note="training samples always use the trained DiT"),
    # Both caches are folders in both stages: data.latent_cache, data.text_cache.
    "data.cached_text_features": "data.text_cache",
    "gen.instruction": Alias(
        None,
        note="training samples use no instruction prefix",
        allowed=("",),
        unsupported="training samples use no instruction prefix",
    ),
    # The reference's FuseDiT ablations (its configs/fusedit/*.yaml, docs/fusedit-family.md). Its "clip-llm"
    # encoder type (clip-mod.yaml) adds a CLIP-L pooled embedding to the timestep embedding; its clip_l
    # section and data.tokenizer.{clip, llm} are from_pretrained arguments, which map onto our fields.
    "clip_l.pretrained_model_name_or_path": Alias("model.clip_text_encoder", note="the CLIP text encoder"),
    "clip_l.subfolder": "model.clip_text_encoder_subfolder",
    "clip_l.*": Alias(None, allowed=(), unsupported=_CLIP_KEYS),
    "data.tokenizer.llm": Alias("data.tokenizer", note="the LLM's tokenizer of the reference's clip-llm layout"),
    "data.tokenizer.clip.pretrained_model_name_or_path": Alias("data.clip_tokenizer", note="the CLIP tokenizer"),
    "data.tokenizer.clip.subfolder": "data.clip_tokenizer_subfolder",
    "data.tokenizer.clip.*": Alias(None, allowed=(), unsupported=_CLIP_KEYS),
    "data.add_generation_prompt": Alias(None, note="read only with a chat template, which is not supported"),
    "data.instruction_length": Alias(None, note="the reference computed it from data.instruction's tokens; so do we"),
}

# model.base_config_override changes the config the reference's *baseline* DiT is built from; its FuseDiT
# builder never reads it (both halves take their sizes from the LLM checkpoint's own config). For
# model.name: FuseDiT those keys therefore had no effect, and they are accepted and ignored here too.
FUSE_DIT_ALIASES: dict[str, str | Alias] = {
    **{k: v for k, v in ALIASES.items() if not k.startswith("model.base_config_override.")},
    "model.base_config_override.*": Alias(
        None,
        note="no effect on a FuseDiT in the reference: its builder reads the LLM's own config; "
        "model.hidden_size (the reference's model.dit_hidden_size) sets the DiT's width",
    ),
}

# Where a reference YAML is silent, its builders size the DiT from the LLM's own (hub) config: width (unless
# model.dit_hidden_size), MLP width, heads, KV heads and head size, and the baseline's text width. Our
# defaults are the 3B study's numbers instead, so a file in the reference's layout (it spells
# model.dit_num_hidden_layers, which the reference requires) gets the LLM's numbers from this table; the
# hub is never read while loading a config (fusedit.llm_architectures).
_REFERENCE_LAYOUT_KEY = "model.dit_num_hidden_layers"


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _spelled(path: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """Every dotted key as written (the file, the files it extends, then the overrides), last value wins."""
    layers = file_layers(Path(path)) if path is not None else []
    layers += [parse_override(item) for item in overrides]
    spelled: dict[str, Any] = {}
    for layer in layers:
        spelled.update(_leaves(OmegaConf.to_container(layer, resolve=False)))
    return spelled


def _reference_layout(cfg: TrainConfig, spelled: dict[str, Any], aliases: AliasTable) -> None:
    """A reference-layout YAML: the DiT sizes it leaves unsaid are its LLM's (fusedit.llm_architectures)."""
    if _REFERENCE_LAYOUT_KEY not in spelled:
        return
    m = cfg.model
    stated = {resolve_alias_key(key, aliases) for key in spelled}
    fields = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"]
    fields += [] if m.is_fuse_dit else ["text_hidden_size"]
    missing = [name for name in fields if f"model.{name}" not in stated]
    if not missing:
        return
    sizes = known_llm(m.base)
    if sizes is None:
        raise ConfigError(
            f"model.base: {m.base!r}: a reference YAML ({_REFERENCE_LAYOUT_KEY}) leaves "
            f"{', '.join(f'model.{n}' for n in missing)} to the LLM's own config, known offline only for "
            f"{', '.join(KNOWN_LLMS)}; state them"
        )
    for name in missing:
        setattr(m, name, sizes["hidden_size" if name == "text_hidden_size" else name])
    config_notice(
        f"config: reference layout ({_REFERENCE_LAYOUT_KEY}): "
        + ", ".join(f"model.{n}={getattr(m, n)}" for n in missing)
        + f" from {m.base}'s config, where the reference's builder reads them"
    )


def _reference_values(cfg: TrainConfig) -> None:
    """Values the reference spells differently: a null timestep conditioning, one '::'-joined shard string."""
    if cfg.model.timestep_conditioning is None:
        cfg.model.timestep_conditioning = "none"
        config_notice("config: model.timestep_conditioning: null (the reference's spelling) is read as 'none'")
    d = cfg.data
    if isinstance(d.data_path, str):
        d.data_path = [p for p in d.data_path.split("::") if p]
        config_notice(
            f"config: data.data_path given as one string is read as {len(d.data_path)} shard pattern(s) "
            "(the reference's '::'-joined form)"
        )
    if not isinstance(d.data_path, list) or not all(isinstance(p, str) for p in d.data_path):
        raise ConfigError(f"data.data_path: a list of shard patterns (or one '::'-joined string), got {d.data_path!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Schema <- YAML file <- ``key=value`` overrides, then :func:`validate`.

    Old spellings (the reference Fuse-DiT YAML, ``data.batch_size``) are accepted through
    :data:`ALIASES` (:data:`FUSE_DIT_ALIASES` for a FuseDiT), each with a one-line notice; a YAML in
    the reference's layout gets the DiT sizes it leaves to its LLM from :mod:`fusedit.llm_architectures`.

    Raises :class:`ConfigError` naming the bad field for unknown keys, wrong types, missing
    required values and out-of-range settings.
    """
    spelled = _spelled(path, list(overrides or []))
    fuse = spelled.get("model.name", ModelConfig.name) in FUSE_DIT_NAMES
    aliases = FUSE_DIT_ALIASES if fuse else ALIASES
    cfg = merge_structured(TrainConfig, path, overrides, aliases=aliases)
    _reference_layout(cfg, spelled, aliases)
    _reference_values(cfg)
    normalise_trainer(cfg.trainer)
    if cfg.data.cached_latents:
        config_notice(
            "config: data.cached_latents=true (data.data_path names the cache's shards) is the old spelling of "
            "a latent cache: data.latent_cache=DIR with data.data_path at the images says the same"
        )
    validate(cfg)
    return cfg


def _validate_trainer(t: TrainerConfig, errors: list[str]) -> None:
    check_trainer(errors, t)
    check_choice(errors, "trainer.weighting_scheme", t.weighting_scheme, WEIGHTING_SCHEMES)
    check_positive(errors, "trainer.gradient_accumulation_steps", t.gradient_accumulation_steps)
    check_positive(errors, "trainer.logit_std", t.logit_std)
    if t.deepspeed_config is not None and not Path(t.deepspeed_config).is_file():
        errors.append(f"trainer.deepspeed_config: file not found: {t.deepspeed_config}")
    if t.init_from is not None:
        _validate_init_from(t.init_from, errors)


def _validate_init_from(i: InitFromConfig, errors: list[str]) -> None:
    """Shape only: the folder itself is checked by the trainer (fusedit.train.init_from), not here."""
    if not str(i.checkpoint).strip():
        errors.append("trainer.init_from.checkpoint: the parent run directory, e.g. output/<run>")
    if i.tag != "latest" and not str(i.tag).isdigit():
        errors.append(f"trainer.init_from.tag: {i.tag!r} is not 'latest' or a step number")
    check_choice(errors, "trainer.init_from.weights", i.weights, INIT_FROM_WEIGHTS)


def _validate_model(m: ModelConfig, errors: list[str]) -> None:
    check_choice(errors, "model.name", m.name, BASELINE_NAMES + FUSE_DIT_NAMES)
    _validate_fusion(m, errors)
    check_choice(errors, "model.encoder_type", m.encoder_type, ENCODER_TYPES)
    check_choice(errors, "model.attention", m.attention, ATTENTION_KINDS)
    check_choice(errors, "model.pos_embed", m.pos_embed, POS_EMBED_KINDS)
    check_choice(errors, "model.timestep_conditioning", m.timestep_conditioning, TIMESTEP_CONDITIONING)
    for name in ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
        check_positive(errors, f"model.{name}", getattr(m, name))
    check_positive(errors, "model.num_key_value_heads", m.num_key_value_heads)
    check_positive(errors, "model.intermediate_size", m.intermediate_size)
    if m.num_key_value_heads > 0 and m.num_attention_heads % m.num_key_value_heads:
        errors.append(
            f"model.num_key_value_heads: {m.num_key_value_heads} must divide "
            f"model.num_attention_heads ({m.num_attention_heads}) for grouped-query attention"
        )
    if m.pos_embed in ("2d-rope", "m-rope") and m.head_dim % 4:
        errors.append(f"model.head_dim: {m.pos_embed} needs a multiple of 4, got {m.head_dim}")
    elif m.head_dim % 2:
        errors.append(f"model.head_dim: rotary and attention kernels need an even head size, got {m.head_dim}")
    if m.pos_embed == "ape" and m.hidden_size % 4:
        errors.append(f"model.hidden_size: the 2-D sin-cos APE needs a multiple of 4, got {m.hidden_size}")


def _validate_fusion(m: ModelConfig, errors: list[str]) -> None:
    """The FuseDiT-only fields: their values, and that a baseline DiT leaves them at their defaults."""
    if not m.is_fuse_dit:
        for name, default in (
            ("initial_layers", 0),
            ("shared_attention_layers", "all"),
            ("text_modulation_embeds_dim", None),
        ):
            if getattr(m, name) != default:
                errors.append(
                    f"model.{name}: only model.name: FuseDiT has it (the baseline DiT reads the text "
                    f"encoder's output in every layer); remove it or use FuseDiT"
                )
        return
    if m.initial_layers < 0:
        errors.append(f"model.initial_layers: must be >= 0, got {m.initial_layers}")
    shared = m.shared_attention_layers
    if isinstance(shared, str):
        if shared != "all":
            errors.append(f"model.shared_attention_layers: 'all' or a list of LLM layer indices, got {shared!r}")
    elif not shared or not all(isinstance(i, int) and not isinstance(i, bool) for i in shared):
        errors.append(f"model.shared_attention_layers: 'all' or a non-empty list of LLM layer indices, got {shared!r}")
    elif sorted(set(shared)) != list(shared) or min(shared) < m.initial_layers:
        errors.append(
            f"model.shared_attention_layers: indices must be increasing, unique and >= model.initial_layers "
            f"({m.initial_layers}), got {list(shared)}"
        )
    if m.text_modulation_embeds_dim is not None and m.text_modulation_embeds_dim <= 0:
        errors.append(f"model.text_modulation_embeds_dim: a positive width or null, got {m.text_modulation_embeds_dim}")


def _clip_fields(cfg: TrainConfig) -> list[str]:
    """The fields that ask for a CLIP text encoder, as spelled in the schema, in a fixed order."""
    m, d = cfg.model, cfg.data
    values = (
        ("model.clip_text_encoder", m.clip_text_encoder),
        ("model.clip_text_encoder_subfolder", m.clip_text_encoder_subfolder),
        ("data.clip_tokenizer", d.clip_tokenizer),
        ("data.clip_tokenizer_subfolder", d.clip_tokenizer_subfolder),
    )
    fields = [name for name, value in values if value is not None]
    return fields + ["model.encoder_type"] * (m.encoder_type == "clip-llm")


def _validate_clip(cfg: TrainConfig, errors: list[str]) -> None:
    """The "fuse-dit-clip" type, in one place: a CLIP text encoder, ``encoder_type: clip-llm`` and
    ``model.text_modulation_embeds_dim`` go together, and only in a FuseDiT (the pooled embedding
    modulates its timestep embedding; the baseline DiT has no such input)."""
    m, clip_fields = cfg.model, _clip_fields(cfg)
    if not m.is_fuse_dit:
        if clip_fields:
            errors.append(
                f"{clip_fields[0]}: only model.name: FuseDiT takes a CLIP text encoder (the reference's "
                "fuse-dit-clip type), the baseline DiT reads the text encoder alone: remove it or use FuseDiT"
            )
        return
    for name in ("clip_text_encoder", "clip_text_encoder_subfolder"):
        value = getattr(m, name)
        if value is not None and not value.strip():
            errors.append(f"model.{name}: a hub id or folder, or null (no CLIP text encoder)")
    has_clip, has_width = bool(m.clip_text_encoder), m.text_modulation_embeds_dim is not None
    if has_width and not has_clip:
        errors.append(
            f"model.clip_text_encoder: required with model.text_modulation_embeds_dim "
            f"({m.text_modulation_embeds_dim}): it computes the pooled text embedding of that width, e.g. "
            "stabilityai/stable-diffusion-3-medium-diffusers with model.clip_text_encoder_subfolder: text_encoder"
        )
    elif has_clip and not has_width:
        errors.append(
            "model.text_modulation_embeds_dim: required with model.clip_text_encoder (the width of its pooled "
            "embedding, 768 for CLIP-L), or remove the CLIP text encoder"
        )
    elif not has_clip and clip_fields:
        errors.append(f"model.clip_text_encoder: required with {clip_fields[0]}, or remove that")
    elif has_clip and m.encoder_type != "clip-llm":
        errors.append(
            f"model.encoder_type: 'clip-llm' with model.clip_text_encoder (the LLM plus CLIP's pooled "
            f"embedding), got {m.encoder_type!r}"
        )


def _validate_trained_sides(cfg: TrainConfig, errors: list[str]) -> None:
    """trainer.train_dit / train_llm: something must train, and only a FuseDiT holds an LLM to train."""
    t = cfg.trainer
    if not cfg.model.is_fuse_dit and (t.train_llm or not t.train_dit):
        errors.append(
            "trainer.train_llm / trainer.train_dit: the baseline DiT trains the DiT and keeps the text encoder "
            "frozen; only model.name: FuseDiT can train its LLM"
        )
    elif not (t.train_dit or t.train_llm):
        errors.append("trainer.train_dit / trainer.train_llm: both false leaves nothing to train")
    if cfg.model.is_fuse_dit and cfg.data.text_cache:
        errors.append(
            "data.text_cache: a FuseDiT runs its LLM inside the model, layer by layer with the image, so "
            "there are no text features to cache; remove data.text_cache (a latent cache still works)"
        )


def _validate_data(d: DataConfig, errors: list[str]) -> None:
    if not d.data_path:
        errors.append("data.data_path: must list at least one shard pattern")
    for p in d.data_path:
        if "/PATH/TO/DATASET/" in p:
            errors.append(f"data.data_path: {p!r} still holds the /PATH/TO/DATASET/ placeholder")
    for name in ("batch_size_per_gpu", "resolution", "max_prompt_length", "pad_to_multiple_of", "num_open_shards"):
        check_positive(errors, f"data.{name}", getattr(d, name))
    check_positive(errors, "data.dataloader_num_workers", d.dataloader_num_workers, allow_zero=True)
    for name in ("global_batch_size", "num_streams"):
        if getattr(d, name) is not None:
            check_positive(errors, f"data.{name}", getattr(d, name))
    check_rate(errors, "data.original_caption_rate", d.original_caption_rate)
    check_rate(errors, "data.random_dropping_rate", d.random_dropping_rate)
    if d.original_caption_rate > 0 and not d.caption_column.original:
        errors.append("data.caption_column.original: must be set when data.original_caption_rate > 0")
    if not d.caption_column.synthetic:
        errors.append("data.caption_column.synthetic: must name the caption member (e.g. 'txt')")
    if d.uses_latent_cache and not d.center_crop:
        errors.append("data.latent_cache: a latent cache fixes the crop; it needs data.center_crop=true")
    if d.latent_cache is not None and d.cached_latents:
        errors.append(
            "data.cached_latents: give either data.latent_cache=DIR (data_path at the images) or the old "
            "data.cached_latents=true (data_path at the cache's shards), not both"
        )
    for name in ("latent_cache", "text_cache"):
        value = getattr(d, name)
        if value is not None and not value.strip():
            errors.append(f"data.{name}: a cache folder, or null to run the encoder every step")


def check_geometry(
    cfg: TrainConfig, spatial_factor: int, latent_channels: int | None = None, native_resolution: int | None = None
) -> None:
    """Resolution and sample sizes must map to whole patches once the VAE's factor is known, a
    stated ``model.in_channels`` must be the latent's channel count, and an RAE (which encodes and
    decodes one image side only, ``native_resolution``) must be asked for that side.

    Called by the trainer (after loading the VAE), the planner and the benchmark (from the VAE
    config alone), so the three agree on what a valid geometry is. The channels are those the DiT
    sees, after the family's own patchify (FLUX.2: 4 x 32 = 128).
    """
    stated = cfg.model.in_channels
    if latent_channels is not None and stated is not None and stated != latent_channels:
        raise ConfigError(
            f"model.in_channels: {stated}, but the VAE {cfg.vae.pretrained_model_name_or_path!r} gives "
            f"{latent_channels}-channel latents; set it to {latent_channels} (or null to take the VAE's)"
        )
    unit = spatial_factor * cfg.model.patch_size
    sizes = (
        ("data.resolution", cfg.data.resolution),
        ("sample.height", cfg.sample.height),
        ("sample.width", cfg.sample.width),
    )
    for name, value in sizes:
        if native_resolution is not None and value != native_resolution:
            raise ConfigError(
                f"{name}: {value}, but the VAE {cfg.vae.pretrained_model_name_or_path!r} is an RAE that "
                f"encodes and decodes {native_resolution} px only; set it to {native_resolution} (or use "
                "the RAE built for this resolution)"
            )
        if value % unit:
            raise ConfigError(
                f"{name}: {value} is not a multiple of VAE factor {spatial_factor} "
                f"x patch {cfg.model.patch_size} = {unit}"
            )
        # The APE is a centred crop of a fixed (max x max) table: a larger grid has no positions.
        if cfg.model.pos_embed == "ape" and value // unit > cfg.model.pos_embed_max_size:
            raise ConfigError(
                f"{name}: {value} px is a {value // unit}-token side, larger than model.pos_embed_max_size="
                f"{cfg.model.pos_embed_max_size} (the APE table's side); at most "
                f"{cfg.model.pos_embed_max_size * unit} px"
            )


def derive_batch(cfg: TrainConfig, world_size: int) -> dict[str, int] | None:
    """With ``data.global_batch_size``, set the micro-batch and accumulation for ``world_size``.

    Each of the N processes takes G / N samples per step in A micro-batches of G / (N A): the
    smallest A whose micro-batch fits ``data.batch_size_per_gpu`` and splits the share evenly. So a
    run that loses or gains GPUs keeps its global batch (and, through the global sample order, its
    samples). Returns what was derived (None without a global batch); refuses, naming the numbers,
    a global batch that N processes cannot share.
    """
    g, cap = cfg.data.global_batch_size, cfg.data.batch_size_per_gpu
    if g is None:
        return None
    if g % world_size:
        raise ConfigError(
            f"data.global_batch_size: {g} samples cannot be shared by {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    share = g // world_size
    accumulation = next(a for a in range(-(-share // cap), share + 1) if share % a == 0)
    cfg.data.batch_size_per_gpu = share // accumulation
    cfg.trainer.gradient_accumulation_steps = accumulation
    return {
        "global_batch_size": g,
        "world_size": world_size,
        "batch_size_per_gpu": share // accumulation,
        "gradient_accumulation_steps": accumulation,
    }


def check_fuse_dit_heads(cfg: TrainConfig, llm_config: Any) -> None:
    """A FuseDiT takes its heads, KV heads and head size from its LLM: refuse a contradiction.

    The two halves meet in one attention, so ``model.num_attention_heads`` etc. may only be left at
    their defaults or equal the LLM's. Called by the trainer (on the loaded LLM's config) and the
    planner (on its config.json or known architecture), so both refuse the same configs.
    ``llm_config`` is a transformers config object or its dict.
    """
    defaults = ModelConfig()
    for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
        ours = getattr(cfg.model, name)
        theirs = llm_config.get(name) if isinstance(llm_config, dict) else getattr(llm_config, name, None)
        if ours != getattr(defaults, name) and theirs is not None and ours != theirs:
            raise ConfigError(
                f"model.{name}: {ours}, but a FuseDiT takes it from its LLM ({cfg.model.base}: {theirs}); "
                f"the two halves meet in one attention. Remove it or set {theirs}"
            )


def validate(cfg: TrainConfig) -> None:
    """Semantic checks the type system cannot express; raises one ConfigError listing all."""
    errors: list[str] = []
    _validate_trainer(cfg.trainer, errors)
    _validate_model(cfg.model, errors)
    _validate_trained_sides(cfg, errors)
    _validate_clip(cfg, errors)
    _validate_data(cfg.data, errors)
    check_choice(errors, "vae.kind", cfg.vae.kind, VAE_KINDS)
    if not 0.0 < cfg.ema.decay < 1.0:
        errors.append(f"ema.decay: must be in (0, 1), got {cfg.ema.decay!r}")
    check_positive(errors, "ema.update_steps", cfg.ema.update_steps)
    if cfg.trainer.peak_tflops is not None:
        check_positive(errors, "trainer.peak_tflops", cfg.trainer.peak_tflops)
    check_positive(errors, "noise_scheduler.shift", cfg.noise_scheduler.shift)
    if cfg.noise_scheduler.shift_base_dim is not None:
        check_positive(errors, "noise_scheduler.shift_base_dim", cfg.noise_scheduler.shift_base_dim)
        if cfg.noise_scheduler.pretrained_model_name_or_path:
            errors.append(
                "noise_scheduler.shift_base_dim: set, but noise_scheduler.pretrained_model_name_or_path loads a "
                "scheduler with its own shift; use one or the other"
            )
    check_positive(errors, "optimizer.lr", cfg.optimizer.lr)
    check_positive(errors, "optimizer.weight_decay", cfg.optimizer.weight_decay, allow_zero=True)
    if len(cfg.optimizer.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optimizer.betas):
        errors.append(f"optimizer.betas: expected two values in [0, 1), got {cfg.optimizer.betas!r}")
    check_choice(errors, "lr_scheduler.name", cfg.lr_scheduler.name, LR_SCHEDULES)
    check_positive(errors, "lr_scheduler.num_warmup_steps", cfg.lr_scheduler.num_warmup_steps, allow_zero=True)
    for name in ("height", "width", "num_images_per_prompt", "num_steps"):
        check_positive(errors, f"sample.{name}", getattr(cfg.sample, name))
    raise_config_errors(errors)
