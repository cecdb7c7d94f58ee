"""VAE diagnostics: image metrics, latent statistics, and the side-by-side CLI on tiny VAEs."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from repae import diagnostics as diag

FID_EXTRACTOR = "common.fid:random_conv_extractor"


# --------------------------------------------------------------------------------------------
# SSIM / PSNR
# --------------------------------------------------------------------------------------------
def _scipy_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Independent SSIM, skimage's recipe: scipy Gaussian filter (sigma 1.5, truncate 3.5 -> 11 taps),
    population covariance, then crop the 5-pixel border; mean over channels."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = 0.01**2, 0.03**2
    out = []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
        f = lambda t: gaussian_filter(t, 1.5, truncate=3.5)[5:-5, 5:-5]
        ma, mb = f(a), f(b)
        va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
        s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
        out.append(s.mean())
    return float(np.mean(out))


def test_ssim_identical_images_is_one_and_constant_images_hand_checked() -> None:
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(diag.ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)
    # Flat images: zero variance, so SSIM is only the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), 0.25)
    expected = (2 * 0.5 * 0.25 + 1e-4) / (0.25 + 0.0625 + 1e-4)
    assert diag.ssim(a, b).item() == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(0.80006, abs=1e-5)


def test_ssim_matches_an_independent_scipy_implementation() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 40, generator=g)
    y = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours = diag.ssim(x, y).item()
    assert ours == pytest.approx(_scipy_ssim(x[0].numpy(), y[0].numpy()), abs=1e-10)
    assert 0.2 < ours < 0.95
    noisier = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert diag.ssim(x, noisier).item() < ours
    with pytest.raises(ValueError, match="at least 11"):
        diag.ssim(x[..., :10, :10], y[..., :10, :10])


def test_psnr_known_value_and_exact_reconstruction_reported_as_null_in_json() -> None:
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.125  # mse 1/64 -> 10 log10(4 * 64)
    values = diag.psnr(x, y)
    assert values[0].item() == pytest.approx(10 * math.log10(256), abs=1e-9) and math.isinf(values[1].item())
    metrics = diag._summarise_metrics({"psnr": [values], "ssim": [torch.ones(2)], "lpips": []})
    assert math.isinf(metrics["psnr_db"]) and metrics["psnr_exact_images"] == 1
    assert metrics["psnr_db_finite"] == pytest.approx(24.0824, abs=1e-4) and metrics["lpips"] is None
    notes: list[str] = []
    safe = diag.json_safe({"a": {"metrics": metrics}}, notes)
    assert safe["a"]["metrics"]["psnr_db"] is None and notes == ["a.metrics.psnr_db: inf (written as null)"]
    json.dumps(safe, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Latent statistics
# --------------------------------------------------------------------------------------------
def _structured_latents(n: int = 12, h: int = 4) -> torch.Tensor:
    """Channel 0: one value per image (+-1, no spatial variation); channel 1: the same +-2
    checkerboard in every image (all variance spatial); channel 2: constant 3."""
    z = torch.zeros(n, 3, h, h, dtype=torch.float64)
    z[:, 0] = torch.tensor([1.0, -1.0]).repeat(n // 2)[:, None, None]
    checker = (torch.arange(h)[:, None] + torch.arange(h)[None, :]) % 2 * 4.0 - 2.0
    z[:, 1] = checker
    z[:, 2] = 3.0
    return z


def test_latent_stats_on_known_per_channel_structure_any_batching() -> None:
    z = _structured_latents()
    whole = diag.LatentStats()
    whole.update(z)
    pieces = diag.LatentStats()
    for chunk in (z[:1], z[1:6], z[6:]):
        pieces.update(chunk)
    r, rp = whole.result(), pieces.result()
    for key in ("mean", "std", "spatial_var", "var_fraction"):
        assert np.allclose(r[key], rp[key], atol=1e-12), key
    assert np.allclose(r["mean"], [0.0, 0.0, 3.0]) and np.allclose(r["std"], [1.0, 2.0, 0.0])
    assert np.allclose(r["spatial_var"], [0.0, 4.0, 0.0])
    assert np.allclose(r["var_fraction"], [0.2, 0.8, 0.0])
    assert r["std_avg"] == pytest.approx(1.0) and r["spatial_var_avg"] == pytest.approx(4 / 3)
    assert r["mean_avg"] == pytest.approx(1.0) and r["max_var_fraction"] == pytest.approx(0.8)
    # pooled over all channels: mean 1, var = (1 + 4 + 0)/3 + var of channel means (0, 0, 3) = 5/3 + 2
    assert r["pooled_std"] == pytest.approx(math.sqrt(5 / 3 + 2))
    norm = whole.result(shift=torch.tensor([0.0, 0.0, 3.0]), scale=torch.tensor([1.0, 0.5, 1.0]))
    assert np.allclose(norm["mean"], 0.0) and np.allclose(norm["std"], [1.0, 1.0, 0.0])
    assert np.allclose(norm["spatial_var"], [0.0, 1.0, 0.0])


class _StandInVAE(nn.Module):
    """A TrainableVAE-shaped double with known latents: mean = 2x per pixel, std 0.5, exact decoder."""

    latent_channels, spatial_factor = 3, 1

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        mean = 2 * x  # scaling by 2 and back is exact in floating point
        std = torch.full_like(mean, 0.5)
        kl = 0.5 * (mean**2 + std**2 - 1 - torch.log(std**2)).flatten(1).sum(1)
        return SimpleNamespace(mean=mean, std=std, kl=lambda: kl)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z / 2


def test_diagnose_vae_on_a_stand_in_with_known_latents() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g)
    images[:, 1] = 255  # channel 1 is constant: latent mean channel 1 is exactly 2
    vae = _StandInVAE().train()
    norm = {"shift": [0.0, 2.0, 0.0], "scale": [1.0, 1.0, 1.0], "source": "test"}
    report = diag.diagnose_vae(vae, [images[:3], *images[3:]], batch_size=4, seed=0, normalisation=norm)
    assert vae.training  # mode restored
    assert report["num_images"] == 10
    m = report["metrics"]
    assert math.isinf(m["psnr_db"]) and m["psnr_exact_images"] == 10 and m["ssim"] == pytest.approx(1.0)
    x = images.double() / 127.5 - 1
    mean_stats = report["latents"]["mean"]
    assert mean_stats["mean"][1] == pytest.approx(2.0) and mean_stats["std"][1] == pytest.approx(0.0, abs=1e-9)
    assert mean_stats["std"][0] == pytest.approx((2 * x[:, 0]).std(unbiased=False).item(), rel=1e-6)
    spatial0 = (2 * x[:, 0]).flatten(1).var(1, unbiased=False).mean().item()
    assert mean_stats["spatial_var"][0] == pytest.approx(spatial0, rel=1e-6)
    sample = report["latents"]["sample"]  # sample = mean + 0.5 eps: the constant channel gets variance 0.25
    assert sample["std"][1] == pytest.approx(0.5, rel=0.1) and sample["var_fraction"][1] > 0.01
    assert report["latents"]["normalised"]["mean"][1] == pytest.approx(sample["mean"][1] - 2.0)
    assert report["posterior"]["std_avg"] == pytest.approx(0.5)
    rebatched = diag.diagnose_vae(vae, [images], batch_size=7, seed=0, normalisation=norm)["latents"]["sample"]
    assert np.allclose(rebatched["std"], sample["std"], rtol=1e-12)  # noise is per image, not per batch
    other = diag.diagnose_vae(vae, [images], batch_size=7, seed=1, normalisation=norm)["latents"]["sample"]
    assert not np.allclose(other["std"], sample["std"], rtol=1e-6)
    limited = diag.diagnose_vae(vae, [images], batch_size=4, num_images=5)
    assert limited["num_images"] == 5


# --------------------------------------------------------------------------------------------
# CLI on tiny diffusers VAEs
# --------------------------------------------------------------------------------------------
def _tiny_vae(folder: Path, seed: int) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    vae.save_pretrained(folder)
    return folder


def _image_arrays(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (40, 48) if i % 2 else (32, 32)  # non-square ones get centre-cropped
        base = rng.integers(0, 256, 3)
        img = np.broadcast_to(base, (h, w, 3)).copy()
        img[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(0, 256, 3)
        out.append(img.astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("diag")
    images = root / "images"
    images.mkdir()
    for i, arr in enumerate(_image_arrays(7, seed=0)):
        Image.fromarray(arr).save(images / f"{i:03d}.png")
    return SimpleNamespace(
        root=root, images=images, vae_a=_tiny_vae(root / "vae_a", 0), vae_b=_tiny_vae(root / "vae_b", 1)
    )


def test_cli_two_vaes_side_by_side_writes_json_and_table(tiny_setup, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.json"
    argv = ["--vae", str(tiny_setup.vae_a), "--vae", str(tiny_setup.vae_b), "--images", str(tiny_setup.images)]
    argv += ["--resolution", "32", "--num-images", "6", "--batch-size", "4", "--lpips-backbone", "random"]
    argv += ["--no-rfid", "--device", "cpu", "--quiet", "--out", str(out)]
    assert diag.main(argv) == 0
    report = json.loads(out.read_text())
    assert list(report["vaes"]) == ["vae_a", "vae_b"]
    a, b = report["vaes"]["vae_a"], report["vaes"]["vae_b"]
    for entry in (a, b):
        assert entry["num_images"] == 6 and entry["config"]["class"] == "AutoencoderKL"
        assert entry["config"]["latent_channels"] == 4 and entry["config"]["spatial_factor"] == 2
        assert entry["config"]["scaling_factor"] == 0.5 and entry["config"]["shift_factor"] == 0.1
        assert math.isfinite(entry["metrics"]["psnr_db"]) and -1 < entry["metrics"]["ssim"] < 1
        assert entry["metrics"]["lpips"] is not None and entry["metrics"]["lpips"] >= 0
        assert "rfid" not in entry["metrics"]
        assert len(entry["latents"]["mean"]["std"]) == 4 and len(entry["latents"]["sample"]["spatial_var"]) == 4
        lat = entry["latents"]
        assert lat["normalised"]["source"] == "scalar"
        assert lat["normalised"]["std"][0] == pytest.approx(lat["sample"]["std"][0] * 0.5)
        assert sum(lat["mean"]["var_fraction"]) == pytest.approx(1.0)
    assert a["metrics"]["psnr_db"] != b["metrics"]["psnr_db"]  # two different random VAEs
    assert report["config"]["num_images"] == 6 and report["config"]["resolution"] == 32
    assert any("random backbone" in n for n in report["notes"])
    table = capsys.readouterr().out
    assert "vae_a" in table and "vae_b" in table and "PSNR (dB)" in table and "SSIM" in table
    # the same VAE twice gets unique columns, and the deterministic pipeline gives identical numbers
    argv2 = ["--vae", str(tiny_setup.vae_a), "--vae", str(tiny_setup.vae_a), "--images", str(tiny_setup.images)]
    argv2 += ["--resolution", "32", "--num-images", "6", "--no-rfid", "--no-lpips", "--quiet", "--out", str(out)]
    assert diag.main(argv2) == 0
    twice = json.loads(out.read_text())["vaes"]
    assert list(twice) == ["vae_a", "vae_a#2"]
    assert twice["vae_a"]["metrics"] == twice["vae_a#2"]["metrics"]
    assert twice["vae_a"]["metrics"]["psnr_db"] == pytest.approx(a["metrics"]["psnr_db"], rel=1e-6)
    assert twice["vae_a"]["latents"] == twice["vae_a#2"]["latents"]


def _write_shard(path: Path, arrays: list[np.ndarray]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, arr in enumerate(arrays):
            members = {"json": b"{}"}
            if i != 2:  # sample 2 has no image: skipped and reported
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                members["png"] = buf.getvalue()
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cli_shards_with_rfid_through_the_offline_extractor(tiny_setup, tmp_path: Path) -> None:
    arrays = _image_arrays(10, seed=3)
    _write_shard(tmp_path / "s-000000.tar", arrays[:5])
    _write_shard(tmp_path / "s-000001.tar", arrays[5:])
    out = tmp_path / "report.json"
    argv = ["--vae", str(tiny_setup.vae_a), "--vae", str(tiny_setup.vae_b), "--label", "before", "--label", "after"]
    argv += ["--shards", str(tmp_path / "s-{000000..000001}.tar"), "--resolution", "32", "--num-images", "0"]
    argv += ["--no-lpips", "--fid-extractor", FID_EXTRACTOR, "--quiet", "--out", str(out)]
    assert diag.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["config"]["skipped_samples"] == ["000002", "000002"]  # one per shard
    for entry in report["vaes"].values():
        assert entry["num_images"] == 8 and entry["rfid"]["num_real"] == 8 and entry["rfid"]["num_fake"] == 8
        assert entry["rfid"]["feature_extractor"] == FID_EXTRACTOR and entry["metrics"]["rfid"] > 0
    assert any("only 8 images" in n for n in report["notes"])


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # identical sets: singular covariance product
def test_compare_vaes_with_in_memory_models_and_identity_vae_rfid_zero() -> None:
    """How the trainer calls it: label -> loaded model; an exact VAE has rFID 0 and PSNR null + note."""
    images = torch.from_numpy(np.stack(_image_arrays(4, seed=5)[::2] * 2)).permute(0, 3, 1, 2).contiguous()
    report = diag.compare_vaes(
        {"exact": _StandInVAE()}, images, batch_size=3, rfid=True, fid_extractor=FID_EXTRACTOR, device="cpu"
    )
    entry = report["vaes"]["exact"]
    assert entry["metrics"]["psnr_db"] is None and entry["metrics"]["psnr_exact_images"] == 4
    assert entry["metrics"]["rfid"] == pytest.approx(0.0, abs=1e-6)
    assert any(n.startswith("vaes.exact.metrics.psnr_db: inf") for n in report["notes"])
    json.dumps(report, allow_nan=False)
    assert "exact" in diag.format_table(report)


def test_saved_e2e_vae_is_normalised_with_its_own_stats_file(tiny_setup, tmp_path: Path) -> None:
    """A folder from repae.vae.save_e2e_vae: config latents_mean/std reported, latents_stats.safetensors used."""
    from repae.vae import load_vae, save_e2e_vae

    scale, bias = torch.tensor([2.0, 1.0, 0.5, 4.0]), torch.tensor([0.1, -0.2, 0.0, 0.3])
    folder = save_e2e_vae(load_vae(str(tiny_setup.vae_a)), tmp_path / "e2e", scale, bias)
    images = torch.from_numpy(np.stack(_image_arrays(6, seed=2)[::2])).permute(0, 3, 1, 2).contiguous()
    report = diag.compare_vaes([diag.VaeSource(str(folder))], images, batch_size=2, device="cpu")
    entry = report["vaes"]["e2e"]
    assert entry["config"]["latents_mean"] == pytest.approx(bias.tolist())
    assert entry["config"]["latents_std"] == pytest.approx((1 / scale).tolist())
    lat = entry["latents"]
    assert lat["normalised"]["source"].endswith("latents_stats.safetensors")
    expected_std = [s * k for s, k in zip(lat["sample"]["std"], scale.tolist())]
    expected_mean = [(m - b) * k for m, b, k in zip(lat["sample"]["mean"], bias.tolist(), scale.tolist())]
    assert lat["normalised"]["std"] == pytest.approx(expected_std) and lat["normalised"]["mean"] == pytest.approx(
        expected_mean
    )


def test_per_vae_options_must_pair_with_vae() -> None:
    assert diag._paired(None, 2, "--x") == [None, None]
    assert diag._paired(["a.pt", "none"], 2, "--x") == ["a.pt", None]
    with pytest.raises(SystemExit, match="once per --vae"):
        diag._paired(["a.pt"], 2, "--vae-checkpoint")
    src = diag.VaeSource("f8d4", checkpoint="/x/sdvae-f8d4.pt")
    assert src.default_label() == "f8d4:sdvae-f8d4"
    assert diag._unique_labels(["a", "a", "b", "a"]) == ["a", "a#2", "b", "a#3"]
