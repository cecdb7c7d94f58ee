"""REPA-E joint tuning: a VAE and a SiT trained together, the VAE shaped by REPA, not diffusion.

    python -m repae.train -c configs/repae/toy.yaml [key=value ...]
    torchrun --nproc_per_node=8 -m repae.train -c configs/repae/sdvae.yaml
    accelerate launch -m repae.train -c configs/repae/sdvae.yaml
    python -m repae.train -c configs/repae/sdvae.yaml --exp-name x --batch-size 256   # reference flags (repae.flags)

One step, in the reference order (docs/reference-facts.md, REPAE-5.2), with this repository's fixes:

1. frozen vision encoders -> patch tokens ``zs`` (no grad);
2. VAE forward -> posterior, a posterior sample ``z`` and the reconstruction;
3. **VAE step**: L1/L2 + LPIPS + KL + GAN, plus ``vae_align_proj_coeff`` x REPA computed through
   the SiT *frozen and in eval mode* (its BatchNorm normalises with running statistics and does
   not update them; no SiT parameter gets a gradient) — REPA is the only path from the
   diffusion model into the VAE;
4. **discriminator step** on real vs reconstruction (one concatenated pass, optional LeCam);
5. **SiT step** on ``z.detach()`` (the diffusion loss never reaches the VAE) with the same time
   and noise: denoising + ``proj_coeff`` x REPA; BatchNorm in train mode over the *global*
   batch (:mod:`repae.sync_bn`);
6. EMA of the SiT's parameters and BatchNorm buffers.

Three AdamW optimisers with their own learning rates and clipping, one GradScaler each under
fp16 (the reference shared one), non-finite guards, deterministic per-(seed, rank, step) noise,
and checkpoints that resume exactly (weights, optimisers, scalers, data position).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common.checkpoint import CheckpointWriter
from common.distributed import DistEnv, all_reduce_mean, all_reduce_sum, init_distributed
from common.files import write_json_atomic
from common.lifecycle import (
    Cadence,
    NonFiniteGuard,
    error_exit,
    last_good_checkpoint,
    preview_path,
    run_entry,
    run_loop,
)
from common.metrics import DATA, PERF, TRAIN, MetricsLogger, train_key
from common.precision import Precision
from common.randomness import step_seed
from common.signals import StopSignal
from common.vae_config import per_channel_stats
from repae import checkpoint as rckpt
from repae.config import ConfigError, RepaeConfig, load_repae_config, save_config
from repae.ema import ModelEMA
from repae.sync_bn import batch_normalize

log = logging.getLogger("repae.train")


# ---------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------
def allreduce_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over processes in one flat buffer (for modules not wrapped in DDP)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def mean_over_ranks(values: dict[str, torch.Tensor | float], device: torch.device) -> dict[str, float]:
    """Means over processes of scalars (device tensors or numbers): one stack, one all-reduce, one host copy."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], device=device).detach().double().reshape(()) for k in keys])
    return dict(zip(keys, all_reduce_mean(stacked).tolist()))


def detached(values: dict[str, Any]) -> dict[str, torch.Tensor | float]:
    """Step metrics without a host sync: tensors are detached where they are, numbers stay numbers
    (the loss module's logs are already floats; copying them back to the device every step would
    only add transfers). :func:`mean_over_ranks` moves everything to the device once per log."""
    return {k: v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


class Optim:
    """An AdamW, its GradScaler (enabled only for fp16) and its clipping, stepped as one unit."""

    def __init__(
        self, params: list[nn.Parameter], lr: float, cfg, fp16: bool, device: torch.device, max_norm: float
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        # foreach: torch picks it by itself only for CUDA tensors; on CPU its default is a Python loop
        # over the ~200 tensors of the three optimisers, with bit-identical results (repae.bench).
        self.opt = torch.optim.AdamW(
            self.params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps, foreach=True
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self.max_norm = max_norm

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> tuple[torch.Tensor, bool]:
        """Unscale, clip, step unless the gradient is non-finite; returns (grad norm, stepped).

        The finiteness check is the one host sync a step needs per optimiser (to skip the update);
        the norm stays on the device for the metrics.
        """
        self.scaler.unscale_(self.opt)
        if self.max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        finite = bool(torch.isfinite(norm))
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.opt)  # the scaler skips the update itself on inf/nan
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return norm.detach(), finite

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# ---------------------------------------------------------------------------------------------
# Building blocks shared with train_ldm
# ---------------------------------------------------------------------------------------------
def sit_kwargs(cfg: RepaeConfig, latent_channels: int, latent_side: int, z_dims: list[int]) -> dict[str, Any]:
    """Constructor arguments of the SiT: registry size + config overrides (stored with checkpoints)."""
    from repae.models.sit import SIT_ARCHS

    m = cfg.model
    arch = dict(SIT_ARCHS[m.arch])
    for name in ("hidden_size", "depth", "num_heads", "patch_size"):
        if getattr(m, name) is not None:
            arch[name] = getattr(m, name)
    return dict(
        input_size=latent_side,
        in_channels=latent_channels,
        patch_size=arch["patch_size"],
        hidden_size=arch["hidden_size"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        class_dropout_prob=m.class_dropout_prob,
        num_classes=m.num_classes,
        z_dims=list(z_dims),
        encoder_depth=m.encoder_depth,
        projector_dim=m.projector_dim,
        qk_norm=m.qk_norm,
        fused_attn=m.fused_attn,
        bn_momentum=m.bn_momentum,
    )


def load_configured_vae(cfg: RepaeConfig):
    from repae.vae import TrainableVAE, load_vae

    v = cfg.vae
    return TrainableVAE(
        load_vae(v.pretrained_model_name_or_path, subfolder=v.subfolder, kind=v.kind, checkpoint=v.checkpoint)
    )


def vae_source(cfg: RepaeConfig) -> dict[str, Any]:
    v = cfg.vae
    return {
        "name_or_path": v.pretrained_model_name_or_path,
        "subfolder": v.subfolder,
        "kind": v.kind,
        "checkpoint": v.checkpoint,
    }


def stats_from_vae_config(vae) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (scale, bias) the VAE itself carries: its config's latents_mean/std (Qwen-Image,
    exported E2E-VAEs) or FLUX.2's BatchNorm running statistics; None for a global factor only."""
    if vae.family.batchnorm_stats:
        shift, scale = vae.family.normalisation_constants(vae.vae)
        return scale.flatten(), shift.flatten()
    stats = per_channel_stats(vae.vae.config)
    if stats is None:
        return None
    mean, std = stats
    return 1.0 / torch.tensor(std, dtype=torch.float32), torch.tensor(mean, dtype=torch.float32)


def reference_stats_file(cfg: RepaeConfig) -> Path | None:
    """The reference keeps `<name>-latents-stats.pt` next to `<name>.pt`."""
    if cfg.vae.checkpoint is None:
        return None
    p = Path(cfg.vae.checkpoint)
    candidate = p.with_name(p.stem + "-latents-stats.pt")
    return candidate if candidate.is_file() else None


@torch.no_grad()
def estimate_latent_stats(vae, batches, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (1/std, mean) of posterior samples over a few batches of every process.

    The reference has no script for this (REPAE-6.2, REPAE-D19); without it a new VAE cannot be tuned.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    total = None
    for batch in batches:
        z = vae.encode(to_unit(batch["images"].to(device))).sample(g).double()
        c = z.shape[1]
        s = torch.cat([z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3)), torch.tensor([z.numel() / c], device=device)])
        total = s if total is None else total + s
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    c = (total.numel() - 1) // 2
    n = total[-1]
    mean = total[:c] / n
    std = (total[c : 2 * c] / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return (1.0 / std).float().cpu(), mean.float().cpu()


class Trainer:
    """The parts both trainers share: SiT + EMA + encoders + data + checkpoints + loop."""

    kind = "joint"

    def __init__(self, cfg: RepaeConfig, env: DistEnv) -> None:
        self.cfg, self.env, self.device = cfg, env, env.device
        self.precision = Precision.resolve(cfg.trainer.mixed_precision, env.device)  # once per run
        self.run_dir = cfg.run_dir
        self.step = 0
        self.guard = NonFiniteGuard(cfg.trainer.max_nonfinite_steps)
        self._step_finite = True  # all optimizers of the current step applied their update
        self.stop_signal = StopSignal()
        self.checkpoints = CheckpointWriter(self.run_dir, env.rank, env.is_main, cfg.trainer.checkpoints_total_limit)
        if cfg.data.global_batch_size % env.world_size:
            raise ConfigError(
                f"data.global_batch_size: {cfg.data.global_batch_size} is not divisible by "
                f"the {env.world_size} processes"
            )
        self.local_batch = cfg.data.global_batch_size // env.world_size
        torch.manual_seed(cfg.trainer.seed + env.rank)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.trainer.allow_tf32
            torch.backends.cudnn.allow_tf32 = cfg.trainer.allow_tf32
        self._check_data_paths()
        self.checkpoints.claim()  # one writer per run folder, before anything reads or writes it

    # -- set-up ------------------------------------------------------------------------------
    def _check_data_paths(self) -> None:
        from common.shards import validate_data_paths

        try:
            validate_data_paths(self.cfg.data.data_path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.data_path: {err}") from None

    def _build_loader(self):
        from repae.data import LabeledImageLoader

        d = self.cfg.data
        return LabeledImageLoader(
            d.data_path,
            batch_size=self.local_batch,
            resolution=d.resolution,
            label=d.label,
            rank=self.env.rank,
            world_size=self.env.world_size,
            seed=self.cfg.trainer.seed,
            num_workers=d.dataloader_num_workers,
            latents_dir=d.latent_cache,
        )

    def _build_encoders(self) -> list[nn.Module]:
        from repae.encoders import load_encoders

        e = self.cfg.encoder
        encoders = load_encoders(list(e.types), resolution=self.cfg.data.resolution, checkpoints=dict(e.checkpoints))
        return [enc.to(self.device).eval().requires_grad_(False) for enc in encoders]

    def _build_sit(self, latent_channels: int, latent_side: int) -> None:
        from repae.models.sit import SiT

        self.sit_config = sit_kwargs(self.cfg, latent_channels, latent_side, [e.embed_dim for e in self.encoders])
        self.sit = SiT(**self.sit_config).to(self.device)
        self.latent_shape = (latent_channels, latent_side, latent_side)

    def _init_latent_stats(self, vae, loader_iter) -> None:
        """Seed the SiT BatchNorm with the VAE's latent statistics (REPAE-2.6 `init_bn`)."""
        how = self.cfg.vae.latents_stats
        stats = None
        if how not in ("auto", "estimate", "config"):
            from repae.vae import load_latents_stats

            stats, source = load_latents_stats(how), how
        elif how == "auto" and reference_stats_file(self.cfg) is not None:
            from repae.vae import load_latents_stats

            source = str(reference_stats_file(self.cfg))
            stats = load_latents_stats(source)
        if stats is None and how in ("auto", "config"):
            stats, source = (
                stats_from_vae_config(vae),
                f"the VAE's own ({vae.family.normalisation_source(vae.vae.config)})",
            )
            if stats is None and how == "config":
                raise ConfigError("vae.latents_stats=config: the VAE config has no latents_mean/latents_std")
        if stats is None:
            batches = [next(loader_iter) for _ in range(self.cfg.vae.stats_batches)]
            stats = estimate_latent_stats(vae, batches, self.device, self.cfg.trainer.seed)
            source = f"estimated from {len(batches) * self.cfg.data.global_batch_size} images"
        scale, bias = stats
        self.sit.init_bn(scale.to(self.device), bias.to(self.device))
        if self.env.is_main:
            log.info("latent statistics (%s): mean %s, std %s", source, _fmt(bias), _fmt(1.0 / scale))

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> None:
        """Train to ``trainer.max_steps`` or an agreed stop (common.lifecycle)."""
        cfg = self.cfg
        self.logger = MetricsLogger(
            self.run_dir,
            cfg.trainer.report_to,
            cfg.trainer.project,
            cfg.trainer.run,
            dataclasses.asdict(cfg),  # the tracker's run page shows the whole config, as in the T2I stage
            enabled=self.env.is_main,
        )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.trainer.max_steps,
            initial=self.step,
            desc=f"{self.kind} {cfg.trainer.run}",
            disable=not self.env.is_main,
            dynamic_ncols=True,
        )
        if cfg.trainer.sampling_steps and self.step == 0:
            self.preview()
        self._window: dict[str, torch.Tensor] = {}
        self._logged = {"skipped": 0, "nonfinite": self.guard.total}  # window counts are differences
        try:
            run_loop(self, Cadence.of(cfg.trainer), self.stop_signal, self.device, bar)
        finally:
            bar.close()
            self.logger.close()

    # -- the stage's part of the loop ----------------------------------------------------------
    def loop_step(self) -> None:
        """One training step; the guard counts it as skipped when any of its optimizers skipped."""
        self._step_finite = True
        metrics = self.train_step(next(self.data_iter))
        self.guard.record(
            self._step_finite, self.step + 1, lambda: last_good_checkpoint(self.run_dir), warn=self.env.is_main
        )
        for k, v in metrics.items():  # on the device: no host sync until the logging step
            self._window[k] = self._window[k] + v if k in self._window else v

    def log_window(self, steps: int, seconds: float) -> dict[str, str]:
        """Log the window's means in the shared namespace (common.metrics): train/, data/, perf/."""
        means = mean_over_ranks({k: v / steps for k, v in self._window.items()}, self.device)
        values = {train_key(k): v for k, v in means.items()}
        skipped = float(getattr(self.loader, "skipped", 0))  # this rank's count since the run started
        total = all_reduce_sum(torch.tensor([skipped], device=self.device, dtype=torch.float64)).item()
        values[DATA + "skipped"] = int(total) - self._logged["skipped"]
        values[TRAIN + "nonfinite_skipped"] = self.guard.total - self._logged["nonfinite"]
        values[PERF + "steps_per_s"] = steps / max(seconds, 1e-9)
        self._logged = {"skipped": int(total), "nonfinite": self.guard.total}
        self.logger.log(self.step, values)
        self._window = {}
        return {k: f"{values[train_key(k)]:.3g}" for k in self.postfix_keys if train_key(k) in values}

    def end_step(self) -> None:
        pass

    def _guard(self, finite: bool) -> None:
        """Note one optimizer's verdict (it skipped its update when not finite); the step is judged once.

        Judged per optimizer, a run whose SiT is non-finite on every step never stopped while the
        VAE's and the discriminator's finite steps in between reset the count.
        """
        self._step_finite = self._step_finite and finite

    def batch_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Generator, list]:
        """Images and labels on the device, this step's generator, and the encoders' target tokens."""
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with torch.no_grad(), self.precision.autocast():
            zs = [enc(images).float() for enc in self.encoders]
        return images, labels, self.generator(), zs

    def generator(self, micro: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(
            step_seed(self.cfg.trainer.seed, self.env.rank, self.step, micro)
        )

    # -- checkpoints -------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step": self.step,
            "world_size": self.env.world_size,
            "latent_shape": list(self.latent_shape),
            "num_classes": self.cfg.model.num_classes,
            "resolution": self.cfg.data.resolution,
            "nonfinite_total": self.guard.total,
        }

    def save(self) -> None:
        """Collective: every rank's data position, rank 0's models and records (common.checkpoint)."""

        def write_main(partial: Path) -> None:
            self.save_models(partial)
            write_json_atomic(partial / rckpt.SIT_CONFIG, self.sit_config)

        self.checkpoints.save(self.step, self.trainer_state(), self.loader.state_dict(), write_main)

    def resume(self) -> bool:
        step = self.checkpoints.resume_step(self.cfg.trainer.resume_from)
        if step is None:
            return False
        folder = self.checkpoints.folder(step)
        state = self.checkpoints.trainer_state(step)
        if state.get("kind") != self.kind:
            raise ConfigError(
                f"{folder} was written by the {state.get('kind')} trainer, not {self.kind}: train into another folder"
            )
        self.load_models(folder)
        data_state = self.checkpoints.data_state(step, rank=0)  # a global position: any world size
        if data_state is not None:
            self.loader.load_state_dict(data_state)
        else:
            log.warning("%s has no data position: the data order restarts", folder)
        self.step = int(state["step"])
        self.guard.total = int(state.get("nonfinite_total", 0))
        if self.env.is_main:
            log.info("resumed from %s (step %d)", folder, self.step)
        return True

    # -- previews ----------------------------------------------------------------------------
    @torch.no_grad()
    def preview(self) -> None:
        """A grid from the EMA SiT with fixed labels and noise (the reference used the live model)."""
        if not self.env.is_main:
            return
        from common.images import save_grid
        from repae.samplers import euler_maruyama_sampler, euler_sampler

        s = self.cfg.sample
        sit = self.ema.model
        g = torch.Generator(device=self.device).manual_seed(self.cfg.trainer.seed)
        n = s.num_images
        noise = torch.randn((n, *self.latent_shape), generator=g, device=self.device)
        labels = torch.arange(n, device=self.device) % self.cfg.model.num_classes

        def velocity(x, t, y):
            with self.precision.autocast():
                return sit(x, t, y).output.float()

        kwargs = dict(
            cfg_scale=s.cfg_scale, guidance_low=s.guidance_low, guidance_high=s.guidance_high, null_label=sit.null_class
        )
        if s.mode == "ode":
            x = euler_sampler(velocity, noise, labels, num_steps=s.num_steps, heun=s.heun, **kwargs)
        else:
            x = euler_maruyama_sampler(
                velocity, noise, labels, num_steps=s.num_steps, generator=g, path_type=self.cfg.loss.path_type, **kwargs
            )
        images = self.decode_for_preview(sit.denormalize(x.float()))
        path = preview_path(self.run_dir, self.step)
        save_grid(((images + 1) / 2).clamp(0, 1).cpu(), path, ncol=max(1, round(n**0.5)))


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in t.flatten().tolist()[:8]) + (", ...]" if t.numel() > 8 else "]")


class JointTrainer(Trainer):
    """REPA-E: VAE + discriminator + SiT, three optimisers, one step in the reference order."""

    kind = "joint"
    postfix_keys = ("sit_loss", "proj_loss", "vae_loss", "vae_align_loss", "d_loss")

    def __init__(self, cfg: RepaeConfig, env: DistEnv) -> None:
        super().__init__(cfg, env)
        from repae.losses import VAELoss, load_discriminator_checkpoint

        self.encoders = self._build_encoders()
        self.vae = load_configured_vae(cfg).to(self.device)
        res = cfg.data.resolution
        if res % self.vae.spatial_factor:
            raise ConfigError(f"data.resolution: {res} is not a multiple of the VAE factor {self.vae.spatial_factor}")
        self._build_sit(self.vae.latent_channels, res // self.vae.spatial_factor)
        self.loss_fn = VAELoss(**cfg.loss.vae_loss_kwargs()).to(self.device)
        if cfg.loss.discriminator_checkpoint:
            load_discriminator_checkpoint(self.loss_fn.discriminator, cfg.loss.discriminator_checkpoint)
        fp16 = self.precision.loss_scaling
        o, clip = cfg.optimizer, cfg.trainer.gradient_clipping
        self.opt_sit = Optim(list(self.sit.parameters()), o.sit_lr, o, fp16, self.device, clip)
        self.opt_vae = Optim(list(self.vae.parameters()), o.vae_lr, o, fp16, self.device, clip)
        self.opt_disc = Optim(list(self.loss_fn.discriminator_parameters()), o.disc_lr, o, fp16, self.device, clip)
        self.loader = self._build_loader()
        self.data_iter = iter(self.loader)
        if not self.resume():
            self._init_latent_stats(self.vae, self.data_iter)
            self.ema = ModelEMA(self.sit, cfg.ema.decay)
        self._wrap()
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

    def _wrap(self) -> None:
        """DDP for the SiT and VAE (one forward + backward each per step); the small discriminator
        is averaged by hand because it also runs, gradient-free, inside the VAE step."""
        self.sit_train = self.sit
        self.vae_train = self.vae
        if self.env.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.sit_train = DDP(self.sit, device_ids=ids)
            self.vae_train = DDP(self.vae, device_ids=ids, find_unused_parameters=self.vae.has_unused_parameters)
        if self.cfg.trainer.compile:
            self.sit_train = torch.compile(self.sit_train)
            self.vae_train = torch.compile(self.vae_train)

    def load_models(self, folder: Path) -> None:
        from repae.vae import load_vae

        self.sit.load_state_dict(rckpt.load_tensors(folder / "sit.safetensors", self.device), strict=True)
        self.ema = ModelEMA(self.sit, self.cfg.ema.decay)
        self.ema.load_state_dict(rckpt.load_tensors(folder / "ema.safetensors", self.device))
        tuned = load_vae(str(folder / "vae"))
        self.vae.vae.load_state_dict(tuned.state_dict(), strict=True)
        disc_state = rckpt.load_tensors(folder / "discriminator.safetensors", self.device)
        self.loss_fn.load_state_dict(disc_state, strict=False)
        missing = [k for k in disc_state if k not in self.loss_fn.state_dict()]
        if missing:
            raise KeyError(f"{folder}/discriminator.safetensors has unknown keys {missing[:5]}")
        opts = rckpt.load_optimizers(folder / "optimizers.pt")
        self.opt_sit.load_state_dict(opts["sit"])
        self.opt_vae.load_state_dict(opts["vae"])
        self.opt_disc.load_state_dict(opts["disc"])

    def save_models(self, folder: Path) -> None:
        rckpt.save_tensors(self.sit.state_dict(), folder / "sit.safetensors", self.checkpoints.manifest_builder)
        rckpt.save_tensors(self.ema.state_dict(), folder / "ema.safetensors", self.checkpoints.manifest_builder)
        self.vae.vae.save_pretrained(folder / "vae", safe_serialization=True)
        write_json_atomic(folder / rckpt.VAE_SOURCE, {"folder": "vae"})
        disc = {k: v for k, v in self.loss_fn.state_dict().items() if not k.startswith("lpips.")}
        rckpt.save_tensors(disc, folder / "discriminator.safetensors", self.checkpoints.manifest_builder)
        rckpt.save_optimizers(
            folder / "optimizers.pt",
            {"sit": self.opt_sit.state_dict(), "vae": self.opt_vae.state_dict(), "disc": self.opt_disc.state_dict()},
        )

    def decode_for_preview(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).float()

    # -- the step ----------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor | float]:
        images, labels, g, zs = self.batch_inputs(batch)
        x = to_unit(images)
        self.vae_train.train()
        with self.precision.autocast():
            posterior, z, recon = self.vae_train(x, generator=g)
        t, noise = self._time_and_noise(z, g)
        metrics = self.vae_phase(x, recon, posterior, z, labels, zs, t, noise)
        metrics.update(self.disc_phase(x, recon))
        metrics.update(self.sit_phase(z, labels, zs, t, noise, g))
        self.ema.update(self.sit)
        return metrics

    def _time_and_noise(self, z: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from repae.transport import sample_time

        t = sample_time(z.shape[0], self.cfg.loss.weighting, generator=g, device=self.device)
        noise = torch.randn(z.shape, generator=g, device=self.device, dtype=torch.float32)
        return t, noise

    def vae_phase(self, x, recon, posterior, z, labels, zs, t, noise) -> dict[str, torch.Tensor | float]:
        """VAE losses + REPA through the frozen, eval-mode SiT; steps the VAE only."""
        from repae.losses import repa_loss
        from repae.transport import interpolate

        cfg = self.cfg
        trainable = [p for p in self.sit.parameters() if p.requires_grad]
        self.sit.eval()
        for p in trainable:
            p.requires_grad_(False)
        try:
            with self.precision.autocast():
                rec_loss, gdict = self.loss_fn.generator_loss(
                    x, recon, posterior, self.step, last_layer=self.vae.last_layer()
                )
                x_t, _ = interpolate(self.sit.normalize(z), noise, t, cfg.loss.path_type)
                align = repa_loss(self.sit(x_t, t, labels, align_only=True).zs_tilde, zs)
                loss = rec_loss + cfg.loss.vae_align_proj_coeff * align
        finally:
            for p in trainable:
                p.requires_grad_(True)
        self.opt_vae.backward(loss)
        norm, finite = self.opt_vae.step()
        self._guard(finite)
        metrics = {**gdict, "vae_loss": loss, "vae_align_loss": align, "grad_norm_vae": norm}
        return detached(metrics)

    def disc_phase(self, x, recon) -> dict[str, torch.Tensor | float]:
        with self.precision.autocast():
            d_loss, ddict = self.loss_fn.discriminator_loss(x, recon.detach(), self.step)
        if not d_loss.requires_grad:  # before discriminator_start: nothing to train
            return detached({"d_loss": d_loss, **ddict})
        self.opt_disc.backward(d_loss)
        allreduce_grads(self.opt_disc.params)
        norm, finite = self.opt_disc.step()
        self._guard(finite)
        return detached({"d_loss": d_loss, "grad_norm_disc": norm, **ddict})

    def sit_phase(self, z, labels, zs, t, noise, g) -> dict[str, torch.Tensor | float]:
        """Denoising + REPA on the detached latent; BatchNorm in train mode over the global batch."""
        from repae.losses import repa_loss
        from repae.transport import denoising_loss, interpolate

        cfg = self.cfg
        self.sit.train()
        drop = torch.rand(labels.shape, generator=g, device=self.device) < cfg.model.class_dropout_prob
        with self.precision.autocast():
            x_n = batch_normalize(self.sit.bn, z.detach().float())
            x_t, target = interpolate(x_n, noise, t, cfg.loss.path_type)
            out = self.sit_train(x_t, t, labels, force_drop_ids=drop)
            den = denoising_loss(out.output.float(), target).mean()
            proj = repa_loss(out.zs_tilde, zs)
            loss = den + cfg.loss.proj_coeff * proj
        self.opt_sit.backward(loss)
        norm, finite = self.opt_sit.step()
        self._guard(finite)
        metrics = {"sit_loss": loss, "denoising_loss": den, "proj_loss": proj, "grad_norm_sit": norm}
        return detached(metrics)


def parse_args(
    argv: list[str] | None, description: str = __doc__, prog: str = "python -m repae.train"
) -> argparse.Namespace:
    """``-c CONFIG`` (optional), ``key=value`` overrides and the reference train_repae.py flags (repae.flags)."""
    from repae.flags import parse_train_args

    return parse_train_args(argv, description, prog)


def run(trainer_cls, argv: list[str] | None, description: str) -> int:
    """Parse, validate (before any heavy work), start the process group, train, clean up.

    Exit codes: common.lifecycle.ExitCode (0 also after a planned stop on a signal).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = parse_args(argv, description, f"python -m repae.{'train_ldm' if trainer_cls.kind == 'ldm' else 'train'}")
    try:
        cfg = load_repae_config(args.config, args.overrides)
    except ConfigError as err:
        return error_exit(str(err))
    env = init_distributed(use_deepspeed=False)

    def cleanup() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    return run_entry(lambda: trainer_cls(cfg, env).fit(), cleanup)


def main(argv: list[str] | None = None) -> int:
    return run(JointTrainer, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["JointTrainer", "Trainer", "main"]
