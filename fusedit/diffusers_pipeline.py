"""The trained text-to-image model as a ``diffusers.DiffusionPipeline``.

:class:`FuseDiTPipeline` is what ``python -m fusedit.export`` writes and what
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (or
``FuseDiTPipeline.from_pretrained(folder)``) loads: the standard folder with ``model_index.json``
and one sub-folder per component (``transformer/``, ``text_encoder/``, ``tokenizer/``, ``vae/``,
``scheduler/``; for a "fuse-dit-clip" model also ``clip_text_encoder/`` and ``clip_tokenizer/``),
publishable with ``push_to_hub``.

It adds no sampling logic of its own: ``__call__`` translates diffusers' conventions (prompt or
prompts, ``generator``, ``output_type``, ``return_dict``) and runs the same sampler as training's
grids and the evaluation samplers (:class:`fusedit.pipeline.DiTPipeline`), so our fixes hold for
every user of the folder: latents un-normalised with the VAE config's own constants (scalar
``scaling_factor``/``shift_factor`` or per-channel ``latents_mean``/``latents_std``), fp32
latents, and, with ``seed=``, per-image noise that does not depend on batch composition.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from fusedit.latents import LatentCodec
from fusedit.pipeline import DiTPipeline
from fusedit.text import ClipTextEncoder, TextEncoder

OUTPUT_TYPES = ("pil", "np", "pt")


class FuseDiTPipeline(DiffusionPipeline):
    """DiT + frozen causal-LLM text encoder + frozen VAE + flow-matching Euler scheduler.

    ``hidden_states_index`` (which hidden state of the text encoder conditions the DiT) and
    ``max_prompt_length`` are part of the pipeline's config (``model_index.json``): they were
    fixed by training and sampling must use the same ones. ``resolution`` is the training image
    side, the default ``height``/``width`` (the DiT's ``sample_size`` is not: under the APE it
    fixes the position table's spacing and stays 32 at 512 px). ``clip_text_encoder`` (a
    ``CLIPTextModelWithProjection``) and ``clip_tokenizer``: the pooled-text encoder of a FuseDiT
    that takes one (the "fuse-dit-clip" type); None for every other model.
    """

    model_cpu_offload_seq = "clip_text_encoder->text_encoder->transformer->vae"
    _optional_components = ["clip_text_encoder", "clip_tokenizer"]

    def __init__(
        self,
        transformer: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        vae: torch.nn.Module,
        scheduler: Any,
        hidden_states_index: int = -1,
        max_prompt_length: int = 256,
        resolution: int | None = None,
        clip_text_encoder: torch.nn.Module | None = None,
        clip_tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
            scheduler=scheduler,
            clip_text_encoder=clip_text_encoder,
            clip_tokenizer=clip_tokenizer,
        )
        self.register_to_config(
            hidden_states_index=hidden_states_index, max_prompt_length=max_prompt_length, resolution=resolution
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> FuseDiTPipeline:
        """Load an exported folder component by component, running no code from it.

        ``from_pretrained`` executes the folder's ``pipeline.py`` (hence ``trust_remote_code``);
        our own samplers need not: they know the classes and read only configs and safetensors.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection

        from common.vae_config import FAMILIES, family_of_class
        from fusedit.models import model_class

        path = Path(path)
        index = json.loads((path / "model_index.json").read_text())
        vae_cls = (family_of_class(index.get("vae", [None, None])[1]) or FAMILIES["kl"]).vae_class()
        return cls(
            transformer=model_class(path / "transformer").from_pretrained(str(path / "transformer")),
            text_encoder=AutoModel.from_pretrained(str(path / "text_encoder")),
            tokenizer=AutoTokenizer.from_pretrained(str(path / "tokenizer")),
            vae=vae_cls.from_pretrained(str(path / "vae")),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(path / "scheduler")),
            hidden_states_index=int(index.get("hidden_states_index", -1)),
            max_prompt_length=int(index.get("max_prompt_length", 256)),
            resolution=index.get("resolution"),
            **_clip_components(path, index, CLIPTextModelWithProjection, AutoTokenizer),
        )

    def sampler(self) -> DiTPipeline:
        """Our sampler over this pipeline's components (built per call: components may have moved)."""
        encoder = TextEncoder.from_model(self.text_encoder, self.tokenizer, int(self.config.hidden_states_index))
        clip = None
        if self.clip_text_encoder is not None:
            clip = ClipTextEncoder(self.clip_text_encoder, self.clip_tokenizer)
        return DiTPipeline(
            self.transformer, encoder, LatentCodec(self.vae), self.scheduler, int(self.config.max_prompt_length), clip
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 6.0,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 16,
    ) -> ImagePipelineOutput | tuple:
        """Images for ``prompt`` (prompt-major: all images of prompt 0 first).

        Initial noise, first match wins: ``latents`` (one per image); ``seed`` (image ``k`` of
        prompt ``i`` from its own generator seeded by (seed, i, k): reproducible whatever the
        batch); ``generator`` (one, drawn in order, or a list with one per image, as diffusers
        does); else torch's global generator. ``height``/``width`` default to the training
        resolution. ``output_type``: "pil" (list of PIL images), "np" (float32 NHWC in
        [0, 1]) or "pt" (float32 NCHW in [0, 1]).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        sampler = self.sampler()
        default = self.config.resolution or int(self.transformer.config.sample_size) * sampler.codec.spatial_factor
        height, width = height or default, width or default
        count = len(prompts) * num_images_per_prompt
        if latents is None and seed is None:
            latents = self._noise(generator, count, sampler.noise_shape(height, width))
        images = sampler(
            prompts,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            seed=0 if seed is None else seed,
            num_images_per_prompt=num_images_per_prompt,
            batch_size=batch_size,
            latents=latents,
            autocast_dtype=torch.bfloat16 if sampler.device.type == "cuda" else None,
        )
        images = self._convert(images, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def _noise(generator, count: int, shape: tuple[int, int, int]) -> torch.Tensor:
        if isinstance(generator, list):
            if len(generator) != count:
                raise ValueError(f"generator: got a list of {len(generator)}, need one per image ({count})")
            return torch.stack([torch.randn(shape, generator=g, device=g.device).cpu() for g in generator])
        device = generator.device if generator is not None else "cpu"
        return torch.randn((count, *shape), generator=generator, device=device).cpu()

    def _convert(self, images: torch.Tensor, output_type: str):
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).float().numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)


def _clip_components(path: Path, index: dict[str, Any], model_cls: type, tokenizer_cls: type) -> dict[str, Any]:
    """The CLIP text encoder and tokenizer of a folder whose index lists them (a "fuse-dit-clip" export)."""
    if not (index.get("clip_text_encoder") or [None])[0]:
        return {}
    return {
        "clip_text_encoder": model_cls.from_pretrained(str(path / "clip_text_encoder")),
        "clip_tokenizer": tokenizer_cls.from_pretrained(str(path / "clip_tokenizer")),
    }


def is_pipeline_folder(path: str | Path) -> bool:
    """True for a diffusers pipeline folder (``model_index.json``), e.g. one ``fusedit.export`` wrote."""
    return (Path(path) / "model_index.json").is_file()


def sampler_from_folder(path: str | Path, device: str | torch.device = "cpu", vae=None, clip=None) -> DiTPipeline:
    """Our sampler over an exported pipeline folder; ``vae`` (a ``VaeSpec``) replaces its VAE, ``clip``
    (a ``ClipSource``) the CLIP text encoder of a model that takes pooled text (others ignore it)."""
    pipe = FuseDiTPipeline.from_folder(path)
    sampler = pipe.sampler()
    if vae is not None:
        sampler.codec = LatentCodec.from_spec(vae)
    if clip is not None and sampler.clip is not None:
        sampler.clip = ClipTextEncoder.load(clip)
    sampler.transformer.to(device).eval()
    sampler.text_encoder.to(device)
    sampler.codec.to(device)
    if sampler.clip is not None:
        sampler.clip.to(device)
    return sampler
