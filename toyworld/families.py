"""Toy tokenizers of the other families, built offline for fixed steps next to the toy VAE.

The toy world's own VAE is an ``AutoencoderKL``. A study across tokenizer families
(docs/tokenizers.md) needs one of each family that trains, samples and scores through the same
tools, loaded through ``from_pretrained`` like a released one:

* ``<world>/flux2-vae``: a tiny ``AutoencoderKLFlux2`` with the toy VAE's widths (x4, 4 latent
  channels) and training budget; its latent reaches the DiT 2x2-patchified, 16 channels on a 4x4
  grid at 32 px, normalised by its BatchNorm, whose running statistics are measured here on
  training images (posterior samples, the channels the DiT sees) as FLUX.2's were on its data.
* ``<world>/rae``: a tiny ``AutoencoderRAE``. Its encoder is a DINOv2-with-registers network (64
  wide, 8x8 patches, from a transformers config) first trained to recognise the toy attributes
  (colour, shape, position, background) from its tokens, so its latent is a *representation*, as a
  real RAE's is, then frozen; the ViT decoder is trained to reconstruct from those tokens with the
  release's token noise (``noise_tau``). Per-channel ``latents_mean`` / ``latents_std`` are measured
  on training images. The latent is 64 channels on a 4x4 grid at 32 px: the same 16 tokens as
  the other toy tokenizers give the DiT.

Both are deterministic for a seed (fixed steps, seeded batches, the world's numeric path when the
caller pins it) and record what they measured in ``report.json`` in their folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.files import write_json_atomic
from common.images import psnr
from toyworld.training import train_fixed_steps
from toyworld.vae import _to_unit, train_vae, vae_config, vae_psnr
from toyworld.world import ATTRIBUTES

FLUX2_DIR, RAE_DIR = "flux2-vae", "rae"
REPORT = "report.json"

# The RAE's encoder: DINOv2 with registers, diffusers builds it with one 64-wide head per 64 channels.
RAE_CONFIG: dict[str, Any] = {
    "encoder_type": "dinov2",
    "encoder_hidden_size": 64,
    "encoder_patch_size": 8,
    "encoder_num_hidden_layers": 2,
    "encoder_input_size": 32,
    "decoder_hidden_size": 128,
    "decoder_num_hidden_layers": 3,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 256,
    "patch_size": 8,
    "encoder_norm_mean": [0.5, 0.5, 0.5],  # the toy images' own range, not ImageNet statistics
    "encoder_norm_std": [0.5, 0.5, 0.5],
    "noise_tau": 0.8,  # the released RAEs' decoder noise ("n08")
}
RAE_STEPS = {"encoder": (600, 150), "decoder": (1500, 150)}  # (full, quick)
RAE_LR = {"encoder": 3e-3, "decoder": 1e-3}
RAE_BATCH = 32
ENCODER_PREFIX_TOKENS = 5  # DINOv2 with registers: CLS + 4 registers before the patch tokens


# --------------------------------------------------------------------------------------------
# FLUX.2
# --------------------------------------------------------------------------------------------
def flux2_config(resolution: int) -> dict[str, Any]:
    """The toy VAE's architecture as an ``AutoencoderKLFlux2`` (its BatchNorm is over 2x2 x 4 = 16 channels)."""
    return {**vae_config(resolution), "use_quant_conv": True, "use_post_quant_conv": True}


def build_toy_flux2(
    world: Path, images: torch.Tensor, val_images: torch.Tensor, steps: int, seed: int, progress: bool
) -> dict[str, Any]:
    """Train, calibrate and save ``<world>/flux2-vae``; returns its report (PSNR on ``val_images``, as the toy VAE)."""
    from diffusers import AutoencoderKLFlux2

    from common.latent_stats import measure_latents

    start = time.perf_counter()
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**flux2_config(int(images.shape[-1])))
    vae = train_vae(images, int(images.shape[-1]), steps, seed, progress, vae=vae, desc="toy FLUX.2 VAE")
    mean, std = measure_latents(vae, images, seed=seed)  # the 16 patchified channels
    eps = float(vae.config.batch_norm_eps)
    with torch.no_grad():
        vae.bn.running_mean.copy_(mean.float())
        vae.bn.running_var.copy_((std.pow(2) - eps).clamp_min(0.0).float())
    out = world / FLUX2_DIR
    vae.save_pretrained(out, safe_serialization=True)
    report = {
        "family": "flux2",
        "steps": steps,
        "seed": seed,
        **vae_psnr(vae, val_images),
        "bn_running_mean": [round(float(v), 5) for v in mean],
        "bn_std": [round(float(v), 5) for v in std],
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    write_json_atomic(out / REPORT, report, sort_keys=False)
    return report


# --------------------------------------------------------------------------------------------
# RAE
# --------------------------------------------------------------------------------------------
def _rae(stats: tuple[torch.Tensor, torch.Tensor] | None = None):
    from diffusers import AutoencoderRAE

    extra = {}
    if stats is not None:
        extra = {"latents_mean": stats[0].view(-1, 1, 1).tolist(), "latents_std": stats[1].view(-1, 1, 1).tolist()}
    return AutoencoderRAE(**RAE_CONFIG, **extra)


def rae_tokens(rae: nn.Module, images_unit: torch.Tensor) -> torch.Tensor:
    """(B, N, C) patch tokens of the RAE's encoder for pixels in [0, 1] (what its ``encode`` reshapes)."""
    x = (images_unit - rae.encoder_mean) / rae.encoder_std
    return rae.encoder(x).last_hidden_state[:, ENCODER_PREFIX_TOKENS:]


def _attribute_targets(attributes: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([vocab.index(a[name]) for a in attributes]) for name, vocab in ATTRIBUTES.items()}


def train_rae_encoder(rae, images, attributes, steps: int, seed: int, progress: bool) -> float:
    """Teach the encoder the toy attributes from its tokens (mean- and max-pooled, one head each)."""
    width = RAE_CONFIG["encoder_hidden_size"]
    heads = nn.ModuleDict({name: nn.Linear(2 * width, len(vocab)) for name, vocab in ATTRIBUTES.items()})
    targets = _attribute_targets(attributes)
    generator = torch.Generator().manual_seed(seed)
    rae.encoder.requires_grad_(True).train()
    params = [*rae.encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=RAE_LR["encoder"], weight_decay=0.05)

    def loss_at(step: int) -> torch.Tensor:
        rows = torch.randint(len(images), (RAE_BATCH,), generator=generator)
        tokens = rae_tokens(rae, images[rows].float() / 255.0)
        pooled = torch.cat([tokens.mean(dim=1), tokens.amax(dim=1)], dim=1)
        return sum(F.cross_entropy(head(pooled), targets[name][rows]) for name, head in heads.items())

    loss = train_fixed_steps(
        optimizer, loss_at, steps=steps, lr=RAE_LR["encoder"], desc="toy RAE encoder", progress=progress, warmup=10
    )
    rae.encoder.requires_grad_(False).eval()
    return loss


def train_rae_decoder(rae, images, steps: int, seed: int, progress: bool) -> float:
    """Reconstruct from the frozen encoder's (noised, as in training mode) tokens: MSE in [0, 1] pixels."""
    generator = torch.Generator().manual_seed(seed + 1)
    rae.decoder.train()
    optimizer = torch.optim.AdamW(rae.decoder.parameters(), lr=RAE_LR["decoder"], weight_decay=0.0)

    def loss_at(step: int) -> torch.Tensor:
        x = images[torch.randint(len(images), (RAE_BATCH,), generator=generator)].float() / 255.0
        rae.train()
        rae.encoder.eval()
        z = rae.encode(x, generator=generator).latent  # noise_tau applies in training mode
        return (rae.decode(z).sample - x).pow(2).mean()

    loss = train_fixed_steps(
        optimizer,
        loss_at,
        steps=steps,
        lr=RAE_LR["decoder"],
        desc="toy RAE decoder",
        progress=progress,
        clip_params=list(rae.decoder.parameters()),
    )
    rae.eval()
    return loss


@torch.no_grad()
def _token_stats(rae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean / population std of the raw tokens over all images and positions."""
    tokens = torch.cat(
        [rae_tokens(rae, images[i : i + batch_size].float() / 255.0) for i in range(0, len(images), batch_size)]
    )
    flat = tokens.double().reshape(-1, tokens.shape[-1])
    return flat.mean(dim=0).float(), flat.std(dim=0, unbiased=False).float()


@torch.no_grad()
def rae_psnr(rae, images: torch.Tensor, batch_size: int = 256) -> float:
    values = []
    for i in range(0, len(images), batch_size):
        x = _to_unit(images[i : i + batch_size])
        recon = rae.decode(rae.encode((x + 1) / 2).latent).sample * 2 - 1
        values.append(psnr(x, recon))
    return torch.cat(values).mean().item()


def build_toy_rae(
    world: Path, images, attributes, val_images, quick: bool, seed: int, progress: bool
) -> dict[str, Any]:
    """Train, calibrate and save ``<world>/rae``; returns its report (PSNR on ``val_images``)."""
    start = time.perf_counter()
    q = 1 if quick else 0
    steps = {part: RAE_STEPS[part][q] for part in RAE_STEPS}
    torch.manual_seed(seed)
    rae = _rae()
    encoder_loss = train_rae_encoder(rae, images, attributes, steps["encoder"], seed, progress)
    decoder_loss = train_rae_decoder(rae, images, steps["decoder"], seed, progress)
    mean, std = _token_stats(rae, images)
    calibrated = _rae((mean, std - 1e-5))  # diffusers divides by (std + 1e-5)
    state = {k: v for k, v in rae.state_dict().items() if k not in ("_latents_mean", "_latents_std")}
    calibrated.load_state_dict(state, strict=False)
    calibrated.eval()
    out = world / RAE_DIR
    calibrated.save_pretrained(out, safe_serialization=True)
    report = {
        "family": "rae",
        "steps": steps,
        "seed": seed,
        "encoder_final_loss": round(encoder_loss, 4),
        "decoder_final_loss": round(decoder_loss, 5),
        "psnr_db": rae_psnr(calibrated, val_images),
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    write_json_atomic(out / REPORT, report, sort_keys=False)
    return report


# --------------------------------------------------------------------------------------------
# Both, into a built world
# --------------------------------------------------------------------------------------------
def build_toy_families(world: str | Path, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build ``<world>/flux2-vae`` and ``<world>/rae`` when missing (or ``force``); returns their reports.

    The FLUX.2 VAE gets the world's VAE training budget (``request.steps.vae``), the RAE its own
    fixed steps (quick worlds: the quick ones). A folder whose ``report.json`` exists is reused: the
    world's own rebuild removes both (they are derived from its images). Records the reports in
    ``world.json`` (``families``).
    """
    from common import numerics
    from toyworld.world import load_images

    world = Path(world)
    request = json.loads((world / "world.json").read_text())["request"]
    wanted = {FLUX2_DIR: force, RAE_DIR: force}
    todo = [name for name, again in wanted.items() if again or not (world / name / REPORT).is_file()]
    reports = {name: json.loads((world / name / REPORT).read_text()) for name in wanted if name not in todo}
    if todo:
        images, attributes = load_images(sorted((world / "shards").glob("train-*.tar")))
        val, _ = load_images(sorted((world / "shards").glob("val-*.tar")))
        images, val = torch.from_numpy(images), torch.from_numpy(val)
        seed, quick = int(request["seed"]), bool(request["quick"])
        with numerics.pinned_threads():
            if FLUX2_DIR in todo:
                steps = int(request["steps"]["vae"])
                reports[FLUX2_DIR] = build_toy_flux2(world, images, val, steps, seed, progress)
            if RAE_DIR in todo:
                reports[RAE_DIR] = build_toy_rae(world, images, attributes, val, quick, seed, progress)
    record = json.loads((world / "world.json").read_text())
    families = {name: reports[name] for name in wanted}
    if record.get("families") != families:
        record["families"] = families
        write_json_atomic(world / "world.json", record, sort_keys=False)
    return families
