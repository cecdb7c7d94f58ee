"""Objectives of the REPA-E stage: the VAE's reconstruction/perceptual/KL/GAN loss and the REPA loss.

The joint step (docs/reference-facts.md, REPAE-5.2) trains three things with three losses, and each loss must reach only
its own parameters (REPAE-10.17):

* the VAE minimises :meth:`VAELoss.generator_loss` (+ the alignment term, :func:`repa_loss`)
  -- the discriminator is used there but receives no gradient;
* the discriminator minimises :meth:`VAELoss.discriminator_loss` on detached reconstructions;
* the SiT minimises its denoising loss plus :func:`repa_loss`.

What differs from the reference loss module, on purpose (each item names the reference defect):

* LPIPS is fed our [-1, 1] images unchanged, which is the range the ``lpips`` package expects
  (REPAE-D8: the reference mapped [-1, 1] images as if they were [0, 1], so VGG saw [-3, 1]).
  Its linear heads ship with the package and are read with ``weights_only=True``; the backbone
  is torchvision's (hub cache), a local file, or a seeded random VGG for offline worlds.
* LPIPS is frozen, always in eval mode, excluded from ``discriminator_parameters()`` (the
  reference listed it in the discriminator optimiser) and left out of ``VAELoss.state_dict()``:
  a checkpoint of the loss is the discriminator plus the LeCam buffers, nothing else.
* The discriminator sees real and fake images in one concatenated forward, so its BatchNorm
  normalises both with the same statistics (REPAE-D11), and the generator pass neither updates
  its running statistics nor gives its parameters gradients.
* A linear warm-up of the generator's GAN weight (``discriminator_warmup_steps``) is the
  supported path for a discriminator trained from scratch (REPAE-D12).
* :func:`repa_loss` matches encoder and SiT token grids of different size by interpolation
  instead of crashing (REPAE-D6).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import lpips
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.weights import TRAINING_ARGS, load_weights_file, safe_torch_load, strip_prefixes

LPIPS_NETS = ("vgg", "alex", "squeeze")
RECONSTRUCTION_LOSSES = ("l1", "l2")
RANDOM_LPIPS_SEED = 0
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class HasKL(Protocol):
    """What :func:`kl_loss` needs from a posterior (``repae.vae.Posterior`` satisfies it)."""

    def kl(self) -> Tensor: ...


# ----------------------------------------------------------------------------- state dict files


def _read_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors from a ``.safetensors`` file or a ``.pt``/``.pth``/``.ckpt`` loaded ``weights_only``.

    ``argparse.Namespace`` is allow-listed because reference REPA-E checkpoints embed their CLI
    arguments; nothing else outside plain containers and tensors can be unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state dict file not found: {path}")
    state = load_weights_file(path, allow=TRAINING_ARGS)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping), got {type(state).__name__}")
    return dict(state)


def _describe_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Any], limit: int = 8) -> list[str]:
    """Human-readable list of missing keys, unexpected keys and shape mismatches."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and isinstance(found[k], Tensor) and found[k].shape != v.shape
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{label} {len(items)}: {items[:limit]}{more}")
    return problems


# ------------------------------------------------------------------------------------------ LPIPS


class FrozenLPIPS(nn.Module):
    """An ``lpips.LPIPS`` metric that stays frozen and in eval mode, returning one distance per sample.

    ``train()`` is a no-op (the package's heads carry dropout, which must never switch on when
    the owning loss module is put in train mode). Its weights are not part of any state dict:
    LPIPS is rebuilt from the config, never trained, and a checkpoint of the loss module should
    not carry ~60 MB of VGG. Loading a state dict without them is therefore not an error.
    """

    def __init__(self, metric: lpips.LPIPS, reference_range: bool = False) -> None:
        super().__init__()
        self.metric = metric
        # The reference maps its [-1, 1] inputs once more (x -> 2x - 1), so LPIPS sees [-3, 1].
        self.reference_range = bool(reference_range)
        self.requires_grad_(False)
        super().train(False)
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_fill_own_keys)

    def train(self, mode: bool = True) -> FrozenLPIPS:
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample LPIPS distance (B,) between images in [-1, 1], computed in float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            # Our images are already in [-1, 1], the range lpips.LPIPS expects with
            # normalize=False: feed them unchanged (the reference rescaled them again, REPAE-D8;
            # reference_range=True reproduces that, as the published E2E-VAEs were trained).
            return self.metric(x.float(), y.float(), normalize=self.reference_range).flatten()


def _drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_own_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # The module's state_dict() is empty by design (see _drop_own_keys), so walk its tensors.
    for key, value in _own_tensors(module):
        state_dict.setdefault(prefix + key, value)


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every parameter and persistent buffer of `module` by state-dict key (bypassing the hooks)."""
    for name, sub in module.named_modules(remove_duplicate=False):
        head = f"{name}." if name else ""
        for key, param in sub._parameters.items():
            if param is not None:
                yield head + key, param.detach()
        for key, buf in sub._buffers.items():
            if buf is not None and key not in sub._non_persistent_buffers_set:
                yield head + key, buf


def _new_lpips(net: str, random_backbone: bool) -> lpips.LPIPS:
    """The package's LPIPS with its heads loaded ``weights_only`` from the package's own files.

    ``pretrained=False`` stops the package from loading the heads itself (with a plain
    ``torch.load``); ``pnet_rand=True`` makes torchvision build the backbone with ``weights=None``,
    i.e. without touching the network.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        metric = lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=random_backbone, verbose=False)
    heads_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    heads = safe_torch_load(heads_file)
    # lin0..linN are also registered as the `lins` ModuleList (same tensors): check the lin<i> names only.
    expected = {k: v for k, v in metric.state_dict().items() if k.startswith("lin") and not k.startswith("lins.")}
    problems = _describe_mismatch(expected, heads)
    if problems:
        raise ValueError(f"{heads_file}: LPIPS heads do not match the {net} metric: " + "; ".join(problems))
    metric.load_state_dict(heads, strict=False)
    return metric


def _load_lpips_backbone(metric: lpips.LPIPS, path: str | Path) -> None:
    """Load a torchvision classifier state dict (``features.*`` keys) into the package's backbone.

    The package splits torchvision's ``features`` Sequential into ``slice1..sliceN`` while keeping
    the original indices, so ``slice3.10.weight`` is torchvision's ``features.10.weight``.
    Classifier keys in the file are ignored; every backbone key must be present with its shape.
    """
    source = _read_state_dict(path)
    expected = metric.net.state_dict()
    mapped = {key: source.get("features." + key.split(".", 1)[1]) for key in expected}
    found = {k: v for k, v in mapped.items() if v is not None}
    problems = _describe_mismatch(expected, found)
    if problems:
        raise ValueError(
            f"{path}: not a torchvision {metric.pnet_type} state dict for the LPIPS backbone "
            "(keys 'features.<i>.*' expected): " + "; ".join(problems)
        )
    metric.net.load_state_dict(found, strict=True)


def build_lpips(net: str = "vgg", backbone: str = "torchvision", reference_range: bool = False) -> FrozenLPIPS:
    """LPIPS perceptual distance (frozen, eval) on images in [-1, 1]; forward gives (B,) distances.

    `net` is the trunk: "vgg" (the reference's choice), "alex" or "squeeze". The calibrated
    linear heads always come from the ``lpips`` package. `backbone` says where the trunk's
    ImageNet weights come from:

    * ``"torchvision"`` -- torchvision's pretrained weights, read from the torch hub cache and
      downloaded there if absent (real runs);
    * ``"random"`` -- a randomly initialised trunk, seeded with ``RANDOM_LPIPS_SEED`` without
      disturbing the global RNG, so it is identical in every process. For offline toy worlds and
      tests: random-feature LPIPS is a weaker but real perceptual metric (random conv features
      still compare local structure at several scales, just not the features humans agree with);
    * a file path -- a local torchvision classifier state dict of the trunk (``vgg16``,
      ``alexnet`` or ``squeezenet1_1``; ``.pth`` loaded ``weights_only`` or ``.safetensors``).

    Only ``"torchvision"`` can touch the network.
    """
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}")
    if backbone == "torchvision":
        try:
            metric = _new_lpips(net, random_backbone=False)
        except OSError as err:
            raise RuntimeError(
                f"could not get torchvision's ImageNet weights for the LPIPS {net} backbone (not in the torch "
                "hub cache and the download failed); set the perceptual backbone to a local file or 'random'"
            ) from err
    elif backbone == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_LPIPS_SEED)
            metric = _new_lpips(net, random_backbone=True)
    else:
        metric = _new_lpips(net, random_backbone=True)
        _load_lpips_backbone(metric, backbone)
    return FrozenLPIPS(metric, reference_range)


# ---------------------------------------------------------------------------------- discriminator


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator with BatchNorm (REPAE-4.5): logits per overlapping patch.

    Layout and parameter names (``main.<i>.*``) match the reference so its pretrained
    discriminators load strictly: 4x4 convs with padding 1 and LeakyReLU(0.2); the first conv has a
    bias and no norm, the `n_layers` - 1 stride-2 and one stride-1 middle convs have BatchNorm and
    no bias, the last conv maps to one channel. With the defaults: 2,765,633 parameters and
    (B, 1, 30, 30) logits for 256x256 images.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference init: conv weights N(0, 0.02) (biases keep PyTorch's default), BN weight N(1, 0.02), bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.normal_(1.0, 0.02)
                module.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def _unwrap_discriminator_state(state: dict[str, Any]) -> dict[str, Any]:
    """Accept a plain discriminator state dict, or one nested/prefixed by a training checkpoint."""
    for key in ("discriminator", "state_dict"):
        if isinstance(state.get(key), Mapping):
            state = dict(state[key])
    return strip_prefixes(state, ("module.", "_orig_mod.", "discriminator."))


def load_discriminator_checkpoint(disc: nn.Module, path: str | Path) -> None:
    """Load a reference (or our) discriminator checkpoint strictly into `disc`.

    `path` is a plain state dict (``.pt``/``.pth``, loaded ``weights_only``) or ``.safetensors``;
    a full REPA-E checkpoint with a ``discriminator`` entry and ``module.``/``_orig_mod.`` prefixes
    are also understood. Missing, unexpected or mis-shaped keys raise ``ValueError`` listing them.
    """
    state = _unwrap_discriminator_state(_read_state_dict(path))
    problems = _describe_mismatch(disc.state_dict(), state)
    if problems:
        raise ValueError(f"{path}: does not match the discriminator: " + "; ".join(problems))
    disc.load_state_dict(state, strict=True)


@contextmanager
def _frozen(disc: nn.Module) -> Iterator[None]:
    """Run `disc` as a fixed function: no parameter gradients, no BatchNorm running-stat updates.

    In train mode BatchNorm still normalises with the batch statistics (the function the
    discriminator is trained as), but with ``track_running_stats`` off it neither reads nor
    updates the running buffers; the flags are restored on exit.
    """
    params = list(disc.parameters())
    grad_flags = [p.requires_grad for p in params]
    norms = [m for m in disc.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
        for m in norms:
            m.track_running_stats = True


# ------------------------------------------------------------------------------- pure loss terms


def kl_loss(posterior: HasKL) -> Tensor:
    """KL to N(0, I): per-sample sum over (C, h, w), mean over the batch (REPAE-4.2), float32 scalar."""
    return posterior.kl().float().mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 * (mean ReLU(1 - D(real)) + mean ReLU(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator hinge loss: the negative mean logit of the reconstructions."""
    return -logits_fake.mean()


def lecam_reg(real_mean: Tensor, fake_mean: Tensor, ema_real: Tensor, ema_fake: Tensor) -> Tensor:
    """LeCam regulariser: mean ReLU(D(real) - ema_fake)^2 + mean ReLU(ema_real - D(fake))^2.

    It keeps the discriminator's predictions near the moving averages of the *other* side's
    predictions, which bounds how far apart real and fake logits can drift (useful with little
    data or a strong discriminator). Inputs are usually scalar means of the logits.
    """
    return F.relu(real_mean - ema_fake).pow(2).mean() + F.relu(ema_real - fake_mean).pow(2).mean()


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive GAN weight: ||d nll / d w|| / (||d g / d w|| + 1e-4) at the decoder's last layer.

    It balances the two gradients where they meet the image; detached and clamped to
    [0, `max_weight`]. Off by default because the reference uses a fixed weight (REPAE-4.2).
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def _match_tokens(target: Tensor, like: Tensor) -> Tensor:
    """Bring encoder tokens (B, N, D) onto the SiT's token grid (B, T, D).

    Equal counts pass through. Otherwise both grids must be square: the encoder grid is resized
    bilinearly (align_corners=False) to the SiT grid -- for the usual factor 2 (256 encoder tokens
    vs 64 SiT tokens) this is exactly 2x2 average pooling. Encoders give patch tokens only; a
    class token would make the count non-square and is rejected.
    """
    if target.ndim != 3 or like.ndim != 3 or target.shape[0] != like.shape[0] or target.shape[2] != like.shape[2]:
        raise ValueError(f"REPA: encoder tokens {tuple(target.shape)} vs projected SiT tokens {tuple(like.shape)}")
    n, t = target.shape[1], like.shape[1]
    if n == t:
        return target
    side_n, side_t = math.isqrt(n), math.isqrt(t)
    if side_n * side_n != n or side_t * side_t != t:
        raise ValueError(
            f"REPA: token counts differ and are not both square grids: encoder {tuple(target.shape)} "
            f"vs SiT {tuple(like.shape)}"
        )
    b, _, d = target.shape
    grid = target.transpose(1, 2).reshape(b, d, side_n, side_n)
    grid = F.interpolate(grid.float(), size=(side_t, side_t), mode="bilinear", align_corners=False)
    return grid.reshape(b, d, t).transpose(1, 2)


def repa_loss(zs_tilde: list[Tensor], zs: list[Tensor]) -> Tensor:
    """REPA alignment loss: negative mean token-wise cosine similarity (REPAE-2.7 step 7).

    ``zs_tilde[k]`` (B, T, D_k) are the SiT projector outputs, ``zs[k]`` (B, N, D_k) the frozen
    encoder's patch tokens; the mean runs over encoders, samples and tokens. Range -1 (aligned)
    .. +1 (opposite); ~0 for unrelated features. Computed in float32 whatever the autocast dtype.
    """
    if len(zs_tilde) != len(zs) or not zs:
        raise ValueError(f"REPA: {len(zs_tilde)} projector outputs for {len(zs)} encoders")
    terms = []
    for pred, target in zip(zs_tilde, zs):
        target = _match_tokens(target, pred)
        cos = (F.normalize(pred.float(), dim=-1, eps=1e-12) * F.normalize(target.float(), dim=-1, eps=1e-12)).sum(-1)
        terms.append(cos.mean())
    return -torch.stack(terms).mean()


# ------------------------------------------------------------------------------------- VAE loss


class VAELoss(nn.Module):
    """The VAE's loss (reconstruction + LPIPS + KL + hinge GAN) and its discriminator's loss.

    Keyword fields are the ``loss`` config section (``repae.config.LossSection.vae_loss_kwargs``);
    defaults are the reference ``configs/l1_lpips_kl_gan.yaml`` (REPAE-4.1). Owns ``.discriminator``
    (trained by the caller's optimiser over :meth:`discriminator_parameters`) and ``.lpips``
    (frozen; None when ``perceptual_weight`` is 0, so no backbone is built). Both losses run in
    float32 with autocast disabled, whatever the caller's precision.

    GAN schedule: before ``discriminator_start`` neither loss runs the discriminator (the
    discriminator loss is a constant zero without grad -- check :meth:`discriminator_active`
    before calling backward). From then on the generator's GAN weight is
    ``discriminator_weight * discriminator_factor * ramp`` (times the adaptive weight if enabled),
    with ``ramp`` growing linearly over ``discriminator_warmup_steps`` steps (see :meth:`gan_ramp`).
    """

    def __init__(
        self,
        *,
        reconstruction_loss: str = "l1",
        reconstruction_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual_net: str = "vgg",
        perceptual_backbone: str = "torchvision",
        kl_weight: float = 1e-6,
        discriminator_start: int = 0,
        discriminator_factor: float = 1.0,
        discriminator_weight: float = 0.1,
        adaptive_weight: bool = False,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.999,
        discriminator_warmup_steps: int = 0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        reference_faithful: bool = False,
    ) -> None:
        super().__init__()
        # The published recipe's two quirks (REPAE-4.3, REPAE-4.4): LPIPS fed [-3, 1] and the discriminator
        # run separately on real and fake images. Off by default (our fixes); on to reproduce it.
        self.reference_faithful = bool(reference_faithful)
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction_loss must be one of {RECONSTRUCTION_LOSSES}, got {reconstruction_loss!r}")
        self.reconstruction_loss = reconstruction_loss
        self.reconstruction_weight = float(reconstruction_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.kl_weight = float(kl_weight)
        self.discriminator_start = int(discriminator_start)
        self.discriminator_factor = float(discriminator_factor)
        self.discriminator_weight = float(discriminator_weight)
        self.adaptive_weight = bool(adaptive_weight)
        self.lecam_weight = float(lecam_weight)
        self.lecam_decay = float(lecam_decay)
        self.discriminator_warmup_steps = int(discriminator_warmup_steps)
        self.lpips = (
            build_lpips(perceptual_net, perceptual_backbone, reference_range=self.reference_faithful)
            if self.perceptual_weight > 0
            else None
        )
        self.discriminator = NLayerDiscriminator(3, disc_channels, disc_layers)
        # Always registered (persistent) so checkpoints have the same keys whether LeCam is on or not.
        self.register_buffer("lecam_ema_real", torch.zeros(()))
        self.register_buffer("lecam_ema_fake", torch.zeros(()))

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """What the discriminator optimiser trains: the discriminator only, never LPIPS."""
        return list(self.discriminator.parameters())

    def discriminator_active(self, step: int) -> bool:
        """Whether the adversarial game is on at `step` (the discriminator loss has a graph)."""
        return step >= self.discriminator_start and self.discriminator_factor > 0

    def gan_ramp(self, step: int) -> float:
        """Generator GAN-weight ramp: 0 before the start, (k + 1) / warmup at the k-th active step, capped at 1."""
        if step < self.discriminator_start:
            return 0.0
        if self.discriminator_warmup_steps <= 0:
            return 1.0
        return min(1.0, (step - self.discriminator_start + 1) / self.discriminator_warmup_steps)

    def _reconstruction(self, x: Tensor, recon: Tensor) -> Tensor:
        if self.reconstruction_loss == "l1":
            return (x - recon).abs().mean()
        return F.mse_loss(recon, x)

    def _perceptual(self, x: Tensor, recon: Tensor) -> Tensor:
        if self.lpips is None:
            return x.new_zeros(())
        return self.lpips(x, recon).mean()

    def generator_loss(
        self, x: Tensor, recon: Tensor, posterior: HasKL, step: int, last_layer: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The VAE's loss: rec + perc + kl + d_weight * factor * ramp * hinge_g (REPAE-4.2).

        `x` and `recon` are (B, 3, H, W) in [-1, 1]; `last_layer` (the decoder's output conv
        weight) is needed only with ``adaptive_weight``. The discriminator runs on
        ``cat([x, recon])`` -- the same mixed batch its BatchNorm is trained on -- with frozen
        parameters and untouched running statistics; only the fake half's logits are used, and
        the gradient reaches `recon` only. Returns the total and python floats for logging.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, recon = x.float(), recon.float()
            rec = self.reconstruction_weight * self._reconstruction(x, recon)
            perc = self.perceptual_weight * self._perceptual(x, recon)
            kl = self.kl_weight * kl_loss(posterior)
            factor = self.discriminator_factor * self.gan_ramp(step)
            gan = d_weight = x.new_zeros(())
            if factor > 0 and self.discriminator_weight > 0:
                with _frozen(self.discriminator):
                    if self.reference_faithful:  # the reference: fake images alone
                        fake_logits = self.discriminator(recon)
                    else:
                        fake_logits = self.discriminator(torch.cat([x.detach(), recon]))[x.shape[0] :]
                gan = hinge_g_loss(fake_logits)
                d_weight = self._gan_weight(rec + perc, gan, last_layer)
            weighted_gan = d_weight * factor * gan
            total = rec + perc + kl + weighted_gan
        logs = {
            "total_loss": total,
            "reconstruction_loss": rec,
            "perceptual_loss": perc,
            "kl_loss": kl,
            "weighted_gan_loss": weighted_gan,
            "discriminator_factor": x.new_tensor(factor),
            "d_weight": d_weight,
            "gan_loss": gan,
        }
        return total, _to_floats(logs)

    def _gan_weight(self, nll: Tensor, gan: Tensor, last_layer: Tensor | None) -> Tensor:
        """``discriminator_weight``, times the adaptive gradient ratio when enabled.

        Without a graph (evaluation under ``no_grad``) the ratio cannot be formed and the GAN
        term is reported with weight 0, as VQGAN does.
        """
        weight = torch.tensor(self.discriminator_weight, device=gan.device)
        if not self.adaptive_weight:
            return weight
        if last_layer is None:
            raise ValueError("adaptive_weight needs last_layer (the decoder's output conv weight)")
        if not (torch.is_grad_enabled() and nll.requires_grad and gan.requires_grad):
            return torch.zeros_like(weight)
        return weight * adaptive_weight(nll, gan, last_layer)

    def discriminator_loss(self, x: Tensor, recon: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """The discriminator's loss: factor * hinge + LeCam, on detached images (REPAE-4.3).

        Real and fake images go through ONE forward pass, so BatchNorm normalises both with the
        same batch statistics (the reference used two passes, REPAE-D11). The LeCam moving
        averages are updated after use, in train mode only. Before ``discriminator_start`` (or
        with factor 0) no forward runs and the loss is a zero without grad.
        """
        zero = x.new_zeros((), dtype=torch.float32)
        if not self.discriminator_active(step):
            logs = dict.fromkeys(("discriminator_loss", "logits_real", "logits_fake", "lecam_loss"), 0.0)
            return zero, logs
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.reference_faithful:  # the reference: two passes, two sets of batch statistics
                real = self.discriminator(x.detach().float())
                fake = self.discriminator(recon.detach().float())
            else:
                batch = x.shape[0]
                logits = self.discriminator(torch.cat([x.detach().float(), recon.detach().float()]))
                real, fake = logits[:batch], logits[batch:]
            loss = self.discriminator_factor * hinge_d_loss(real, fake)
            lecam = zero
            if self.lecam_weight > 0:
                real_mean, fake_mean = real.mean(), fake.mean()
                lecam = self.lecam_weight * lecam_reg(real_mean, fake_mean, self.lecam_ema_real, self.lecam_ema_fake)
                if self.training:
                    self._update_lecam(real_mean.detach(), fake_mean.detach())
            total = loss + lecam
        logs = {"discriminator_loss": total, "logits_real": real.mean(), "logits_fake": fake.mean()}
        logs["lecam_loss"] = lecam
        return total, _to_floats(logs)

    @torch.no_grad()
    def _update_lecam(self, real_mean: Tensor, fake_mean: Tensor) -> None:
        self.lecam_ema_real.lerp_(real_mean.to(self.lecam_ema_real.dtype), 1.0 - self.lecam_decay)
        self.lecam_ema_fake.lerp_(fake_mean.to(self.lecam_ema_fake.dtype), 1.0 - self.lecam_decay)


def _to_floats(values: dict[str, Tensor]) -> dict[str, float]:
    """Detached python floats with one device sync for the whole dict."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, stacked))
