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
        shards["bad"], make_tokenizer(), batch_size=5, resolution=16, random_dropping_rate=0.0, num_open_shards=1
    )
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
    n = 3  # odd: with 2 workers the resumed loader's worker 0 must play role 1
    straight = batches(build_dataloader(data, tok, **kw), 2 * n)
    stream = StreamState()
    for batch in straight[:n]:
        stream.update(batch)
    saved = json.loads(json.dumps(stream.state_dict()))
    assert saved["batches"] == n and len(saved["roles"]) == max(1, num_workers)
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
    kw = dict(batch_size=5, resolution=16, num_open_shards=2)
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


def test_resume_state_of_another_rank_is_refused(shards):
    tok = make_tokenizer()
    stream = StreamState()
    stream.update(batches(build_dataloader(shards["good"], tok, batch_size=2, resolution=8), 1)[0])
    with pytest.raises(ValueError, match="rank 0"):
        build_dataloader(
            shards["good"], tok, batch_size=2, resolution=8, rank=1, world_size=2, resume_state=stream.state_dict()
        )
