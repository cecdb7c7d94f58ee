"""The RAE family (representation autoencoders, diffusers' AutoencoderRAE) as a text-to-image tokenizer.

What is checked against whom: encode / decode against the diffusers model's own methods (the reader
a user's pipeline uses), the latent cache and training path through ``train.py``, the noise
schedule's shift by latent dimension, and the offline plans of the released DINOv2-B RAEs.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderRAE

from common.config import ConfigError
from common.latent_stats import check_normalisation
from common.vae_config import FAMILIES, VaeSpec, native_resolution
from fusedit.latents import LatentCodec
from tests.conftest import ROOT, images_and_cache_runs

CHANNELS = 64  # the encoder's width (one 64-wide head: AutoencoderRAE fixes head_dim at 64)
TINY = {
    "encoder_hidden_size": CHANNELS,
    "encoder_patch_size": 4,
    "encoder_num_hidden_layers": 1,
    "encoder_input_size": 32,
    "decoder_hidden_size": 32,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 2,
    "decoder_intermediate_size": 64,
    "patch_size": 4,
}


def tiny_rae(seed: int = 0, stats: bool = True) -> AutoencoderRAE:
    """A DINOv2-with-registers RAE at toy size: 32 px in, 8x8 latent of 64 channels, 32 px out.

    With ``stats`` it carries per-channel latent statistics, shaped (C, 1, 1) as the model's
    buffers broadcast them over the grid, like a released RAE's ``latents_mean/std``.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    extra = {}
    if stats:
        extra = {
            "latents_mean": (torch.randn(CHANNELS, 1, 1, generator=g) * 0.1).tolist(),
            "latents_std": (torch.rand(CHANNELS, 1, 1, generator=g) + 0.5).tolist(),
        }
    return AutoencoderRAE(**TINY, **extra).eval()


def pixels(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_geometry_and_the_one_resolution():
    codec = LatentCodec(tiny_rae())
    assert codec.family.kind == "rae" and not codec.has_posterior
    assert (codec.latent_channels, codec.spatial_factor, codec.native_resolution) == (CHANNELS, 4, 32)
    assert codec.latent_shape(3, 32, 32) == (3, CHANNELS, 8, 8)
    assert codec.latent_numel(32) == CHANNELS * 64
    # The encoder resizes any input to its size: a 64 px image would still give 8x8 and decode to 32 px.
    with pytest.raises(ValueError, match="works at 32x32 only"):
        codec.latent_shape(1, 64, 64)
    # The released configs: DINOv2-B/14 at 224 -> 16x16 tokens, decoder patch 16 -> 256 px (448 -> 512).
    assert native_resolution({"encoder_hidden_size": 768, "patch_size": 16, "encoder_input_size": 224,
                              "encoder_patch_size": 14}) == 256  # fmt: skip
    assert native_resolution({"latent_channels": 16, "block_out_channels": [1, 2]}) is None


def test_encode_and_decode_are_the_models_own():
    """Pixels in [-1, 1] on our side, [0, 1] on the RAE's; the RAE normalises with its own statistics."""
    rae = tiny_rae()
    codec = LatentCodec(rae)
    x = pixels()
    with torch.no_grad():
        expected = rae.encode((x + 1) / 2).latent
        drawn = rae.decode(expected).sample * 2 - 1
    got = codec.encode(x, generator=torch.Generator().manual_seed(0))  # nothing to sample: deterministic
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(codec.decode(got), drawn.clamp(-1, 1), atol=1e-6, rtol=0)
    assert torch.equal(codec.shift, torch.zeros_like(codec.shift)) and torch.equal(
        codec.scale, torch.ones_like(codec.scale)
    )


def test_a_cached_latent_is_the_latent():
    codec = LatentCodec(tiny_rae())
    x = pixels()
    mean, std = codec.moments(x)
    assert std is None and mean.shape == (2, CHANNELS, 8, 8)
    stored = mean.unsqueeze(1)  # what a latent cache holds for an RAE: (B, 1, C, h, w)
    for sample in (False, True):
        a = codec.encode(x, generator=torch.Generator().manual_seed(4), sample=sample)
        assert torch.equal(codec.from_cached(stored, torch.Generator().manual_seed(4), sample), a)


def test_check_normalisation_reads_the_rae_statistics():
    """evaluation.check_latents' measure: the RAE's own statistics are what is checked."""
    rae = tiny_rae()
    images = pixels(batch=32, seed=1)
    before = check_normalisation(rae, images, tol_mean=0.05, tol_std=0.05)
    assert before["source"] == "inside the VAE (latents_mean/std)" and not before["ok"]
    assert len(before["per_channel_mean"]) == CHANNELS
    # Statistics measured on these images (on the raw tokens) make them pass, as a released RAE's do.
    raw = tiny_rae(stats=False)
    with torch.no_grad():
        tokens = raw.encode((images + 1) / 2).latent.double()
    mean, std = tokens.mean(dim=(0, 2, 3)), tokens.std(dim=(0, 2, 3), unbiased=False)
    fitted = AutoencoderRAE.from_config(
        {
            **rae.config,
            "latents_mean": mean.view(-1, 1, 1).tolist(),
            "latents_std": (std - 1e-5).view(-1, 1, 1).tolist(),
        }
    )
    state = {k: v for k, v in raw.state_dict().items() if k not in ("_latents_mean", "_latents_std")}
    fitted.load_state_dict(state, strict=False)
    after = check_normalisation(fitted.eval(), images, tol_mean=0.05, tol_std=0.05)
    assert after["ok"], (after["max_abs_mean"], after["max_abs_std_error"])


def test_detected_by_its_saved_class(tmp_path: Path):
    tiny_rae().save_pretrained(tmp_path / "neutral")
    spec = VaeSpec(str(tmp_path / "neutral"))
    assert spec.resolve_kind() == "rae"
    codec = LatentCodec.from_spec(spec)
    assert codec.family is FAMILIES["rae"]
    torch.testing.assert_close(codec.encode(pixels()), LatentCodec(tiny_rae()).encode(pixels()))


def test_siglip2_rae_cannot_be_built_with_the_locked_libraries():
    """Why there is no SigLIP-2 arm (docs/tokenizers.md): diffusers' AutoencoderRAE reaches for a
    ``vision_model`` attribute the locked transformers' SiglipVisionModel does not have. When this
    starts failing, the locked pair supports it and the arm can be added."""
    with pytest.raises(AttributeError, match="vision_model"):
        AutoencoderRAE(encoder_type="siglip2", **TINY)


def test_shift_by_latent_dimension():
    from fusedit.config import load_config
    from fusedit.flow import build_scheduler, schedule_shift, training_sigma_table
    from tests.conftest import TOY_CONFIG

    cfg = load_config(TOY_CONFIG, ["noise_scheduler.shift_base_dim=4096"])
    assert schedule_shift(cfg, 768 * 16 * 16) == pytest.approx(6.9282, abs=1e-4)
    assert schedule_shift(cfg, 768 * 32 * 32) == pytest.approx(13.8564, abs=1e-4)
    with pytest.raises(ValueError, match="needs the latent's size"):
        schedule_shift(cfg)
    # The derived shift transforms sigma exactly as the fixed one does.
    fixed = load_config(TOY_CONFIG, ["noise_scheduler.shift=6.928203230275509"])
    derived = training_sigma_table(build_scheduler(cfg, 768 * 16 * 16))
    torch.testing.assert_close(derived, training_sigma_table(build_scheduler(fixed)))
    plain = load_config(TOY_CONFIG, [])
    assert plain.noise_scheduler.shift_base_dim is None and schedule_shift(plain, 10**6) == plain.noise_scheduler.shift
    for bad, field in (
        (["noise_scheduler.shift_base_dim=0"], "noise_scheduler.shift_base_dim"),
        (["noise_scheduler.shift_base_dim=4096", "noise_scheduler.pretrained_model_name_or_path=x/y"], "use one"),
    ):
        with pytest.raises(ConfigError, match=field):
            load_config(TOY_CONFIG, bad)


def test_two_training_steps_a_preview_and_a_latent_cache_through_an_rae(quick_world: Path, tmp_path: Path) -> None:
    """train.py on the quick world with a tiny RAE as the frozen tokenizer: the DiT takes the 64
    channels at patch 1, the schedule is shifted by the latent's dimension, the preview decodes
    through the RAE, and a latent cache (one array per image, no posterior) trains as the images do."""
    folder = tmp_path / "rae"
    tiny_rae().save_pretrained(folder)
    tokenizer = {
        "vae.pretrained_model_name_or_path": str(folder),
        "model.patch_size": 1,
        "model.pos_embed_max_size": 8,  # 32 px / x4 / patch 1 = an 8-token side
        "noise_scheduler.shift_base_dim": 1024,  # 64 x 8 x 8 = 4096 numbers: 2 x the toy shift 1.0
    }
    info, losses = images_and_cache_runs(quick_world, tmp_path, tokenizer)
    assert info["latent_shape"] == [1, CHANNELS, 8, 8]
    config = json.loads((tmp_path / "images" / "2" / "model" / "config.json").read_text())
    assert config["in_channels"] == CHANNELS and config["out_channels"] == CHANNELS and config["patch_size"] == 1
    assert list((tmp_path / "images" / "samples").glob("*2*.png"))
    assert len(losses["images"]) == 2 and losses["cache"] == pytest.approx(losses["images"], rel=1e-5)


def test_a_resolution_the_rae_does_not_serve_is_one_error(tmp_path: Path) -> None:
    config = ROOT / "configs" / "e2e-vae" / "sa-w2048-3b-res256-raedinov2b-fulldataset-500k.yaml"
    cmd = [sys.executable, str(ROOT / "train.py"), "-c", str(config), "--dry-run", "data.resolution=512"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and last.startswith("error: data.resolution: 512")
    assert "256 px only" in last


@pytest.mark.parametrize(
    ("name", "image_tokens", "shift"),
    [
        ("sa-w2048-3b-res256-raedinov2b-fulldataset-500k", 256, 6.93),
        ("sa-w2048-3b-res512-raedinov2b-200k", 1024, 13.86),
    ],
)
def test_the_rae_arms_plan_offline(name: str, image_tokens: int, shift: float) -> None:
    """The plans' figures come from a meta build of the released architecture (encoder + ViT-XL decoder)."""
    from fusedit.config import load_config
    from fusedit.tools.plan import RAE_DINOV2_B, build_plan

    with torch.device("meta"):
        rae = AutoencoderRAE(**RAE_DINOV2_B)
    params = sum(p.numel() for p in rae.parameters())
    assert params == 501_638_656  # 86,582,016 frozen DINOv2-B + 415,056,640 ViT-XL decoder
    plan = build_plan(load_config(ROOT / "configs" / "e2e-vae" / f"{name}.yaml"), world_size=32)
    t = plan.tokens
    assert (t.image_tokens, t.latent_channels, t.patch_size) == (image_tokens, 768, 1)
    assert t.schedule_shift == pytest.approx(shift, abs=5e-3) and t.shift_rule.startswith("1 x sqrt(")
    assert plan.component("VAE").frozen == params
    assert plan.component("DiT").trainable == 2_663_375_104  # 2 x (768 - 64) x 2,048 + 704 more than FLUX.1's
