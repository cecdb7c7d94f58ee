"""The webdataset training stream: batches, caption handling, corrupt data, determinism, resume."""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from webdataset import TarWriter

from common.shards import validate_data_paths
from fusedit.data import webdata
from fusedit.data.webdata import StreamState, build_dataloader

WORDS = "a red blue green cat dog on the table sitting photo of small big".split()
PER_SHARD = 20


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def jpeg(rng: np.random.Generator, h: int = 24, w: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def caption(rng: np.random.Generator, name: str) -> str:
    """Variable-length caption ending with the sample's name, so batches identify their samples."""
    return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) + " " + name


def write_shard(path: Path, shard: int, rng: np.random.Generator, n: int = PER_SHARD, bad=None) -> None:
    bad = bad or {}
    with TarWriter(str(path)) as sink:
        for i in range(n):
            key = f"s{shard}_{i:03d}"
            sample = {"__key__": key, "jpg": jpeg(rng, 24 + i % 3 * 4, 32), "txt": caption(rng, key)}
            sample["orig"] = "original " + key
            if bad.get(i) == "garbage":
                sample["jpg"] = b"this is not a jpeg"
            elif bad.get(i) == "truncated":
                sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
            elif bad.get(i) == "notxt":
                del sample["txt"]
            sink.write(sample)


def truncate_inside(path: Path, member: str) -> None:
    """Cut the tar in the middle of a member's data (a truncated download)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    with open(path, "r+b") as f:
        f.truncate(info.offset_data + info.size // 2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s in range(4):
        write_shard(root / f"good-{s:06d}.tar", s, rng)
    write_shard(root / "bad-mixed.tar", 10, rng, n=10, bad={2: "garbage", 5: "truncated", 7: "notxt"})
    write_shard(root / "bad-cut.tar", 11, rng, n=10)
    truncate_inside(root / "bad-cut.tar", "s11_006.jpg")
    return {
        "good": [str(root / "good-{000000..000003}.tar")],
        "bad": [str(root / "bad-mixed.tar"), str(root / "bad-cut.tar")],
        "root": root,
    }


def batches(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def names(batch: dict) -> list[str]:
    return [c.split()[-1] if c else "" for c in batch["captions"]]


def test_batch_shapes_dtypes_and_padding(shards):
    tok = make_tokenizer()
    loader = build_dataloader(shards["good"], tok, batch_size=4, resolution=16, random_dropping_rate=0.0)
    for batch in batches(loader, 3):
        px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        assert px.shape == (4, 3, 16, 16) and px.dtype == torch.float32
        assert px.min() >= -1 and px.max() <= 1 and px.std() > 0.1
        assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == mask.shape
        longest = int(mask.sum(1).max())
        assert ids.shape[1] == math.ceil(longest / 8) * 8
        assert (ids[:, 0] == tok.bos_token_id).all() and (ids[mask == 0] == tok.pad_token_id).all()
        assert len(batch["captions"]) == 4 and all(n.startswith("s") for n in names(batch))
        assert batch["skipped"] == 0
        json.dumps(batch["state"])


def test_caption_dropout_original_column_and_instruction(shards):
    tok = make_tokenizer()
    common = dict(batch_size=25, resolution=8, num_open_shards=2)
    caps = [c for b in batches(build_dataloader(shards["good"], tok, random_dropping_rate=0.5, **common), 12)
            for c in b["captions"]]  # fmt: skip
    assert 0.4 < sum(c == "" for c in caps) / len(caps) < 0.6
    columns = {"original": "orig", "synthetic": "txt"}
    loader = build_dataloader(
        shards["good"], tok, caption_column=columns, original_caption_rate=0.5, random_dropping_rate=0.0,
        instruction="photo of ", **common,
    )  # fmt: skip
    caps = [c for b in batches(loader, 8) for c in b["captions"]]
    assert all(c.startswith("photo of ") for c in caps)
    assert 0.3 < sum(c.startswith("photo of original ") for c in caps) / len(caps) < 0.7


def test_corrupt_data_is_skipped_counted_and_logged(shards, caplog):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    caplog.set_level(logging.WARNING, logger="fusedit.data.webdata")
    loader = build_dataloader(
        shards["bad"], make_tokenizer(), batch_size=5, resolution=16, random_dropping_rate=0.0, num_open_shards=1,
        num_streams=1,
    )  # fmt: skip
    got = batches(loader, 12)
    seen = {n for b in got for n in names(b)}
    assert not seen & {"s10_002", "s10_005", "s10_007"}
    assert {"s10_000", "s10_009", "s11_000"} <= seen
    assert not {f"s11_{i:03d}" for i in range(5, 10)} & seen  # the rest of the cut shard is dropped
    assert sum(b["skipped"] for b in got) >= 4
    text = caplog.text
    assert "s10_002" in text and "s10_007" in text and "bad-cut.tar" in text


@pytest.mark.parametrize("workers", [0, 1])
def test_all_garbage_data_is_one_user_error(tmp_path, monkeypatch, workers):
    """Shards whose every sample is unusable end in a DataError naming the field, not an endless loop."""
    from common.config import ConfigError, user_message

    monkeypatch.setattr(webdata, "MAX_BAD_SAMPLES_IN_A_ROW", 20)
    path = tmp_path / "garbage.tar"
    with TarWriter(str(path)) as sink:
        for i in range(8):
            sink.write({"__key__": f"g{i:03d}", "jpg": b"not a jpeg", "txt": "a caption"})
    loader = build_dataloader([str(path)], make_tokenizer(), batch_size=2, resolution=16, num_workers=workers)
    with pytest.raises(ConfigError) as err:
        next(iter(loader))
    message = user_message(err.value)
    assert message.startswith("data.data_path: 20 samples in a row were unusable") and "\n" not in message


def test_ranks_differ_and_streams_are_deterministic(shards):
    tok = make_tokenizer()
    kw = dict(batch_size=6, resolution=16, center_crop=False, world_size=2)
    a = batches(build_dataloader(shards["good"], tok, rank=0, **kw), 3)
    b = batches(build_dataloader(shards["good"], tok, rank=0, **kw), 3)
    c = batches(build_dataloader(shards["good"], tok, rank=1, **kw), 3)
    d = batches(build_dataloader(shards["good"], tok, rank=0, seed=1, **kw), 3)
    for x, y in zip(a, b):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["captions"] == y["captions"]
    assert [names(x) for x in a] != [names(x) for x in c]
    assert [names(x) for x in a] != [names(x) for x in d]


def test_pipe_urls_are_read(shards):
    url = "pipe:cat " + str(shards["root"] / "good-000001.tar")
    assert validate_data_paths([url]) == [url]
    (batch,) = batches(build_dataloader([url], make_tokenizer(), batch_size=4, resolution=16), 1)
    assert all(n.startswith("s1_") or n == "" for n in names(batch))


def assert_same_batches(xs: list[dict], ys: list[dict]) -> None:
    for x, y in zip(xs, ys, strict=True):
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["attention_mask"], y["attention_mask"])
        assert x["captions"] == y["captions"] and x["skipped"] == y["skipped"] and x["state"] == y["state"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(shards, num_workers):
    tok = make_tokenizer()
    kw = dict(batch_size=4, resolution=16, center_crop=False, num_workers=num_workers, num_open_shards=3)
    data = shards["good"] + shards["bad"]
    n = 3
    straight = batches(build_dataloader(data, tok, **kw), 2 * n)
    stream = StreamState()
    for batch in straight[:n]:
        stream.update(batch)
    saved = json.loads(json.dumps(stream.state_dict()))
    assert saved["batches"] == n and saved["step"] == n and len(saved["streams"]) == 4  # one per sample
    resumed = batches(build_dataloader(data, tok, resume_state=saved, **kw), n)
    assert_same_batches(straight[n:], resumed)
    # The trainer's StreamState keeps counting from the resumed position.
    again = StreamState(saved)
    for batch in resumed:
        again.update(batch)
    for batch in straight[n:]:
        stream.update(batch)
    assert again.state_dict() == stream.state_dict()


def test_resume_reads_a_bounded_prefix_and_decodes_nothing_consumed(shards, monkeypatch):
    counts = {"decode": 0, "open": 0}
    decode, open_url = webdata.decode_image, webdata._open_url

    def counting(key, fn):
        def wrapped(*args):
            counts[key] += 1
            return fn(*args)

        return wrapped

    monkeypatch.setattr(webdata, "decode_image", counting("decode", decode))
    monkeypatch.setattr(webdata, "_open_url", counting("open", open_url))
    tok = make_tokenizer()
    kw = dict(batch_size=5, resolution=16, num_open_shards=2, num_streams=1)
    it = iter(build_dataloader(shards["good"], tok, **kw))
    stream = StreamState()
    for _ in range(8):  # 40 samples: the open shards are deep into their 20 samples
        stream.update(next(it))
    counts.update(decode=0, open=0)
    expected = [next(it) for _ in range(3)]
    straight = dict(counts)

    counts.update(decode=0, open=0)
    resumed = batches(build_dataloader(shards["good"], tok, resume_state=stream.state_dict(), **kw), 3)
    assert_same_batches(expected, resumed)
    assert counts["decode"] == straight["decode"] == 15  # not one consumed image decoded again
    assert counts["open"] <= straight["open"] + kw["num_open_shards"]  # each open reads <= 1 shard


def test_missing_shards_fail_early_naming_the_pattern(shards):
    root = shards["root"]
    assert validate_data_paths([str(root / "good-{000000..000001}.tar")])[1].endswith("good-000001.tar")
    pattern = str(root / "good-{000002..000005}.tar")
    with pytest.raises(FileNotFoundError, match=r"good-\{000002\.\.000005\}.*2 of 4.*good-000004\.tar"):
        validate_data_paths(shards["good"] + [pattern])
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        build_dataloader([str(root / "nope.tar")], make_tokenizer(), batch_size=2, resolution=8)


# ------------------------------------------------------------------ the global order (issue 29)
def _global_steps(data: list[str], steps: int, world: int, workers: int, accumulation: int = 1, **kw) -> list:
    """Sample names of global batches 0..steps-1 read by ``world`` ranks, each rank's share in rank order."""
    tok = make_tokenizer()
    micro = 8 // (world * accumulation)
    ranks = [
        iter(build_dataloader(data, tok, batch_size=micro, resolution=8, rank=r, world_size=world,
                              accumulation=accumulation, num_workers=workers, center_crop=False, **kw))
        for r in range(world)
    ]  # fmt: skip
    out = []
    for _ in range(steps):
        names_, skipped, pixels = [], 0, []
        for it in ranks:
            for _ in range(accumulation):
                batch = next(it)
                names_ += names(batch)
                skipped += batch["skipped"]
                pixels.append(batch["pixel_values"])
        out.append((names_, skipped, torch.cat(pixels)))
    return out


@pytest.mark.parametrize(("world", "workers", "accumulation"), [(2, 0, 1), (4, 1, 1), (2, 2, 1), (1, 2, 2)])
def test_global_batches_do_not_depend_on_world_size_workers_or_accumulation(shards, world, workers, accumulation):
    """Global batch s holds the same samples in the same order, with the same crops and the same
    corrupt samples skipped, for 1, 2 or 4 ranks, 0-2 workers and any accumulation."""
    data = shards["bad"] + [str(shards["root"] / "good-000000.tar")]
    kw = dict(random_dropping_rate=0.0, num_open_shards=1)  # each stream reads its shards through: meets the bad ones
    reference = _global_steps(data, 8, 1, 0, **kw)
    got = _global_steps(data, 8, world, workers, accumulation, **kw)
    assert sum(s for _, s, _ in reference) > 0  # the bad shards were met: skipping is part of the order
    for (names_a, skipped_a, pixels_a), (names_b, skipped_b, pixels_b) in zip(reference, got):
        assert names_a == names_b and skipped_a == skipped_b
        assert torch.equal(pixels_a, pixels_b)  # random crops are keyed by the sample, not the rank


def _state_after(data: list[str], steps: int, world: int, tok) -> dict:
    """Every rank's StreamState after ``steps`` global batches, merged as a resume merges them."""
    states = []
    for r in range(world):
        it = iter(build_dataloader(data, tok, batch_size=8 // world, resolution=8, rank=r, world_size=world))
        stream = StreamState()
        for _ in range(steps):
            stream.update(next(it))
        states.append(json.loads(json.dumps(stream.state_dict())))
    return webdata.merge_stream_states(states)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 4)])
def test_resume_at_another_world_size_continues_the_global_order(shards, before, after):
    tok, data = make_tokenizer(), shards["good"]
    merged = _state_after(data, 2, before, tok)
    assert merged["step"] == 2 and len(merged["streams"]) == 8
    resumed = []
    for r in range(after):
        it = iter(build_dataloader(data, tok, batch_size=8 // after, resolution=8, rank=r, world_size=after,
                                   resume_state=merged))  # fmt: skip
        resumed.append([names(next(it)) for _ in range(2)])
    straight = [n for n, _, _ in _global_steps(data, 4, 1, 0)]
    assert [sum((resumed[r][s] for r in range(after)), []) for s in range(2)] == straight[2:]


def test_a_split_that_does_not_tile_the_global_batch_is_refused(shards):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="data.num_streams: 3 streams cannot be split over 2 processes"):
        build_dataloader(shards["good"], tok, batch_size=3, resolution=8, world_size=2, num_streams=3)
    with pytest.raises(ValueError, match="data.num_streams: 5 does not divide the global batch 8"):
        build_dataloader(shards["good"], tok, batch_size=8, resolution=8, num_streams=5)
    merged = _state_after(shards["good"], 1, 1, tok)
    with pytest.raises(ValueError, match="this run"):  # another global batch is another order
        build_dataloader(shards["good"], tok, batch_size=2, resolution=8, resume_state=merged)


def test_states_written_before_the_global_order_are_not_continued():
    old = {"version": 1, "batches": 3, "roles": {"0": {"role": 0, "slots": [[0, 3]], "next_k": 4, "draws": 3}}}
    assert webdata.merge_stream_states([old]) is None
    assert StreamState(old).state_dict()["streams"] == {}


@pytest.mark.parametrize(
    ("global_batch", "cap", "world", "micro", "accumulation"),
    [(1024, 32, 32, 32, 1), (1024, 32, 16, 32, 2), (1024, 24, 32, 16, 2), (96, 32, 4, 24, 1), (96, 5, 4, 4, 6)],
)
def test_the_global_batch_is_kept_by_deriving_micro_batch_and_accumulation(
    global_batch, cap, world, micro, accumulation
):
    from fusedit.config import derive_batch, load_config

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "e2e-vae" / "toy.yaml",
        [f"data.global_batch_size={global_batch}", f"data.batch_size_per_gpu={cap}"],
    )
    derived = derive_batch(cfg, world)
    assert derived["batch_size_per_gpu"] == cfg.data.batch_size_per_gpu == micro
    assert derived["gradient_accumulation_steps"] == cfg.trainer.gradient_accumulation_steps == accumulation
    assert micro * accumulation * world == global_batch


def test_a_global_batch_the_processes_cannot_share_is_refused_with_the_numbers():
    from common.config import ConfigError
    from fusedit.config import derive_batch, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "e2e-vae" / "toy.yaml",
                      ["data.global_batch_size=100"])  # fmt: skip
    with pytest.raises(ConfigError, match="data.global_batch_size: 100 samples cannot be shared by 3 processes"):
        derive_batch(cfg, 3)
