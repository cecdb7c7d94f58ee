"""Frozen diffusers VAE plus the latent normalisation the DiT is trained in.

The DiT never sees raw VAE latents: it sees `x0 = (z - shift) * scale`, and whatever produced
those latents must be undone exactly (`z = x0 / scale + shift`) before decoding. Keeping both
directions in one object is the point of this module: the reference fork normalised in training
but forgot to un-normalise at inference (reference defect T2I-D2, docs/reference-facts.md), and normalised in
bf16 or fp32 depending on the VAE family (T2I-D5). Here both directions always run in float32.

The families (``common.vae_config.FAMILIES``, docs/tokenizers.md):

* ``kl``    -- `diffusers.AutoencoderKL` (FLUX.1, SD3.5 and their REPA-E tuned versions), images
  (B, 3, H, W);
* ``qwen``  -- `diffusers.AutoencoderKLQwenImage`, a video VAE: images get a frame axis
  (B, 3, 1, H, W) on the way in and lose it on the way out;
* ``flux2`` -- `diffusers.AutoencoderKLFlux2`: the posterior sample (32 channels at x8) is folded
  2x2 into 128 channels at x16 and normalised with the VAE's BatchNorm running statistics, as
  FLUX.2's pipeline does. The latent cache stores the un-patchified posterior moments.
* ``rae``   -- `diffusers.AutoencoderRAE`: a frozen vision encoder's tokens as the latent (768
  channels at x16 for a base encoder), one deterministic latent already normalised by the model's
  own ``latents_mean/std``, at one native resolution; the cache stores that latent alone.

`LatentCodec` is a plain class rather than an `nn.Module` on purpose: it must not register the
frozen VAE as a sub-module of anything it is attached to (its weights would leak into optimiser
parameter lists and checkpoints). Its own `.to()` moves the VAE and the constants together.
"""

from __future__ import annotations

import torch

from common.randomness import Generators, randn
from common.vae_config import VaeSpec, family_of_module, latent_channels, spatial_factor


class LatentCodec:
    """Pixels in [-1, 1] <-> normalised fp32 latents, through a frozen diffusers VAE.

    Attributes: `vae` (eval, no grad), `family` (common.vae_config.Family), `latent_channels` and
    `spatial_factor` of the latent the DiT sees (after the family's own patchify), and the float32
    (1, C, 1, 1) tensors `shift` and `scale`. The VAE may run in any dtype (`dtype`); the
    normalisation, the posterior sample and the returned latents/pixels are float32.
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        self.family = family_of_module(vae)
        vae.eval().requires_grad_(False)
        self.vae = vae
        self.latent_channels = self.family.latent_channels(vae.config)
        self.spatial_factor = self.family.spatial_factor(vae.config)
        shift, scale = self.family.normalisation_constants(vae)
        self.shift = shift.to(self.device)
        self.scale = scale.to(self.device)

    @classmethod
    def from_spec(cls, spec: VaeSpec, torch_dtype: torch.dtype = torch.float32) -> LatentCodec:
        """Load the VAE a spec names (local folder or hub cache) in `torch_dtype`."""
        vae = (
            spec.family()
            .vae_class()
            .from_pretrained(spec.pretrained_model_name_or_path, subfolder=spec.subfolder, torch_dtype=torch_dtype)
        )
        return cls(vae)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the VAE computes in (the codec's inputs/outputs are fp32 regardless)."""
        return next(self.vae.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LatentCodec:
        """Move the VAE (and cast it when `dtype` is given); the constants follow, staying fp32."""
        self.vae.to(device=device, dtype=dtype)
        self.shift = self.shift.to(self.device)
        self.scale = self.scale.to(self.device)
        return self

    def moment_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of :meth:`moments`' mean (and std): the VAE's own latent, before any family patchify."""
        f = spatial_factor(self.vae.config)
        self.latent_shape(batch_size, height, width)  # the size check
        return (batch_size, latent_channels(self.vae.config), height // f, width // f)

    @property
    def native_resolution(self) -> int | None:
        """The one image side an RAE works at; None for a convolutional VAE (any multiple of the factor)."""
        return self.family.native_resolution(self.vae.config)

    @property
    def has_posterior(self) -> bool:
        """Whether :meth:`moments` gives a std (a latent cache then stores 2 arrays per image, else 1)."""
        return self.family.posterior

    def latent_numel(self, resolution: int) -> int:
        """C * h * w of one normalised latent of a ``resolution``-px square image (a schedule's dimension)."""
        _, c, h, w = self.latent_shape(1, resolution, resolution)
        return c * h * w

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of the normalised latents for images of `height` x `width` pixels."""
        native = self.native_resolution
        if native is not None and (height, width) != (native, native):
            name = self.family.class_name
            raise ValueError(f"image size {height}x{width}: this {name} works at {native}x{native} only")
        if height % self.spatial_factor or width % self.spatial_factor:
            raise ValueError(f"image size {height}x{width} is not a multiple of {self.spatial_factor}")
        f = self.spatial_factor
        return (batch_size, self.latent_channels, height // f, width // f)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: Generators = None, sample: bool = True) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, C, H/f, W/f) normalised float32 latents.

        `sample=True` draws from the posterior (what training does, T2I-3.2) with noise
        from `generator`, drawn on the generator's device so a CPU generator gives the same draw
        on any accelerator (a list of CPU generators: one per sample); `sample=False` returns the
        posterior mean.
        """
        mean, std = self.moments(pixels)
        return self.from_moments(mean, std, generator, sample)

    @torch.no_grad()
    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The posterior's (mean, std), each (B, C, H/f, W/f) float32 and *un-normalised*.

        What a latent cache stores (fusedit/data/latent_cache.py): with them, training draws the
        same posterior samples as from pixels, without running the encoder. A family without a
        posterior (RAE) gives its one latent as the mean and ``None`` as the std.
        """
        return self.family.encode_moments(self.vae, pixels.to(device=self.device, dtype=self.dtype))

    def from_moments(
        self, mean: torch.Tensor, std: torch.Tensor | None, generator: Generators = None, sample: bool = True
    ) -> torch.Tensor:
        """Normalised latents from posterior moments: ``(patchify(mean + std * eps) - shift) * scale``.

        Without a std (a family with no posterior) nothing is drawn: the latent is deterministic.
        """
        z = mean.to(self.device, torch.float32)
        if sample and std is not None:
            z = z + std.to(self.device, torch.float32) * randn(z.shape, generator, z.device)
        return (self.family.patchify(z) - self.shift) * self.scale

    def from_cached(self, stored: torch.Tensor, generator: Generators = None, sample: bool = True) -> torch.Tensor:
        """Normalised latents from a latent cache's (B, k, C, h, w) batch: k = 2 (mean, std) or 1 (the latent)."""
        std = stored[:, 1] if stored.shape[1] > 1 else None
        return self.from_moments(stored[:, 0], std, generator, sample)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> (B, 3, H, W) float32 pixels clamped to [-1, 1].

        Un-normalises with the same constants `encode` used before the VAE sees anything.
        """
        z = self.family.unpatchify(latents.to(device=self.device, dtype=torch.float32) / self.scale + self.shift)
        return self.family.decode_pixels(self.vae, z.to(self.dtype)).float().clamp(-1.0, 1.0)

    def __repr__(self) -> str:
        family = self.family.kind
        geometry = f"channels={self.latent_channels}, x{self.spatial_factor}"
        return f"LatentCodec({family}, {geometry}, dtype={self.dtype})"
