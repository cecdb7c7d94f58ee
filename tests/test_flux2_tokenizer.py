"""The FLUX.2 VAE family: 2x2 latent patchify + the VAE's own BatchNorm statistics, checked against
diffusers' FLUX.2 pipeline (its own patchify and normalisation code is the reader we must match)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Pipeline

from common.latent_stats import check_normalisation
from common.vae_config import FAMILIES, VaeSpec, detect
from fusedit.latents import LatentCodec
from tests.conftest import ROOT, images_and_cache_runs


def tiny_flux2(seed: int = 0) -> AutoencoderKLFlux2:
    """FLUX.2's architecture at toy width, with BatchNorm statistics that differ per channel."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
        sample_size=16,
    )
    g = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(torch.randn(16, generator=g) * 0.3)
    vae.bn.running_var.copy_(torch.rand(16, generator=g) * 2 + 0.5)
    return vae.eval()


def pixels(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def pipeline_encode(vae: AutoencoderKLFlux2, x: torch.Tensor) -> torch.Tensor:
    """What FLUX.2's pipeline does to an image (its `_encode_vae_image`, posterior mean)."""
    z = Flux2Pipeline._patchify_latents(vae.encode(x).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (z - mean) / std


def pipeline_decode(vae: AutoencoderKLFlux2, latents: torch.Tensor) -> torch.Tensor:
    """What FLUX.2's pipeline does before `vae.decode` (un-normalise, un-patchify)."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return vae.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean)).sample


def test_geometry_is_what_the_dit_sees():
    codec = LatentCodec(tiny_flux2())
    assert codec.family.kind == "flux2"
    # 4 VAE channels at x2 -> 16 channels at x4 after the 2x2 patchify
    assert (codec.latent_channels, codec.spatial_factor) == (16, 4)
    assert codec.latent_shape(3, 16, 16) == (3, 16, 4, 4)
    assert codec.moment_shape(3, 16, 16) == (3, 4, 8, 8)  # what a latent cache stores
    with pytest.raises(ValueError, match="multiple of 4"):
        codec.latent_shape(1, 18, 16)


def test_encode_matches_the_flux2_pipeline():
    vae = tiny_flux2()
    codec = LatentCodec(vae)
    x = pixels()
    with torch.no_grad():
        expected = pipeline_encode(vae, x)
    got = codec.encode(x, sample=False)
    assert got.shape == (2, 16, 4, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decode_matches_the_flux2_pipeline():
    vae = tiny_flux2()
    codec = LatentCodec(vae)
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pipeline_decode(vae, latents).clamp(-1, 1)
    torch.testing.assert_close(codec.decode(latents), expected, atol=1e-5, rtol=1e-5)


def test_patchify_is_the_pipelines_and_inverts():
    family = FAMILIES["flux2"]
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(family.patchify(z), Flux2Pipeline._patchify_latents(z))
    assert torch.equal(family.unpatchify(family.patchify(z)), z)
    assert torch.equal(FAMILIES["kl"].patchify(z), z)


def test_cached_moments_train_like_pixels():
    """A latent cache stores the un-patchified moments; from_moments must give what encode gives."""
    codec = LatentCodec(tiny_flux2())
    x = pixels()
    mean, std = codec.moments(x)
    assert mean.shape == (2, 4, 8, 8)
    for sample in (False, True):
        a = codec.encode(x, generator=torch.Generator().manual_seed(4), sample=sample)
        b = codec.from_moments(mean, std, torch.Generator().manual_seed(4), sample=sample)
        assert torch.equal(a, b)


def test_bf16_vae_keeps_fp32_constants():
    codec = LatentCodec(tiny_flux2()).to(dtype=torch.bfloat16)
    assert codec.shift.dtype == torch.float32 and codec.scale.dtype == torch.float32
    latents = codec.encode(pixels(), generator=torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float32 and codec.decode(latents).dtype == torch.float32


def test_check_normalisation_reads_the_batchnorm_statistics():
    """evaluation.check_latents' measure: fails with statistics that do not fit, passes once they do."""
    vae = tiny_flux2()
    images = pixels(batch=64, size=16, seed=1)
    before = check_normalisation(vae, images, tol_mean=0.05, tol_std=0.05)
    assert before["source"] == "bn running statistics" and not before["ok"]
    assert len(before["per_channel_mean"]) == 16
    # Fit the statistics to these images' latents, as FLUX.2's BatchNorm tracked them on its training
    # images: the check's draws are seeded per image, so the refit normalises the same draws to 0 / 1.
    old_shift, old_scale = FAMILIES["flux2"].normalisation_constants(vae)
    mean, std = torch.tensor(before["per_channel_mean"]), torch.tensor(before["per_channel_std"])
    with torch.no_grad():
        vae.bn.running_mean.copy_(mean / old_scale.flatten() + old_shift.flatten())
        vae.bn.running_var.copy_((std / old_scale.flatten()).pow(2) - vae.config.batch_norm_eps)
    after = check_normalisation(vae, images, tol_mean=0.05, tol_std=0.05)
    assert after["ok"], after


def test_family_detection(tmp_path):
    assert detect("black-forest-labs/FLUX.2-dev").kind == "flux2"
    assert detect("REPA-E/e2e-flux-vae").kind == "kl"  # FLUX.1's VAE: no "flux.2" / "flux2" in the name
    assert detect("Qwen/Qwen-Image").kind == "qwen"
    tiny_flux2().save_pretrained(tmp_path / "neutral")
    assert VaeSpec(str(tmp_path / "neutral")).resolve_kind() == "flux2"  # by the saved class name
    codec = LatentCodec.from_spec(VaeSpec(str(tmp_path / "neutral")))
    assert codec.family.kind == "flux2"
    # The BatchNorm statistics are saved weights: they survive the round trip.
    torch.testing.assert_close(codec.vae.bn.running_var, tiny_flux2().bn.running_var)
    assert json.loads((tmp_path / "neutral" / "config.json").read_text())["_class_name"] == "AutoencoderKLFlux2"


def test_two_training_steps_and_a_preview_through_a_flux2_vae(quick_world: Path, tmp_path: Path) -> None:
    """train.py on the quick world with a tiny FLUX.2 VAE as the frozen VAE: the DiT's input side
    follows the patchified latent (16 channels here), the preview decodes through the family, and a
    latent cache (the VAE's own 4-channel moments) trains exactly as the images do."""
    folder = tmp_path / "flux2-vae"
    tiny_flux2().save_pretrained(folder)
    info, losses = images_and_cache_runs(quick_world, tmp_path, {"vae.pretrained_model_name_or_path": str(folder)})
    assert info["latent_shape"] == [2, 4, 16, 16]  # (mean, std) of the VAE's own latent at 32 px
    config = json.loads((tmp_path / "images" / "2" / "model" / "config.json").read_text())
    assert config["in_channels"] == 16 and config["out_channels"] == 16
    assert list((tmp_path / "images" / "samples").glob("*2*.png"))
    assert len(losses["images"]) == 2 and losses["cache"] == pytest.approx(losses["images"], rel=1e-5)


def test_a_stated_in_channels_that_is_not_the_latents_is_one_error(tmp_path: Path) -> None:
    """The planner (and the trainer, after loading the VAE) refuse a DiT input that does not fit the VAE."""
    config = ROOT / "configs" / "e2e-vae" / "sa-w2048-3b-res256-flux2vae-fulldataset-500k.yaml"
    cmd = [sys.executable, str(ROOT / "train.py"), "-c", str(config), "--dry-run", "model.in_channels=16"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error:")
    assert "model.in_channels: 16" in lines[-1] and "128-channel latents" in lines[-1]


def test_the_joint_stage_names_a_family_it_does_not_tune(tmp_path: Path) -> None:
    from repae.vae import load_vae
    from tests.test_rae_tokenizer import tiny_rae

    tiny_rae().save_pretrained(tmp_path / "neutral")
    with pytest.raises(ValueError, match=r"AutoencoderRAE \(kind rae\); the joint stage tunes kl, qwen and flux2"):
        load_vae(str(tmp_path / "neutral"))


# ------------------------------------------------------------------------------------------------
# REPA-E on the FLUX.2 VAE: the joint stage works in the patchified latent and exports into the BatchNorm
# ------------------------------------------------------------------------------------------------
def test_trainable_wrapper_works_in_the_patchified_latent():
    from repae.vae import TrainableVAE

    vae = tiny_flux2()
    wrapper = TrainableVAE(vae)
    assert (wrapper.latent_channels, wrapper.spatial_factor) == (16, 4) and not wrapper.has_unused_parameters
    x = pixels()
    posterior, z, recon = wrapper(x, torch.Generator().manual_seed(0))
    assert posterior.mean.shape == z.shape == (2, 16, 4, 4) and recon.shape == (2, 3, 16, 16)
    with torch.no_grad():
        reference = vae.encode(x).latent_dist
        torch.testing.assert_close(posterior.mean, Flux2Pipeline._patchify_latents(reference.mean))
        torch.testing.assert_close(posterior.kl(), reference.kl(), rtol=1e-5, atol=1e-4)  # a permutation
        torch.testing.assert_close(recon, vae.decode(Flux2Pipeline._unpatchify_latents(z)).sample)
    (recon.square().mean() + z.square().mean()).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0


def test_export_writes_the_statistics_into_the_batchnorm(tmp_path: Path):
    from repae.vae import META_FILE, TrainableVAE, load_latents_stats, save_e2e_vae

    vae = tiny_flux2()
    before = vae.bn.running_var.clone()
    g = torch.Generator().manual_seed(7)
    scale, bias = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g) * 0.2
    folder = save_e2e_vae(TrainableVAE(vae), tmp_path / "e2e-flux2", scale, bias, metadata={"step": 3})
    assert torch.equal(vae.bn.running_var, before)  # the caller's model is untouched
    loaded = AutoencoderKLFlux2.from_pretrained(folder)  # plain diffusers
    eps = loaded.config.batch_norm_eps
    torch.testing.assert_close(loaded.bn.running_mean, bias)
    torch.testing.assert_close(torch.sqrt(loaded.bn.running_var + eps), 1.0 / scale)
    assert "latents_mean" not in json.loads((folder / "config.json").read_text())
    assert json.loads((folder / META_FILE).read_text())["latent_channels"] == 16
    assert torch.equal(load_latents_stats(folder)[0], scale)
    codec = LatentCodec.from_spec(VaeSpec(str(folder)))
    x = pixels()
    with torch.no_grad():
        mean = TrainableVAE(vae).encode(x).mean
    torch.testing.assert_close(codec.encode(x, sample=False), (mean - bias.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1))
    with pytest.raises(ValueError, match="below sqrt"):
        save_e2e_vae(vae, tmp_path / "bad", torch.full((16,), 1e3), bias)


def test_repae_tunes_a_flux2_vae_and_exports_it(repae_world: Path, tmp_path: Path) -> None:
    """Two joint steps on the toy world with a tiny FLUX.2 VAE (the SiT's BatchNorm starts from the VAE's
    own statistics), then an export that plain diffusers loads, statistics in its BatchNorm."""
    from repae.checkpoint import load_sit
    from repae.vae import load_latents_stats
    from tests.test_repae_train import CONFIG, run_module, tiny_overrides

    folder, run, out = tmp_path / "flux2-vae", tmp_path / "run", tmp_path / "e2e-flux2"
    tiny_flux2().save_pretrained(folder)
    extra = {"vae.pretrained_model_name_or_path": str(folder), "vae.latents_stats": "auto"}
    proc = run_module("repae.train", ["-c", str(CONFIG), *tiny_overrides(repae_world, run, **extra)])
    assert "latent statistics (the VAE's own (bn running statistics))" in proc.stderr
    sit = load_sit(run / "2")
    assert sit.x_embedder.proj.in_channels == 16  # the patchified latent, patch 1
    run_module("repae.export", ["--run", str(run), "--out", str(out), "--stats-images", "64"])
    loaded = AutoencoderKLFlux2.from_pretrained(out)
    scale, bias = load_latents_stats(out)
    torch.testing.assert_close(loaded.bn.running_mean, bias)
    torch.testing.assert_close(torch.sqrt(loaded.bn.running_var + loaded.config.batch_norm_eps), 1.0 / scale)
    tuned = AutoencoderKLFlux2.from_pretrained(run / "2" / "vae")
    assert not torch.equal(tuned.encoder.conv_in.weight, tiny_flux2().encoder.conv_in.weight)  # it was tuned
