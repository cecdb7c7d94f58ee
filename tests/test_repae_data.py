"""REPA-E data side: ImageNet-style preprocessing, the labelled loader, latent caching."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from repae import preprocess as pp
from repae.cache_latents import cache_latents
from repae.cache_latents import main as cache_main
from repae.data import LabeledImageLoader, label_fn, num_classes_for, split_member_name, toy_label, toy_num_classes
from toyworld.world import write_toy_data

RES = 16


# ----------------------------------------------------------------------------- fixtures


def _rgb(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synset folders of 8 random non-square JPEG/PNG images, plus one corrupt file."""
    root = tmp_path_factory.mktemp("imagenet")
    sizes = [(40, 24), (24, 50), (70, 33), (33, 33), (100, 31), (18, 40), (64, 48), (17, 17)]
    for c, synset in enumerate(["n003", "n001", "n002"]):
        (root / synset).mkdir()
        for i, size in enumerate(sizes):
            img = _rgb(size, 10 * c + i)
            if i % 2:
                img.save(root / synset / f"{synset}_{i}.JPEG", quality=90)
            else:
                img.save(root / synset / f"{synset}_{i}.png")
    (root / "n002" / "n002_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, dict]]:
    """Toy-world shards (32 px, 5 shards of 64) and each key's attributes."""
    out = tmp_path_factory.mktemp("toyworld")
    data = write_toy_data(out, seed=0, num_train=320, num_val=8, samples_per_shard=64, progress=False)
    attrs = {}
    for line in (out / "attributes.jsonl").read_text().splitlines():
        row = json.loads(line)
        attrs[row["key"]] = row
    return str(out / data["train_pattern"]), attrs


def _tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__'].decode()}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(seed: int, size: int = RES) -> bytes:
    buffer = io.BytesIO()
    _rgb((size, size), seed).save(buffer, format="PNG")
    return buffer.getvalue()


def _members(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = split_member_name(m.name)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _take(loader: LabeledImageLoader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        assert torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["images"], y["images"])


# ----------------------------------------------------------------------------- ADM crop


@pytest.mark.parametrize("size", [(40, 24), (24, 50), (200, 33), (16, 16), (9, 12), (1000, 64)])
def test_adm_crop_is_square_at_resolution(size: tuple[int, int]) -> None:
    assert pp.adm_center_crop(_rgb(size, 0), RES).size == (RES, RES)


def test_adm_crop_keeps_the_centre_of_a_wide_image() -> None:
    """Three vertical bands, 96x32 at res 16: BOX-halved to 48x16, the crop is the green middle band exactly."""
    bands = np.zeros((32, 96, 3), dtype=np.uint8)
    bands[:, :32, 0] = 255
    bands[:, 32:64, 1] = 255
    bands[:, 64:, 2] = 255
    crop = np.asarray(pp.adm_center_crop(Image.fromarray(bands), RES))
    assert crop.shape == (RES, RES, 3)
    assert (crop == np.array([0, 255, 0], dtype=np.uint8)).all()


def test_adm_crop_keeps_the_centre_of_a_tall_image_through_bicubic() -> None:
    """24x72 at res 16: no halving, bicubic to 16x48, rows 16..31 = the middle third (offsets floored)."""
    bands = np.zeros((72, 24, 3), dtype=np.uint8)
    bands[:24, :, 0] = 255
    bands[24:48, :, 1] = 255
    bands[48:, :, 2] = 255
    crop = np.asarray(pp.adm_center_crop(Image.fromarray(bands), RES)).astype(int)
    assert crop.shape == (RES, RES, 3)
    inner = crop[2:-2]  # away from the band edges that bicubic blends
    assert (inner[..., 1] == 255).all() and (inner[..., 0] == 0).all() and (inner[..., 2] == 0).all()
    assert crop[..., 1].mean() > 230


def test_adm_crop_box_halves_then_bicubic() -> None:
    """The reference recipe, step by step: 70x33 at 16 -> BOX to 35x16 (33 >= 32), BICUBIC scale 1, crop x 9."""
    img = _rgb((70, 33), 3)
    half = img.resize((35, 16), resample=Image.Resampling.BOX)
    expected = np.asarray(half)[:, 9:25]
    assert np.array_equal(np.asarray(pp.adm_center_crop(img, RES)), expected)


# ----------------------------------------------------------------------------- preprocess


def test_preprocess_shards_labels_and_corrupt(imagenet: Path, tmp_path: Path) -> None:
    manifest = pp.preprocess(imagenet, tmp_path, resolution=RES, num_workers=0, shard_size=10, progress=False)
    assert manifest["count"] == 24 and manifest["skipped_corrupt"] == 1
    assert manifest["corrupt"][0]["source"] == "n002/n002_broken.JPEG"
    assert manifest["shards"] == [f"imagenet-{k:06d}.tar" for k in range(3)]  # 25 sources / 10
    assert json.loads((tmp_path / "classes.json").read_text()) == ["n001", "n002", "n003"]
    assert manifest["relative_pattern"] == "imagenet-{000000..000002}.tar"
    samples: dict[str, dict[str, bytes]] = {}
    for name in manifest["shards"]:
        samples.update(_members(tmp_path / name))
    assert len(samples) == 24
    sources = pp.list_images(imagenet)
    for key, sample in samples.items():
        assert set(sample) == {"png", "cls", "json"}
        meta = json.loads(sample["json"])
        assert sources[int(key.removeprefix("img"))] == meta["source"]
        assert int(sample["cls"].decode("ascii")) == ["n001", "n002", "n003"].index(meta["class"])
        assert meta["source"].startswith(meta["class"] + "/")
        with Image.open(imagenet / meta["source"]) as src:
            expected = np.asarray(pp.adm_center_crop(src.convert("RGB"), RES))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), expected)  # lossless
    assert manifest["pattern"].endswith("imagenet-{000000..000002}.tar")
    assert num_classes_for("cls", manifest["pattern"]) == 3


def test_preprocess_pool_output_is_identical(imagenet: Path, tmp_path: Path) -> None:
    a = pp.preprocess(imagenet, tmp_path / "a", resolution=RES, num_workers=0, shard_size=7, fmt="jpg", progress=False)
    pp.preprocess(imagenet, tmp_path / "b", resolution=RES, num_workers=2, shard_size=7, fmt="jpg", progress=False)
    for name in a["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert set(_members(tmp_path / "a" / a["shards"][0])["img00000000"]) == {"jpg", "cls", "json"}


def test_preprocess_dataset_json_labels_and_max_images(imagenet: Path, tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for i in range(4):
        _rgb((20, 30), i).save(root / f"{i}.png")
    (root / "dataset.json").write_text(json.dumps({"labels": [[f"{i}.png", 7 - i] for i in range(4)]}))
    manifest = pp.preprocess(root, tmp_path / "out", resolution=RES, num_workers=0, max_images=3, progress=False)
    samples = _members(tmp_path / "out" / manifest["shards"][0])
    assert manifest["count"] == 3 and manifest["labels_from"] == "dataset.json"
    assert [int(samples[f"img{i:08d}"]["cls"]) for i in range(3)] == [7, 6, 5]


def test_preprocess_killed_run_leaves_no_partial_shard(imagenet: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "imagenet-000000.tar.tmp").write_bytes(b"stale garbage of an earlier crash")
    real, calls = pp.encode_sample, {"n": 0}

    def dies_in_second_shard(job, source):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt  # the run is killed while shard 1 is being written
        return real(job, source)

    monkeypatch.setattr(pp, "encode_sample", dies_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(imagenet, out, resolution=RES, num_workers=0, shard_size=10, progress=False)
    assert (out / "imagenet-000000.tar").is_file() and not (out / "imagenet-000000.tar.tmp").exists()
    assert not (out / "imagenet-000001.tar").exists() and (out / "imagenet-000001.tar.tmp").exists()
    first = (out / "imagenet-000000.tar").stat()

    calls["n"] = -1000
    manifest = pp.preprocess(imagenet, out, resolution=RES, num_workers=0, shard_size=10, progress=False)
    assert calls["n"] == -1000 + 15  # only shards 1 and 2 (10 + 5 sources) were encoded again
    assert (out / "imagenet-000000.tar").stat().st_mtime_ns == first.st_mtime_ns
    assert not list(out.glob("*.tmp"))
    assert manifest["count"] == 24 and manifest["skipped_corrupt"] == 1  # shard 0's record kept
    reference = pp.preprocess(
        imagenet, tmp_path / "clean", resolution=RES, num_workers=0, shard_size=10, progress=False
    )
    for name in reference["shards"]:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


# ----------------------------------------------------------------------------- labels


def test_toy_label_rule_values() -> None:
    attrs = {"color": "orange", "shape": "square", "position": "top right", "background": "black"}
    assert toy_label(attrs, "color+shape") == 1 * 4 + 1
    assert toy_label(attrs, "toy:shape+color") == 1 * 6 + 1
    assert toy_label(attrs, "color+shape+position+background") == ((1 * 4 + 1) * 5 + 2) * 3 + 2
    assert toy_label({"color": "purple", "shape": "cross"}, "color+shape") == 23
    assert toy_num_classes("color+shape") == 24 and num_classes_for("toy:color+shape+position") == 120
    assert label_fn("toy:color")({"json": json.dumps(attrs).encode()}) == 1
    assert label_fn("cls")({"cls": b"417"}) == 417
    for bad in ("toy:colour", "toy:color+color", "toy:", "class"):
        with pytest.raises(ValueError):
            label_fn(bad)


def test_split_member_name_matches_webdataset() -> None:
    from webdataset.tariterators import base_plus_ext

    for name in ["a.b", "d/a.b.c", ".x", "d/.x", "x.y/.z", "noext", "a/b.c/d", "x.y/z.w.v", "a/b..c", "A.JPG"]:
        key, ext = split_member_name(name)
        ref_key, ref_ext = base_plus_ext(name)
        assert key == ref_key and (key is None or ext == ref_ext)


# ----------------------------------------------------------------------------- loader


def test_loader_batches_and_toy_labels(toy_shards) -> None:
    pattern, attrs = toy_shards
    loader = LabeledImageLoader(pattern, batch_size=8, resolution=32, label="toy:color+shape", num_workers=0)
    assert loader.num_samples == 320 and loader.steps_per_epoch == 40 and loader.num_classes == 24
    for batch in _take(loader, 3):
        assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.uint8
        assert batch["labels"].dtype == torch.int64
        expected = [toy_label(attrs[k], "color+shape") for k in batch["keys"]]
        assert batch["labels"].tolist() == expected
    upscaled = _take(LabeledImageLoader(pattern, batch_size=4, resolution=48, label="toy:shape", num_workers=0), 1)
    assert upscaled[0]["images"].shape == (4, 3, 48, 48)


def test_loader_ranks_are_disjoint_and_cover_the_epoch(toy_shards) -> None:
    pattern, attrs = toy_shards
    world, batch = 3, 8
    seen: list[list[str]] = []
    for rank in range(world):
        loader = LabeledImageLoader(
            pattern, batch_size=batch, resolution=32, label="toy:color", rank=rank, world_size=world, num_workers=0
        )
        assert loader.steps_per_epoch == 320 // 3 // 8
        batches = _take(loader, 2 * loader.steps_per_epoch)
        epoch0 = [k for b in batches[: loader.steps_per_epoch] for k in b["keys"]]
        epoch1 = [k for b in batches[loader.steps_per_epoch :] for k in b["keys"]]
        assert len(set(epoch0)) == len(epoch0) and epoch0 != epoch1  # no repeats in an epoch; reshuffled
        seen.append(epoch0)
    union = set().union(*seen)
    assert len(union) == sum(len(s) for s in seen) == 3 * 13 * 8  # disjoint
    assert union <= set(k for k in attrs if k.startswith("train"))
    # the global batch is 3 x 8 = 24: 13 steps use 312 rows, N mod 24 = 8 are left out of the epoch
    assert 320 - len(union) == 320 % 24


def _global(pattern: str, world: int, workers: int, n: int, global_batch: int = 8, **kw) -> list[dict]:
    """Global batches 0..n-1 read by ``world`` ranks: every rank's part in rank order, joined."""
    ranks = [
        iter(LabeledImageLoader(pattern, batch_size=global_batch // world, resolution=32, label="toy:color",
                                rank=r, world_size=world, num_workers=workers, seed=3, **kw))
        for r in range(world)
    ]  # fmt: skip
    out = []
    for _ in range(n):
        parts = [next(it) for it in ranks]
        joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if isinstance(parts[0][k], torch.Tensor)}
        out.append({**joined, "keys": [k for p in parts for k in p["keys"]]})
    return out


@pytest.mark.parametrize(("world", "workers"), [(2, 1), (4, 2)])
def test_global_batches_do_not_depend_on_world_size_or_workers(toy_shards, world: int, workers: int) -> None:
    """Global batch b holds the same samples in the same order for 1, 2 or 4 ranks and 0-2 workers,
    across an epoch boundary (320 rows, global batch 8: 40 steps per epoch)."""
    pattern, _ = toy_shards
    _same(_global(pattern, world, workers, 42), _global(pattern, 1, 0, 42))


def test_resume_at_another_world_size_continues_exactly(toy_shards) -> None:
    """A position saved by 2 ranks continues on 1 (and one saved by 1 on 4) with exactly the batches
    an uninterrupted run reads: the position is the global batch index, saved identically by every rank."""
    pattern, _ = toy_shards
    straight = _global(pattern, 1, 0, 12)
    kw = dict(resolution=32, label="toy:color", seed=3, num_workers=0)
    two = [LabeledImageLoader(pattern, batch_size=4, rank=r, world_size=2, **kw) for r in range(2)]
    for loader in two:
        _take(loader, 5)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in two]
    assert states[0] == states[1] and states[0]["next_batch"] == 5 and states[0]["global_batch"] == 8
    one = LabeledImageLoader(pattern, batch_size=8, **kw)
    one.load_state_dict(states[0])
    _same(_take(one, 3), straight[5:8])
    four = [LabeledImageLoader(pattern, batch_size=2, rank=r, world_size=4, **kw) for r in range(4)]
    for loader in four:
        loader.load_state_dict(one.state_dict())
    parts = [_take(loader, 4) for loader in four]
    assert [k for b in range(4) for p in parts for k in p[b]["keys"]] == [k for b in straight[8:12] for k in b["keys"]]


def test_a_position_saved_by_the_per_rank_order(toy_shards, caplog) -> None:
    """Version 1 states (the order before the global one): one process's continue exactly (the two
    orders agree there); a multi-process one continues at the same epoch fraction, with a warning."""
    pattern, _ = toy_shards
    kw = dict(resolution=32, label="toy:color", seed=3, num_workers=0)
    straight = _global(pattern, 1, 0, 9)
    old = {**LabeledImageLoader(pattern, batch_size=8, **kw).state_dict(), "version": 1, "next_batch": 7, "step": 7}
    del old["global_batch"]
    loader = LabeledImageLoader(pattern, batch_size=8, **kw)
    loader.load_state_dict(old)
    _same(_take(loader, 2), straight[7:9])
    two = LabeledImageLoader(pattern, batch_size=4, rank=1, world_size=2, **kw)
    with caplog.at_level("WARNING"):
        two.load_state_dict({**old, "batch_size": 4, "world_size": 2})
    assert "per-rank order" in caplog.text and two.state_dict()["next_batch"] == 7


def test_loader_resumes_exactly(toy_shards) -> None:
    pattern, _ = toy_shards
    kwargs = dict(batch_size=8, resolution=32, label="toy:color+shape", seed=5, rank=1, world_size=2)
    straight = _take(LabeledImageLoader(pattern, num_workers=0, **kwargs), 24)  # crosses epoch 0 -> 1 at 20

    first = LabeledImageLoader(pattern, num_workers=0, **kwargs)
    _same(_take(first, 7), straight[:7])
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["next_batch"] == 7 and state["epoch"] == 0 and state["step"] == 7

    resumed = LabeledImageLoader(pattern, num_workers=0, **kwargs)
    it = iter(resumed)  # the trainers build the iterator before loading the state
    resumed.load_state_dict(state)
    _same([next(it) for _ in range(17)], straight[7:24])
    assert resumed.state_dict()["epoch"] == 1

    with_workers = LabeledImageLoader(pattern, num_workers=2, **kwargs)
    with_workers.load_state_dict(state)
    _same(_take(with_workers, 9), straight[7:16])  # any worker count gives the same stream


def test_loader_resume_checks(toy_shards) -> None:
    pattern, _ = toy_shards
    loader = LabeledImageLoader(pattern, batch_size=8, resolution=32, label="toy:color", num_workers=0)
    state = {**loader.state_dict(), "seed": 1}
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict(state)
    other = {**loader.state_dict(), "next_batch": 50, "epoch": 1, "step": 10, "global_batch": 16, "steps_per_epoch": 20}
    loader.load_state_dict(other)  # another global batch: same epoch, same fraction of it
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step"] == 20


def test_loader_skips_corrupt_samples(tmp_path: Path) -> None:
    good = [{"__key__": f"a{i:03d}".encode(), "png": _png(i), "cls": str(i % 3).encode()} for i in range(12)]
    bad_image = {"__key__": b"bad_image", "png": b"\x89PNG\r\n\x1a\n garbage", "cls": b"1"}
    no_label = {"__key__": b"no_label", "png": _png(99)}
    bad_label = {"__key__": b"bad_label", "png": _png(98), "cls": b"one"}
    _tar(tmp_path / "s-000000.tar", good[:6] + [bad_image, no_label, bad_label] + good[6:])
    tail = [{"__key__": f"b{i:03d}".encode(), "png": _png(100 + i, 64), "cls": b"2"} for i in range(6)]
    _tar(tmp_path / "s-000001.tar", tail)
    full = (tmp_path / "s-000001.tar").stat().st_size
    with open(tmp_path / "s-000001.tar", "r+b") as f:
        f.truncate(full // 2)  # a copy interrupted half-way
    (tmp_path / "s-000002.tar").write_bytes(b"this is not a tar file at all" * 40)

    loader = LabeledImageLoader(
        str(tmp_path / "s-{000000..000002}.tar"), batch_size=4, resolution=RES, num_workers=0, seed=1
    )
    assert loader.skipped >= 3  # missing label, bad label, the broken tails
    assert 12 < loader.num_samples < 12 + 6 + 1  # only complete samples of the truncated shard survive
    before = loader.skipped
    keys = [k for b in _take(loader, 3 * loader.steps_per_epoch) for k in b["keys"]]
    assert "bad_image" not in keys and "no_label" not in keys and "bad_label" not in keys
    assert loader.skipped > before  # the undecodable image was met and refilled
    batch = _take(loader, 1)[0]
    assert batch["images"].shape == (4, 3, RES, RES)
    # every world size meets the same corrupt images (counted once, by the rank that met them)
    # and takes the same replacements
    shards, n = str(tmp_path / "s-{000000..000002}.tar"), 3 * loader.steps_per_epoch
    one = LabeledImageLoader(shards, batch_size=4, resolution=RES, num_workers=0, seed=1)
    two = [LabeledImageLoader(shards, batch_size=2, resolution=RES, num_workers=0, seed=1, rank=r, world_size=2)
           for r in range(2)]  # fmt: skip
    indexed = one.skipped
    batches, parts = _take(one, n), [_take(ld, n) for ld in two]
    assert [k for b in batches for k in b["keys"]] == [k for b in range(n) for p in parts for k in p[b]["keys"]]
    assert sum(ld.skipped - indexed for ld in two) == one.skipped - indexed > 0


def test_loader_rejects_streams_and_tiny_data(toy_shards) -> None:
    pattern, _ = toy_shards
    with pytest.raises(ValueError, match="local"):
        LabeledImageLoader("pipe:cat x.tar", batch_size=2, resolution=32)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        LabeledImageLoader(pattern, batch_size=200, resolution=32, label="toy:color", world_size=2, num_workers=0)


# ----------------------------------------------------------------------------- latents


class _StandInVAE(torch.nn.Module):
    """A tiny diffusers AutoencoderKL behind the TrainableVAE interface (encode -> mean/std)."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        self.vae = AutoencoderKL(
            block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=3,
            layers_per_block=1,
            norm_num_groups=4,
        )

    def encode(self, x: torch.Tensor):
        dist = self.vae.encode(x).latent_dist
        return type("Posterior", (), {"mean": dist.mean, "std": dist.std})()


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    try:
        from repae.vae import TrainableVAE

        return TrainableVAE(_StandInVAE().vae)
    except ImportError:
        return _StandInVAE()


def _direct_posteriors(vae, pattern: str, label: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    loader = LabeledImageLoader(pattern, batch_size=64, resolution=32, label=label, num_workers=0)
    out = {}
    with torch.no_grad():
        for batch in _take(loader, loader.steps_per_epoch):
            post = vae.eval().encode(batch["images"].float() / 127.5 - 1)
            for i, key in enumerate(batch["keys"]):
                out[key] = (post.mean[i], post.std[i])
    return out


def test_cache_latents_files_stats_and_resume(toy_shards, vae, tmp_path: Path, monkeypatch) -> None:
    pattern, attrs = toy_shards
    out = tmp_path / "lat"
    cache_latents(
        vae, pattern, out, resolution=32, batch_size=24, label="toy:color", rank=1, world_size=2, progress=False
    )
    assert sorted(p.name for p in out.glob("*.json")) == ["train-000001.json", "train-000003.json"]
    assert not (out / "stats.json").exists()  # rank 0 has not run yet
    cache_latents(
        vae, pattern, out, resolution=32, batch_size=24, label="toy:color", rank=0, world_size=2, progress=False
    )
    assert (out / "stats.json").exists()

    direct = _direct_posteriors(vae, pattern, "toy:color")
    tensors = load_file(str(out / "train-000002.safetensors"))
    keys = json.loads((out / "train-000002.json").read_text())
    assert keys == [f"train_{i:07d}" for i in range(128, 192)]  # shard order
    assert tensors["mean"].shape == (64, 3, 16, 16) and tensors["mean"].dtype == torch.float32
    assert tensors["labels"].tolist() == [toy_label(attrs[k], "color") for k in keys]
    for row, key in enumerate(keys[:5]):
        assert torch.allclose(tensors["mean"][row], direct[key][0], atol=1e-5)
        assert torch.allclose(tensors["std"][row], direct[key][1], atol=1e-5)

    means = torch.stack([m for m, _ in direct.values()]).double()
    stds = torch.stack([s for _, s in direct.values()]).double()
    mu = means.mean(dim=(0, 2, 3))
    var = (means**2 + stds**2).mean(dim=(0, 2, 3)) - mu**2
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_samples"] == 320 and stats["latent_shape"] == [3, 16, 16]
    assert np.allclose(stats["mean"], mu.numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(stats["std"], var.sqrt().numpy(), rtol=1e-5, atol=1e-6)
    z = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert np.allclose(stats["std"], z.std(dim=(0, 2, 3)).numpy(), rtol=0.02)  # it is the std of samples
    scale_bias = load_file(str(out / "latents_stats.safetensors"))
    assert torch.allclose(scale_bias["latents_scale"].flatten(), 1 / torch.tensor(stats["std"]).float())

    monkeypatch.setattr(vae, "encode", lambda x: (_ for _ in ()).throw(AssertionError("re-encoded")))
    cache_latents(vae, pattern, out, resolution=32, batch_size=24, label="toy:color", progress=False)  # all done
    with pytest.raises(AssertionError, match="re-encoded"):  # another label rule is not reused
        cache_latents(vae, pattern, out, resolution=32, batch_size=24, label="toy:shape", progress=False)


def test_loader_pairs_latents_by_key(toy_shards, vae, tmp_path: Path) -> None:
    pattern, _ = toy_shards
    out = cache_latents(vae, pattern, tmp_path / "lat", resolution=32, batch_size=64, label="toy:color", progress=False)
    # Scramble the cache: rows reversed inside one file, and two shards' files swapped by name.
    for stem in ("train-000000", "train-000004"):
        t, keys = load_file(str(out / f"{stem}.safetensors")), json.loads((out / f"{stem}.json").read_text())
        order = list(range(len(keys)))[::-1]
        save_file(
            {k: v[order] if v.dim() and v.shape[0] == len(keys) else v for k, v in t.items()},
            str(out / f"{stem}.safetensors"),
            metadata={"label": "toy:color"},
        )
        (out / f"{stem}.json").write_text(json.dumps([keys[i] for i in order]))
    for ext in (".safetensors", ".json"):
        os.replace(out / f"train-000001{ext}", out / f"tmp{ext}")
        os.replace(out / f"train-000003{ext}", out / f"train-000001{ext}")
        os.replace(out / f"tmp{ext}", out / f"train-000003{ext}")

    loader = LabeledImageLoader(
        pattern, batch_size=16, resolution=32, label="toy:color", latents_dir=str(out), num_workers=0
    )
    direct = _direct_posteriors(vae, pattern, "toy:color")
    for batch in _take(loader, 6):
        assert batch["latent_mean"].shape == (16, 3, 16, 16) and batch["latent_std"].dtype == torch.float32
        for i, key in enumerate(batch["keys"]):
            assert torch.allclose(batch["latent_mean"][i], direct[key][0], atol=1e-5)
            assert torch.allclose(batch["latent_std"][i], direct[key][1], atol=1e-5)


def test_cache_latents_cli(toy_shards, tmp_path: Path, monkeypatch) -> None:
    from diffusers import AutoencoderKL

    pattern, _ = toy_shards
    folder = tmp_path / "vae"
    AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
    ).save_pretrained(folder)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "lat"
    cache_main(
        [
            "--vae",
            str(folder),
            "--shards",
            pattern,
            "--out",
            str(out),
            "--resolution",
            "32",
            "--batch-size",
            "64",
            "--label",
            "toy:shape",
            "--fp16",
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    tensors = load_file(str(out / "train-000004.safetensors"))
    assert tensors["mean"].dtype == torch.float16 and tensors["mean"].shape == (64, 4, 32, 32)
    assert json.loads((out / "stats.json").read_text())["num_samples"] == 320


@pytest.mark.multiprocess
def test_cache_latents_under_torchrun(toy_shards, tmp_path: Path) -> None:
    """Two ranks, each writing its own shards; rank 0 merges the statistics after the barrier."""
    import subprocess
    import sys

    from diffusers import AutoencoderKL

    pattern, _ = toy_shards
    folder = tmp_path / "vae"
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
    ).save_pretrained(folder)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    args = ["--vae", str(folder), "--shards", pattern, "--resolution", "32", "--batch-size", "64"]
    args += ["--label", "toy:shape", "--num-workers", "0", "--no-progress"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*launcher, "-m", "repae.cache_latents", *args, "--out", str(tmp_path / "two")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    subprocess.run(
        [sys.executable, "-m", "repae.cache_latents", *args, "--out", str(tmp_path / "one")],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    two, one = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("two", "one"))
    assert two["num_samples"] == one["num_samples"] == 320
    assert np.allclose(two["mean"], one["mean"], rtol=1e-6) and np.allclose(two["std"], one["std"], rtol=1e-6)
    for k in range(5):
        a = load_file(str(tmp_path / "two" / f"train-00000{k}.safetensors"))
        b = load_file(str(tmp_path / "one" / f"train-00000{k}.safetensors"))
        assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["labels"], b["labels"])
