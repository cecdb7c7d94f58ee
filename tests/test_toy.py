"""The toy world: data written by the real formats, models loadable by the real loaders.

Reads the session's quick world (``quick_world`` in conftest.py: built once, ~15-20 s on 2 cores).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dataset_download
from common.images import psnr
from toyworld import build, text_encoder
from toyworld import world as toy
from toyworld.scorer import ToyScorer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(quick_world: Path) -> tuple[Path, dict]:
    """(folder, world.json) of the session's quick world, built with seed 0."""
    summary = json.loads((quick_world / "world.json").read_text())
    assert summary["request"]["seed"] == 0 and summary["request"]["quick"]
    return quick_world, summary


def _shard_paths(out: Path, split: str) -> list[Path]:
    return sorted((out / "shards").glob(f"{split}-*.tar"))


def _all_captions(out: Path) -> list[str]:
    captions = []
    for sample in toy.read_shard_samples(_shard_paths(out, "train") + _shard_paths(out, "val")):
        captions += [sample["txt"].decode(), sample["short.txt"].decode()]
    for name in ("heldout.json", "val.json"):
        captions += [p["prompt"] for p in json.loads((out / "prompts" / name).read_text())]
    return captions


def test_shards_readable_with_webdataset(world):
    import webdataset as wds

    out, summary = world
    for split, pattern, count in [
        ("train", summary["train_pattern"], summary["counts"]["train"]),
        ("val", summary["val_pattern"], summary["counts"]["val"]),
    ]:
        samples = list(wds.WebDataset(str(out / pattern), shardshuffle=False).decode("pil"))
        assert len(samples) == count, split
        for sample in samples[:16]:
            assert {"jpg", "txt", "short.txt", "json"} <= set(sample)
            assert sample["jpg"].size == (32, 32) and sample["jpg"].mode == "RGB"
            attrs = sample["json"]
            assert sample["txt"] == toy.caption(attrs, toy.TEMPLATES.index(_template_of(sample["txt"])))
            assert sample["short.txt"] == f"{attrs['color']} {attrs['shape']}"
    manifest = (out / "attributes.jsonl").read_text().splitlines()
    assert len(manifest) == summary["counts"]["train"] + summary["counts"]["val"]


def _template_of(text: str) -> str:
    """The template a caption came from (templates differ in their fixed words)."""
    for template in toy.TEMPLATES:
        pattern = re.escape(template)
        for field in ("color", "shape", "pos", "background"):
            pattern = pattern.replace(re.escape("{" + field + "}"), ".+")
        if re.fullmatch(pattern, text):
            return template
    raise AssertionError(f"caption matches no template: {text!r}")


def test_data_is_deterministic(world, tmp_path):
    """A second build with the same seed writes byte-identical shards, manifest and prompts.

    The rebuild writes only the data (no model training): the data must not depend on the
    model training that follows it, which this also checks.
    """
    out, summary = world
    request = summary["request"]
    kwargs = {k: request[k] for k in ("seed", "resolution", "num_train", "num_val", "samples_per_shard")}
    again = tmp_path / "again"
    toy.write_toy_data(again, progress=False, **kwargs)
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    files = sorted(p for p in files if p.parts[0] in ("shards", "prompts"))
    files.append(Path("attributes.jsonl"))
    assert len(files) >= 7
    for name in files:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other"
    toy.write_toy_data(other, progress=False, **{**kwargs, "seed": 1, "num_train": 8, "num_val": 8})
    assert (other / "shards/val-000000.tar").read_bytes() != (out / "shards/val-000000.tar").read_bytes()
    captions = list(toy.all_captions())
    first, second = text_encoder.build_tokenizer(captions), text_encoder.build_tokenizer(captions)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_tokenizer_covers_every_caption_word(world):
    from transformers import AutoTokenizer

    out, _ = world
    tokenizer = AutoTokenizer.from_pretrained(out / "text_encoder")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.padding_side == "right"
    captions = sorted(set(_all_captions(out)))
    words = sorted({w for c in captions for w in re.findall(r"\w+|[^\w\s]", c)})
    assert len(words) > 20
    for word in words:
        assert tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id, word
    batch = tokenizer(captions + [""], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[:, 0] == 2).all(), "BOS first"
    assert not (ids == tokenizer.unk_token_id).any()
    assert not (ids == tokenizer.eos_token_id).any(), "no EOS appended"
    assert (ids[mask == 0] == 0).all(), "pad id 0"
    assert (mask[:, :-1] >= mask[:, 1:]).all(), "right padding"
    assert mask[-1].sum() == 1, "an empty caption is just BOS"
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == captions[0].replace(",", " ,")


def test_text_encoder_loads_with_automodel(world):
    from transformers import AutoModel, AutoTokenizer

    out, summary = world
    tokenizer = AutoTokenizer.from_pretrained(out / "text_encoder")
    model = AutoModel.from_pretrained(out / "text_encoder").eval()
    assert type(model).__name__ == "GemmaModel"
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == (0, 1, 2)
    prompts = ["a red circle in the center on a white background", "blue cross"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
        alone = model(**tokenizer(prompts[1:], return_tensors="pt")).last_hidden_state
    assert len(hidden) == model.config.num_hidden_layers + 1
    assert hidden[-1].shape == (2, batch["input_ids"].shape[1], summary["text_encoder"]["hidden_size"])
    assert torch.isfinite(hidden[-1]).all()
    # right padding + causal attention: padding does not change the real tokens' features
    length = alone.shape[1]
    torch.testing.assert_close(hidden[-1][1, :length], alone[0], atol=1e-4, rtol=1e-4)


def test_vae_loads_and_reconstructs(world, record_property):
    from diffusers import AutoencoderKL

    out, summary = world
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    report = json.loads((out / "vae" / "report.json").read_text())
    images, _ = toy.load_images(_shard_paths(out, "val"))
    x = torch.from_numpy(images[:64]).float() / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mode()).sample
        z = (posterior.sample(torch.Generator().manual_seed(0)) - vae.config.shift_factor) * vae.config.scaling_factor
    assert z.shape == (64, 4, 8, 8)
    assert 0.5 < z.std().item() < 2.0 and abs(z.mean().item()) < 0.5, "normalised latents ~ unit variance"
    measured = psnr(x, recon).mean().item()
    record_property("vae_psnr_db", report["psnr_db"])
    print(f"toy VAE (quick build) reconstruction PSNR: {report['psnr_db']:.2f} dB")
    assert abs(measured - report["psnr_db"]) < 1.5
    assert report["psnr_db"] > 15.0, "even the quick VAE must beat a flat-background guess"
    assert summary["vae"]["psnr_db"] == report["psnr_db"]


def test_scorer_is_well_above_chance_on_heldout_images(world):
    out, summary = world
    scorer = ToyScorer.from_pretrained(out / "scorer")
    images, attributes = toy.load_images(_shard_paths(out, "val"))
    result = scorer.score(torch.from_numpy(images).float() / 127.5 - 1, attributes)
    assert result["n"] == len(attributes)
    assert result["chance"] == {k: 1 / len(v) for k, v in toy.ATTRIBUTES.items()}
    for name, accuracy in result["accuracy"].items():
        assert accuracy > result["chance"][name] + 0.1, (name, result)
    for name in ("color", "position", "background"):
        assert result["accuracy"][name] >= 0.8, (name, result)
    assert result["accuracy"] == pytest.approx(summary["scorer"]["heldout_clean"]["accuracy"], abs=1e-3)
    names = scorer.decode(scorer.predict(torch.from_numpy(images[:4]).float() / 127.5 - 1))
    assert set(names[0]) == set(toy.ATTRIBUTES)


def test_heldout_triples_never_in_training(world):
    out, summary = world
    heldout = {tuple(t) for t in summary["heldout_triples"]}
    assert len(heldout) == 12
    triple = lambda a: (a["color"], a["shape"], a["position"])
    train = [json.loads(s["json"]) for s in toy.read_shard_samples(_shard_paths(out, "train"))]
    val = [json.loads(s["json"]) for s in toy.read_shard_samples(_shard_paths(out, "val"))]
    assert not {triple(a) for a in train} & heldout
    assert {triple(a) for a in val} <= heldout
    for key in ("color", "shape", "position"):
        assert {a[key] for a in train} == set(toy.ATTRIBUTES[key]), key
    prompts = json.loads((out / "prompts" / "heldout.json").read_text())
    assert len(prompts) >= 40
    assert {triple(p) for p in prompts} == heldout
    assert all(p["prompt"] == toy.caption(p, toy.TEMPLATES.index(_template_of(p["prompt"]))) for p in prompts)
    val_prompts = json.loads((out / "prompts" / "val.json").read_text())
    assert len(val_prompts) == 8 and {p["heldout"] for p in val_prompts} == {True, False}


def test_existing_world_is_reused(world):
    """The same request on the same numeric path reuses the world; another request does not.

    Asked the way the session world was built (``dataset_download.py``, pinned): this test process
    computes on the machine's own kernels, and a world is never reused across numeric paths.
    """
    out, summary = world
    cmd = [sys.executable, str(ROOT / "dataset_download.py"), "--toy", str(out), "--quick"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    assert "(reused)" in proc.stdout, proc.stdout[-2000:]
    assert json.loads((out / "world.json").read_text())["build_seconds"] == summary["build_seconds"]
    changed = {**summary["request"], "seed": 1}
    assert build.existing_world(out, changed) is None
    assert build.existing_world(out, {**summary["request"], "numerics": "unpinned"}) is None


def test_download_skips_only_files_with_matching_size(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "done.tar").write_bytes(b"x" * 10)
    (tmp_path / "partial.tar").write_bytes(b"x" * 4)
    (tmp_path / "sub" / "meta.json").write_bytes(b"{}")
    remote = {"done.tar": 10, "partial.tar": 5, "missing.tar": 7, "sub/meta.json": 2}
    assert dataset_download.files_to_download(remote, tmp_path) == ["missing.tar", "partial.tar"]
    assert dataset_download.repo_local_dir("data", "BLIP3o/BLIP3o-Pretrain-Long-Caption") == Path(
        "data/BLIP3o-Pretrain-Long-Caption"
    )
    assert dataset_download.format_size(3 * 1024**3) == "3.0 GiB"
    help_text = dataset_download.build_parser().format_help()
    assert "--toy" in help_text and "--output-dir" in help_text and "--repos" in help_text


def test_text_encoder_tells_attribute_words_apart(quick_world: Path) -> None:
    """Captions that differ only in colour/shape/background words must give clearly different features.

    Regression: a next-token-trained toy encoder collapsed these words (2-5% relative difference),
    and a DiT conditioned on it generated images that ignored the prompt.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_world / "text_encoder")
    model = AutoModel.from_pretrained(quick_world / "text_encoder").eval()
    caps = ["a red circle in the center on a white background", "a blue square in the center on a black background"]
    batch = tok(caps, return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    rel = ((h[0] - h[1]).norm(dim=-1) / h[0].norm(dim=-1)).mean().item()
    assert rel > 0.2, rel
