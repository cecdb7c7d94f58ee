"""The latent cache: same stream as the image shards, same training, clear refusals."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset import TarWriter

from common.config import ConfigError
from common.shards import TAR_MTIME
from common.vae_config import VaeSpec
from fusedit.config import load_config
from fusedit.data import latent_cache
from fusedit.data.webdata import LATENT_MEMBER, build_dataloader
from fusedit.latents import LatentCodec
from fusedit.tools.demo import toy_overrides
from tests.conftest import TOY_CONFIG, run_train, tiny_train_overrides


def _members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]


def _config(world: Path, *extra: str):
    return load_config(TOY_CONFIG, [*toy_overrides(world), *extra])


@pytest.fixture(scope="module")
def cache(quick_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    info = latent_cache.build_cache(_config(quick_world), out, batch_size=48, progress=False)
    assert info is not None and info["counts"]["undecodable"] == 0
    return out


def test_cache_keeps_every_sample_in_order_with_its_posterior(quick_world: Path, cache: Path) -> None:
    info = json.loads((cache / "cache.json").read_text())
    sources = info["sources"]
    assert info["shards"] == len(sources) and info["latent_shape"] == [2, 4, 8, 8]
    assert info["counts"]["samples"] == info["counts"]["encoded"] > 0
    codec = LatentCodec.from_spec(VaeSpec(str(quick_world / "vae")))
    cfg = _config(quick_world)
    transform = latent_cache._transform(cfg)
    src = _members(Path(sources[0]))
    out = _members(cache / latent_cache.shard_name(0))
    keys = [n.split(".", 1)[0] for n, _ in src if n.endswith(".jpg")]
    assert [n.split(".", 1)[0] for n, _ in out if n.endswith(LATENT_MEMBER)] == keys  # same samples, same order
    assert not any(n.endswith(".jpg") for n, _ in out)  # images replaced
    assert {n: b for n, b in src if n.endswith(".txt")} == {n: b for n, b in out if n.endswith(".txt")}
    with tarfile.open(cache / latent_cache.shard_name(0)) as tf:  # plain ustar members: cheap to read back
        assert all(m.mtime == TAR_MTIME and not m.pax_headers for m in tf.getmembers())
    # the first sample's moments are what the VAE gives for its centre crop
    jpg = next(b for n, b in src if n.endswith(".jpg"))
    image = transform.image({"jpg": jpg}, np.random.default_rng(0))
    mean, std = codec.moments(image[None])
    stored = np.load(io.BytesIO(next(b for n, b in out if n.endswith(LATENT_MEMBER))))
    assert stored.shape == (2, 4, 8, 8)
    torch.testing.assert_close(torch.from_numpy(stored), torch.stack([mean[0], std[0]]), rtol=1e-5, atol=1e-5)


def test_loader_reads_the_same_stream_as_the_images(quick_world: Path, cache: Path) -> None:
    cfg = _config(quick_world)
    from fusedit.text import TextEncoder

    tokenizer = TextEncoder(str(quick_world / "text_encoder")).tokenizer
    kw = dict(batch_size=6, resolution=32, random_dropping_rate=0.3, seed=3, num_open_shards=2)
    images = iter(build_dataloader(cfg.data.data_path, tokenizer, **kw))
    latents = iter(
        build_dataloader(
            [json.loads((cache / "cache.json").read_text())["data_path"]], tokenizer, **kw, cached_latents=True
        )
    )
    for _ in range(3):
        a, b = next(images), next(latents)
        assert "pixel_values" not in b and b["latent_moments"].shape == (6, 2, 4, 8, 8)
        assert a["captions"] == b["captions"]  # same samples, same caption draws and dropout
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_training_from_the_cache_equals_training_from_images(quick_world: Path, cache: Path, tmp_path: Path) -> None:
    data = json.loads((cache / "cache.json").read_text())["data_path"]
    runs = {}
    old_spelling = {"data.cached_latents": "true", "data.data_path": f'["{data}"]'}  # data_path at the cache
    for name, extra in (("images", {}), ("cache", {"data.latent_cache": str(cache)}), ("old", old_spelling)):
        run = tmp_path / name
        overrides = tiny_train_overrides(quick_world, run, **{"trainer.max_steps": 3, **extra})
        run_train(overrides)
        runs[name] = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["images"]) == 3
    assert runs["cache"] == pytest.approx(runs["images"], rel=1e-5)
    assert runs["old"] == runs["cache"]


def test_a_cache_made_for_another_vae_or_resolution_is_refused(quick_world: Path, cache: Path) -> None:
    folder = f"data.latent_cache={cache}"
    ok = _config(quick_world, folder)
    latent_cache.check_cache_matches(ok)
    shards = json.loads((cache / "cache.json").read_text())["shards"]
    assert latent_cache.training_urls(ok) == [str(cache / latent_cache.shard_name(i)) for i in range(shards)]
    with pytest.raises(ConfigError, match="data.resolution"):
        latent_cache.check_cache_matches(_config(quick_world, folder, "data.resolution=64"))
    with pytest.raises(ConfigError, match=r"^vae: the latent cache"):
        latent_cache.check_cache_matches(_config(quick_world, folder, "vae.subfolder=other"))
    one_shard = f'data.data_path=["{quick_world / "shards" / "train-000000.tar"}"]'
    with pytest.raises(ConfigError, match=r"^data.latent_cache: .* other shards than the 1 of data.data_path"):
        latent_cache.check_cache_matches(_config(quick_world, folder, one_shard))
    codec = LatentCodec.from_spec(VaeSpec(str(quick_world / "vae")), torch_dtype=torch.bfloat16)
    latent_cache.check_cache_fingerprint(ok, codec)  # a bf16 load of the same weights matches
    with torch.no_grad():
        next(codec.vae.parameters()).add_(0.5)
    with pytest.raises(ConfigError, match="rebuild the cache"):
        latent_cache.check_cache_fingerprint(ok, codec)
    with pytest.raises(ConfigError, match="no cache.json"):
        latent_cache.check_cache_matches(_config(quick_world, "data.cached_latents=true"))  # the image shards
    with pytest.raises(ConfigError, match="no cache.json"):
        latent_cache.check_cache_matches(_config(quick_world, f"data.latent_cache={quick_world / 'shards'}"))
    with pytest.raises(ConfigError, match="center_crop"):
        _config(quick_world, folder, "data.center_crop=false")
    with pytest.raises(ConfigError, match="not both"):
        _config(quick_world, folder, "data.cached_latents=true")


def test_an_undecodable_image_keeps_its_place_and_is_skipped(quick_world: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sorted((quick_world / "shards").glob("train-*.tar"))[0], src / "a.tar")
    samples = {}
    for name, blob in _members(src / "a.tar"):
        key, member = name.split(".", 1)
        samples.setdefault(key, {})[member] = blob
    keys = sorted(samples)[:5]
    samples[keys[2]]["jpg"] = b"not a jpeg"
    with TarWriter(str(src / "b.tar")) as sink:
        for key in keys:
            sink.write({"__key__": key, **samples[key]})
    cfg = _config(quick_world, f"data.data_path=[{src / 'b.tar'}]")
    info = latent_cache.build_cache(cfg, tmp_path / "out", progress=False)
    assert info["counts"] == {"samples": 5, "encoded": 4, "undecodable": 1, "broken_shards": 0}
    names = [n for n, _ in _members(tmp_path / "out" / latent_cache.shard_name(0))]
    assert f"{keys[2]}.txt" in names and f"{keys[2]}.{LATENT_MEMBER}" not in names
    from fusedit.text import TextEncoder

    tokenizer = TextEncoder(str(quick_world / "text_encoder")).tokenizer
    loader = build_dataloader(
        [info["data_path"]], tokenizer, batch_size=4, resolution=32, num_open_shards=1, cached_latents=True,
        num_streams=1,  # one stream reads the one shard through, meeting the bad sample
    )  # fmt: skip
    batch = next(iter(loader))
    assert batch["latent_moments"].shape[0] == 4 and batch["skipped"] == 1


def test_cli_help_and_parts(quick_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        latent_cache.main(["--help"])
    assert "data.latent_cache=" in capsys.readouterr().out
    args = ["-c", str(TOY_CONFIG), "--out", str(tmp_path / "c"), *toy_overrides(quick_world)]
    assert latent_cache.main([*args, "--part", "1/2"]) == 0
    assert not (tmp_path / "c" / "cache.json").exists()  # part 0 has not run yet
    assert latent_cache.main([*args, "--part", "0/2"]) == 0
    info = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert info["counts"]["samples"] == info["counts"]["encoded"] and info["shards"] == len(info["sources"])
    assert latent_cache.main([*args, "--part", "2/2"]) == 2


def _cached_latents(quick_world: Path, cache: Path, world: int, workers: int, steps: int) -> list[torch.Tensor]:
    """The latent moments of global batches 0..steps-1 (4 samples each), every rank's share in rank order."""
    from fusedit.text import TextEncoder

    tokenizer = TextEncoder(str(quick_world / "text_encoder")).tokenizer
    data = [json.loads((cache / "cache.json").read_text())["data_path"]]
    kw = dict(batch_size=4 // world, resolution=32, seed=5, num_streams=4, world_size=world, num_workers=workers)
    ranks = [iter(build_dataloader(data, tokenizer, **kw, rank=r, cached_latents=True)) for r in range(world)]
    return [torch.cat([next(it)["latent_moments"] for it in ranks]) for _ in range(steps)]


def test_cached_latents_follow_the_global_order_at_any_world_size(quick_world: Path, cache: Path) -> None:
    want = _cached_latents(quick_world, cache, 1, 0, 3)
    for world, workers in ((2, 1), (4, 2)):
        got = _cached_latents(quick_world, cache, world, workers, 3)
        assert all(torch.equal(a, b) for a, b in zip(want, got)), (world, workers)
