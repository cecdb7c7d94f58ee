"""The text-feature cache: both captions stored, the same stream and losses as the encoder, clear refusals,
resumable and splittable builds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from common.config import ConfigError
from fusedit.config import load_config
from fusedit.data import latent_cache, text_cache
from fusedit.data.text_features import EMPTY_FILE, TextFeatureReader, shard_name
from fusedit.data.webdata import ShardReader
from fusedit.text import TextEncoder
from fusedit.tools.demo import toy_overrides
from fusedit.train.trainer import Trainer, build_components, loader_from_config
from tests.conftest import TOY_CONFIG, tiny_train_overrides

# Both caption columns and dropout are drawn often, so a few batches exercise every lookup.
STREAM = ("data.original_caption_rate=0.5", "data.random_dropping_rate=0.3")


def _shards(world: Path) -> str:
    """Two of the quick world's shards: every path is exercised at half the encoding."""
    return 'data.data_path=["' + str(world / "shards" / "train-{000000..000001}.tar") + '"]'


def _config(world: Path, *extra: str):
    return load_config(TOY_CONFIG, [*toy_overrides(world), _shards(world), *STREAM, *extra])


def _build(world: Path, out: Path, dtype: str = "float32") -> dict:
    info = text_cache.build_text_cache(_config(world), out, batch_size=256, dtype=dtype, progress=False)
    assert info is not None
    return info


@pytest.fixture(scope="module")
def cache(quick_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 cache: trains like the encoder up to float rounding, so losses can be compared tightly."""
    out = tmp_path_factory.mktemp("text-fp32")
    _build(quick_world, out)
    return out


def test_cache_stores_both_captions_real_tokens_only(quick_world: Path, cache: Path) -> None:
    info = json.loads((cache / "cache.json").read_text())
    cfg = _config(quick_world)
    assert info["max_prompt_length"] == 32 and info["text_hidden_states_index"] == -1 and info["dtype"] == "float32"
    assert info["caption_column"] == {"original": "short.txt", "synthetic": "txt"}
    assert info["counts"]["captions"] == 2 * info["counts"]["samples"] > 0 and info["counts"]["missing_captions"] == 0
    encoder = TextEncoder(cfg.model.base)
    reader = ShardReader(info["sources"][0], 0, 0)
    samples = [reader.next() for _ in range(3)]
    with safe_open(str(cache / shard_name(0)), framework="pt") as f:
        keys, starts, lengths = json.loads(f.metadata()["keys"]), f.get_tensor("starts"), f.get_tensor("lengths")
        features = f.get_tensor("features")
    assert keys[:3] == [s["__key__"] for s in samples]  # same samples, same order
    assert features.shape[0] == int(lengths.sum())  # real tokens only: no padding stored
    for n, sample in enumerate(samples):
        for c, member in enumerate(("short.txt", "txt")):
            ids, mask = encoder.tokenize([sample[member].decode().strip()], 32, None)
            want = encoder.encode(ids, mask)[0]
            assert lengths[n, c] == want.shape[0] == int(mask.sum())
            got = features[starts[n, c] : starts[n, c] + lengths[n, c]]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with safe_open(str(cache / EMPTY_FILE), framework="pt") as f:  # what caption dropout produces, stored once
        empty = f.get_tensor("features")
    torch.testing.assert_close(empty, encoder.encode(*encoder.tokenize([""], 32, None))[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def components(quick_world: Path, cache: Path):
    """The trainer's frozen parts and a tiny DiT, perturbed so the text reaches the loss (the
    zero-initialised output layer would make every loss independent of it)."""
    overrides = tiny_train_overrides(quick_world, Path("unused"), **dict(s.split("=") for s in STREAM))
    cfg = load_config(TOY_CONFIG, [*overrides, _shards(quick_world)])
    cfg.data.text_cache = str(cache)  # build_components checks the fingerprints
    parts = build_components(cfg, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in parts.dit.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return cfg, parts


class _Engine:
    """What micro_step needs of the DeepSpeed engine: a call to the module, and the module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)


def _losses(cfg, parts, steps: int = 2) -> list[float]:
    """Trainer.micro_step on the stream's first batches, with fixed weights and the trainer's generators."""
    trainer = SimpleNamespace(cfg=cfg, parts=parts, device=torch.device("cpu"), env=SimpleNamespace(rank=0))
    trainer.engine, trainer.step = _Engine(parts.dit), 0
    trainer.sample_generators = lambda micro, count: Trainer.sample_generators(trainer, micro, count)
    batches = iter(loader_from_config(cfg, parts.text_encoder.tokenizer))
    out = []
    for step in range(steps):
        trainer.step = step
        with torch.no_grad():
            out.append(float(Trainer.micro_step(trainer, next(batches), 0)))
    return out


def test_micro_steps_from_the_caches_equal_those_from_images(
    quick_world: Path, cache: Path, components, tmp_path: Path
) -> None:
    """A float32 store: equal up to float rounding (bf16, the default, rounds each feature once more)."""
    cfg, parts = components
    images = _losses(_with(cfg, text_cache=None), parts)
    assert _losses(cfg, parts) == pytest.approx(images, rel=1e-5)
    # together with a latent cache (aligned by shard and key) the stream and the losses are still the images'
    latent_cache.build_cache(cfg, tmp_path / "latents", batch_size=128, progress=False)
    both = _with(cfg, latent_cache=str(tmp_path / "latents"))
    assert _losses(both, parts) == pytest.approx(images, rel=1e-5)


def _with(cfg, **data):
    """A copy of ``cfg`` with some data fields changed."""
    import copy

    out = copy.deepcopy(cfg)
    for key, value in data.items():
        setattr(out.data, key, value)
    return out


def test_batches_are_padded_as_the_encoders_output(quick_world: Path, cache: Path, components) -> None:
    cfg, parts = components
    encoder = parts.text_encoder
    tokens = iter(loader_from_config(_with(cfg, text_cache=None), encoder.tokenizer))
    cached = iter(loader_from_config(cfg, encoder.tokenizer))
    for _ in range(3):
        a, b = next(tokens), next(cached)
        assert "input_ids" not in b and a["captions"] == b["captions"]  # same caption choice and dropout
        assert torch.equal(a["attention_mask"], b["attention_mask"])  # same length rule, same mask
        want = encoder.encode(a["input_ids"], a["attention_mask"])
        mask = a["attention_mask"].bool()
        torch.testing.assert_close(b["text_features"][mask], want[mask], rtol=1e-5, atol=1e-5)
        assert not b["text_features"][~mask].any()


def test_a_cache_for_other_settings_or_weights_is_refused(quick_world: Path, cache: Path) -> None:
    ok = _config(quick_world, f"data.text_cache={cache}")
    text_cache.check_text_cache_matches(ok)
    assert _config(quick_world, f"data.cached_text_features={cache}").data.text_cache == str(cache)  # old spelling
    Trainer._validate_inputs(SimpleNamespace(cfg=ok))  # the trainer's early check, before any model loads
    for override, field in (
        ("data.max_prompt_length=64", "data.max_prompt_length"),
        ("model.text_hidden_states_index=-2", "model.text_hidden_states_index"),
        ("data.instruction='Draw: '", "data.instruction"),
        ("data.caption_column.synthetic=short.txt", "data.caption_column.synthetic"),
        ("data.caption_column.original=txt", "data.caption_column.original"),
        ('data.data_path=["' + str(quick_world / "shards" / "train-000000.tar") + '"]', "data.data_path"),
    ):
        with pytest.raises(ConfigError, match=f"^{field}: the text cache"):
            Trainer._validate_inputs(SimpleNamespace(cfg=_config(quick_world, f"data.text_cache={cache}", override)))
    # the original column is not read when it is never picked
    text_cache.check_text_cache_matches(
        _config(
            quick_world,
            f"data.text_cache={cache}",
            "data.caption_column.original=x",
            "data.original_caption_rate=0",
        )
    )
    with pytest.raises(ConfigError, match="no cache.json"):
        text_cache.check_text_cache_matches(_config(quick_world, f"data.text_cache={quick_world}"))
    encoder = TextEncoder(ok.model.base, torch_dtype=torch.bfloat16)
    text_cache.check_text_cache_fingerprint(ok, encoder)  # a bf16 load of the same weights matches
    with torch.no_grad():
        next(encoder.model.parameters()).add_(0.5)
    with pytest.raises(ConfigError, match="^model.base: the text encoder weights"):
        text_cache.check_text_cache_fingerprint(ok, encoder)
    # a stream over other shards than the cache's fails on its first sample, naming the field
    urls = json.loads((cache / "cache.json").read_text())["sources"]
    first = ShardReader(urls[0], 0, 0).next()
    with pytest.raises(ValueError, match="^data.text_cache: sample 0"):
        TextFeatureReader(cache, urls[::-1]).features(urls[0], 0, first["__key__"], "synthetic")


def test_a_killed_build_resumes_without_redoing_finished_shards(
    quick_world: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encode, done = text_cache._ShardEncoder.encode_shard, []

    def killed_in_the_second_shard(self, url: str, dest: Path) -> int:
        if done:
            dest.with_name(f".{dest.name}.partial").write_bytes(b"half a file")
            raise KeyboardInterrupt
        done.append(dest.name)
        return encode(self, url, dest)

    monkeypatch.setattr(text_cache._ShardEncoder, "encode_shard", killed_in_the_second_shard)
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        _build(quick_world, out)
    assert (out / shard_name(0)).exists() and not (out / shard_name(1)).exists() and not (out / "cache.json").exists()
    first = os.stat(out / shard_name(0)).st_mtime_ns
    redone = []

    def counting(self, url: str, dest: Path) -> int:
        redone.append(dest.name)
        return encode(self, url, dest)

    monkeypatch.setattr(text_cache._ShardEncoder, "encode_shard", counting)
    info = _build(quick_world, out)
    assert redone == [shard_name(1)] and os.stat(out / shard_name(0)).st_mtime_ns == first
    for i in range(2):  # the resumed cache is the uninterrupted one
        _assert_same_shard(out / shard_name(i), cache / shard_name(i))
    assert info["counts"] == json.loads((cache / "cache.json").read_text())["counts"]
    with pytest.raises(ConfigError, match="^--dtype: .* holds a text cache"):  # no mixing of settings in one folder
        _build(quick_world, out, dtype="bfloat16")


def _shard(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _assert_same_shard(a: Path, b: Path, tol: float = 0.0) -> None:
    """Same samples, index and features (to ``tol`` relative); the header's key order is not fixed."""
    (meta_a, a), (meta_b, b) = _shard(a), _shard(b)
    assert meta_a == meta_b and torch.equal(a["starts"], b["starts"]) and torch.equal(a["lengths"], b["lengths"])
    torch.testing.assert_close(a["features"].float(), b["features"].float(), rtol=tol, atol=tol)


def test_cli_parts_split_the_shards_in_bf16(quick_world: Path, cache: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "c"
    args = ["-c", str(TOY_CONFIG), "--out", str(out), "--batch-size", "256", *toy_overrides(quick_world), *STREAM]
    args.append(_shards(quick_world))
    assert text_cache.main([*args, "--part", "1/2"]) == 0
    printed = capsys.readouterr().out
    assert "per sample" in printed and "this run" in printed and "(1 shard)" in printed  # estimated before it starts
    assert [p.name for p in out.glob("text-*")] == [shard_name(1)]
    assert not (out / "cache.json").exists()  # part 0 has not run yet
    assert text_cache.main([*args, "--part", "0/2"]) == 0
    assert "train with: data.text_cache=" in capsys.readouterr().out
    info = json.loads((out / "cache.json").read_text())
    assert info["dtype"] == "bfloat16" and info["counts"] == json.loads((cache / "cache.json").read_text())["counts"]
    for i in range(2):  # the float32 cache's features, rounded to bf16 once (8 bits of mantissa)
        _assert_same_shard(out / shard_name(i), cache / shard_name(i), tol=2**-8)
    assert 0 < info["bytes_per_sample"] < 2 * 32 * 64 * 2 + 64  # real tokens only, below two full-length captions
    assert text_cache.main([*args, "--part", "2/2"]) == 2
    # bf16 features cross from a loader worker (as int16 bits: numpy has no bf16) unchanged
    by_worker, in_process = (_cached_rows(quick_world, out, 2, w, 2) for w in (1, 0))
    assert all(a.dtype == torch.bfloat16 and torch.equal(a, b) for (_, a), (_, b) in zip(by_worker, in_process))


def _cached_rows(quick_world: Path, cache: Path, world: int, workers: int, steps: int) -> list:
    """(caption, unpadded features) of each sample of global batches 0..steps-1 (4 samples each)."""
    cfg = _config(
        quick_world, f"data.text_cache={cache}", f"data.batch_size_per_gpu={4 // world}", "data.num_streams=4",
        f"data.dataloader_num_workers={workers}",
    )  # fmt: skip
    tokenizer = TextEncoder(cfg.model.base).tokenizer
    ranks = [iter(loader_from_config(cfg, tokenizer, rank=r, world_size=world)) for r in range(world)]
    rows = []
    for _ in range(steps):
        for it in ranks:
            batch = next(it)
            mask = batch["attention_mask"].bool()
            rows += [(c, f[m]) for c, f, m in zip(batch["captions"], batch["text_features"], mask)]
    return rows


@pytest.mark.parametrize(("world", "workers"), [(2, 1), (4, 2)])
def test_cached_features_follow_the_global_order_at_any_world_size(
    quick_world: Path, cache: Path, world: int, workers: int
) -> None:
    """The text cache's rows of global batch s do not depend on the ranks or the workers reading it
    (the features cross from a worker packed in one tensor per part: the same values)."""
    want = _cached_rows(quick_world, cache, 1, 0, 3)
    got = _cached_rows(quick_world, cache, world, workers, 3)
    assert [c for c, _ in got] == [c for c, _ in want] and len(want) == 12
    for (_, a), (_, b) in zip(want, got):
        assert torch.equal(a, b)
