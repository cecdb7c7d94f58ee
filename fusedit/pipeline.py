"""Inference: prompts -> images with the DiT, the frozen text encoder and the VAE.

Fixes over the reference sampler (docs/reference-facts.md, T2I-5, T2I-D2, T2I-D6, T2I-D7): latents
are un-normalised before decoding with the constants used in training; latents stay fp32 (bf16 only inside the model,
never fp16); and the initial noise of image ``k`` of prompt ``i`` comes from its own CPU
generator seeded by (seed, i, k), so an image does not depend on batch size, batch
composition, device or process count.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from common.randomness import noise_seed
from common.vae_config import VaeSpec
from fusedit.flow import euler_sample, sampling_sigmas
from fusedit.latents import LatentCodec
from fusedit.models import DiT, is_fuse_dit, model_class, takes_pooled_text
from fusedit.text import ClipSource, ClipTextEncoder, TextEncoder, tokenize


class DiTPipeline:
    """Our one sampler: training's preview grids, the benchmark samplers and the diffusers export run it.

    ``clip``: the CLIP text encoder of a "fuse-dit-clip" FuseDiT (one that takes a pooled text
    embedding); required for such a model, unused by the others.
    """

    def __init__(
        self,
        transformer: DiT,
        text_encoder: TextEncoder,
        codec: LatentCodec,
        scheduler,
        max_prompt_length: int = 256,
        clip: ClipTextEncoder | None = None,
    ) -> None:
        if takes_pooled_text(transformer) and clip is None:
            raise ValueError("this FuseDiT takes a pooled CLIP text embedding (text_modulation_embeds_dim): pass clip")
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.codec = codec
        self.scheduler = copy.deepcopy(scheduler)
        self.max_prompt_length = max_prompt_length
        self.clip = clip

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @classmethod
    def from_checkpoint(
        cls,
        run_dir: str | Path,
        tag: str | int = "latest",
        use_ema: bool = True,
        device: str | torch.device = "cpu",
        vae: VaeSpec | None = None,
        clip: ClipSource | None = None,
    ) -> DiTPipeline:
        """Load a training run's step ``tag`` (EMA weights by default) from safetensors only.

        The VAE is the one recorded in ``<tag>/vae.json`` (the one the DiT was trained with);
        ``vae`` overrides it, e.g. when the checkpoint moved to a machine with another copy. A
        model that takes pooled text loads its CLIP text encoder from the run's config, or from
        ``clip`` (the samplers' ``--clip-l``); other models have none and ignore it.
        The files read (the weights folder, ``vae.json``) are checked against the tag's manifest
        first: ``common.checkpoint.CheckpointDamaged`` names a damaged file.
        """
        from common.checkpoint import checkpoint_folder, verify_files
        from fusedit.config import load_config
        from fusedit.flow import build_scheduler

        run_dir = Path(run_dir)
        weights = "ema" if use_ema else "model"
        folder = checkpoint_folder(run_dir, tag, needs=weights)
        verify_files(folder, [weights] if vae is not None else [weights, "vae.json"])
        cfg = load_config(run_dir / "config.yaml")
        spec = vae if vae is not None else VaeSpec(**json.loads((folder / "vae.json").read_text()))
        transformer = model_class(folder / weights).from_pretrained(str(folder / weights)).to(device).eval()
        text_encoder = TextEncoder(
            cfg.model.base,
            subfolder=cfg.model.base_subfolder,
            tokenizer=cfg.data.tokenizer,
            hidden_states_index=cfg.model.text_hidden_states_index,
        ).to(device)
        codec = LatentCodec.from_spec(spec).to(device)
        clip_encoder = None
        if takes_pooled_text(transformer):
            clip_encoder = ClipTextEncoder.load(clip or ClipSource.from_config(cfg)).to(device)
        scheduler = build_scheduler(cfg, codec.latent_numel(cfg.data.resolution))
        return cls(transformer, text_encoder, codec, scheduler, cfg.data.max_prompt_length, clip_encoder)

    def _encode_prompts(self, prompts: list[str]) -> tuple[Any, torch.Tensor]:
        """(text condition, mask): encoder features for the DiT; for a FuseDiT, its per-layer text KV cache.

        A FuseDiT's text rows never attend to image rows, so its LLM runs once per prompt batch
        here, not at every denoising step; so does CLIP for a model that takes pooled text (the
        cache carries the pooled embeddings; the CFG rows' "" gets CLIP's embedding of "", as a
        dropped caption did in training).
        """
        ids, mask = tokenize(self.text_encoder.tokenizer, prompts, self.max_prompt_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if is_fuse_dit(self.transformer):
            pooled = self.clip.embed(prompts).to(self.device) if takes_pooled_text(self.transformer) else None
            return self.transformer.encode_text(ids, mask, pooled), mask
        # the encoder may live elsewhere (host memory, when training reads a text-feature cache)
        return self.text_encoder.encode(ids, mask).to(self.device), mask

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        *,
        height: int,
        width: int,
        num_inference_steps: int = 25,
        guidance_scale: float = 6.0,
        negative_prompt: str | None = None,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        prompt_indices: list[int] | None = None,
        batch_size: int = 16,
        autocast_dtype: torch.dtype | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images in [0, 1], shape (len(prompts) * num_images_per_prompt, 3, H, W), prompt-major.

        ``prompt_indices`` are the global indices used for seeding (default 0..n-1); pass them
        when a prompt list is split across processes so every image keeps its seed. ``latents``
        (one initial noise per image, in the same order) replaces the seeded noise.
        """
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        jobs = [(p, i, k) for p, i in zip(prompts, indices) for k in range(num_images_per_prompt)]
        if latents is not None and (latents.ndim != 4 or latents.shape[0] != len(jobs)):
            got = tuple(latents.shape)
            raise ValueError(f"latents: expected one (C, h, w) noise per image ({len(jobs)}), got {got}")
        out = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            if latents is None:
                noise = self.initial_noise(chunk, height, width, seed)
            else:
                noise = latents[start : start + len(chunk)]
            out.append(
                self._generate(chunk, noise, num_inference_steps, guidance_scale, negative_prompt, autocast_dtype)
            )
        return torch.cat(out)

    def noise_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of one image's initial latent noise."""
        factor = self.codec.spatial_factor
        return (self.codec.latent_channels, height // factor, width // factor)

    def initial_noise(self, jobs, height: int, width: int, seed: int) -> torch.Tensor:
        """Image ``k`` of prompt ``i`` gets noise from its own CPU generator seeded by (seed, i, k)."""
        shape = self.noise_shape(height, width)
        noise = [
            torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, i, k))) for _, i, k in jobs
        ]
        return torch.stack(noise)

    def _generate(self, jobs, noise, steps, guidance, negative, autocast_dtype) -> torch.Tensor:
        latents = noise.to(self.device, torch.float32)
        texts = [p for p, _, _ in jobs]
        cfg = guidance > 1.0
        if cfg:  # unconditional branch = the empty caption used by training's caption dropout
            texts = [negative or ""] * len(jobs) + texts
        hidden, mask = self._encode_prompts(texts)
        dtype = next(self.transformer.parameters()).dtype

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if is_fuse_dit(self.transformer):
                    v = self.transformer(x.to(dtype), t.to(dtype), None, mask, text_cache=hidden)
                else:
                    v = self.transformer(x.to(dtype), t.to(dtype), hidden.to(dtype), mask)
            return v.float()

        sigmas = sampling_sigmas(self.scheduler, steps).to(self.device)
        latents = euler_sample(model_fn, latents, sigmas, guidance)
        images = self.codec.decode(latents)
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()
