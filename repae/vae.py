"""Trainable diffusers VAEs for REPA-E: loading, the posterior, a gradient-friendly wrapper, export.

The reference trains its own CompVis-layout autoencoder class and so can only tune its two
hard-coded architectures (reference defect REPAE-D17, docs/reference-facts.md). We train diffusers
models instead, which covers the reference VAEs (converted losslessly by `repae.reference.convert`)
*and* the text-to-image VAEs the `fusedit` stage consumes: FLUX / SD3.5 style `AutoencoderKL` (no
quant convs), Qwen-Image's `AutoencoderKLQwenImage` (a video VAE that needs a frame axis) and
FLUX.2's `AutoencoderKLFlux2` (whose latent is 2x2-patchified before anything normalises it).
What differs between them is asked of `common.vae_config.Family`.

FLUX.2 (docs/tokenizers.md, "REPA-E on the FLUX.2 VAE"): the wrapper works in the latent the
diffusion model sees, the patchified one (128 channels at x16). Patchifying is a permutation, so
the posterior over it is the same Gaussian (same KL); the SiT's BatchNorm then normalises the same
128 channels the VAE's own BatchNorm does, and export writes the statistics into that BatchNorm.

Why a wrapper rather than `vae.encode(...).latent_dist`:

* one posterior type (`Posterior`) whatever the family, float32, with the reference's logvar clamp
  and KL, and noise drawn on the *generator's* device so a CPU generator reproduces across devices;
* `decode` is unclamped: diffusers' Qwen decoder clamps to [-1, 1], which would zero the
  reconstruction gradient wherever the output overshoots; the reference decoder is unbounded;
* nothing here runs under `no_grad`: the REPA-E alignment loss back-propagates into the encoder.

Export (`save_e2e_vae`) writes a folder that `diffusers.*.from_pretrained` loads and that
`fusedit.latents.LatentCodec` normalises correctly: the per-channel statistics go into the config
as `latents_mean` (= bias) and `latents_std` (= 1/scale), so `(z - mean) / std` is the reference's
`(z - bias) * scale` (FLUX.2: into its BatchNorm's `running_mean` / `running_var`, where its
pipeline reads them). The same numbers are also stored in the reference's own format
(`latents_stats.safetensors`, `[1, C, 1, 1]`), and the folder appears atomically.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage
from safetensors.torch import load_file, save_file
from torch import nn

from common.files import write_json_atomic
from common.vae_config import Family, VaeSpec, family_of_module
from common.weights import load_weights_file
from repae.config import REPAE_FAMILIES
from repae.reference.convert import ldm_to_diffusers_vae, load_reference_vae, load_strict

STATS_FILE = "latents_stats.safetensors"
META_FILE = "e2e_vae.json"
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
DiffusersVAE = AutoencoderKL | AutoencoderKLQwenImage | AutoencoderKLFlux2

_ENCODER_TYPES = ["DownEncoderBlock2D"] * 4
_DECODER_TYPES = ["UpDecoderBlock2D"] * 4

VAE_PRESETS: dict[str, dict] = {
    # The Stable-Diffusion KL-f8 VAE (sd-vae-ft-mse) config, the reference "f8d4" (REPAE-1.2).
    "f8d4": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=_ENCODER_TYPES,
        up_block_types=_DECODER_TYPES,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=1.0,
        shift_factor=None,
    ),
    # IN-VAE / VA-VAE layout, the reference "f16d32": attention at the 16x16 level (REPAE-1.4).
    "f16d32": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=_ENCODER_TYPES + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + _DECODER_TYPES,
        block_out_channels=[128, 128, 256, 256, 512],
        layers_per_block=2,
        act_fn="silu",
        latent_channels=32,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=1.0,
        shift_factor=None,
    ),
}
"""AutoencoderKL configs of the reference archs. Scaling is neutral on purpose: REPA-E
normalises with per-channel statistics (`load_latents_stats`), never a global factor."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_vae(
    name_or_path: str,
    *,
    subfolder: str | None = None,
    kind: str = "auto",
    checkpoint: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> DiffusersVAE:
    """A diffusers VAE from a preset name or a diffusers folder / hub id, optionally re-weighted.

    * `name_or_path` in `VAE_PRESETS`: an `AutoencoderKL` built from the preset (random weights
      unless `checkpoint` is given);
    * otherwise the family's class `.from_pretrained`, the family chosen by `kind` exactly as
      `common.vae_config.VaeSpec.family` does (REPA-E tunes `repae.config.REPAE_FAMILIES`; another
      family, an RAE, is a ValueError naming it).

    `checkpoint` replaces all weights, strictly (a missing, extra or mis-shaped key raises
    `repae.reference.convert.VAEKeyError` naming it): a `.safetensors` file is a diffusers-layout state dict,
    anything else a reference LDM `.pt` (read with `weights_only=True`, then converted; KL only).
    Weights are loaded in float32 and cast to `torch_dtype` last.
    """
    if name_or_path in VAE_PRESETS:
        if kind == "qwen":
            raise ValueError(f"preset {name_or_path!r} is an AutoencoderKL, not a Qwen VAE")
        vae: DiffusersVAE = AutoencoderKL(**copy.deepcopy(VAE_PRESETS[name_or_path]))
    else:
        family = VaeSpec(str(name_or_path), subfolder=subfolder, kind=kind).family()
        if family.kind not in REPAE_FAMILIES:
            raise ValueError(
                f"{name_or_path}: {family.class_name} (kind {family.kind}); the joint stage tunes "
                f"{', '.join(REPAE_FAMILIES[:-1])} and {REPAE_FAMILIES[-1]} VAEs (docs/tokenizers.md)"
            )
        vae = family.vae_class().from_pretrained(name_or_path, subfolder=subfolder, torch_dtype=torch.float32)
    if checkpoint is not None:
        load_strict(vae, _checkpoint_state_dict(vae, checkpoint), source=str(checkpoint))
    return vae if torch_dtype == torch.float32 else vae.to(dtype=torch_dtype)


def _checkpoint_state_dict(vae: DiffusersVAE, checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Diffusers-layout weights from a `.safetensors` file or a converted reference `.pt`."""
    if str(checkpoint).endswith(".safetensors"):
        return load_file(str(checkpoint))
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"{checkpoint}: reference LDM checkpoints only fit AutoencoderKL, not {type(vae).__name__}")
    return ldm_to_diffusers_vae(load_reference_vae(checkpoint), len(vae.config.block_out_channels))


# --------------------------------------------------------------------------------------------
# Posterior
# --------------------------------------------------------------------------------------------
class Posterior:
    """Diagonal Gaussian over latents, from moments (B, 2C, h, w) = [mean, logvar] on channels.

    Everything is float32 (moments computed under autocast are upcast here, differentiably). The
    log-variance is clamped to [-30, 20] *before* std/var are derived (REPAE-1.3).
    """

    def __init__(self, moments: torch.Tensor) -> None:
        if moments.dim() != 4 or moments.shape[1] % 2:
            raise ValueError(f"moments must be (B, 2C, h, w), got {tuple(moments.shape)}")
        mean, logvar = moments.float().chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw `mean + std * eps`; eps is drawn on `generator`'s device."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over (C, h, w): one value per sample, shape (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------
# Trainable wrapper
# --------------------------------------------------------------------------------------------
class TrainableVAE(nn.Module):
    """Images (B,3,H,W) in [-1,1] <-> latents (B,C,h,w) through a diffusers VAE, with gradients.

    Calls the VAE's sub-modules directly (encoder, optional quant convs, decoder) rather than its
    `encode`/`decode`: that keeps FLUX-style models without quant convs, the Qwen frame axis and
    the unclamped decoder output in one place, and skips tiling/slicing code paths that training
    must not take. For a single frame the Qwen causal convolutions without a feature cache compute
    exactly what diffusers' own chunked path computes for the first chunk.

    Latents are the diffusion model's view (`Family.patchify`: FLUX.2's 2x2 fold; identity for the
    others): `latent_channels` and `spatial_factor` are those of that view.
    """

    def __init__(self, vae: DiffusersVAE) -> None:
        super().__init__()
        family = family_of_module(vae)
        if family.kind not in REPAE_FAMILIES:
            raise TypeError(f"TrainableVAE tunes {', '.join(REPAE_FAMILIES)} VAEs, got {type(vae).__name__}")
        self.vae = vae
        self.family: Family = family
        self.latent_channels = family.latent_channels(vae.config)
        self.spatial_factor = family.spatial_factor(vae.config)

    @property
    def has_unused_parameters(self) -> bool:
        """Whether some parameters get no gradient in a step (Qwen's video-only layers): DDP must be told."""
        return self.family.frame_axis

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.decoder.conv_out.weight.dtype

    def encode(self, x: torch.Tensor) -> Posterior:
        """(B,3,H,W) in [-1,1] -> posterior over the patchified (B,C,H/f,W/f)."""
        moments = self.vae.encoder(self.family.frames(x.to(self.dtype)))
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean, logvar = self.family.unframe(moments).chunk(2, dim=1)
        return Posterior(torch.cat([self.family.patchify(mean), self.family.patchify(logvar)], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w) latents (un-normalised, patchified) -> (B,3,H,W) float32, unclamped."""
        z = self.family.frames(self.family.unpatchify(z).to(self.dtype))
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.family.unframe(self.vae.decoder(z)).float()

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[Posterior, torch.Tensor, torch.Tensor]:
        """(posterior, z, recon) with z a reparameterised sample and recon = decode(z) (REPAE-1.3)."""
        posterior = self.encode(x)
        z = posterior.sample(generator)
        return posterior, z, self.decode(z)

    def last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight, for the adaptive GAN weight of the VAE loss."""
        return self.vae.decoder.conv_out.weight


# --------------------------------------------------------------------------------------------
# Latent statistics and export
# --------------------------------------------------------------------------------------------
def load_latents_stats(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale[C], bias[C]) float32, where normalised latents are `(z - bias) * scale`.

    `path`: a reference `<vae>-latents-stats.pt` (dict of `[1, C, 1, 1]` tensors, read with
    `weights_only=True`), our `latents_stats.safetensors`, or a folder written by `save_e2e_vae`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    stats = load_weights_file(path)
    if not isinstance(stats, dict) or not {"latents_scale", "latents_bias"} <= set(stats):
        raise ValueError(f"{path}: expected a dict with 'latents_scale' and 'latents_bias'")
    return _check_stats(stats["latents_scale"], stats["latents_bias"], str(path))


def _check_stats(scale: torch.Tensor, bias: torch.Tensor, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten [1,C,1,1] or [C] to float32 [C]; scale must be finite and positive."""
    scale, bias = (torch.as_tensor(t).detach().to("cpu", torch.float32) for t in (scale, bias))
    for name, t in (("scale", scale), ("bias", bias)):
        if t.numel() == 0 or t.dim() not in (1, 4) or (t.dim() == 4 and t.numel() != t.shape[1]):
            raise ValueError(f"{source}: latents {name} must be [C] or [1,C,1,1], got {tuple(t.shape)}")
    scale, bias = scale.flatten(), bias.flatten()
    if scale.shape != bias.shape:
        raise ValueError(f"{source}: scale has {scale.numel()} channels, bias {bias.numel()}")
    if not (torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(bias).all()):
        raise ValueError(f"{source}: latents scale must be finite and > 0, bias finite")
    return scale, bias


def save_e2e_vae(
    vae: DiffusersVAE | TrainableVAE,
    folder: str | os.PathLike,
    scale: torch.Tensor,
    bias: torch.Tensor,
    metadata: dict | None = None,
) -> Path:
    """Write a tuned VAE as a diffusers folder carrying its per-channel latent statistics.

    Contents: the `save_pretrained` files (safetensors), with the statistics where the family's
    readers look: KL and Qwen get `latents_mean = bias` and `latents_std = 1 / scale` in
    `config.json` (KL configs also `scaling_factor = 1.0`, `shift_factor = None`, so diffusers'
    `(z - mean) * scaling_factor / std` convention reads the same normalisation); FLUX.2 gets them
    as its BatchNorm's `running_mean = bias`, `running_var = 1 / scale**2 - batch_norm_eps` (over
    the 2x2-patchified channels, what its pipeline normalises with). Always also
    `latents_stats.safetensors` (`latents_scale`, `latents_bias`, float32 `[1, C, 1, 1]`, the
    reference meaning) and `e2e_vae.json` (class, geometry, stats, `metadata`).

    The folder is assembled under a temporary name next to `folder` and renamed into place; an
    existing `folder` is moved aside first and deleted only after the new one is in place, so a
    crash leaves either the old or the new folder (plus a hidden leftover), never a half one.
    The caller's model and its config are not modified; weights are written in the model's dtype.
    A `TrainableVAE`, or a model wrapped by DDP (`.module`) or torch.compile (`._orig_mod`), is unwrapped.
    """
    model = _unwrap(vae)
    family = family_of_module(model)
    scale, bias = _check_stats(scale, bias, "save_e2e_vae")
    channels = family.latent_channels(model.config)
    if scale.numel() != channels:
        raise ValueError(f"stats have {scale.numel()} channels, the VAE's latent has {channels}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if family.batchnorm_stats:
            with _batchnorm_holding(model, scale, bias):
                model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            _write_stats_into_config(tmp / "config.json", scale, bias, scalar_fields=not family.frame_axis)
        save_file({"latents_scale": scale.view(1, -1, 1, 1), "latents_bias": bias.view(1, -1, 1, 1)}, tmp / STATS_FILE)
        write_json_atomic(tmp / META_FILE, _metadata(model, family, scale, bias, metadata), default=str)
        _replace_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _batchnorm_holding(model: DiffusersVAE, scale: torch.Tensor, bias: torch.Tensor) -> Iterator[None]:
    """Put per-channel statistics into a FLUX.2 VAE's BatchNorm buffers for the save, then restore them."""
    eps = float(model.config.batch_norm_eps)
    var = (1.0 / scale.double()).pow(2) - eps
    if (var <= 0).any():
        worst = float((1.0 / scale.double()).min())
        raise ValueError(f"a latent std of {worst:.3g} is below sqrt(batch_norm_eps={eps}): no BatchNorm holds it")
    bn = model.bn
    saved = (bn.running_mean.clone(), bn.running_var.clone())
    try:
        with torch.no_grad():
            bn.running_mean.copy_(bias.to(bn.running_mean))
            bn.running_var.copy_(var.to(bn.running_var))
        yield
    finally:
        with torch.no_grad():
            bn.running_mean.copy_(saved[0])
            bn.running_var.copy_(saved[1])


def _unwrap(vae: nn.Module) -> DiffusersVAE:
    """The diffusers model inside DDP / torch.compile / TrainableVAE wrappers."""
    while not isinstance(vae, DiffusersVAE):
        if isinstance(vae, TrainableVAE):
            vae = vae.vae
        elif hasattr(vae, "module") or hasattr(vae, "_orig_mod"):
            vae = vae.module if hasattr(vae, "module") else vae._orig_mod
        else:
            raise TypeError(f"save_e2e_vae needs one of {', '.join(REPAE_FAMILIES)}'s VAE classes, got {type(vae)}")
    return vae


def _write_stats_into_config(config_path: Path, scale: torch.Tensor, bias: torch.Tensor, scalar_fields: bool) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["latents_mean"] = bias.tolist()
    config["latents_std"] = (1.0 / scale.double()).tolist()
    if scalar_fields:  # AutoencoderKL's global factor and shift: neutral, the per-channel ones rule
        config["scaling_factor"] = 1.0
        config["shift_factor"] = None
    write_json_atomic(config_path, config, default=str)


def _metadata(model: DiffusersVAE, family: Family, scale: torch.Tensor, bias: torch.Tensor, extra: dict | None) -> dict:
    return {
        "format": "repae-e2e-vae",
        "version": 1,
        "class_name": type(model).__name__,
        "latent_channels": family.latent_channels(model.config),
        "spatial_factor": family.spatial_factor(model.config),
        "latents_scale": scale.tolist(),
        "latents_bias": bias.tolist(),
        "metadata": extra or {},
    }


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; a directory cannot be renamed over a non-empty one, so swap via a side name."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
