"""REPA-E VAEs: reference layout, LDM <-> diffusers converter, posterior, trainable wrapper, export.

Full-size models are only ever built on the meta device (parameter counts, key maps, latent
shapes); numerics use tiny configs with perturbed random weights so every parameter matters.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLQwenImage
from safetensors.torch import load_file, save_file

from common.vae_config import VaeSpec
from fusedit.latents import LatentCodec
from repae.reference.convert import (
    VAEKeyError,
    check_keys,
    diffusers_config_from_ldm,
    diffusers_to_ldm_vae,
    ldm_to_diffusers_vae,
    load_reference_vae,
)
from repae.reference.ldm_vae import LDM_ARCHS, LDMAutoencoderKL, build_ldm_vae
from repae.vae import (
    META_FILE,
    STATS_FILE,
    VAE_PRESETS,
    Posterior,
    TrainableVAE,
    load_latents_stats,
    load_vae,
    save_e2e_vae,
)

PARAMS = {"f8d4": 83_653_863, "f16d32": 69_836_067}
TINY = dict(ch=32, ch_mult=(1, 2), z_channels=4, resolution=16, num_res_blocks=1)
# No attention outside mid; attention at the last level (like f16d32); at level 0 (decoder flip).
TINY_ATTN = {"none": (), "last": (8,), "first": (16,)}


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, GroupNorm affines and biases included (defaults are 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


def tiny_ldm(attn: str = "none", seed: int = 0) -> LDMAutoencoderKL:
    torch.manual_seed(seed)
    return perturbed(LDMAutoencoderKL(**TINY, attn_resolutions=TINY_ATTN[attn]), seed).eval()


def tiny_kl(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    config = dict(diffusers_config_from_ldm(**TINY, attn_resolutions=()), **overrides)
    return perturbed(AutoencoderKL(**config))


def tiny_qwen() -> AutoencoderKLQwenImage:
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False]
    )


def images(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def stats(channels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.linspace(0.5, 2.0, channels)
    bias = torch.linspace(-0.3, 0.4, channels)
    return scale, bias


# --------------------------------------------------------------------------------------------
# Reference layout and presets at full size (meta device)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["f8d4", "f16d32"])
def test_parameter_counts(arch):
    with torch.device("meta"):
        ldm = build_ldm_vae(arch)
        diffusers = AutoencoderKL(**VAE_PRESETS[arch])
    assert numel(ldm) == numel(diffusers) == PARAMS[arch]


@pytest.mark.parametrize("arch", ["f8d4", "f16d32"])
def test_presets_are_the_reference_archs(arch):
    assert VAE_PRESETS[arch] == diffusers_config_from_ldm(**LDM_ARCHS[arch])
    assert VAE_PRESETS[arch]["scaling_factor"] == 1.0 and VAE_PRESETS[arch]["shift_factor"] is None


def test_reference_keys_follow_spec():
    with torch.device("meta"):
        f8, f16 = (set(build_ldm_vae(a).state_dict()) for a in ("f8d4", "f16d32"))
    assert not any(".attn." in k for k in f8)  # f8d4: attention only in mid
    assert {"encoder.mid.attn_1.q.weight", "decoder.mid.block_2.conv2.bias", "quant_conv.weight"} <= f8
    assert "encoder.down.1.block.0.nin_shortcut.weight" in f8 and "encoder.down.3.downsample.conv.weight" not in f8
    assert "decoder.up.0.block.2.conv1.weight" in f8 and "decoder.up.0.upsample.conv.weight" not in f8
    assert {"encoder.down.4.attn.1.proj_out.weight", "decoder.up.4.attn.2.norm.bias"} <= f16
    assert "encoder.down.4.attn.2.q.weight" not in f16 and "encoder.down.3.attn.0.q.weight" not in f16
    assert "encoder.down.4.downsample.conv.weight" not in f16 and "decoder.up.4.upsample.conv.weight" in f16


@pytest.mark.parametrize("arch", ["f8d4", "f16d32"])
def test_full_size_key_maps_are_exact(arch):
    """REPAE-10.2: every reference key maps onto the diffusers preset, shapes included, none extra."""
    levels = len(LDM_ARCHS[arch]["ch_mult"])
    with torch.device("meta"):
        ldm = build_ldm_vae(arch).state_dict()
        diffusers = AutoencoderKL(**VAE_PRESETS[arch]).state_dict()
    check_keys(ldm_to_diffusers_vae(ldm, levels), diffusers)
    check_keys(diffusers_to_ldm_vae(diffusers, levels), ldm)


@pytest.mark.parametrize(("arch", "shape"), [("f8d4", (1, 4, 32, 32)), ("f16d32", (1, 32, 16, 16))])
def test_latent_shape_for_256(arch, shape):
    with torch.device("meta"):
        vae = TrainableVAE(load_vae(arch))
        posterior, z, recon = vae(torch.empty(1, 3, 256, 256))
    assert tuple(posterior.mean.shape) == tuple(z.shape) == shape
    assert tuple(recon.shape) == (1, 3, 256, 256)
    assert (vae.latent_channels, vae.spatial_factor) == (shape[1], 256 // shape[-1])


# --------------------------------------------------------------------------------------------
# Converter numerics on tiny models
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", list(TINY_ATTN))
def test_converted_model_matches_reference(attn):
    ldm = tiny_ldm(attn)
    config = diffusers_config_from_ldm(**TINY, attn_resolutions=TINY_ATTN[attn])
    assert ("AttnDownEncoderBlock2D" in config["down_block_types"]) == (attn != "none")
    diffusers = AutoencoderKL(**config).eval()
    diffusers.load_state_dict(ldm_to_diffusers_vae(ldm.state_dict(), 2), strict=True)
    x, z = images(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        moments = ldm.encode(x)
        ours = TrainableVAE(diffusers).encode(x)
        assert torch.allclose(ours.mean, moments[:, :4], atol=1e-5)
        assert torch.allclose(ours.logvar, moments[:, 4:].clamp(-30, 20), atol=1e-5)
        assert torch.allclose(diffusers.decode(z).sample, ldm.decode(z), atol=1e-5)
        assert ldm.decode(z).abs().max() > 0.1  # not a vacuous comparison


@pytest.mark.parametrize("attn", list(TINY_ATTN))
def test_round_trip_is_bit_exact(attn):
    sd = tiny_ldm(attn).state_dict()
    diffusers_sd = ldm_to_diffusers_vae(sd, 2)
    assert any(k.endswith("to_q.weight") and v.dim() == 2 for k, v in diffusers_sd.items())
    back = diffusers_to_ldm_vae(diffusers_sd, 2)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) and back[k].shape == sd[k].shape for k in sd)


def test_decoder_levels_are_flipped():
    sd = ldm_to_diffusers_vae(tiny_ldm("first").state_dict(), 2)
    assert "decoder.up_blocks.1.attentions.0.to_q.weight" in sd  # LDM up.0 (full res) is last
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in sd  # LDM up.1 upsamples
    assert "encoder.down_blocks.0.attentions.0.to_out.0.bias" in sd


def test_unmappable_key_is_named():
    sd = dict(tiny_ldm().state_dict())
    sd["encoder.down.0.block.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(VAEKeyError, match=r"encoder\.down\.0\.block\.0\.bogus\.weight"):
        ldm_to_diffusers_vae(sd, 2)
    with pytest.raises(VAEKeyError, match=r"decoder\.up\.2"):  # a level beyond num_levels
        ldm_to_diffusers_vae({"decoder.up.2.block.0.conv1.weight": torch.zeros(1)}, 2)


def test_load_vae_checkpoint_is_strict(tmp_path):
    """A reference .pt goes through prefix stripping, loss.* removal, conversion, strict load."""
    ldm = tiny_ldm()
    raw = {f"first_stage_model.{k}": v for k, v in ldm.state_dict().items()}
    raw["first_stage_model.loss.logvar"] = torch.zeros(())
    raw["model.diffusion_model.x.weight"] = torch.zeros(1)  # other parts of a whole LDM checkpoint
    torch.save({"state_dict": raw, "global_step": 7}, tmp_path / "ldm.pt")
    assert set(load_reference_vae(tmp_path / "ldm.pt")) == set(ldm.state_dict())
    tiny_kl().save_pretrained(tmp_path / "kl")

    vae = load_vae(str(tmp_path / "kl"), checkpoint=str(tmp_path / "ldm.pt"))
    with torch.no_grad():
        assert torch.allclose(TrainableVAE(vae).encode(images()).mean, ldm.encode(images())[:, :4], atol=1e-5)

    missing = {f"module.{k}": v for k, v in ldm.state_dict().items() if k != "encoder.conv_out.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(VAEKeyError, match=r"missing keys: encoder\.conv_out\.bias"):
        load_vae(str(tmp_path / "kl"), checkpoint=str(tmp_path / "missing.pt"))

    extra = dict(tiny_kl().state_dict(), **{"encoder.extra.weight": torch.zeros(1)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(VAEKeyError, match=r"unexpected keys: encoder\.extra\.weight"):
        load_vae(str(tmp_path / "kl"), checkpoint=str(tmp_path / "extra.safetensors"))


# --------------------------------------------------------------------------------------------
# Posterior
# --------------------------------------------------------------------------------------------
def test_logvar_is_clamped_before_std_and_var():
    moments = torch.zeros(1, 2, 1, 2)
    moments[0, 1, 0] = torch.tensor([-100.0, 100.0])
    posterior = Posterior(moments)
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.allclose(posterior.std.flatten(), torch.tensor([math.exp(-15.0), math.exp(10.0)]))
    assert torch.allclose(posterior.var.flatten(), torch.tensor([math.exp(-30.0), math.exp(20.0)]))


def test_kl_against_hand_computed_value():
    mean = torch.tensor([[1.0, -2.0], [0.0, 0.5]]).view(1, 1, 2, 2)
    logvar = torch.tensor([[0.0, math.log(2.0)], [math.log(0.5), 0.0]]).view(1, 1, 2, 2)
    posterior = Posterior(torch.cat([torch.cat([mean, logvar], 1)] * 2))  # batch of two
    # 0.5 * sum(mean^2 + var - 1 - logvar) per element:
    terms = [1 + 1 - 1 - 0, 4 + 2 - 1 - math.log(2), 0 + 0.5 - 1 + math.log(2), 0.25 + 1 - 1 - 0]
    expected = 0.5 * sum(terms)
    assert posterior.kl().shape == (2,)
    assert torch.allclose(posterior.kl(), torch.full((2,), expected))


def test_sample_uses_the_generator():
    moments = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    posterior = Posterior(moments.to(torch.bfloat16))
    assert posterior.mean.dtype == torch.float32 and posterior.mode() is posterior.mean
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    draw = posterior.sample(torch.Generator().manual_seed(5))
    assert torch.equal(draw, posterior.mean + posterior.std * eps)
    assert not torch.equal(draw, posterior.sample(torch.Generator().manual_seed(6)))


# --------------------------------------------------------------------------------------------
# TrainableVAE
# --------------------------------------------------------------------------------------------
def test_qwen_frame_axis_and_gradients():
    qwen = tiny_qwen()
    vae = TrainableVAE(qwen)
    assert vae.family.kind == "qwen" and (vae.latent_channels, vae.spatial_factor) == (4, 2)
    x = images()
    posterior, z, recon = vae(x, torch.Generator().manual_seed(0))
    assert posterior.mean.shape == z.shape == (2, 4, 8, 8) and recon.shape == (2, 3, 16, 16)
    with torch.no_grad():  # same numbers as diffusers' own (clamping) single-frame path
        reference = qwen.encode(x.unsqueeze(2)).latent_dist
        assert torch.allclose(posterior.mean, reference.mean.squeeze(2))
        assert torch.allclose(recon.clamp(-1, 1), qwen.decode(z.unsqueeze(2)).sample.squeeze(2))
    (recon.square().mean() + posterior.kl().mean()).backward()
    assert vae.last_layer() is qwen.decoder.conv_out.weight and vae.last_layer().grad is not None
    assert qwen.encoder.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("quant", [True, False])
def test_kl_wrapper_with_and_without_quant_convs(quant):
    kl = tiny_kl(use_quant_conv=quant, use_post_quant_conv=quant)
    vae = TrainableVAE(kl)
    x = images()
    posterior, z, recon = vae(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(posterior.mean, kl.encode(x).latent_dist.mean)
        assert torch.allclose(recon, kl.decode(z).sample)
    # A loss on the latents alone (the alignment path) must reach the encoder.
    z.square().mean().backward()
    assert kl.encoder.conv_in.weight.grad.abs().sum() > 0
    assert kl.decoder.conv_out.weight.grad is None


# --------------------------------------------------------------------------------------------
# Latent statistics and export
# --------------------------------------------------------------------------------------------
def test_load_latents_stats_reference_format(tmp_path):
    scale, bias = stats()
    torch.save({"latents_scale": scale.view(1, -1, 1, 1), "latents_bias": bias.view(1, -1, 1, 1)}, tmp_path / "x.pt")
    got_scale, got_bias = load_latents_stats(tmp_path / "x.pt")
    assert got_scale.shape == got_bias.shape == (4,) and got_scale.dtype == torch.float32
    assert torch.equal(got_scale, scale) and torch.equal(got_bias, bias)
    torch.save({"latents_scale": scale}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="latents_bias"):
        load_latents_stats(tmp_path / "bad.pt")
    torch.save({"latents_scale": -scale, "latents_bias": bias}, tmp_path / "neg.pt")
    with pytest.raises(ValueError, match="> 0"):
        load_latents_stats(tmp_path / "neg.pt")


@pytest.fixture
def saved_kl(tmp_path):
    kl = tiny_kl(scaling_factor=0.3611, shift_factor=0.1159)
    scale, bias = stats()
    folder = save_e2e_vae(TrainableVAE(kl), tmp_path / "e2e", scale, bias, metadata={"step": 10})
    return kl, folder


def test_save_e2e_vae_loads_with_diffusers(saved_kl):
    kl, folder = saved_kl
    scale, bias = stats()
    assert kl.config.scaling_factor == 0.3611  # the caller's model is untouched
    loaded = AutoencoderKL.from_pretrained(folder)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in kl.state_dict().items())
    assert torch.allclose(torch.tensor(loaded.config.latents_mean), bias)
    assert torch.allclose(torch.tensor(loaded.config.latents_std), 1 / scale)
    assert loaded.config.scaling_factor == 1.0 and loaded.config.shift_factor is None
    raw = load_file(folder / STATS_FILE)
    assert raw["latents_scale"].shape == (1, 4, 1, 1) and raw["latents_scale"].dtype == torch.float32
    got = load_latents_stats(folder)
    assert torch.equal(got[0], scale) and torch.equal(got[1], bias)
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["class_name"] == "AutoencoderKL" and meta["metadata"] == {"step": 10}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["e2e"]  # no temp folders left


def test_saved_stats_drive_fusedit_normalisation(saved_kl):
    kl, folder = saved_kl
    scale, bias = stats()
    codec = LatentCodec.from_spec(VaeSpec(str(folder)))
    x = images()
    with torch.no_grad():
        mean = TrainableVAE(kl).encode(x).mean
        expected = (mean - bias.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
        assert torch.allclose(codec.encode(x, sample=False), expected, atol=1e-6)
        assert torch.allclose(codec.decode(expected), kl.decode(mean).sample.clamp(-1, 1), atol=1e-5)


def test_save_e2e_vae_qwen_and_overwrite(tmp_path):
    qwen = tiny_qwen()
    scale, bias = stats()
    folder = tmp_path / "neutral_name"
    save_e2e_vae(qwen, folder, torch.ones(4), torch.zeros(4))
    save_e2e_vae(qwen, folder, scale.view(1, 4, 1, 1), bias.view(1, 4, 1, 1))  # replaces the first
    assert VaeSpec(str(folder)).resolve_kind() == "qwen"
    loaded = AutoencoderKLQwenImage.from_pretrained(folder)
    assert torch.allclose(torch.tensor(loaded.config.latents_std), 1 / scale)
    assert torch.equal(load_latents_stats(folder)[1], bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neutral_name"]
    with pytest.raises(ValueError, match="channels"):
        save_e2e_vae(qwen, tmp_path / "x", torch.ones(3), torch.zeros(3))


def test_save_e2e_vae_crash_leaves_old_folder(saved_kl, monkeypatch):
    kl, folder = saved_kl
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(self, path, **kwargs):
        os.makedirs(path, exist_ok=True)
        (path / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_e2e_vae(kl, folder, torch.ones(4), torch.zeros(4))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["e2e"]
