"""REPA-E losses: hand-computed values, gradient routing and the discriminator layout.

Gradient routing: REPAE-10.17 in docs/reference-facts.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import socket
from pathlib import Path

import lpips
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from repae.losses import (
    NLayerDiscriminator,
    VAELoss,
    adaptive_weight,
    build_lpips,
    hinge_d_loss,
    hinge_g_loss,
    kl_loss,
    lecam_reg,
    load_discriminator_checkpoint,
    repa_loss,
)

GEN_KEYS = {
    "total_loss",
    "reconstruction_loss",
    "perceptual_loss",
    "kl_loss",
    "weighted_gan_loss",
    "discriminator_factor",
    "d_weight",
    "gan_loss",
}


class StandInPosterior:
    """Diagonal Gaussian with the `kl()` contract of repae.vae.Posterior."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean, self.logvar = mean, logvar

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _posterior(batch: int = 2) -> StandInPosterior:
    return StandInPosterior(torch.zeros(batch, 4, 2, 2), torch.zeros(batch, 4, 2, 2))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def vgg_random():
    return build_lpips("vgg", "random")


def _loss(**kwargs) -> VAELoss:
    base = {"perceptual_weight": 0.0, "disc_channels": 8}
    base.update(kwargs)
    torch.manual_seed(0)
    return VAELoss(**base)


def _images(batch: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    recon = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1).requires_grad_(True)
    return x, recon


# ------------------------------------------------------------------------------- pure functions


def test_kl_loss_hand_value():
    mean = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    logvar = torch.tensor([[[[0.0, 0.0]]], [[[math.log(2.0), 0.0]]]])
    # sample 0: 0.5 * 1^2 = 0.5; sample 1: 0.5 * (2 - 1 - ln 2); mean over the batch.
    expected = (0.5 + 0.5 * (1.0 - math.log(2.0))) / 2
    assert kl_loss(StandInPosterior(mean, logvar)).item() == pytest.approx(expected, rel=1e-6)


def test_hinge_losses_hand_values():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-3.0, 0.0])
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1] -> 0.5; 0.5 * (0.25 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    assert hinge_g_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)


def test_lecam_hand_values():
    value = lecam_reg(torch.tensor(0.5), torch.tensor(-0.2), torch.tensor(0.1), torch.tensor(0.3))
    assert value.item() == pytest.approx(0.2**2 + 0.3**2)
    inside = lecam_reg(torch.tensor(0.1), torch.tensor(0.4), torch.tensor(0.2), torch.tensor(0.3))
    assert inside.item() == 0.0


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.ones(3, requires_grad=True)
    nll, gan = (3 * w).sum(), w.sum()
    expected = 3 * math.sqrt(3) / (math.sqrt(3) + 1e-4)
    weight = adaptive_weight(nll, gan, w)
    assert weight.item() == pytest.approx(expected, rel=1e-6)
    assert not weight.requires_grad
    assert adaptive_weight((1e6 * w).sum(), (1e-6 * w).sum(), w, max_weight=1e4).item() == 1e4


def test_repa_loss_identical_opposite_orthogonal():
    z = torch.randn(2, 4, 8)
    assert repa_loss([z], [z]).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss([z], [-z]).item() == pytest.approx(1.0, abs=1e-6)
    a = torch.zeros(2, 4, 8)
    a[..., 0] = 1.0
    b = torch.zeros(2, 4, 8)
    b[..., 1] = 3.0
    assert repa_loss([a], [b]).item() == pytest.approx(0.0, abs=1e-7)
    # Mean over encoders: one aligned (-1) and one opposite (+1) encoder average to 0.
    assert repa_loss([z, z], [z, -z]).item() == pytest.approx(0.0, abs=1e-6)


def test_repa_loss_token_means_and_gradient():
    pred = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], requires_grad=True)
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # cos 1 and 0 -> mean 0.5
    loss = repa_loss([pred], [target])
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_repa_loss_interpolates_square_grids():
    enc = torch.randn(2, 16, 5)  # 4x4 encoder grid
    # Bilinear factor-2 shrink of a 4x4 grid is 2x2 average pooling: build that target by hand.
    grid = enc.transpose(1, 2).reshape(2, 5, 4, 4)
    pooled = F.avg_pool2d(grid, 2).reshape(2, 5, 4).transpose(1, 2)
    assert repa_loss([pooled], [enc]).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss([-pooled], [enc]).item() == pytest.approx(1.0, abs=1e-6)


def test_repa_loss_rejects_unmatched_grids():
    with pytest.raises(ValueError, match=r"\(2, 6, 5\).*\(2, 4, 5\)"):
        repa_loss([torch.randn(2, 4, 5)], [torch.randn(2, 6, 5)])
    with pytest.raises(ValueError, match="17"):  # a class token makes the grid non-square
        repa_loss([torch.randn(2, 4, 5)], [torch.randn(2, 17, 5)])
    with pytest.raises(ValueError):
        repa_loss([torch.randn(2, 4, 5)], [torch.randn(2, 4, 6)])  # feature widths differ
    with pytest.raises(ValueError):
        repa_loss([torch.randn(2, 4, 5)], [])


# -------------------------------------------------------------------------------- discriminator


def test_discriminator_layout_and_param_count():
    with torch.device("meta"):
        disc = NLayerDiscriminator()
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    keys = set(disc.state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_var", "main.11.bias"} <= keys
    assert "main.2.bias" not in keys and "main.8.bias" not in keys


def test_discriminator_output_shape_and_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    with torch.no_grad():
        out = disc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)
    big = disc.main[8].weight
    assert big.std().item() == pytest.approx(0.02, rel=0.01)
    assert disc.main[9].weight.mean().item() == pytest.approx(1.0, abs=0.005)
    assert disc.main[9].bias.abs().sum().item() == 0.0


def test_load_discriminator_checkpoint_formats(tmp_path):
    torch.manual_seed(3)
    src = NLayerDiscriminator(ndf=8)
    state = src.state_dict()
    torch.save(state, tmp_path / "d.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "d.safetensors"))
    nested = {"discriminator": {"module." + k: v for k, v in state.items()}, "args": argparse.Namespace(a=1)}
    torch.save(nested, tmp_path / "full.pt")
    for name in ("d.pt", "d.safetensors", "full.pt"):
        dst = NLayerDiscriminator(ndf=8)
        load_discriminator_checkpoint(dst, tmp_path / name)
        for key, value in dst.state_dict().items():
            assert torch.equal(value, state[key]), (name, key)


def test_load_discriminator_checkpoint_errors(tmp_path):
    torch.save(NLayerDiscriminator(ndf=8).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_discriminator_checkpoint(NLayerDiscriminator(ndf=16), tmp_path / "small.pt")
    partial = {k: v for k, v in NLayerDiscriminator(ndf=8).state_dict().items() if not k.startswith("main.11")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="missing 2"):
        load_discriminator_checkpoint(NLayerDiscriminator(ndf=8), tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError):
        load_discriminator_checkpoint(NLayerDiscriminator(ndf=8), tmp_path / "absent.pt")


# ------------------------------------------------------------------------------------ VAE loss


def test_reconstruction_l1_vs_l2():
    x = torch.zeros(1, 3, 2, 2)
    recon = torch.full((1, 3, 2, 2), 0.5)
    recon[..., 0, 0] = -1.0
    # per channel: |.| = [1, .5, .5, .5] -> mean 0.625; squares [1, .25, .25, .25] -> 0.4375
    post = _posterior(1)
    _, l1 = _loss(reconstruction_loss="l1", discriminator_weight=0.0).generator_loss(x, recon, post, 0)
    _, l2 = _loss(reconstruction_loss="l2", discriminator_weight=0.0).generator_loss(x, recon, post, 0)
    assert l1["reconstruction_loss"] == pytest.approx(0.625)
    assert l2["reconstruction_loss"] == pytest.approx(0.4375)
    _, weighted = _loss(reconstruction_weight=2.0, discriminator_weight=0.0).generator_loss(x, recon, post, 0)
    assert weighted["reconstruction_loss"] == pytest.approx(1.25)
    with pytest.raises(ValueError):
        VAELoss(reconstruction_loss="l3", perceptual_weight=0.0)


def test_generator_loss_routes_gradient_to_recon_only():
    loss_fn = _loss()
    loss_fn.train()
    x, recon = _images()
    bn = loss_fn.discriminator.main[3]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    total, logs = loss_fn.generator_loss(x, recon, _posterior(), step=0)
    total.backward()
    assert set(logs) == GEN_KEYS and all(isinstance(v, float) for v in logs.values())
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())  # restored afterwards
    # The generator pass leaves the discriminator's BatchNorm running statistics alone.
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2]) and bn.track_running_stats
    assert logs["d_weight"] == pytest.approx(0.1)
    expected = logs["reconstruction_loss"] + logs["perceptual_loss"] + logs["kl_loss"] + logs["weighted_gan_loss"]
    assert logs["total_loss"] == pytest.approx(expected, rel=1e-6)
    assert logs["weighted_gan_loss"] == pytest.approx(0.1 * logs["gan_loss"], rel=1e-6)


def test_generator_loss_kl_weight_and_fp32_under_autocast():
    x, recon = _images()
    post = StandInPosterior(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2))  # KL per sample = 0.5 * 16 = 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, logs = _loss(kl_weight=1e-3).generator_loss(x, recon.bfloat16(), post, step=0)
    assert total.dtype == torch.float32
    assert logs["kl_loss"] == pytest.approx(8e-3, rel=1e-6)


def test_discriminator_loss_routes_gradient_to_discriminator_only():
    loss_fn = _loss()
    loss_fn.train()
    x, recon = _images()
    before = copy.deepcopy(loss_fn.discriminator)
    total, logs = loss_fn.discriminator_loss(x, recon, step=0)
    total.backward()
    assert set(logs) == {"discriminator_loss", "logits_real", "logits_fake", "lecam_loss"}
    assert recon.grad is None
    # (The last bias gets exactly zero while every hinge is active: -0.5 * 1 + 0.5 * 1.)
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    assert loss_fn.discriminator.main[0].weight.grad.abs().sum() > 0
    # One concatenated pass: BN normalises real and fake with the same statistics, updated once.
    concatenated = copy.deepcopy(before)
    logits = concatenated(torch.cat([x, recon.detach()]))
    bn = loss_fn.discriminator.main[3]
    assert torch.allclose(bn.running_mean, concatenated.main[3].running_mean) and bn.num_batches_tracked.item() == 1
    assert logs["logits_real"] == pytest.approx(logits[:2].mean().item(), rel=1e-5)
    assert logs["discriminator_loss"] == pytest.approx(hinge_d_loss(logits[:2], logits[2:]).item(), rel=1e-5)
    separate_real = copy.deepcopy(before)(x).mean().item()
    assert separate_real != pytest.approx(logs["logits_real"], rel=1e-3)  # a real-only pass would differ


def test_discriminator_start_gates_both_losses():
    loss_fn = _loss(discriminator_start=5)
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *args: calls.append(1))
    x, recon = _images()
    total_g, logs_g = loss_fn.generator_loss(x, recon, _posterior(), step=4)
    total_d, logs_d = loss_fn.discriminator_loss(x, recon, step=4)
    assert calls == [] and not loss_fn.discriminator_active(4)
    assert logs_g["gan_loss"] == 0.0 and logs_g["weighted_gan_loss"] == 0.0 and logs_g["discriminator_factor"] == 0.0
    assert total_d.item() == 0.0 and not total_d.requires_grad and logs_d["discriminator_loss"] == 0.0
    assert total_g.item() == pytest.approx(logs_g["reconstruction_loss"] + logs_g["kl_loss"], rel=1e-6)
    loss_fn.generator_loss(x, recon, _posterior(), step=5)
    total_d, _ = loss_fn.discriminator_loss(x, recon, step=5)
    assert len(calls) == 2 and total_d.requires_grad and loss_fn.discriminator_active(5)


def test_warmup_ramp_values():
    loss_fn = _loss(discriminator_start=10, discriminator_warmup_steps=4)
    ramp = [loss_fn.gan_ramp(s) for s in (0, 9, 10, 11, 12, 13, 50)]
    assert ramp == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert _loss(discriminator_start=3).gan_ramp(3) == 1.0
    x, recon = _images()
    _, logs = loss_fn.generator_loss(x, recon, _posterior(), step=11)
    assert logs["discriminator_factor"] == 0.5
    assert logs["weighted_gan_loss"] == pytest.approx(0.1 * 0.5 * logs["gan_loss"], rel=1e-6)


def test_lecam_buffers_update_and_checkpoint():
    loss_fn = _loss(lecam_weight=2.0, lecam_decay=0.9)
    loss_fn.train()
    x, recon = _images()
    _, logs = loss_fn.discriminator_loss(x, recon, step=0)
    real, fake = logs["logits_real"], logs["logits_fake"]
    assert logs["lecam_loss"] == pytest.approx(2.0 * (max(real, 0) ** 2 + max(-fake, 0) ** 2), rel=1e-5, abs=1e-8)
    assert loss_fn.lecam_ema_real.item() == pytest.approx(0.1 * real, rel=1e-5)
    assert loss_fn.lecam_ema_fake.item() == pytest.approx(0.1 * fake, rel=1e-5)
    loss_fn.eval()
    before = loss_fn.lecam_ema_real.clone()
    loss_fn.discriminator_loss(x, recon, step=0)
    assert torch.equal(loss_fn.lecam_ema_real, before)  # no update outside training
    state = loss_fn.state_dict()
    assert {"lecam_ema_real", "lecam_ema_fake"} <= set(state)
    fresh = _loss(lecam_weight=2.0)
    fresh.load_state_dict(state)
    assert fresh.lecam_ema_real.item() == before.item()


def test_adaptive_weight_in_generator_loss():
    torch.manual_seed(0)
    head = torch.nn.Conv2d(3, 3, 1)
    x, _ = _images()
    recon = head(x + 0.1)
    loss_fn = _loss(adaptive_weight=True)
    _, logs = loss_fn.generator_loss(x, recon, _posterior(), step=0, last_layer=head.weight)
    assert math.isfinite(logs["d_weight"]) and logs["d_weight"] > 0 and logs["d_weight"] != pytest.approx(0.1)
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(x, head(x), _posterior(), step=0)


# ---------------------------------------------------------------------------------------- LPIPS


def test_lpips_random_backbone_metric(vgg_random):
    x, recon = _images(size=32)
    x = x.requires_grad_(True)
    assert torch.equal(vgg_random(x, x), torch.zeros(2))
    dist = vgg_random(x, recon.detach())
    assert dist.shape == (2,) and (dist > 0).all()
    dist.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in vgg_random.parameters())
    # [-1, 1] inputs go to the package unchanged (normalize=False), not rescaled again.
    with torch.no_grad():
        direct = vgg_random.metric(x, recon, normalize=False).flatten()
    assert torch.allclose(dist.detach(), direct)


def test_lpips_random_is_seeded_offline_and_keeps_global_rng(no_network):
    state = torch.get_rng_state()
    a, b = build_lpips("squeeze", "random"), build_lpips("squeeze", "random")
    assert torch.equal(torch.get_rng_state(), state)
    for (key, va), vb in zip(a.metric.state_dict().items(), b.metric.state_dict().values()):
        assert torch.equal(va, vb), key
    heads = torch.load(Path(lpips.__file__).parent / "weights/v0.1/squeeze.pth", map_location="cpu", weights_only=True)
    assert torch.equal(a.metric.lin0.model[1].weight, heads["lin0.model.1.weight"])


def test_lpips_local_backbone_file(tmp_path, no_network):
    torch.manual_seed(5)
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    torch.save(state, tmp_path / "squeeze.pth")
    save_file(state, str(tmp_path / "squeeze.safetensors"))
    for name in ("squeeze.pth", "squeeze.safetensors"):
        metric = build_lpips("squeeze", str(tmp_path / name))
        assert torch.equal(metric.metric.net.slice1[0].weight, state["features.0.weight"])
        assert torch.equal(metric.metric.net.slice7[0].expand3x3.weight, state["features.12.expand3x3.weight"])
    with pytest.raises(ValueError, match="torchvision vgg"):
        build_lpips("vgg", str(tmp_path / "squeeze.pth"))


def test_lpips_torchvision_backbone_offline_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache: the weights must be downloaded
    with pytest.raises(RuntimeError, match="'random'"):
        build_lpips("squeeze", "torchvision")
    with pytest.raises(ValueError, match="net"):
        build_lpips("resnet", "random")


def test_vae_loss_lpips_frozen_excluded_and_eval(vgg_random, monkeypatch):
    import repae.losses as losses

    monkeypatch.setattr(losses, "build_lpips", lambda net, backbone, **_: vgg_random)
    loss_fn = VAELoss(perceptual_weight=1.0, perceptual_backbone="random", disc_channels=8)
    loss_fn.train()
    assert not loss_fn.lpips.training and not loss_fn.lpips.metric.lin0.training
    disc_ids = {id(p) for p in loss_fn.discriminator_parameters()}
    assert disc_ids == {id(p) for p in loss_fn.discriminator.parameters()}
    assert not disc_ids & {id(p) for p in loss_fn.lpips.parameters()}
    state = loss_fn.state_dict()
    assert not any(k.startswith("lpips.") for k in state)
    loss_fn.load_state_dict(state, strict=True)
    x, recon = _images(size=32)
    total, logs = loss_fn.generator_loss(x, recon, _posterior(), step=0)
    total.backward()
    assert logs["perceptual_loss"] > 0 and recon.grad is not None
    assert all(p.grad is None for p in loss_fn.lpips.parameters())


# ------------------------------------------------------------------ the reference-faithful recipe
def test_reference_faithful_lpips_sees_the_references_range():
    """The reference maps [-1, 1] images once more (x -> 2x - 1): LPIPS sees [-3, 1] (REPAE-4.4)."""
    ours = build_lpips("squeeze", "random")
    faithful = build_lpips("squeeze", "random", reference_range=True)
    x, recon = _images()
    x, recon = x.detach(), recon.detach()
    assert torch.allclose(faithful(x, recon), ours(2 * x - 1, 2 * recon - 1))
    assert not torch.allclose(faithful(x, recon), ours(x, recon))


def test_reference_faithful_discriminator_runs_real_and_fake_apart():
    calls = []
    for faithful in (False, True):
        loss_fn = _loss(reference_faithful=faithful, discriminator_weight=0.1)
        loss_fn.train()
        sizes = []
        hook = loss_fn.discriminator.register_forward_pre_hook(lambda _m, args, s=sizes: s.append(args[0].shape[0]))
        x, recon = _images()
        loss_fn.discriminator_loss(x, recon, step=0)
        loss_fn.generator_loss(x, recon, _posterior(), step=0)
        hook.remove()
        calls.append(sizes)
    assert calls[0] == [4, 4]  # ours: one concatenated pass each (real + fake)
    assert calls[1] == [2, 2, 2]  # reference: real, fake for D; fake alone for G
