"""What end-to-end tuning did to a VAE: reconstruction quality and latent statistics, side by side.

    python -m repae.diagnostics --vae f8d4 --vae-checkpoint sdvae-f8d4.pt \\
        --vae exps/e2e-sdvae --vae-checkpoint none --images data/val --num-images 1000 --out report.json

The reference answers "did REPA-E make the VAE better or worse?" only in the paper. This tool
measures it on the user's own images, for any number of VAEs (typically the original and its
E2E-tuned copy) on exactly the same images:

* reconstruction: PSNR (dB, per image, peak-to-peak 2 in [-1, 1]), SSIM (Gaussian 11x11,
  sigma 1.5, on [0, 1]), LPIPS (``repae.losses.build_lpips``) and, optionally, rFID between the
  originals and the reconstructions through ``common.fid`` (clean-fid; needs a few hundred
  images to mean anything, hence ``--no-rfid``);
* the latent statistics the REPA-E paper discusses, from the posterior means *and* from posterior
  samples: per-channel mean, std and spatial variance (variance over (h, w) of each image's
  channel map, averaged over images: high for a noisy, high-frequency latent, low for an
  over-smoothed one), their channel averages and each channel's share of the total variance;
  plus the same statistics after the VAE's own latent normalisation (config ``latents_mean`` /
  ``latents_std``, ``shift_factor`` / ``scaling_factor`` or a ``latents-stats`` file), which
  says whether that normalisation still fits the tuned latents.

Decisions: reconstructions decode the posterior *mean* by default (deterministic, what rFID
tables usually mean; ``--reconstruct-from sample`` otherwise) and are clamped to [-1, 1] before
PSNR/SSIM/LPIPS; rFID sees them rounded to uint8 PNGs, like any generated image. Posterior samples
draw their noise on the CPU from a generator seeded by (seed, image index), so every VAE with the
same latent shape gets the same noise per image, whatever the batch size, on CPU and GPU alike.
Images are read in sorted order and the first ``--num-images`` are used. JSON has no infinity: a
non-finite number (PSNR of an exact reconstruction) is written as null and explained in ``notes``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.files import write_json_atomic
from common.images import psnr, quantise
from common.lifecycle import UsageExit
from common.randomness import STREAM_RECONSTRUCTION, derive_seed
from common.vae_config import normalisation_constants, normalisation_source

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
RFID_MIN_USEFUL = 500  # below this rFID is dominated by its small-sample bias; reported with a note

ImageSource = torch.Tensor | Callable[[], Iterable[Any]]


# --------------------------------------------------------------------------------------------
# Image metrics
# --------------------------------------------------------------------------------------------
def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian (size, size), float64: the window of Wang et al. (2004)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images in [0, data_range]: mean over channels and valid positions.

    The standard definition (Wang et al. 2004; skimage's ``gaussian_weights=True,
    use_sample_covariance=False``): Gaussian-weighted local means, variances and covariance with
    an 11x11, sigma 1.5 window, K1 = 0.01, K2 = 0.03, and only window positions fully inside the
    image (skimage filters the whole image and then crops the same 5-pixel border). Computed in
    float64: the variance terms are differences of nearly equal numbers.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two equal (B,C,H,W) shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW} px, got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    window = gaussian_window().to(x.device).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)
    x, y = x.double(), y.double()
    blur = lambda t: F.conv2d(t, window, groups=channels)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def _lpips_values(lpips_fn: Callable, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS; the network returns (B,1,1,1) or (B,), both inputs in [-1, 1]."""
    return lpips_fn(x, recon).reshape(x.shape[0], -1).mean(1).double()


# --------------------------------------------------------------------------------------------
# Latent statistics
# --------------------------------------------------------------------------------------------
class LatentStats:
    """Running per-channel statistics of (B, C, h, w) latents, accumulated in float64.

    Mean and variance over (images, h, w) are merged batch by batch (Chan et al.), never as
    sum-of-squares minus squared sum, so large offsets cannot cancel the variance away. The
    spatial variance is each image's variance over (h, w) (population, ddof 0) per channel,
    averaged over images: the part of a channel's variance that lives inside one image.
    """

    def __init__(self) -> None:
        self.count = 0  # elements per channel
        self.images = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.spatial_var_sum: torch.Tensor | None = None

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().to("cpu", torch.float64)
        flat = z.transpose(0, 1).reshape(z.shape[1], -1)
        n, batch_mean = flat.shape[1], flat.mean(1)
        batch_m2 = (flat - batch_mean[:, None]).pow(2).sum(1)
        spatial = z.flatten(2).var(dim=2, unbiased=False).sum(0)
        if self.mean is None:
            self.mean, self.m2, self.spatial_var_sum = batch_mean, batch_m2, spatial
        else:
            if batch_mean.shape != self.mean.shape:
                raise ValueError(f"LatentStats: {batch_mean.numel()} channels after {self.mean.numel()}")
            delta, total = batch_mean - self.mean, self.count + n
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + batch_m2 + delta.pow(2) * (self.count * n / total)
            self.spatial_var_sum = self.spatial_var_sum + spatial
        self.count += n
        self.images += z.shape[0]

    def result(self, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> dict[str, Any]:
        """Per-channel lists, channel averages, pooled mean/std; normalised by (z - shift) * scale if given."""
        if self.mean is None:
            raise ValueError("LatentStats: no latents seen")
        mean, var, spatial = self.mean, self.m2 / self.count, self.spatial_var_sum / self.images
        if shift is not None and scale is not None:
            shift, scale = shift.double().flatten(), scale.double().flatten()
            mean, var, spatial = (mean - shift) * scale, var * scale**2, spatial * scale**2
        std = var.sqrt()
        pooled_var = var.mean() + (mean - mean.mean()).pow(2).mean()  # all channels as one population
        return {
            "mean": mean.tolist(),
            "std": std.tolist(),
            "spatial_var": spatial.tolist(),
            "var_fraction": (var / var.sum()).tolist(),
            "spatial_share": (spatial / var).tolist(),
            "mean_avg": mean.mean().item(),
            "abs_mean_avg": mean.abs().mean().item(),
            "std_avg": std.mean().item(),
            "spatial_var_avg": spatial.mean().item(),
            "spatial_share_avg": (spatial / var).mean().item(),
            "max_var_fraction": (var / var.sum()).max().item(),
            "pooled_mean": mean.mean().item(),
            "pooled_std": pooled_var.sqrt().item(),
        }


# --------------------------------------------------------------------------------------------
# Images in
# --------------------------------------------------------------------------------------------
def _to_uint8_chw(image, resolution: int) -> torch.Tensor:
    """PIL image -> centre-cropped, resized uint8 (3, R, R): the same transform as common.fid."""
    from common.fid import ResizeTo

    return torch.from_numpy(np.ascontiguousarray(ResizeTo(resolution)(np.asarray(image)).transpose(2, 0, 1)))


def folder_images(folder: str | Path, resolution: int, num_images: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 (3, R, R) images of a folder (recursive, sorted by path, hidden files skipped), first N."""
    from PIL import Image

    from common.fid import list_images

    files = list_images(folder)
    for path in files[:num_images] if num_images else files:
        with Image.open(path) as image:
            yield _to_uint8_chw(image.convert("RGB"), resolution)


def shard_images(
    patterns: str | Sequence[str], resolution: int, num_images: int | None = None, skipped: list[str] | None = None
) -> Iterator[torch.Tensor]:
    """uint8 (3, R, R) images from local webdataset tars, in shard then member order, first N.

    Deliberately not the training loader: that one shuffles, splits by rank and may flip; here
    every VAE must see the same images in the same order. Each sample's first image member
    (jpg, jpeg, png, webp) is used; samples without one or with undecodable bytes are skipped
    and their keys appended to ``skipped``.
    """
    from common.shards import decode_image, validate_data_paths
    from toyworld.world import read_shard_samples

    urls = validate_data_paths([patterns] if isinstance(patterns, str) else list(patterns))
    produced = 0
    for sample in read_shard_samples(urls):
        if num_images and produced >= num_images:
            return
        member = next((sample[m] for m in IMAGE_MEMBERS if m in sample), None)
        try:
            if member is None:
                raise ValueError("no image member")
            image = decode_image(member)
        except (OSError, ValueError):
            if skipped is not None:
                skipped.append(sample["__key__"].decode(errors="replace"))
            continue
        produced += 1
        yield _to_uint8_chw(image, resolution)


def _batches(images: Iterable[Any], batch_size: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Re-batch single (3,H,W) or batched (B,3,H,W) uint8 tensors/arrays into (batch_size,3,H,W) chunks."""
    pending: list[torch.Tensor] = []
    seen = 0
    for item in images:
        item = torch.as_tensor(item)
        if item.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {item.dtype}")
        for image in item.unsqueeze(0) if item.dim() == 3 else item:
            if limit is not None and seen >= limit:
                break
            pending.append(image)
            seen += 1
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
    if pending:
        yield torch.stack(pending)


def _save_pngs(batch_uint8: torch.Tensor, folder: Path, start: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(batch_uint8.permute(0, 2, 3, 1).cpu().numpy()):
        Image.fromarray(image).save(folder / f"{start + i:06d}.png")


# --------------------------------------------------------------------------------------------
# One VAE
# --------------------------------------------------------------------------------------------
def as_trainable(vae: nn.Module) -> nn.Module:
    """A ``repae.vae.TrainableVAE`` for a diffusers VAE; anything already shaped like one is kept.

    "Shaped like one" (has ``encode``, ``decode`` and ``spatial_factor``) rather than an
    isinstance check, so a wrapper of the trainer's or a test double can be diagnosed as is.
    DDP (``.module``) and torch.compile (``._orig_mod``) wrappers are looked through.
    """
    while isinstance(getattr(vae, "module", None), nn.Module) or isinstance(getattr(vae, "_orig_mod", None), nn.Module):
        vae = vae.module if isinstance(getattr(vae, "module", None), nn.Module) else vae._orig_mod
    if all(hasattr(vae, a) for a in ("encode", "decode", "spatial_factor", "latent_channels")):
        return vae
    from repae.vae import TrainableVAE

    return TrainableVAE(vae)


def config_normalisation(config: Mapping[str, Any], channels: int) -> dict[str, Any] | None:
    """(shift, scale) per channel the VAE's config implies, plus where they came from; None if none.

    The same rule as training reads (:func:`common.vae_config.normalisation_constants`):
    per-channel ``latents_mean`` / ``latents_std`` win over the scalar factors.
    """
    source = normalisation_source(config)
    if source is None:
        return None
    shift, scale = normalisation_constants(config, channels)
    return {"shift": shift.flatten().tolist(), "scale": scale.flatten().tolist(), "source": source}


def _config(model: nn.Module) -> dict[str, Any]:
    """The diffusers config of the wrapped VAE ({} for a VAE without one)."""
    return dict(getattr(getattr(model, "vae", model), "config", None) or {})


def describe_vae(vae: nn.Module) -> dict[str, Any]:
    """Class, latent geometry and the normalisation constants found in the config."""
    model = as_trainable(vae)
    inner = getattr(model, "vae", model)
    config = _config(model)
    return {
        "class": type(inner).__name__,
        "latent_channels": int(model.latent_channels),
        "spatial_factor": int(model.spatial_factor),
        "num_parameters": sum(p.numel() for p in inner.parameters()),
        **{k: config.get(k) for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")},
    }


@torch.no_grad()
def diagnose_vae(
    vae: nn.Module,
    images_uint8_iter: Iterable[Any],
    *,
    lpips_fn: Callable | None = None,
    batch_size: int = 32,
    seed: int = 0,
    num_images: int | None = None,
    reconstruct_from: str = "mean",
    normalisation: Mapping[str, Any] | None = None,
    recon_dir: str | Path | None = None,
    real_dir: str | Path | None = None,
    progress: bool = False,
    desc: str = "encode",
    total: int | None = None,
) -> dict[str, Any]:
    """Reconstruction metrics and latent statistics of one VAE over some uint8 images.

    ``vae``: a ``TrainableVAE`` or a diffusers VAE, on any device (images follow it); its
    train/eval mode is restored afterwards, so the trainer can call this mid-run.
    ``images_uint8_iter``: (3,H,W) or (B,3,H,W) uint8 tensors/arrays. ``lpips_fn``: a module
    taking two [-1, 1] batches (None skips LPIPS). ``normalisation``: {"shift", "scale"} per
    channel (default: from the VAE's config) for the normalised statistics. ``recon_dir`` /
    ``real_dir``: where to write reconstructions / originals as PNGs (rFID input). ``total``:
    the progress bar's length when it is not ``num_images``.
    Returns {"num_images", "metrics", "latents": {"mean", "sample", "normalised"}, "posterior"}.
    """
    if reconstruct_from not in ("mean", "sample"):
        raise ValueError(f"reconstruct_from must be 'mean' or 'sample', got {reconstruct_from!r}")
    from tqdm.auto import tqdm

    model = as_trainable(vae)
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    acc = {"psnr": [], "ssim": [], "lpips": [], "kl": []}
    stats_mean, stats_sample, post_std = LatentStats(), LatentStats(), LatentStats()
    done = 0
    try:
        with tqdm(total=total or num_images, desc=desc, unit="img", disable=not progress) as bar:
            for batch in _batches(images_uint8_iter, batch_size, num_images):
                x = batch.to(device).float() / 127.5 - 1.0
                posterior = model.encode(x)
                mean, std = posterior.mean.float(), posterior.std.float()
                eps = _noise(mean.shape, seed, done).to(device)
                z = mean + std * eps
                recon = model.decode(mean if reconstruct_from == "mean" else z).float()
                if recon.shape != x.shape:
                    raise ValueError(f"decoded shape {tuple(recon.shape)} != input {tuple(x.shape)}")
                recon = recon.clamp(-1, 1)
                acc["psnr"].append(psnr(x, recon).cpu())
                acc["ssim"].append(ssim((x + 1) / 2, (recon + 1) / 2).cpu())
                if lpips_fn is not None:
                    acc["lpips"].append(_lpips_values(lpips_fn, x, recon).cpu())
                acc["kl"].append(posterior.kl().double().cpu() / mean[0].numel())
                stats_mean.update(mean)
                stats_sample.update(z)
                post_std.update(std)
                if recon_dir is not None:
                    _save_pngs(quantise(recon), Path(recon_dir), done)
                if real_dir is not None:
                    _save_pngs(batch, Path(real_dir), done)
                done += len(batch)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    if done == 0:
        raise ValueError("diagnose_vae: no images")
    if normalisation is None:
        normalisation = config_normalisation(_config(model), int(model.latent_channels))
    std_per_channel = post_std.result()["mean"]
    return {
        "num_images": done,
        "metrics": _summarise_metrics(acc),
        "latents": _latent_report(stats_mean, stats_sample, normalisation),
        "posterior": {
            "std": std_per_channel,
            "std_avg": sum(std_per_channel) / len(std_per_channel),
            "kl_per_element": torch.cat(acc["kl"]).mean().item(),
        },
    }


def _noise(shape: torch.Size, seed: int, first_index: int) -> torch.Tensor:
    """Standard normal noise for images first_index.. of a batch, one CPU generator per image.

    Seeding by (seed, image index) makes every image's sample independent of the batch size and
    of the device, so reports from different runs and machines agree.
    """
    per_image, draws = tuple(shape[1:]), []
    for i in range(shape[0]):
        key = derive_seed(seed, (STREAM_RECONSTRUCTION,), first_index + i)
        draws.append(torch.randn(per_image, generator=torch.Generator().manual_seed(key)))
    return torch.stack(draws)


def _summarise_metrics(acc: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Image-averaged metrics; PSNR also over the finite images only, since one exact image makes the mean inf."""
    values = torch.cat(acc["psnr"])
    finite = values[torch.isfinite(values)]
    return {
        "psnr_db": values.mean().item(),
        "psnr_db_finite": finite.mean().item() if len(finite) else None,
        "psnr_exact_images": int((~torch.isfinite(values)).sum()),
        "psnr_db_std": finite.std().item() if len(finite) > 1 else None,
        "ssim": torch.cat(acc["ssim"]).mean().item(),
        "lpips": torch.cat(acc["lpips"]).mean().item() if acc["lpips"] else None,
    }


def _latent_report(mean: LatentStats, sample: LatentStats, norm: Mapping[str, Any] | None) -> dict[str, Any]:
    report = {"mean": mean.result(), "sample": sample.result(), "normalised": None}
    if norm is not None:
        shift, scale = torch.tensor(norm["shift"]), torch.tensor(norm["scale"])
        if shift.numel() == len(report["sample"]["mean"]):
            report["normalised"] = {"source": norm.get("source"), **sample.result(shift, scale)}
    return report


# --------------------------------------------------------------------------------------------
# Several VAEs
# --------------------------------------------------------------------------------------------
@dataclass
class VaeSource:
    """Where a VAE comes from (the arguments of ``repae.vae.load_vae``) and its report column name."""

    name_or_path: str
    checkpoint: str | None = None
    subfolder: str | None = None
    kind: str = "auto"
    label: str | None = None

    def default_label(self) -> str:
        base = Path(self.name_or_path.rstrip("/")).name or self.name_or_path
        return f"{base}:{Path(self.checkpoint).stem}" if self.checkpoint else base

    def load(self, device: str | torch.device = "cpu") -> nn.Module:
        from repae.vae import load_vae

        vae = load_vae(self.name_or_path, subfolder=self.subfolder, kind=self.kind, checkpoint=self.checkpoint)
        return as_trainable(vae).to(device).eval()

    def latents_stats_file(self) -> Path | None:
        """The stats file that travels with this VAE: ``<ckpt>-latents-stats.pt`` or ``latents_stats.safetensors``."""
        if self.checkpoint and self.checkpoint.endswith(".pt"):
            path = Path(self.checkpoint[: -len(".pt")] + "-latents-stats.pt")
        else:
            path = Path(self.name_or_path) / (self.subfolder or "") / "latents_stats.safetensors"
        return path if path.is_file() else None


def stats_file_normalisation(path: Path) -> dict[str, Any]:
    """{"shift", "scale", "source"} from a reference or saved latents-stats file."""
    from repae.vae import load_latents_stats

    scale, bias = load_latents_stats(path)
    return {"shift": bias.flatten().tolist(), "scale": scale.flatten().tolist(), "source": str(path)}


def _unique_labels(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        name, k = label, 2
        while name in out:
            name, k = f"{label}#{k}", k + 1
        out.append(name)
    return out


def _resolve(specs: Sequence[VaeSource] | Mapping[str, nn.Module | VaeSource]) -> list[tuple[str, Any]]:
    if isinstance(specs, Mapping):
        return list(specs.items())
    return list(zip(_unique_labels([s.label or s.default_label() for s in specs]), specs))


def _image_factory(images: ImageSource) -> Callable[[], Iterable[Any]]:
    if isinstance(images, torch.Tensor):
        return lambda: [images]
    if callable(images):
        return images
    raise TypeError("images: a uint8 (N,3,H,W) tensor or a zero-argument callable returning an iterable")


def compare_vaes(
    specs: Sequence[VaeSource] | Mapping[str, nn.Module | VaeSource],
    images: ImageSource,
    *,
    lpips_fn: Callable | None = None,
    batch_size: int = 32,
    seed: int = 0,
    num_images: int | None = None,
    device: str | torch.device | None = None,
    rfid: bool = False,
    fid_extractor: str | None = None,
    reconstruct_from: str = "mean",
    progress: bool = False,
) -> dict[str, Any]:
    """Diagnose several VAEs on the same images; returns the JSON-ready report (non-finite -> null + note).

    ``specs``: ``VaeSource`` entries (loaded one at a time, then freed) or a mapping label ->
    loaded VAE / ``VaeSource`` (how the trainer passes its before/after models). ``images``: a
    uint8 (N,3,H,W) tensor or a callable returning a fresh iterable of uint8 images each time
    (streamed once per VAE). ``rfid``: also FID(originals, reconstructions) via common.fid,
    with ``fid_extractor`` as its ``--feature-extractor`` (None = clean-fid InceptionV3).
    """
    entries = _resolve(specs)
    if not entries:
        raise ValueError("compare_vaes: no VAEs")
    factory = _image_factory(images)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="repae-diag-") as tmp:
        if rfid:
            from common.fid import load_feature_extractor

            try:  # fail before hours of encoding, not after
                load_feature_extractor(fid_extractor, torch.device(device or "cpu"))
            except OSError as e:
                raise OSError(
                    f"rFID feature extractor {fid_extractor or 'InceptionV3'}: {e} (offline, clean-fid needs "
                    "/tmp/inception-2015-12-05.pt; or skip rFID / pick another extractor)"
                ) from e
        vaes: dict[str, Any] = {}
        total = len(images) if isinstance(images, torch.Tensor) else num_images
        for i, (label, spec) in enumerate(entries):
            vaes[label] = _diagnose_entry(
                label,
                spec,
                factory,
                lpips_fn=lpips_fn,
                batch_size=batch_size,
                seed=seed,
                num_images=num_images,
                device=device,
                reconstruct_from=reconstruct_from,
                recon_dir=Path(tmp) / f"recon{i}" if rfid else None,
                real_dir=Path(tmp) / "real" if rfid and i == 0 else None,
                progress=progress,
                total=total,
            )
            total = vaes[label]["num_images"]  # the bars of the next VAEs know the count
        counts = {entry["num_images"] for entry in vaes.values()}
        if len(counts) != 1:
            raise ValueError(f"compare_vaes: the image source gave different counts per VAE: {sorted(counts)}")
        count = counts.pop()
        if rfid:
            _add_rfid(vaes, Path(tmp), count, fid_extractor, batch_size, device, notes)
    report = {
        "config": {
            "num_images": count,
            "batch_size": batch_size,
            "seed": seed,
            "reconstruct_from": reconstruct_from,
            "lpips": lpips_fn is not None,
            "rfid": rfid,
            "fid_extractor": fid_extractor if rfid else None,
        },
        "vaes": vaes,
    }
    report = json_safe(report, notes)
    report["notes"] = notes
    return report


def _diagnose_entry(label: str, spec: Any, factory: Callable, *, device, **kwargs: Any) -> dict[str, Any]:
    """Load (if needed), describe and diagnose one VAE; a VAE loaded here is freed afterwards."""
    normalisation, source = None, None
    if isinstance(spec, VaeSource):
        source = {k: v for k, v in asdict(spec).items() if k != "label"}
        stats_file = spec.latents_stats_file()
        normalisation = stats_file_normalisation(stats_file) if stats_file else None
        model = spec.load(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        model = as_trainable(spec)
        if device is not None:
            model.to(device)
    entry = {"label": label, "source": source, "config": describe_vae(model)}
    entry.update(diagnose_vae(model, factory(), normalisation=normalisation, desc=f"encode {label}", **kwargs))
    del model
    return entry


def _add_rfid(vaes: dict[str, Any], tmp: Path, count: int, extractor: str | None, batch_size, device, notes) -> None:
    """FID(originals, reconstructions) for each VAE; the originals' statistics are computed once (cached)."""
    from common.fid import compute_fid

    if count < 2:
        notes.append(f"rfid: skipped, FID needs at least 2 images (got {count})")
        return
    if count < RFID_MIN_USEFUL:
        notes.append(f"rfid: from only {count} images; biased high, compare VAEs only at equal image counts")
    for i, entry in enumerate(vaes.values()):
        result = compute_fid(
            tmp / "real",
            tmp / f"recon{i}",
            resolution=_png_side(tmp / "real"),  # the originals were already cropped and resized
            dataset_name="rfid",
            feature_extractor=extractor,
            cache_dir=tmp / "fid-cache",
            batch_size=batch_size,
            num_workers=0,
            device=device,
        )
        entry["metrics"]["rfid"] = result["fid"]
        entry["rfid"] = {k: result[k] for k in ("feature_extractor", "num_real", "num_fake", "clean_fid_version")}


def _png_side(folder: Path) -> int:
    from PIL import Image

    with Image.open(next(iter(sorted(folder.glob("*.png"))))) as image:
        return image.size[0]


def json_safe(obj: Any, notes: list[str], path: str = "") -> Any:
    """Replace non-finite floats by None (JSON has no inf/nan) and record each in ``notes``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        notes.append(f"{path.lstrip('.')}: {obj} (written as null)")
        return None
    if isinstance(obj, Mapping):
        return {k: json_safe(v, notes, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v, notes, f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------
TABLE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("class", ("config", "class")),
    ("latent channels", ("config", "latent_channels")),
    ("spatial factor", ("config", "spatial_factor")),
    ("images", ("num_images",)),
    ("PSNR (dB)", ("metrics", "psnr_db")),
    ("PSNR finite (dB)", ("metrics", "psnr_db_finite")),
    ("SSIM", ("metrics", "ssim")),
    ("LPIPS", ("metrics", "lpips")),
    ("rFID", ("metrics", "rfid")),
    ("KL / element", ("posterior", "kl_per_element")),
    ("posterior std avg", ("posterior", "std_avg")),
    ("mean: channel mean avg", ("latents", "mean", "mean_avg")),
    ("mean: std avg", ("latents", "mean", "std_avg")),
    ("mean: spatial var avg", ("latents", "mean", "spatial_var_avg")),
    ("mean: spatial share avg", ("latents", "mean", "spatial_share_avg")),
    ("mean: max var fraction", ("latents", "mean", "max_var_fraction")),
    ("sample: channel mean avg", ("latents", "sample", "mean_avg")),
    ("sample: std avg", ("latents", "sample", "std_avg")),
    ("sample: spatial var avg", ("latents", "sample", "spatial_var_avg")),
    ("sample: pooled std", ("latents", "sample", "pooled_std")),
    ("normalised: |mean| avg", ("latents", "normalised", "abs_mean_avg")),
    ("normalised: std avg", ("latents", "normalised", "std_avg")),
)


def _lookup(entry: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(entry, Mapping) or key not in entry:
            return None
        entry = entry[key]
    return entry


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def format_table(report: Mapping[str, Any]) -> str:
    """One row per metric, one column per VAE; '-' for what was not measured."""
    labels = list(report["vaes"])
    rows = [["", *labels]]
    for name, keys in TABLE_ROWS:
        rows.append([name, *(_cell(_lookup(report["vaes"][label], keys)) for label in labels)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + [f"note: {n}" for n in report.get("notes", [])])


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _paired(values: list[str] | None, n: int, flag: str) -> list[str | None]:
    """A per-VAE option: absent, or given once per --vae in the same order ('none' = not set)."""
    if not values:
        return [None] * n
    if len(values) != n:
        raise UsageExit(f"{flag} was given {len(values)} times for {n} --vae; give it once per --vae ('none' to skip)")
    return [None if v.lower() in ("none", "") else v for v in values]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m repae.diagnostics",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--vae", action="append", required=True, help="preset name, diffusers folder or hub id (repeat)")
    p.add_argument("--vae-checkpoint", action="append", help="weights for a preset --vae (once per --vae, or none)")
    p.add_argument("--vae-subfolder", action="append", help="diffusers subfolder (once per --vae, or none)")
    p.add_argument("--vae-kind", default="auto", choices=("auto", "kl", "qwen"))
    p.add_argument("--label", action="append", help="report column name (once per --vae)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (recursive, sorted, any PIL-readable file)")
    src.add_argument("--shards", action="append", help="local webdataset tar pattern(s), brace-expanded")
    p.add_argument("--resolution", type=int, default=256, help="centre-crop and resize to this size")
    p.add_argument("--num-images", type=int, default=1000, help="use the first N images (0 = all)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (one process)")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior-sample noise")
    p.add_argument("--reconstruct-from", choices=("mean", "sample"), default="mean")
    p.add_argument("--lpips-backbone", default="torchvision", help="torchvision | random | PATH (repae.losses)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--no-rfid", action="store_true", help="skip rFID (needs a few hundred images to mean anything)")
    p.add_argument(
        "--fid-extractor",
        default=None,
        help="module:function features for rFID (default clean-fid InceptionV3; "
        "common.fid:random_conv_extractor runs offline)",
    )
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _image_source(
    args: argparse.Namespace, limit: int | None, skipped: list[str]
) -> Callable[[], Iterable[torch.Tensor]]:
    if args.images:
        return lambda: folder_images(args.images, args.resolution, limit)

    def from_shards() -> Iterator[torch.Tensor]:
        skipped.clear()  # every VAE re-reads the shards; keep one pass's list
        return shard_images(args.shards, args.resolution, limit, skipped)

    return from_shards


def _folder_limit(folder: str, limit: int | None) -> int:
    """How many images a folder run will use (the progress bars' length); FileNotFoundError if none."""
    from common.fid import list_images

    count = len(list_images(folder))
    return min(count, limit) if limit else count


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resolution < 1 or args.batch_size < 1 or args.num_images < 0:
        raise UsageExit("--resolution and --batch-size must be positive, --num-images >= 0")
    n = len(args.vae)
    checkpoints = _paired(args.vae_checkpoint, n, "--vae-checkpoint")
    subfolders = _paired(args.vae_subfolder, n, "--vae-subfolder")
    labels = _paired(args.label, n, "--label")
    specs = [VaeSource(v, c, s, args.vae_kind, lab) for v, c, s, lab in zip(args.vae, checkpoints, subfolders, labels)]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lpips_fn = None
    if not args.no_lpips:
        from repae.losses import build_lpips

        try:
            lpips_fn = build_lpips(net="vgg", backbone=args.lpips_backbone).to(device).eval()
        except (RuntimeError, OSError, ValueError) as e:
            raise UsageExit(f"repae.diagnostics: LPIPS: {e} (or use --lpips-backbone random / --no-lpips)") from e
    skipped: list[str] = []
    try:
        limit = _folder_limit(args.images, args.num_images or None) if args.images else args.num_images or None
        report = compare_vaes(
            specs,
            _image_source(args, limit, skipped),
            lpips_fn=lpips_fn,
            batch_size=args.batch_size,
            seed=args.seed,
            num_images=limit,
            device=device,
            rfid=not args.no_rfid,
            fid_extractor=args.fid_extractor,
            reconstruct_from=args.reconstruct_from,
            progress=not args.quiet,
        )
    except (OSError, ValueError) as e:  # missing files / VAEs, bad shapes, too few images
        from common.lifecycle import error_exit

        return error_exit(str(e), prog="repae.diagnostics")
    report["config"].update(
        images=args.images,
        shards=args.shards,
        resolution=args.resolution,
        device=str(device),
        lpips_backbone=None if args.no_lpips else args.lpips_backbone,
        skipped_samples=list(skipped),
    )
    if lpips_fn is not None and args.lpips_backbone == "random":
        report["notes"].append("lpips: random backbone; values are comparable only with each other")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, report, sort_keys=False)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    from common.lifecycle import run_cli

    sys.exit(run_cli("python -m repae.diagnostics", main))
