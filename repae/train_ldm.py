"""SiT + REPA on a *frozen* VAE (the reference's train_ldm_only.py), e.g. on an exported E2E-VAE.

    python -m repae.cache_latents --vae exps/e2e-vae --shards 'data/imagenet-{000000..001281}.tar' --out data/latents
    python -m repae.train_ldm -c configs/repae/ldm-e2e-vavae.yaml data.latent_cache=data/latents
    torchrun --nproc_per_node=8 -m repae.train_ldm -c configs/repae/ldm-e2e-vavae.yaml

Differences from the joint trainer (docs/reference-facts.md, REPAE-6.1): no VAE or discriminator update; the SiT's
BatchNorm stays in eval mode so it normalises with the VAE's fixed latent statistics and never
changes them; the latent is a fresh posterior sample each step, drawn from cached posterior
means and standard deviations when `data.latent_cache` is set (`repae.cache_latents`), or encoded
on the fly with the frozen VAE otherwise. The vision encoder still sees the images.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common.files import write_json_atomic
from repae import checkpoint as rckpt
from repae.config import ConfigError, RepaeConfig
from repae.ema import ModelEMA
from repae.train import Optim, Trainer, detached, load_configured_vae, run, to_unit, vae_source


class LdmTrainer(Trainer):
    kind = "ldm"
    postfix_keys = ("sit_loss", "denoising_loss", "proj_loss")

    def __init__(self, cfg: RepaeConfig, env) -> None:
        super().__init__(cfg, env)
        self.encoders = self._build_encoders()
        self.vae = load_configured_vae(cfg).to(self.device).eval().requires_grad_(False)
        res = cfg.data.resolution
        if res % self.vae.spatial_factor:
            raise ConfigError(f"data.resolution: {res} is not a multiple of the VAE factor {self.vae.spatial_factor}")
        self._build_sit(self.vae.latent_channels, res // self.vae.spatial_factor)
        o = cfg.optimizer
        self.opt_sit = Optim(
            list(self.sit.parameters()),
            o.sit_lr,
            o,
            self.precision.loss_scaling,
            self.device,
            cfg.trainer.gradient_clipping,
        )
        self.loader = self._build_loader()
        self.data_iter = iter(self.loader)
        if not self.resume():
            self._init_latent_stats(self.vae, self.data_iter)
            self.ema = ModelEMA(self.sit, cfg.ema.decay)
        self.sit_train = self.sit
        if env.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.sit_train = DDP(self.sit, device_ids=ids)
        if cfg.trainer.compile:
            self.sit_train = torch.compile(self.sit_train)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "vae_source.json", vae_source(cfg))

    def load_models(self, folder: Path) -> None:
        self.sit.load_state_dict(rckpt.load_tensors(folder / "sit.safetensors", self.device), strict=True)
        self.ema = ModelEMA(self.sit, self.cfg.ema.decay)
        self.ema.load_state_dict(rckpt.load_tensors(folder / "ema.safetensors", self.device))
        self.opt_sit.load_state_dict(rckpt.load_optimizers(folder / "optimizers.pt")["sit"])

    def save_models(self, folder: Path) -> None:
        from repae.config import save_config

        rckpt.save_tensors(self.sit.state_dict(), folder / "sit.safetensors", self.checkpoints.manifest_builder)
        rckpt.save_tensors(self.ema.state_dict(), folder / "ema.safetensors", self.checkpoints.manifest_builder)
        write_json_atomic(folder / rckpt.VAE_SOURCE, vae_source(self.cfg))
        rckpt.save_optimizers(folder / "optimizers.pt", {"sit": self.opt_sit.state_dict()})
        save_config(self.cfg, self.run_dir / "config.yaml")

    def decode_for_preview(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.decode(z).float()

    def _latents(self, batch: dict[str, Any], images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A posterior sample: from the cache when there is one, else from the frozen VAE."""
        if "latent_mean" in batch:
            mean = batch["latent_mean"].to(self.device).float()
            std = batch["latent_std"].to(self.device).float()
            return mean + std * torch.randn(mean.shape, generator=g, device=self.device)
        with torch.no_grad():
            return self.vae.encode(to_unit(images)).sample(g).float()

    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor | float]:
        from repae.losses import repa_loss
        from repae.transport import denoising_loss, interpolate, sample_time

        cfg, dev = self.cfg, self.device
        images, labels, g, zs = self.batch_inputs(batch)
        z = self._latents(batch, images, g)
        t = sample_time(z.shape[0], cfg.loss.weighting, generator=g, device=dev)
        noise = torch.randn(z.shape, generator=g, device=dev)
        drop = torch.rand(labels.shape, generator=g, device=dev) < cfg.model.class_dropout_prob
        self.sit.train()
        self.sit.bn.eval()  # fixed statistics of the frozen VAE
        with self.precision.autocast():
            x_t, target = interpolate(self.sit.normalize(z), noise, t, cfg.loss.path_type)
            out = self.sit_train(x_t, t, labels, force_drop_ids=drop)
            den = denoising_loss(out.output.float(), target).mean()
            proj = repa_loss(out.zs_tilde, zs)
            loss = den + cfg.loss.proj_coeff * proj
        self.opt_sit.backward(loss)
        norm, finite = self.opt_sit.step()
        self._guard(finite)
        self.ema.update(self.sit)
        metrics = {"sit_loss": loss, "denoising_loss": den, "proj_loss": proj, "grad_norm_sit": norm}
        return detached(metrics)


def main(argv: list[str] | None = None) -> int:
    return run(LdmTrainer, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
