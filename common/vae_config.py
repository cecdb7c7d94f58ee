"""Reading a VAE's config: its class, latent channels, spatial factor and normalisation constants.

Both stages (and the evaluation samplers) need the same four facts about a diffusers VAE folder
before they build anything; they are read here, once, from the config alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

VAE_KINDS = ("auto", "kl", "qwen")


QWEN_CLASS = "AutoencoderKLQwenImage"


@dataclass
class VaeSpec:
    """Where a VAE lives and which family it is; stored with checkpoints so eval loads the same one.

    `kind="auto"` picks Qwen when "qwen" appears in the path (case-insensitive, the reference's
    rule) or when the saved config's `_class_name` is `AutoencoderKLQwenImage`, so a local copy of
    a Qwen VAE is recognised whatever its folder is called.
    """

    pretrained_model_name_or_path: str
    subfolder: str | None = None
    kind: str = "auto"

    @classmethod
    def from_config(cls, vae: object) -> VaeSpec:
        """The spec of a config's ``vae`` section (fusedit.config.VaeConfig)."""
        return cls(vae.pretrained_model_name_or_path, subfolder=vae.subfolder, kind=vae.kind)

    def __post_init__(self) -> None:
        if self.kind not in VAE_KINDS:
            raise ValueError(f"VaeSpec.kind must be one of {VAE_KINDS}, got {self.kind!r}")

    def require_local_folder(self) -> None:
        """A path that is clearly local (absolute, ``./``, ``../``, ``~``) must exist.

        Otherwise diffusers takes it for a hub id and, offline, fails with a message about the
        internet connection that names neither the path nor the flag.
        """
        name = str(self.pretrained_model_name_or_path)
        local = name.startswith(("/", "./", "../", "~"))
        if local and not Path(name).expanduser().exists():
            raise FileNotFoundError(f"{name}: no such VAE folder (a hub id has the form org/name)")

    def resolve_kind(self) -> str:
        """Return "kl" or "qwen"; reads the saved config only when the path does not decide it."""
        self.require_local_folder()
        if self.kind != "auto":
            return self.kind
        if "qwen" in str(self.pretrained_model_name_or_path).lower():
            return "qwen"
        from diffusers import AutoencoderKL

        config = AutoencoderKL.load_config(self.pretrained_model_name_or_path, subfolder=self.subfolder)
        return "qwen" if config.get("_class_name") == QWEN_CLASS else "kl"


def per_channel_stats(config) -> tuple[list[float], list[float]] | None:
    """(mean, std) per channel when the config has both ``latents_mean`` and ``latents_std``.

    Qwen-Image and the E2E-VAEs this project exports carry them; SD/FLUX-style configs do not.
    """
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None or std is None:
        return None
    return [float(v) for v in mean], [float(v) for v in std]


def normalisation_source(config) -> str | None:
    """Which constants :func:`normalisation_constants` reads: per-channel, scalar, or none at all."""
    if per_channel_stats(config) is not None:
        return "latents_mean/std"
    return "scalar" if config.get("scaling_factor") is not None else None


def normalisation_constants(config, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) as float32 (1, C, 1, 1) tensors from a VAE config: ``(z - shift) * scale``.

    Per-channel statistics win when the config has both `latents_mean` and `latents_std`
    (Qwen-Image); otherwise the scalar `shift_factor` (None means 0) and `scaling_factor` (FLUX,
    SD3.5). Scalars are broadcast to one value per channel so callers see one shape always.
    """
    stats = per_channel_stats(config)
    if stats is not None:
        shift = torch.tensor(stats[0], dtype=torch.float64)
        scale = 1.0 / torch.tensor(stats[1], dtype=torch.float64)
    else:
        channels = channels or latent_channels(config)
        shift_factor = config.get("shift_factor")
        shift = torch.full((channels,), 0.0 if shift_factor is None else float(shift_factor), dtype=torch.float64)
        scale = torch.full((channels,), float(config["scaling_factor"]), dtype=torch.float64)
    return shift.float().view(1, -1, 1, 1), scale.float().view(1, -1, 1, 1)


def latent_channels(config) -> int:
    """KL configs call it `latent_channels`, the Qwen video VAE `z_dim`."""
    return int(config["latent_channels"] if "latent_channels" in config else config["z_dim"])


def spatial_factor(config) -> int:
    """Pixels per latent along each side.

    KL: one x2 down-sample between consecutive `block_out_channels` levels. Qwen: one spatial x2
    per `dim_mult` level but the last (its `temperal_downsample` list has that length too and only
    says whether the *time* axis is also halved, irrelevant for single frames).
    """
    levels = config["block_out_channels"] if "block_out_channels" in config else config["dim_mult"]
    return 2 ** (len(levels) - 1)
