"""Reading a VAE: its family (diffusers class), latent channels, spatial factor and normalisation.

Every stage that touches a frozen VAE (T2I training and its latent cache, the planner, evaluation's
latent checks, REPA-E) needs the same few facts before it builds anything; they are read here, once.

| kind    | diffusers class          | the family's own latent handling                                       |
|---------|--------------------------|------------------------------------------------------------------------|
| `kl`    | `AutoencoderKL`          | none (FLUX.1, SD-3.5, SD-VAE, our E2E exports)                         |
| `qwen`  | `AutoencoderKLQwenImage` | a video VAE: images get a frame axis (B, 3, 1, H, W) and lose it again |
| `flux2` | `AutoencoderKLFlux2`     | 2x2 patchify of the latents, then its own BatchNorm running statistics |
| `rae`   | `AutoencoderRAE`         | no posterior; pixels in [0, 1]; normalises inside encode/decode        |

FLUX.2 (docs/tokenizers.md): the VAE's latent has 32 channels at x8; its pipeline folds each 2x2
latent patch into channels (128 channels at x16) and normalises each of those with the VAE's
``bn`` running mean and variance (plus ``batch_norm_eps``). So the latent a DiT sees is 128
channels at x16, and its normalisation constants are buffers of the VAE, not fields of its config.

RAE (representation autoencoder): a frozen vision encoder (DINOv2 / SigLIP-2 / MAE) whose last
tokens *are* the latent (768 channels for a base encoder), with a trained ViT decoder. ``encode``
resizes any input to the encoder's ``encoder_input_size`` (bicubic), normalises it with ImageNet
statistics, and returns one deterministic latent already normalised by the model's own
``latents_mean/std`` buffers; ``decode`` undoes them. So the latent grid is fixed
(``encoder_input_size / encoder_patch_size``) and the decoder draws ``image_size`` =
``patch_size x grid`` pixels: an RAE serves one resolution, its *native* one, and the DiT sees its
latents as they come (shift 0, scale 1 here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class VaeSpec:
    """Where a VAE lives and which family it is; stored with checkpoints so eval loads the same one.

    `kind="auto"` picks the family a hint in the path names ("qwen", the reference's rule;
    "flux.2" / "flux2"), else the one the saved config's `_class_name` names, so a local copy of
    a Qwen-Image or FLUX.2 VAE is recognised whatever its folder is called (:func:`detect`).
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
        """The family's kind (a key of FAMILIES); reads the saved config only when the path does not decide it."""
        return self.family().kind

    def family(self) -> Family:
        """The :class:`Family` this spec names (:func:`detect`'s rule, reading the config only if needed)."""
        self.require_local_folder()
        found = family_named(self.pretrained_model_name_or_path, self.kind)
        if found is not None:
            return found
        from diffusers import AutoencoderKL

        config = AutoencoderKL.load_config(self.pretrained_model_name_or_path, subfolder=self.subfolder)
        return detect(self.pretrained_model_name_or_path, self.kind, config)


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
    """KL configs call it `latent_channels`, the Qwen video VAE `z_dim`, an RAE `encoder_hidden_size`."""
    for key in ("latent_channels", "z_dim", "encoder_hidden_size"):
        if key in config:
            return int(config[key])
    raise KeyError("a VAE config names its latent channels latent_channels, z_dim or encoder_hidden_size")


def spatial_factor(config) -> int:
    """Pixels per latent along each side.

    KL: one x2 down-sample between consecutive `block_out_channels` levels. Qwen: one spatial x2
    per `dim_mult` level but the last (its `temperal_downsample` list has that length too and only
    says whether the *time* axis is also halved, irrelevant for single frames). RAE: the decoder's
    ``patch_size`` (pixels per latent token side, at its native resolution).
    """
    if "encoder_hidden_size" in config:
        return int(config["patch_size"])
    levels = config["block_out_channels"] if "block_out_channels" in config else config["dim_mult"]
    return 2 ** (len(levels) - 1)


def native_resolution(config) -> int | None:
    """The one image side an RAE encodes and decodes (``image_size``, else patch x grid); None for VAEs.

    A convolutional VAE takes any multiple of its factor; an RAE resizes every input to its
    encoder's size, so its latent grid, and the image its decoder draws, never change.
    """
    if "encoder_hidden_size" not in config:
        return None
    if config.get("image_size"):
        return int(config["image_size"])
    return int(config["patch_size"]) * (int(config["encoder_input_size"]) // int(config["encoder_patch_size"]))


@dataclass(frozen=True)
class Family:
    """One tokenizer family; see the module docstring for what each field means."""

    kind: str
    class_name: str
    path_hints: tuple[str, ...] = ()  # lower-case substrings of a hub id / path that name the family
    frame_axis: bool = False  # the VAE takes (B, 3, 1, H, W) (Qwen-Image's video VAE)
    latent_patch: int = 1  # the family folds p x p latent patches into channels before normalising
    batchnorm_stats: bool = False  # normalised by the VAE's own BatchNorm running statistics
    posterior: bool = True  # encode gives a Gaussian posterior (``latent_dist``); an RAE one latent
    unit_pixels: bool = False  # takes and draws pixels in [0, 1] (RAE), not [-1, 1]
    normalises_itself: bool = False  # applies its own latents_mean/std inside encode/decode (RAE)

    def vae_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.class_name)

    # ---- geometry: what the DiT sees (after the family's own patchify)
    def latent_channels(self, config) -> int:
        return latent_channels(config) * self.latent_patch**2

    def spatial_factor(self, config) -> int:
        return spatial_factor(config) * self.latent_patch

    # ---- pixels in and out of the VAE: (B, 3, H, W) in [-1, 1] on our side
    def to_vae(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels + 1.0) * 0.5 if self.unit_pixels else pixels
        return self.frames(x)

    def from_vae(self, x: torch.Tensor) -> torch.Tensor:
        x = self.unframe(x)
        return x * 2.0 - 1.0 if self.unit_pixels else x

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> what the VAE's layers take: (B, C, 1, H, W) for a video VAE, else as is."""
        return x.unsqueeze(2) if self.frame_axis else x

    def unframe(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(2) if self.frame_axis else x

    def encode_moments(self, vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The VAE's own latent for (B, 3, H, W) pixels in [-1, 1]: float32 (mean, std), std None without a posterior.

        Before the family's patchify and before our normalisation (an RAE's own normalisation is
        part of its ``encode``). The one place that knows how each diffusers class encodes.
        """
        x = self.to_vae(pixels)
        if not self.posterior:
            return vae.encode(x).latent.float(), None
        posterior = vae.encode(x).latent_dist
        mean, std = posterior.mean.float(), torch.exp(0.5 * posterior.logvar.float())
        return self.unframe(mean), self.unframe(std)

    def decode_pixels(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        """The VAE's own latent (in the VAE's dtype) -> (B, 3, H, W) pixels in [-1, 1], not clamped."""
        return self.from_vae(vae.decode(self.frames(z)).sample)

    # ---- the family's latent patchify (identity for p = 1)
    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C*p*p, H/p, W/p), channel c*p*p + dy*p + dx (the FLUX.2 pipeline's order)."""
        p = self.latent_patch
        if p == 1:
            return z
        b, c, h, w = z.shape
        return z.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)

    def unpatchify(self, z: torch.Tensor) -> torch.Tensor:
        p = self.latent_patch
        if p == 1:
            return z
        b, c, h, w = z.shape
        return z.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p), h * p, w * p)

    # ---- normalisation: (z - shift) * scale on the patchified latent, float32 (1, C, 1, 1)
    def normalisation_constants(self, vae: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if self.normalises_itself:
            channels = self.latent_channels(vae.config)
            return torch.zeros(1, channels, 1, 1), torch.ones(1, channels, 1, 1)
        if not self.batchnorm_stats:
            return normalisation_constants(vae.config, latent_channels(vae.config))
        bn = vae.bn
        mean = bn.running_mean.detach().to("cpu", torch.float64)
        std = torch.sqrt(bn.running_var.detach().to("cpu", torch.float64) + float(vae.config.batch_norm_eps))
        return mean.float().view(1, -1, 1, 1), (1.0 / std).float().view(1, -1, 1, 1)

    def normalisation_source(self, config) -> str | None:
        """Where the constants come from (for reports and ``evaluation.check_latents``)."""
        if self.batchnorm_stats:
            return "bn running statistics"
        if self.normalises_itself:
            return "inside the VAE (latents_mean/std)" if config.get("latents_mean") is not None else None
        return normalisation_source(config)

    def native_resolution(self, config) -> int | None:
        return native_resolution(config)


FAMILIES: dict[str, Family] = {
    "kl": Family("kl", "AutoencoderKL"),
    "qwen": Family("qwen", "AutoencoderKLQwenImage", path_hints=("qwen",), frame_axis=True),
    "flux2": Family(
        "flux2", "AutoencoderKLFlux2", path_hints=("flux.2", "flux2"), latent_patch=2, batchnorm_stats=True
    ),
    # No path hint: "rae" is a substring of too many names; a saved config's class decides.
    "rae": Family("rae", "AutoencoderRAE", posterior=False, unit_pixels=True, normalises_itself=True),
}
VAE_KINDS = ("auto", *FAMILIES)


def family(kind: str) -> Family:
    """The family of an explicit kind (``auto`` is resolved by :func:`detect` instead)."""
    if kind not in FAMILIES:
        raise ValueError(f"unknown VAE kind {kind!r}; one of {', '.join(VAE_KINDS)}")
    return FAMILIES[kind]


def family_of_class(class_name: str | None) -> Family | None:
    return next((f for f in FAMILIES.values() if f.class_name == class_name), None)


def family_of_module(vae: torch.nn.Module) -> Family:
    """The family of a loaded VAE, by its class (subclasses included)."""
    for f in FAMILIES.values():
        if isinstance(vae, f.vae_class()):
            return f
    names = ", ".join(f.class_name for f in FAMILIES.values())
    raise TypeError(f"not a supported VAE: {type(vae).__name__} (supported: {names})")


def family_named(path: str, kind: str = "auto") -> Family | None:
    """The family an explicit kind or a hint in the path names; None when neither decides."""
    if kind != "auto":
        return family(kind)
    lowered = str(path).lower()
    return next((f for f in FAMILIES.values() if any(hint in lowered for hint in f.path_hints)), None)


def detect(path: str, kind: str = "auto", config: dict | None = None) -> Family:
    """The family of a VAE: an explicit kind, else a hint in the path, else the config's class, else ``kl``.

    The path rule is the reference's (a "qwen" anywhere in the name means Qwen-Image); the saved
    config's ``_class_name`` decides for a local copy whatever its folder is called.
    """
    found = family_named(path, kind)
    if found is not None:
        return found
    return family_of_class((config or {}).get("_class_name")) or FAMILIES["kl"]
