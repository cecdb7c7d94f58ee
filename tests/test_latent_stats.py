"""Latent statistics: measuring them, the text-to-image normalisation check, and the E2E-VAE export."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common.latent_stats import check_normalisation, failing_channels, measure_latents
from tests.test_repae_train import make_trainer


def tiny_vae(**config: object):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        **config,
    ).eval()


def with_stats(vae, mean: torch.Tensor, std: torch.Tensor):
    """The VAE with per-channel statistics in its config, as repae.vae.save_e2e_vae writes them."""
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist(), scaling_factor=1.0, shift_factor=None)
    return vae


def random_images(n: int = 24, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand((n, 3, size, size), generator=g) * 2 - 1


def test_measured_statistics_pass_and_wrong_ones_fail() -> None:
    vae, images = tiny_vae(), random_images()
    mean, std = measure_latents(vae, images, batch_size=7)
    assert mean.dtype == torch.float64 and mean.shape == (4,) and std.shape == (4,)
    again = measure_latents(vae, images, batch_size=24)  # per-image noise: batching changes nothing
    torch.testing.assert_close(again[0], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(again[1], std, rtol=0, atol=1e-6)

    good = check_normalisation(with_stats(vae, mean, std), images)
    assert good["ok"] and good["source"] == "latents_mean/std" and good["images"] == 24
    assert good["max_abs_mean"] < 1e-4 and good["max_abs_std_error"] < 1e-4
    assert failing_channels(good) == []

    too_wide = check_normalisation(with_stats(vae, mean, std * 1.3), images)
    assert not too_wide["ok"] and too_wide["max_abs_std_error"] == pytest.approx(1 - 1 / 1.3, abs=1e-3)
    assert len(failing_channels(too_wide)) == 4

    shifted = mean.clone()
    shifted[2] += 0.2 * std[2]
    off_centre = check_normalisation(with_stats(vae, shifted, std), images)
    assert not off_centre["ok"] and off_centre["max_abs_mean"] == pytest.approx(0.2, abs=1e-3)
    assert [line.split(":")[0] for line in failing_channels(off_centre)] == ["channel 2"]


def test_scalar_factors_are_checked_per_channel() -> None:
    """A FLUX-style scalar scaling_factor is broadcast like the trainer does; per-channel errors show."""
    vae, images = tiny_vae(), random_images()
    mean, std = measure_latents(vae, images)
    flat = mean.mean().item()
    vae.register_to_config(shift_factor=flat, scaling_factor=1.0 / std.mean().item())
    result = check_normalisation(vae, images, tol_mean=10.0, tol_std=10.0)
    assert result["source"] == "scalar" and result["ok"]
    expected = (mean - flat) * (1.0 / std.mean().item())
    assert result["per_channel_mean"] == pytest.approx(expected.tolist(), abs=1e-4)


def write_toy_shards(folder: Path, images: torch.Tensor) -> None:
    """A minimal toy-world folder: shards/train-000000.tar with one jpg per sample."""
    from PIL import Image

    (folder / "shards").mkdir(parents=True)
    with tarfile.open(folder / "shards" / "train-000000.tar", "w") as tar:
        for i, image in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)


def test_check_cli_names_the_failing_vae_and_channel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from evaluation.check_latents import main, toy_training_images

    pixels = (random_images(32).add(1).mul(127.5)).round().clamp(0, 255).to(torch.uint8)
    write_toy_shards(tmp_path / "toy", pixels)
    images = toy_training_images(tmp_path / "toy", 32)
    assert images.shape == (32, 3, 16, 16) and images.dtype == torch.uint8
    vae = tiny_vae()
    mean, std = measure_latents(vae, images)
    with_stats(vae, mean, std).save_pretrained(tmp_path / "good")
    with_stats(vae, mean, std * 1.3).save_pretrained(tmp_path / "wrong")

    report = tmp_path / "check.json"
    args = ["--toy", str(tmp_path / "toy"), "--images", "32", "--device", "cpu", "--json", str(report)]
    assert main(["--vae", str(tmp_path / "good"), *args]) == 0
    assert main(["--vae", str(tmp_path / "good"), "--vae", str(tmp_path / "wrong"), *args]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'wrong'}: channel 0: std" in err and str(tmp_path / "good") + ":" not in err
    results = json.loads(report.read_text())
    assert results[str(tmp_path / "good")]["ok"] and not results[str(tmp_path / "wrong")]["ok"]


def test_export_with_image_statistics_passes_the_check(repae_world: Path, tmp_path: Path) -> None:  # noqa: F811
    from diffusers import AutoencoderKL

    from repae.export import export_e2e_vae, training_images

    run = tmp_path / "run"
    make_trainer(repae_world, run).fit()
    out = export_e2e_vae(run, tmp_path / "e2e", stats="images", stats_images=256, device="cpu")
    vae = AutoencoderKL.from_pretrained(out)
    meta = json.loads((out / "e2e_vae.json").read_text())["metadata"]["latent_statistics"]
    assert meta["from"] == "training images" and meta["images"] == 256 and meta["posterior"] == "samples"
    assert len(meta["bn_ema_mean"]) == len(meta["bn_ema_std"]) == 4 and meta["why"]

    images = training_images(run, 512)  # more images than measured, other posterior noise
    result = check_normalisation(vae, images, seed=1)
    assert result["ok"], result
    original = check_normalisation(AutoencoderKL.from_pretrained(repae_world / "vae"), images, seed=1)
    assert original["ok"] and original["source"] == "latents_mean/std", original  # toyworld.vae.calibrate_vae

    ema = export_e2e_vae(run, tmp_path / "e2e-ema", stats="ema")
    ema_meta = json.loads((ema / "e2e_vae.json").read_text())["metadata"]["latent_statistics"]
    assert ema_meta["from"] == "sit batchnorm ema" and ema_meta["bn_ema_mean"] == meta["bn_ema_mean"]
    loaded = AutoencoderKL.from_pretrained(ema)
    assert np.allclose(loaded.config.latents_mean, meta["bn_ema_mean"], atol=1e-6)
