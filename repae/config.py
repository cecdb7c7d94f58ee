"""Typed configuration of the REPA-E stage (joint tuning, frozen-VAE training, previews).

Same contract as the text-to-image stage (:mod:`fusedit.config`): a dataclass schema, a YAML
file merged on top, ``key=value`` overrides on the command line, and :func:`validate` listing
every semantic error with its field name before any model, data or process group exists.

The defaults are the reference's ``train_repae.py`` CLI defaults and
``configs/l1_lpips_kl_gan.yaml`` values (docs/reference-facts.md, REPAE-4.1 and REPAE-5.4), except where the
reference is wrong or unsafe: bf16 instead of fp16 (fp16 runs collapse around 90k steps), LPIPS fed the [-1, 1]
range it expects, a discriminator warm-up when there is no pretrained discriminator, and a
resume that restores everything.

The vocabulary is the text-to-image stage's (``trainer``, ``optimizer``, ``data.data_path``,
``data.dataloader_num_workers``), with the batch named by its scope (``data.global_batch_size``).
The older spellings of this stage (``run.*``, ``optim.*``, ``data.batch_size``, ``data.shards``,
``data.num_workers``) are still accepted through :data:`ALIASES`, each with a one-line notice;
the reference ``train_repae.py`` flags are translated by :mod:`repae.flags`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from common.config import (
    Alias,
    ConfigError,
    SharedSample,
    SharedTrainer,
    check_choice,
    check_positive,
    check_rate,
    check_trainer,
    merge_structured,
    normalise_trainer,
    raise_config_errors,
    save_config,
)
from common.vae_config import FAMILIES

# The families REPA-E tunes: every VAE with a posterior (KL, Qwen-Image, FLUX.2). An RAE is not one:
# its encoder is a frozen vision model by design and its latent has no posterior (docs/tokenizers.md).
REPAE_FAMILIES = tuple(k for k, f in FAMILIES.items() if f.posterior)
VAE_KINDS = ("auto", *REPAE_FAMILIES)
PATH_TYPES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")
SAMPLER_MODES = ("ode", "sde")
RECONSTRUCTION_LOSSES = ("l1", "l2")
LPIPS_NETS = ("vgg", "alex", "squeeze")

__all__ = ["ALIASES", "ConfigError", "RepaeConfig", "load_repae_config", "save_config"]


@dataclass
class TrainerSection(SharedTrainer):
    """How the run is driven. The fields shared with the text-to-image stage are declared once in
    :class:`common.config.SharedTrainer`; the defaults redeclared here are this stage's reference
    recipe (``train_repae.py``), which its users' scripts and numbers assume."""

    # The reference's --exp-name default: the folder name, tqdm and tracker run name.
    run: str = "repae"
    project: str = "repae"
    # The reference writes runs under exps/<exp-name>/.
    checkpoint_dir: str = "exps/${trainer.run}"
    # The published REPA-E recipe: 400k steps, seed 0.
    max_steps: int = 400_000
    seed: int = 0
    # One REPA-E checkpoint holds SiT, VAE, discriminator and three optimisers: the newest 3 are
    # kept (the reference kept every one).
    checkpoints_total_limit: Optional[int] = 3
    # Class-conditional previews of a 256 px SiT are cheap: more often than the T2I stage's.
    sampling_steps: int = 10_000
    # metrics.jsonl only unless a tracker is asked for (these runs are often many small sweeps).
    report_to: list[str] = field(default_factory=list)
    allow_tf32: bool = True


@dataclass
class VaeSection:
    """The VAE to tune (joint stage) or to keep frozen (train_ldm).

    `pretrained_model_name_or_path` (the T2I stage's spelling; `name_or_path` before): a preset
    ("f8d4", "f16d32", built from its diffusers config and filled from `checkpoint`, a reference
    `.pt`), a diffusers folder, or a hub id (FLUX, SD-3.5, Qwen-Image).
    `latents_stats`: "auto" (the reference's `<checkpoint>-latents-stats.pt` when it exists, else
    the per-channel `latents_mean`/`latents_std` in the VAE config, else estimated from data),
    "estimate", "config", or a path to a stats file.
    """

    pretrained_model_name_or_path: str = "f8d4"
    subfolder: Optional[str] = None
    kind: str = "auto"
    checkpoint: Optional[str] = None
    latents_stats: str = "auto"
    # Loader batches each process reads when the statistics are estimated from data
    # (stats_batches x data.global_batch_size images in all).
    stats_batches: int = 16


@dataclass
class ModelSection:
    """The SiT. `arch` picks a registry size; the optional fields override it (tiny test models)."""

    arch: str = "SiT-XL/2"
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    encoder_depth: int = 8
    projector_dim: int = 2048
    qk_norm: bool = False
    fused_attn: bool = True
    bn_momentum: float = 0.1
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None


@dataclass
class EncoderSection:
    """Frozen vision encoders giving the REPA target (one projector each)."""

    types: list[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    # Optional local weight files per encoder type (offline clusters, MoCo v3).
    checkpoints: dict[str, str] = field(default_factory=dict)


@dataclass
class LossSection:
    """VAE losses (REPAE-4.1 values), the REPA coefficients and the transport."""

    reconstruction_loss: str = "l1"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_net: str = "vgg"
    # "torchvision" (ImageNet backbone via the torch hub cache), "random", or a local file.
    perceptual_backbone: str = "torchvision"
    kl_weight: float = 1.0e-6
    discriminator_start: int = 0
    discriminator_factor: float = 1.0
    discriminator_weight: float = 0.1
    adaptive_weight: bool = False
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999
    # Ramp of the generator's GAN weight: the path for a discriminator trained from scratch.
    discriminator_warmup_steps: int = 0
    discriminator_checkpoint: Optional[str] = None
    disc_channels: int = 64
    disc_layers: int = 3
    # True reproduces the published recipe's losses exactly: LPIPS fed [-3, 1] (the reference maps
    # its [-1, 1] images again) and separate discriminator passes for real and fake images. False
    # (default) keeps this repository's fixes. See docs/repae.md.
    reference_faithful: bool = False
    proj_coeff: float = 0.5
    vae_align_proj_coeff: float = 1.5
    path_type: str = "linear"
    weighting: str = "uniform"

    def vae_loss_kwargs(self) -> dict[str, Any]:
        """The fields :class:`repae.losses.VAELoss` takes."""
        names = (
            "reconstruction_loss",
            "reconstruction_weight",
            "perceptual_weight",
            "perceptual_net",
            "perceptual_backbone",
            "kl_weight",
            "discriminator_start",
            "discriminator_factor",
            "discriminator_weight",
            "adaptive_weight",
            "lecam_weight",
            "lecam_decay",
            "discriminator_warmup_steps",
            "disc_channels",
            "disc_layers",
            "reference_faithful",
        )
        return {n: getattr(self, n) for n in names}


@dataclass
class OptimizerSection:
    """Three AdamW optimisers (SiT, VAE, discriminator) with their own rates; constant LR.

    Clipping is ``trainer.gradient_clipping`` (as in the text-to-image stage).
    """

    sit_lr: float = 1.0e-4
    vae_lr: float = 1.0e-4
    disc_lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1.0e-8


@dataclass
class EmaSection:
    decay: float = 0.9999


@dataclass
class DataSection:
    """Labelled image shards (`python -m repae.preprocess`), or the toy world's shards."""

    # Webdataset shard brace patterns (as fusedit's data.data_path).
    data_path: list[str] = field(default_factory=list)
    # "cls" (ImageNet shards) or "toy:<attr>+<attr>" (labels from the toy attributes).
    label: str = "cls"
    resolution: int = 256
    # Images per optimizer step over all processes (split evenly; the reference's --batch-size).
    global_batch_size: int = 256
    # Loader workers per process.
    dataloader_num_workers: int = 4
    # train_ldm: a folder of cached posteriors from `python -m repae.cache_latents` (the T2I stage's
    # name for its own latent cache folder too; spelled data.latents_dir before).
    latent_cache: Optional[str] = None


@dataclass
class SampleSection(SharedSample):
    """Preview sampling during training (and defaults for `repae.generate`); ``num_steps`` and
    ``cfg_scale`` are declared once for both stages (common.config.SharedSample)."""

    mode: str = "ode"
    # The reference's sampler defaults (50 ODE steps, guidance 4).
    num_steps: int = 50
    cfg_scale: float = 4.0
    heun: bool = False
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    # Images in a preview grid (drawn by rank 0 alone).
    num_images: int = 16


@dataclass
class RepaeConfig:
    trainer: TrainerSection = field(default_factory=TrainerSection)
    vae: VaeSection = field(default_factory=VaeSection)
    model: ModelSection = field(default_factory=ModelSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    loss: LossSection = field(default_factory=LossSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    ema: EmaSection = field(default_factory=EmaSection)
    data: DataSection = field(default_factory=DataSection)
    sample: SampleSection = field(default_factory=SampleSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.checkpoint_dir)


def _under_run_name(output_dir: object) -> str:
    """``run.output_dir: X`` (the folder holding ``<exp_name>/``) -> ``trainer.checkpoint_dir: X/${trainer.run}``."""
    return f"{str(output_dir).rstrip('/')}/${{trainer.run}}"


_GLOBAL = "the global batch, split evenly over the processes, as before"
# This stage's older spellings: old dotted key -> schema key (see common.config.Alias).
ALIASES: dict[str, str | Alias] = {
    "run.*": "trainer.*",
    "run.exp_name": "trainer.run",
    "run.output_dir": Alias("trainer.checkpoint_dir", value=_under_run_name),
    "run.max_train_steps": "trainer.max_steps",
    "optim.*": "optimizer.*",
    "optim.max_grad_norm": "trainer.gradient_clipping",
    "data.batch_size": Alias("data.global_batch_size", note=_GLOBAL),
    "data.shards": "data.data_path",
    "data.num_workers": Alias("data.dataloader_num_workers", note="per process"),
    "data.latents_dir": "data.latent_cache",
    "vae.name_or_path": Alias("vae.pretrained_model_name_or_path", note="the T2I stage's spelling"),
}


def load_repae_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RepaeConfig:
    """Schema <- YAML <- overrides, then :func:`validate` (raises :class:`ConfigError`).

    Older spellings (``run.*``, ``optim.*``, ``data.batch_size``, ...) are accepted through
    :data:`ALIASES`, each with a one-line notice.
    """
    cfg = merge_structured(RepaeConfig, path, overrides, aliases=ALIASES)
    normalise_trainer(cfg.trainer)
    validate(cfg)
    return cfg


def _validate_trainer(t: TrainerSection, errors: list[str]) -> None:
    check_trainer(errors, t)
    if not t.run or "/" in t.run:
        errors.append(f"trainer.run: must be a non-empty folder name, got {t.run!r}")
    if not t.checkpoint_dir:
        errors.append("trainer.checkpoint_dir: must name the run directory")


def _validate_model(m: ModelSection, errors: list[str]) -> None:
    from repae.models.sit import SIT_ARCHS

    check_choice(errors, "model.arch", m.arch, tuple(SIT_ARCHS))
    check_positive(errors, "model.num_classes", m.num_classes)
    check_rate(errors, "model.class_dropout_prob", m.class_dropout_prob)
    check_rate(errors, "model.bn_momentum", m.bn_momentum)
    check_positive(errors, "model.encoder_depth", m.encoder_depth)
    depth = m.depth or SIT_ARCHS.get(m.arch, {}).get("depth", m.encoder_depth)
    if m.encoder_depth > depth:
        errors.append(f"model.encoder_depth: {m.encoder_depth} exceeds the SiT depth {depth}")
    hidden = m.hidden_size or SIT_ARCHS.get(m.arch, {}).get("hidden_size", 0)
    heads = m.num_heads or SIT_ARCHS.get(m.arch, {}).get("num_heads", 1)
    if hidden and hidden % heads:
        errors.append(f"model.num_heads: {heads} must divide the hidden size {hidden}")


def _validate_loss(loss: LossSection, errors: list[str]) -> None:
    check_choice(errors, "loss.reconstruction_loss", loss.reconstruction_loss, RECONSTRUCTION_LOSSES)
    check_choice(errors, "loss.perceptual_net", loss.perceptual_net, LPIPS_NETS)
    check_choice(errors, "loss.path_type", loss.path_type, PATH_TYPES)
    check_choice(errors, "loss.weighting", loss.weighting, WEIGHTINGS)
    for name in (
        "reconstruction_weight",
        "perceptual_weight",
        "kl_weight",
        "discriminator_factor",
        "discriminator_weight",
        "lecam_weight",
        "proj_coeff",
        "vae_align_proj_coeff",
        "discriminator_start",
        "discriminator_warmup_steps",
    ):
        check_positive(errors, f"loss.{name}", getattr(loss, name), allow_zero=True)
    check_rate(errors, "loss.lecam_decay", loss.lecam_decay)
    ckpt = loss.discriminator_checkpoint
    if ckpt is not None and not Path(ckpt).is_file():
        errors.append(f"loss.discriminator_checkpoint: file not found: {ckpt}")
    backbone = loss.perceptual_backbone
    if backbone not in ("torchvision", "random") and not Path(backbone).is_file():
        errors.append(f"loss.perceptual_backbone: not 'torchvision', 'random' or an existing file: {backbone!r}")


def _validate_data(d: DataSection, errors: list[str]) -> None:
    if not d.data_path:
        errors.append("data.data_path: must list at least one shard pattern (python -m repae.preprocess writes them)")
    for p in d.data_path:
        if "/PATH/TO/" in p:
            errors.append(f"data.data_path: {p!r} still holds a /PATH/TO/ placeholder")
    for name in ("resolution", "global_batch_size"):
        check_positive(errors, f"data.{name}", getattr(d, name))
    check_positive(errors, "data.dataloader_num_workers", d.dataloader_num_workers, allow_zero=True)
    if d.label != "cls" and not d.label.startswith("toy:"):
        errors.append(f"data.label: {d.label!r} is neither 'cls' nor 'toy:<attr>+<attr>'")


def _validate_sample(s: SampleSection, errors: list[str]) -> None:
    check_choice(errors, "sample.mode", s.mode, SAMPLER_MODES)
    check_positive(errors, "sample.num_steps", s.num_steps)
    check_positive(errors, "sample.num_images", s.num_images)
    if s.cfg_scale < 1.0:
        errors.append(f"sample.cfg_scale: must be >= 1 (1 disables guidance), got {s.cfg_scale}")
    if not 0.0 <= s.guidance_low <= s.guidance_high <= 1.0:
        errors.append(f"sample.guidance_low/high: need 0 <= low <= high <= 1, got {s.guidance_low}, {s.guidance_high}")
    if s.heun and s.mode != "ode":
        errors.append("sample.heun: Heun's corrector only exists for mode 'ode'")


def validate(cfg: RepaeConfig) -> None:
    """Semantic checks the type system cannot express; raises one ConfigError listing all."""
    errors: list[str] = []
    _validate_trainer(cfg.trainer, errors)
    _validate_model(cfg.model, errors)
    _validate_loss(cfg.loss, errors)
    _validate_data(cfg.data, errors)
    _validate_sample(cfg.sample, errors)
    check_choice(errors, "vae.kind", cfg.vae.kind, VAE_KINDS)
    if cfg.vae.checkpoint is not None and not Path(cfg.vae.checkpoint).is_file():
        errors.append(f"vae.checkpoint: file not found: {cfg.vae.checkpoint}")
    stats = cfg.vae.latents_stats
    if stats not in ("auto", "estimate", "config") and not Path(stats).is_file():
        errors.append(f"vae.latents_stats: not auto/estimate/config or an existing file: {stats!r}")
    check_positive(errors, "vae.stats_batches", cfg.vae.stats_batches)
    if not cfg.encoder.types:
        errors.append("encoder.types: at least one vision encoder is needed for the REPA loss")
    if not 0.0 <= cfg.ema.decay < 1.0:
        errors.append(f"ema.decay: must be in [0, 1), got {cfg.ema.decay!r}")
    o = cfg.optimizer
    for name in ("sit_lr", "vae_lr", "disc_lr", "eps"):
        check_positive(errors, f"optimizer.{name}", getattr(o, name))
    check_positive(errors, "optimizer.weight_decay", o.weight_decay, allow_zero=True)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        errors.append(f"optimizer.betas: expected two values in [0, 1), got {o.betas!r}")
    raise_config_errors(errors)
