"""The toy tokenizers of the other families (toyworld.families): built into a world, loaded like
released ones, normalised by their own statistics, and trained on by their toy configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, launch, tiny_train_overrides


@pytest.fixture(scope="module")
def family_world(quick_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the quick world with its toy FLUX.2 VAE and toy RAE (quick budgets)."""
    from toyworld.families import build_toy_families

    world = tmp_path_factory.mktemp("families") / "world"
    shutil.copytree(quick_world, world, ignore=shutil.ignore_patterns("repae", "latents", "text-features"))
    build_toy_families(world, progress=False)
    return world


def test_families_are_built_recorded_and_reused(family_world: Path) -> None:
    from toyworld.families import build_toy_families

    world = json.loads((family_world / "world.json").read_text())
    record = world["families"]
    assert set(record) == {"flux2-vae", "rae"}
    assert record["flux2-vae"]["steps"] == world["request"]["steps"]["vae"]  # the toy VAE's budget
    stamp = (family_world / "rae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert build_toy_families(family_world, progress=False) == record  # reused, not rebuilt
    assert (family_world / "rae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_each_loads_as_its_family_and_normalises_its_training_latents(family_world: Path) -> None:
    """Their statistics were measured on training images: the trainer's normalised latents there are
    zero-mean, unit-variance per channel (a loose tolerance: the quick builds use 512 images)."""
    from common.latent_stats import check_normalisation
    from common.vae_config import VaeSpec
    from fusedit.latents import LatentCodec
    from toyworld.world import load_images

    images, _ = load_images(sorted((family_world / "shards").glob("train-*.tar")))
    images = torch.from_numpy(images)[:256]
    expected = {"flux2-vae": ("flux2", 16, 8), "rae": ("rae", 64, 8)}
    for folder, (kind, channels, factor) in expected.items():
        codec = LatentCodec.from_spec(VaeSpec(str(family_world / folder)))
        assert (codec.family.kind, codec.latent_channels, codec.spatial_factor) == (kind, channels, factor)
        assert codec.latent_shape(1, 32, 32) == (1, channels, 4, 4)  # 16 tokens at DiT patch 1, as the toy VAE
        result = check_normalisation(codec.vae, images, tol_mean=0.2, tol_std=0.2)
        assert result["ok"], (folder, result["max_abs_mean"], result["max_abs_std_error"])


@pytest.mark.e2e
@pytest.mark.parametrize(("config", "folder"), [("toy-flux2.yaml", "flux2-vae"), ("toy-rae.yaml", "rae")])
def test_the_toy_configs_train_on_them(family_world: Path, tmp_path: Path, config: str, folder: str) -> None:
    run = tmp_path / "run"
    overrides = tiny_train_overrides(family_world, run, **{"trainer.max_steps": 2, "trainer.sampling_steps": 2})
    overrides = [o for o in overrides if not o.startswith("vae.pretrained_model_name_or_path=")]
    overrides.append(f"vae.pretrained_model_name_or_path={family_world / folder}")
    launch([str(ROOT / "train.py"), "-c", str(ROOT / "configs" / "e2e-vae" / config), *overrides], 1, 240, True)
    model = json.loads((run / "2" / "model" / "config.json").read_text())
    assert model["patch_size"] == 1 and model["in_channels"] == {"flux2-vae": 16, "rae": 64}[folder]
    assert list((run / "samples").glob("*2*.png"))
    # The exported diffusers folder names the family's class and samples as our sampler does.
    from fusedit.diffusers_pipeline import FuseDiTPipeline
    from fusedit.pipeline import DiTPipeline
    from fusedit.tools.export import main as export

    out = tmp_path / "pipeline"
    assert export(["--checkpoint", str(run), "--out", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"][1] == {"flux2-vae": "AutoencoderKLFlux2", "rae": "AutoencoderRAE"}[folder]
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=2.0, seed=3)
    theirs = FuseDiTPipeline.from_folder(out)(["a red circle"], output_type="pt", **kw).images
    ours = DiTPipeline.from_checkpoint(run, "latest")(["a red circle"], **kw)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
