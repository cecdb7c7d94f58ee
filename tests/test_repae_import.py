"""Importing a released reference experiment (args.json + pickled checkpoint) into our run layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 16, 16, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)


def _reference_experiment(root: Path, joint: bool = True) -> tuple[Path, dict, AutoencoderKL]:
    from repae.models.sit import SiT
    from repae.reference.convert import diffusers_to_ldm_vae

    args = {
        "model": "SiT-S/2",
        "vae": "f8d4",
        "resolution": 32,
        "enc_type": "dinov2-vit-b",
        "encoder_depth": 4,
        "num_classes": 10,
        "cfg_prob": 0.1,
        "qk_norm": False,
        "bn_momentum": 0.1,
        "vae_ckpt": "sdvae.pt",
    }
    torch.manual_seed(0)
    sit = SiT(
        input_size=4,
        in_channels=4,
        patch_size=2,
        hidden_size=384,
        depth=12,
        num_heads=6,
        num_classes=10,
        z_dims=(8,),
        encoder_depth=4,
    )
    with torch.no_grad():
        for p in sit.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        sit.bn.running_mean.fill_(0.3)
        sit.bn.running_var.fill_(2.0)
    vae = AutoencoderKL(**TINY_VAE)
    ckpt = {
        "model": sit.state_dict(),
        "ema": sit.state_dict(),
        "opt": {},
        "steps": 10,
        "args": argparse.Namespace(**args),
    }
    if joint:
        ckpt["vae"] = diffusers_to_ldm_vae(vae.state_dict(), 4)
    exp = root / "exp"
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "args.json").write_text(json.dumps(args))
    torch.save(ckpt, exp / "checkpoints" / "0000010.pt")
    return exp, sit.state_dict(), vae


def test_import_joint_experiment_then_sample_and_export(tmp_path: Path) -> None:
    from repae.checkpoint import load_sampling_bundle
    from repae.export import export_e2e_vae
    from repae.reference.import_reference import import_reference_run

    exp, sit_state, vae = _reference_experiment(tmp_path)
    folder = import_reference_run(exp, tmp_path / "run", vae_config=TINY_VAE, z_dims=[8])
    assert folder.name == "10" and (tmp_path / "run" / "latest").read_text().strip() == "10"
    bundle = load_sampling_bundle(tmp_path / "run")
    assert bundle.latent_shape == (4, 4, 4) and bundle.num_classes == 10 and bundle.resolution == 32
    for k, v in sit_state.items():
        assert torch.equal(bundle.sit.state_dict()[k], v), k
    for k, v in vae.state_dict().items():
        assert torch.equal(bundle.vae.vae.state_dict()[k], v), k
    images = bundle.decode(torch.zeros(2, 4, 4, 4))
    assert images.shape == (2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="--stats ema"):  # no config.yaml: no training images known
        export_e2e_vae(tmp_path / "run", tmp_path / "e2e")
    exported = AutoencoderKL.from_pretrained(export_e2e_vae(tmp_path / "run", tmp_path / "e2e", stats="ema"))
    assert torch.allclose(torch.tensor(exported.config.latents_mean), torch.full((4,), 0.3))
    assert torch.allclose(torch.tensor(exported.config.latents_std), torch.full((4,), (2.0 + 1e-4) ** 0.5))


def test_import_ldm_only_experiment_names_its_frozen_vae(tmp_path: Path) -> None:
    from repae.checkpoint import read_json
    from repae.reference.import_reference import import_reference_run

    exp, _, _ = _reference_experiment(tmp_path, joint=False)
    folder = import_reference_run(exp, tmp_path / "run", z_dims=[8])
    source = read_json(folder / "vae_source.json")
    assert source["name_or_path"] == "f8d4" and source["checkpoint"] == "sdvae.pt"
    assert read_json(folder / "trainer_state.json")["kind"] == "ldm"


def test_import_rejects_a_model_that_does_not_match_args(tmp_path: Path) -> None:
    import pytest

    from repae.reference.import_reference import import_reference_run

    exp, _, _ = _reference_experiment(tmp_path)
    args = json.loads((exp / "args.json").read_text())
    args["model"] = "SiT-B/2"  # same key names as SiT-S, other widths
    (exp / "args.json").write_text(json.dumps(args))
    with pytest.raises(ValueError, match="other shapes"):
        import_reference_run(exp, tmp_path / "run", vae_config=TINY_VAE, z_dims=[8])
