"""LatentCodec: normalisation both ways, both VAE families, fp32 outputs, kind resolution."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLQwenImage

from common.vae_config import VaeSpec
from fusedit.latents import LatentCodec

QWEN_MEAN = [0.1, -0.2, 0.3, 0.5]
QWEN_STD = [1.5, 0.5, 2.0, 3.0]


def tiny_kl(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    config = dict(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    return AutoencoderKL(**{**config, **overrides})


def tiny_qwen() -> AutoencoderKLQwenImage:
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=QWEN_MEAN,
        latents_std=QWEN_STD,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Both tiny VAEs saved like hub repos: KL in a `vae/` subfolder, Qwen under a neutral name."""
    root = tmp_path_factory.mktemp("vaes")
    tiny_kl().save_pretrained(root / "flux" / "vae")
    tiny_qwen().save_pretrained(root / "plain_folder")
    return root


def pixels(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_kl_constants_and_geometry(saved):
    codec = LatentCodec.from_spec(VaeSpec(str(saved / "flux"), subfolder="vae"))
    assert codec.family.kind == "kl" and codec.latent_channels == 4 and codec.spatial_factor == 2
    assert codec.shift.shape == codec.scale.shape == (1, 4, 1, 1)
    assert codec.shift.dtype == codec.scale.dtype == torch.float32
    torch.testing.assert_close(codec.shift, torch.full((1, 4, 1, 1), 0.1159))
    torch.testing.assert_close(codec.scale, torch.full((1, 4, 1, 1), 0.3611))
    assert not codec.vae.training and not any(p.requires_grad for p in codec.vae.parameters())
    assert codec.latent_shape(3, 16, 8) == (3, 4, 8, 4)


def test_kl_without_shift_factor_uses_zero():
    codec = LatentCodec(tiny_kl(shift_factor=None, scaling_factor=1.5))
    assert torch.equal(codec.shift, torch.zeros(1, 4, 1, 1))
    assert torch.equal(codec.scale, torch.full((1, 4, 1, 1), 1.5))


def test_qwen_constants_and_geometry(saved):
    codec = LatentCodec.from_spec(VaeSpec(str(saved / "plain_folder")))
    assert codec.family.kind == "qwen" and codec.latent_channels == 4 and codec.spatial_factor == 2
    assert codec.spatial_factor == codec.vae.spatial_compression_ratio
    torch.testing.assert_close(codec.shift.flatten(), torch.tensor(QWEN_MEAN))
    torch.testing.assert_close(codec.scale.flatten(), 1 / torch.tensor(QWEN_STD))


def test_real_configs_give_factor_eight():
    four_levels = dict(
        block_out_channels=[4, 4, 4, 4],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
    )
    assert LatentCodec(tiny_kl(**four_levels)).spatial_factor == 8  # FLUX / SD3.5 layout
    default_qwen = AutoencoderKLQwenImage(base_dim=4, z_dim=16, num_res_blocks=1)  # dim_mult [1, 2, 4, 4]
    codec = LatentCodec(default_qwen)
    assert codec.spatial_factor == 8 and codec.latent_channels == 16
    assert abs(codec.shift[0, 0, 0, 0].item() + 0.7571) < 1e-6  # docs/reference-facts.md, T2I-1.1


@pytest.mark.parametrize("family", ["kl", "qwen"])
def test_normalise_then_unnormalise_is_identity(family):
    codec = LatentCodec(tiny_kl() if family == "kl" else tiny_qwen())
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x0 = (z - codec.shift) * codec.scale
    torch.testing.assert_close(x0 / codec.scale + codec.shift, z)
    if family == "qwen":  # per-channel constants really differ per channel
        assert codec.shift.flatten().unique().numel() == 4 and codec.scale.flatten().unique().numel() == 4


@pytest.mark.parametrize("family", ["kl", "qwen"])
def test_encode_decode_matches_raw_vae(family):
    """decode(encode(x)) in mean mode equals the raw VAE round trip, so the inverse really ran."""
    vae = tiny_kl() if family == "kl" else tiny_qwen()
    codec = LatentCodec(vae)
    x = pixels()
    latents = codec.encode(x, sample=False)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    raw_in = x.unsqueeze(2) if family == "qwen" else x
    with torch.no_grad():
        z = vae.encode(raw_in).latent_dist.mean
        expected_latents = (z.squeeze(2) if family == "qwen" else z) - codec.shift
        torch.testing.assert_close(latents, expected_latents * codec.scale)
        expected = vae.decode(z).sample.clamp(-1, 1)
    decoded = codec.decode(latents)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, expected.squeeze(2) if family == "qwen" else expected, atol=1e-5, rtol=0)
    # Decoding the normalised latents as if they were raw gives something else (reference defect T2I-D2).
    with torch.no_grad():
        wrong = vae.decode(latents.unsqueeze(2) if family == "qwen" else latents).sample
    assert not torch.allclose(wrong.squeeze(2) if family == "qwen" else wrong, decoded, atol=1e-3)


@pytest.mark.parametrize("family", ["kl", "qwen"])
def test_posterior_sample_is_generator_driven(family):
    codec = LatentCodec(tiny_kl() if family == "kl" else tiny_qwen())
    x = pixels()
    a = codec.encode(x, generator=torch.Generator().manual_seed(5))
    b = codec.encode(x, generator=torch.Generator().manual_seed(5))
    c = codec.encode(x, generator=torch.Generator().manual_seed(6))
    mean = codec.encode(x, sample=False)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mean)
    # Same draw as the posterior's own sampler (fp32 VAE): noise of the latent's shape, in order.
    raw_in = x.unsqueeze(2) if family == "qwen" else x
    with torch.no_grad():
        z = codec.vae.encode(raw_in).latent_dist.sample(torch.Generator().manual_seed(5))
    z = z.squeeze(2) if family == "qwen" else z
    torch.testing.assert_close(a, (z - codec.shift) * codec.scale)


@pytest.mark.parametrize("family", ["kl", "qwen"])
def test_bf16_vae_still_gives_fp32(family):
    vae = tiny_kl() if family == "kl" else tiny_qwen()
    codec = LatentCodec(vae).to(dtype=torch.bfloat16)
    assert codec.dtype == torch.bfloat16 and codec.shift.dtype == torch.float32
    latents = codec.encode(pixels(), generator=torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float32
    decoded = codec.decode(latents)
    assert decoded.dtype == torch.float32 and decoded.abs().max() <= 1.0


def test_from_spec_passes_dtype(saved):
    codec = LatentCodec.from_spec(VaeSpec(str(saved / "flux"), subfolder="vae"), torch_dtype=torch.bfloat16)
    assert codec.dtype == torch.bfloat16
    assert codec.encode(pixels(), sample=False).dtype == torch.float32


def test_kind_detection(saved, tmp_path):
    assert VaeSpec(str(saved / "flux"), subfolder="vae").resolve_kind() == "kl"
    assert VaeSpec(str(saved / "plain_folder")).resolve_kind() == "qwen"  # by saved class name
    # By path alone (reference rule): never needs to read anything.
    assert VaeSpec("REPA-E/e2e-QwenImage-vae").resolve_kind() == "qwen"
    assert VaeSpec("Qwen/Qwen-Image", subfolder="vae").resolve_kind() == "qwen"
    # Explicit kind wins over both.
    assert VaeSpec(str(saved / "plain_folder"), kind="kl").resolve_kind() == "kl"
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage"}))
    assert VaeSpec(str(tmp_path)).resolve_kind() == "qwen"


def test_kind_typo_is_a_clear_error():
    with pytest.raises(ValueError, match=r"VaeSpec\.kind.*'qwen-image'"):
        VaeSpec("Qwen/Qwen-Image", kind="qwen-image")


def test_unsupported_vae_is_rejected():
    with pytest.raises(TypeError, match="AutoencoderKL"):
        LatentCodec(torch.nn.Linear(2, 2))
