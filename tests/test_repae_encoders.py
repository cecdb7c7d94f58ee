"""Frozen REPA encoders (docs/reference-facts.md, REPAE-3) and the toy world's semantic encoder.

No network: hub architectures are built with ``pretrained=False`` (real weights only matter for
numbers we cannot check offline), big ones on the meta device where only shapes matter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from repae import encoders as enc
from repae import toy
from toyworld import labels as toy_labels

# REPAE-3: z_dim of every encoder.
SPEC_DIMS = {
    "dinov2-vit-s": 384,
    "dinov2-vit-b": 768,
    "dinov2-vit-l": 1024,
    "dinov2-vit-g": 1536,
    "dinov2-vit-b-reg": 768,
    "dinov1-vit-b": 768,
    "clip-vit-L": 1024,
    "mae-vit-l": 1024,
    "jepa-vit-h": 1280,
    "mocov3-vit-s": 384,
    "mocov3-vit-b": 768,
    "mocov3-vit-l": 1024,
}


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=generator, dtype=torch.uint8)


def _expected_input(images: torch.Tensor, mean, std, size: int) -> torch.Tensor:
    """Reference preprocessing written out: x/255, normalise, bicubic resize without antialias."""
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)


# --------------------------------------------------------------------------------------------
# The REPAE-3 table
# --------------------------------------------------------------------------------------------
def test_timm_names_exist():
    import timm

    pretrained, architectures = set(timm.list_models(pretrained=True)), set(timm.list_models())
    for name, recipe in enc.ENCODERS.items():
        assert recipe.timm_name in architectures, name
        if recipe.hub_name is not None:
            assert recipe.hub_name in pretrained, name
    assert enc.ENCODERS["mocov3-vit-b"].hub_name is None  # no published timm weights: checkpoint only


def test_dims_tokens_and_preprocessing_follow_the_spec_table():
    for spec, dim in SPEC_DIMS.items():
        assert enc.encoder_dim(spec) == dim, spec
        with torch.device("meta"):
            encoder = enc.load_encoder(spec, 256, pretrained=False)
        assert encoder.num_tokens == 256, spec
    recipes = enc.ENCODERS
    assert recipes["dinov2-vit-b"].resize and not recipes["dinov2-vit-b"].resize_first  # normalise, then resize
    assert recipes["clip-vit-L"].resize and recipes["clip-vit-L"].resize_first  # resize, then normalise
    assert recipes["clip-vit-L"].mean == enc.CLIP_MEAN and recipes["clip-vit-L"].std == enc.CLIP_STD
    assert not recipes["clip-vit-L"].final_norm and not recipes["mae-vit-l"].final_norm  # no ln_post / no norm
    assert recipes["dinov2-vit-b"].final_norm and recipes["jepa-vit-h"].final_norm
    for name in ("mae-vit-l", "dinov1-vit-b", "mocov3-vit-s"):
        assert not recipes[name].resize and recipes[name].mean == enc.IMAGENET_MEAN, name


def test_spec_names_aliases_and_unknown():
    assert enc.resolve_spec("dinov2reg-vit-b") == "dinov2-vit-b-reg"  # the reference's spelling
    assert enc.resolve_spec(" CLIP-ViT-L ") == "clip-vit-L"
    with pytest.raises(ValueError, match="dinov2-vit-b.*clip-vit-L.*local:"):
        enc.load_encoder("dinov3-vit-b")
    with pytest.raises(ValueError, match="multiple of"):
        enc.load_encoder("dinov2-vit-s", resolution=100, pretrained=False)
    with pytest.raises(ValueError, match="checkpoint"):
        enc.load_encoder("mocov3-vit-s")


def test_load_encoders_accepts_lists_and_comma_strings():
    assert enc.split_specs(" dinov2-vit-b , clip-vit-L,") == ["dinov2-vit-b", "clip-vit-L"]
    assert enc.split_specs("none") == [] and enc.split_specs("") == []
    with torch.device("meta"):
        loaded = enc.load_encoders("dinov2-vit-s,mae-vit-l", resolution=256, pretrained=False)
    assert [e.name for e in loaded] == ["dinov2-vit-s", "mae-vit-l"]
    assert [e.embed_dim for e in loaded] == [384, 1024]


# --------------------------------------------------------------------------------------------
# Real forwards (random weights)
# --------------------------------------------------------------------------------------------
def test_dinov2_b_tokens_at_256():
    """(B,256,768): 224/14 = 16x16 final-norm patch tokens, CLS removed, preprocessing as specified."""
    encoder = enc.load_encoder("dinov2-vit-b", 256, pretrained=False)
    images = _images(1, 256)
    tokens = encoder(images)
    assert tokens.shape == (1, 256, 768) and tokens.dtype == torch.float32
    x = _expected_input(images, enc.IMAGENET_MEAN, enc.IMAGENET_STD, 224)
    torch.testing.assert_close(encoder.preprocess(images), x)
    with torch.no_grad():
        reference = encoder.model.forward_features(x)[:, 1:]  # timm's normed tokens minus CLS
    torch.testing.assert_close(tokens, reference)
    assert encoder.model.pos_embed.shape[1] == 1 + 256  # resampled once at build, not per call


def test_dinov2_registers_dropped_at_512():
    encoder = enc.load_encoder("dinov2-vit-s-reg", 512, pretrained=False)
    assert encoder.input_size == 448 and encoder.num_prefix_tokens == 5
    images = _images(1, 512)
    tokens = encoder(images)
    assert tokens.shape == (1, 1024, 384)
    with torch.no_grad():
        reference = encoder.model.forward_features(encoder.preprocess(images))[:, 5:]
    torch.testing.assert_close(tokens, reference)


def test_clip_l_shape_on_meta():
    with torch.device("meta"):
        encoder = enc.load_encoder("clip-vit-L", 256, pretrained=False)
        tokens = encoder(torch.zeros(2, 3, 256, 256, dtype=torch.uint8))
    assert tokens.shape == (2, 256, 1024)
    assert encoder.input_size == 224 and encoder.resize_first and not encoder.final_norm


# --------------------------------------------------------------------------------------------
# Local encoders, freezing, input checks
# --------------------------------------------------------------------------------------------
TINY_VIT = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "class_token": True}


def _tiny_folder(folder: Path, **config) -> Path:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, num_classes=0, **TINY_VIT)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    base = {"timm_kwargs": TINY_VIT, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": None, "final_norm": True}
    (folder / "encoder.json").write_text(json.dumps({**base, **config}))
    return folder


def test_local_encoder_is_frozen_and_safe_in_inference_mode(tmp_path):
    folder = _tiny_folder(tmp_path / "tiny", num_prefix_tokens=1)
    encoder = enc.load_encoder(f"local:{folder}", resolution=32)
    assert not any(p.requires_grad for p in encoder.parameters())
    torch.nn.Sequential(encoder).train()  # a parent switching to train mode must not reach it
    assert not encoder.training and not encoder.model.training
    images = _images(3, 32)
    with torch.inference_mode():
        in_inference = encoder(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = encoder(images)
    plain = encoder(images)
    assert plain.shape == (3, 64, 32) and not plain.requires_grad
    assert autocast.dtype == torch.float32 and in_inference.dtype == torch.float32
    torch.testing.assert_close(in_inference, plain)
    with pytest.raises(TypeError, match="uint8"):
        encoder(images.float())
    with pytest.raises(ValueError, match="expected images"):
        encoder(_images(1, 64))


def test_final_norm_flag_and_resize(tmp_path):
    with_norm = enc.load_encoder(f"local:{_tiny_folder(tmp_path / 'a')}", resolution=32)
    without = enc.load_encoder(f"local:{_tiny_folder(tmp_path / 'b', final_norm=False)}", resolution=32)
    images = _images(2, 32)
    raw = without(images)
    torch.testing.assert_close(with_norm(images), with_norm.model.norm(raw))
    assert not torch.allclose(raw, with_norm(images))
    resized = enc.load_encoder(f"local:{_tiny_folder(tmp_path / 'c', resize=16)}", resolution=32)
    x = _expected_input(images, [0.5] * 3, [0.5] * 3, 16)
    torch.testing.assert_close(resized.preprocess(images), x)
    assert resized(images).shape == (2, 16, 32)  # (16/4)^2 tokens, pos embed resampled from 8x8


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _mocov3_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A MoCo v3 release-style file: online ViT under module.base_encoder. at 224 px, plus noise."""
    import timm

    torch.manual_seed(1)
    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, num_heads=12)
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    state = {f"module.base_encoder.{k}": v for k, v in weights.items()}
    state["module.base_encoder.blocks.0.norm13.weight"] = state.pop("module.base_encoder.blocks.0.norm1.weight")
    state["module.base_encoder.head.0.weight"] = torch.zeros(4, 384)  # projector: dropped
    state["module.momentum_encoder.cls_token"] = torch.zeros(1, 1, 384)
    state["module.predictor.0.weight"] = torch.zeros(4, 4)
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state}, path)
    return weights


def test_mocov3_checkpoint_loads_strictly_with_resampled_pos_embed(tmp_path):
    from timm.layers import resample_abs_pos_embed

    path = tmp_path / "mocov3_vits.pth.tar"
    weights = _mocov3_checkpoint(path)
    encoder = enc.load_encoder("mocov3-vit-s", 256, checkpoint=path)
    loaded = encoder.model.state_dict()
    torch.testing.assert_close(loaded["blocks.0.norm1.weight"], weights["blocks.0.norm1.weight"])
    torch.testing.assert_close(loaded["blocks.11.mlp.fc2.weight"], weights["blocks.11.mlp.fc2.weight"])
    expected_pos = resample_abs_pos_embed(weights["pos_embed"], new_size=[16, 16], num_prefix_tokens=1)
    torch.testing.assert_close(loaded["pos_embed"], expected_pos)
    assert encoder(_images(1, 256)).shape == (1, 256, 384)


def test_checkpoint_mismatch_and_pickles_are_refused(tmp_path):
    folder = _tiny_folder(tmp_path / "tiny")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    missing = {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(RuntimeError, match=r"missing 1 \[blocks.0.attn.qkv.weight\]"):
        enc.load_encoder(f"local:{folder}", 32, checkpoint=tmp_path / "missing.safetensors")
    save_file({**state, "extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(RuntimeError, match=r"unexpected 1 \[extra.weight\]"):
        enc.load_encoder(f"local:{folder}", 32, checkpoint=tmp_path / "extra.safetensors")
    torch.save({"model": state, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only"):
        enc.load_encoder(f"local:{folder}", 32, checkpoint=tmp_path / "pickled.pth")
    with pytest.raises(FileNotFoundError):
        enc.load_encoder(f"local:{folder}", 32, checkpoint=tmp_path / "absent.pth")


def test_hub_weights_offline_give_an_actionable_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1.*checkpoint="):
        enc.load_encoder("dinov2-vit-s", 256, cache_dir=tmp_path / "empty-cache")


# --------------------------------------------------------------------------------------------
# The toy world
# --------------------------------------------------------------------------------------------
def test_toy_labels_are_mixed_radix():
    assert toy_labels.toy_num_classes("color+shape") == 24
    assert toy_labels.toy_num_classes("color+shape+position+background") == 360
    assert toy_labels.toy_label({"color": "red", "shape": "circle"}, "color+shape") == 0
    assert toy_labels.toy_label({"color": "orange", "shape": "square"}, "color+shape") == 1 * 4 + 1
    assert toy_labels.toy_label({"color": "orange", "shape": "square"}, "shape+color") == 1 * 6 + 1
    labels = {
        toy_labels.toy_label({"color": c, "shape": s}, "color + shape")
        for c in toy.TOY_ATTRIBUTES["color"]
        for s in toy.TOY_ATTRIBUTES["shape"]
    }
    assert labels == set(range(24))
    for bad in ("", "colour", "color+color"):
        with pytest.raises(ValueError):
            toy_labels.toy_num_classes(bad)
    with pytest.raises(ValueError, match="pink"):
        toy_labels.toy_label({"color": "pink"}, "color")


def test_flip_augmentation_mirrors_position():
    positions = toy.TOY_ATTRIBUTES["position"]
    mirrored = [positions[i] for i in toy._MIRRORED_POSITION]
    assert mirrored == ["center", "top right", "top left", "bottom right", "bottom left"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """Only the shards of a small world (no VAE / scorer training): all the encoder needs."""
    from toyworld.world import write_toy_data

    out = tmp_path_factory.mktemp("toy") / "world"
    write_toy_data(out, seed=0, num_train=1024, num_val=192, samples_per_shard=512, progress=False)
    return out


def test_toy_encoder_carries_semantics(toy_data):
    folder = toy.build_toy_encoder(toy_data, seed=0, quick=True, progress=False)
    assert folder == toy_data / "repae" / "encoder"
    report = json.loads((folder / "report.json").read_text())
    accuracy = report["val"]["accuracy"]  # held-out (colour, shape, position) triples
    # chance: colour 1/6, shape 1/4; a shortcut (colour, position) -> shape scores far below chance
    assert accuracy["color"] >= 0.9 and accuracy["shape"] >= 0.55, report
    encoder = enc.load_encoder(f"local:{folder}", resolution=32)
    from toyworld.world import load_images

    images, attributes = load_images(sorted((toy_data / "shards").glob("val-*.tar")))
    images = torch.from_numpy(images)
    assert encoder(images[:4]).shape == (4, 64, report["embed_dim"])
    again = toy.evaluate_toy_encoder(encoder, toy.load_toy_heads(folder), images, attributes)
    assert again["accuracy"] == accuracy  # the report describes the saved encoder
