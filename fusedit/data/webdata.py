"""The training data stream: image/caption samples from webdataset tar shards, as batches.

Design goals: (1) a position that is a handful of integers, so that a checkpoint can store it and
a resumed run continues with *exactly* the batches an uninterrupted run would have seen, without
decoding anything it already consumed (the reference keeps no position and replays ``step x
batch`` samples on resume, which takes hours at scale); (2) one global sample order that does not
depend on the number of GPUs or data-loader workers, so that a run resumed on another allocation,
and the two arms of a paired study, see the same samples in the same order.

How the order is defined:

* **Streams**: the data is ``V = data.num_streams`` independent sample streams (default: one per
  sample of the global batch ``G``). Global batch ``s`` is, for v = 0..V-1 in turn, the next
  ``q = G / V`` samples of stream v. Nothing in it depends on the world size ``N`` or the workers.
* **Ranks**: rank r of N owns the consecutive streams ``[r V/N, (r+1) V/N)``, so its share of global
  batch s is the contiguous slice ``[r G/N, (r+1) G/N)``: the place in the global batch that the
  trainer's per-sample randomness (noise, timestep) is keyed by. Each rank opens only its own
  streams' shards. Its share is split into ``gradient_accumulation_steps`` micro-batches in order.
* **Workers**: a rank's W data-loader workers split its streams (worker w reads every W-th) and
  each yields one *part* per step; the main process puts the W parts of a step back in stream
  order. W only changes who decodes what, never the batches.
* **One stream**: the k-th shard stream v opens is ``urls[draw(seed, v, k)]``, a uniform draw
  *with replacement* (infinite resampling, no epochs); being a pure function of the position,
  shard k can be found without drawing shards 0..k-1. The stream keeps ``num_open_shards`` shards
  open and takes each next sample from the slot ``draw(seed, v, draw_index)``; an exhausted (or
  broken) shard is replaced in its slot by the stream's next shard. This interleaving shuffle is
  weaker than webdataset's shuffle buffer (V streams x ``num_open_shards`` shards are mixed, one
  sample at a time each), but its state is a few positions; a buffer of decoded samples cannot be
  checkpointed cheaply.
  Streams draw their shards independently (as ranks and workers did before the global order), so
  when ``V x num_open_shards`` nears the number of shards two streams may read one shard at the
  same time and repeat its samples a few steps apart; keep it well below the shard count (the 3B
  configs: 1,024 x 4 slots over 4,530 shards is not; dealing each epoch's shard permutation out
  to the streams would be the fix, and would change every order).
* **Position** of a stream = its open slots' ``(k, offset)`` + the next k + the draw count; of
  the run = the step and every stream's position (each rank saves its own streams; a resume at
  another world size merges all ranks' files). Resuming a slot at offset ``o`` re-reads that
  shard's first ``o`` samples (tar members, no image decoding): at most one shard per open slot.
* **Per-sample randomness** (caption column, caption dropout for CFG, random crop) comes from a
  generator seeded by ``(seed, v, k, offset)``: the same sample always gets the same draws.

Corrupt data is never fatal: an unreadable or truncated shard ends that shard (the rest of it is
skipped), and a sample without its image or caption, or whose JPEG does not decode, is skipped
and its stream's next sample takes its place; the same one at every world size. Both are counted
in the batch's ``skipped`` and logged (rate limited) with URL and key. Truncated JPEGs are
rejected: this module never sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` (the reference set it,
silently training on grey-filled images).

Typical use by the trainer::

    loader = build_dataloader(paths, tokenizer, batch_size=32, resolution=256, global_batch=1024,
                              world_size=32, rank=r, resume_state=merged_state)
    stream = StreamState(merged_state)
    for batch in loader:          # micro-batches; one iterator per loader: a new iterator
        stream.update(batch)      # restarts from resume_state
        ...
        checkpoint["data"] = stream.state_dict()
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from common.shards import BadSample, DataError, RateLimitedWarnings, decode_image, validate_data_paths
from fusedit.data.text_features import TextFeatureReader, pad_features
from fusedit.text import pad_token_rows, token_rows

log = logging.getLogger(__name__)

# 2: the global order (1: per-rank streams, before it; still read, never continued)
STATE_VERSION = 2
# The member a latent cache (fusedit/data/latent_cache.py) stores each sample's posterior in.
LATENT_MEMBER = "latent.npy"
# Domains separate the independent random streams derived from the same (seed, rank, role).
_SHARD, _SLOT, _SAMPLE = 0, 1, 2
# A draw that opens this many shards in a row without finding a sample gives up: the data is
# (nearly) all broken, and looping forever would hide it.
MAX_EMPTY_SHARDS = 100
# Consecutive unusable samples after which the data, not a few bad files, is the problem.
MAX_BAD_SAMPLES_IN_A_ROW = 2000


# ----------------------------------------------------------------------------- shard URLs


def _fingerprint(urls: list[str]) -> str:
    """Short id of the shard list: resuming on another list maps positions to other shards."""
    return f"{len(urls)}:" + hashlib.sha1("\n".join(urls).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- randomness


def _rng(*key: int) -> np.random.Generator:
    """An independent generator for a position: a pure function of the integer key."""
    return np.random.default_rng([int(k) % 2**64 for k in key])


def _draw(n: int, *key: int) -> int:
    return int(_rng(*key).integers(n))


# ----------------------------------------------------------------------------- logging


# ----------------------------------------------------------------------------- shard reading


def _open_url(url: str) -> Any:
    """Open a shard as a byte stream (local file, ``pipe:``, http, ...). Tests count calls."""
    return gopen(url)


class ShardReader:
    """Reads the samples of one shard in order; ``offset`` = samples handed out so far.

    Samples follow the webdataset convention (webdataset's own tar iteration and grouping):
    members sharing the key (path up to the first dot of the basename) form one sample, keyed by
    the lower-cased rest of the name. Opening at offset o skips o samples without decoding.
    """

    def __init__(self, url: str, k: int, offset: int) -> None:
        self.url, self.k, self.offset = url, k, offset
        self._stream: Any = None
        self._samples: Iterator[dict[str, Any]] | None = None

    def _open(self) -> None:
        self._stream = _open_url(self.url)
        members = ({**m, "__url__": self.url} for m in tar_file_iterator(self._stream))
        self._samples = group_by_keys(members)
        for _ in range(self.offset):
            next(self._samples)

    def next(self) -> dict[str, Any] | None:
        """The next sample, or None at the end of the shard. Raises on corrupt data."""
        try:
            if self._samples is None:
                self._open()
            sample = next(self._samples)
        except StopIteration:
            return None
        self.offset += 1
        return sample

    def close(self) -> None:
        try:
            if self._stream is not None:
                self._stream.close()
        except Exception:  # a pipe's exit status does not matter once the shard is done
            pass
        self._stream = self._samples = None


class _Stream:
    """The infinite raw-sample stream ``v`` of the global order, addressable by its state."""

    def __init__(self, urls: list[str], seed: int, v: int, num_open_shards: int, state: dict | None) -> None:
        # Keyed (seed, 0, v): the "0" is where the per-rank streams before the global order put
        # the rank, so one stream on one GPU reads exactly what those runs read. Every draw of the
        # stream (shards, slots, per-sample randomness) starts with this key.
        self.urls, self.key = urls, (seed, 0, v)
        if state is None:
            slots, self.next_k, self.draws = [[k, 0] for k in range(num_open_shards)], num_open_shards, 0
        else:
            slots, self.next_k, self.draws = state["slots"], int(state["next_k"]), int(state["draws"])
        self.readers = [ShardReader(self._url(k), k, off) for k, off in slots]
        self.warnings = RateLimitedWarnings()
        self.skipped = 0  # broken shards since the last pop_skipped()

    def _url(self, k: int) -> str:
        return self.urls[_draw(len(self.urls), *self.key, _SHARD, k)]

    def _replace(self, slot: int) -> None:
        self.readers[slot].close()
        self.readers[slot] = ShardReader(self._url(self.next_k), self.next_k, 0)
        self.next_k += 1

    def next_sample(self) -> tuple[dict[str, Any], int, int]:
        """The next raw sample and its position (k, offset) in the stream's shard sequence."""
        slot = _draw(len(self.readers), *self.key, _SLOT, self.draws)
        self.draws += 1
        for _ in range(MAX_EMPTY_SHARDS):
            reader = self.readers[slot]
            try:
                sample = reader.next()
            except Exception as exn:  # unreadable or truncated tar: drop the rest of the shard
                self.skipped += 1
                self.warnings.warn("shard %s after %d samples: %r", reader.url, reader.offset, exn)
                sample = None
            if sample is not None:
                return sample, reader.k, reader.offset - 1
            self._replace(slot)
        raise DataError(
            f"data.data_path: {MAX_EMPTY_SHARDS} shards in a row gave no sample (e.g. {self.readers[slot].url}); "
            "are these webdataset .tar shards?"
        )

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def pop_skipped(self) -> int:
        n, self.skipped = self.skipped, 0
        return n

    def state(self) -> dict[str, Any]:
        return {
            "slots": [[r.k, r.offset] for r in self.readers],
            "next_k": self.next_k,
            "draws": self.draws,
        }


# ----------------------------------------------------------------------------- sample decoding


class SampleTransform:
    """Raw sample -> (pixels (3,R,R) float32 in [-1,1], caption). Built once per stream.

    The random draws are made in a fixed order from the sample's own generator, so a sample's
    crop and caption depend only on its position.
    """

    def __init__(
        self,
        *,
        resolution: int,
        center_crop: bool,
        image_column: str,
        caption_column: tuple[str, str],
        original_caption_rate: float,
        random_dropping_rate: float,
        instruction: str,
        latent_key: str | None = None,
    ) -> None:
        self.resolution, self.center_crop = resolution, center_crop
        self.latent_key = latent_key
        self.image_keys = [c.strip().lower() for c in image_column.split(";") if c.strip()]
        self.original_key, self.synthetic_key = (c.lower() for c in caption_column)
        self.original_caption_rate = original_caption_rate
        self.random_dropping_rate = random_dropping_rate
        self.instruction = instruction

    def caption_text(self, sample: dict[str, Any], key: str) -> str:
        """A caption member as training reads it (UTF-8, stripped); the text cache reads it so too."""
        if key not in sample:
            raise BadSample(f"no caption member {key!r}")
        try:
            return sample[key].decode("utf-8").strip()
        except UnicodeDecodeError as exn:
            raise BadSample(f"caption {key!r} is not UTF-8") from exn

    def _caption(self, sample: dict[str, Any], u: float) -> tuple[str, str]:
        """(column, caption): "original" with probability ``original_caption_rate`` when present."""
        column = "synthetic"
        if self.original_key and self.original_caption_rate > 0 and self.original_key in sample:
            column = "original" if u < self.original_caption_rate else column
        key = self.original_key if column == "original" else self.synthetic_key
        return column, self.caption_text(sample, key)

    def _image_bytes(self, sample: dict[str, Any]) -> bytes:
        for key in self.image_keys:
            if key in sample:
                return sample[key]
        raise BadSample(f"no image member {'/'.join(self.image_keys)!r}")

    def _pixels(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """Shorter side to R (bilinear; PIL's resize filters, i.e. antialiases), crop R x R."""
        r = self.resolution
        w, h = img.size
        # Longer side as torchvision's Resize(int) computes it, so the crops match the reference.
        size = (r, max(r, int(r * h / w))) if w <= h else (max(r, int(r * w / h)), r)
        img = img.resize(size, Image.Resampling.BILINEAR)
        w, h = img.size
        if self.center_crop:
            left, top = int(round((w - r) / 2.0)), int(round((h - r) / 2.0))
        else:
            left, top = int(rng.integers(w - r + 1)), int(rng.integers(h - r + 1))
        img = img.crop((left, top, left + r, top + r))
        array = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()

    def _latent(self, sample: dict[str, Any]) -> torch.Tensor:
        """(2, C, h, w) float32 posterior (mean, std), or (1, C, h, w) for an RAE, from a cache's ``.npy`` member."""
        if self.latent_key not in sample:
            raise BadSample(f"no latent member {self.latent_key!r} (the cache could not encode this image)")
        try:
            array = np.load(io.BytesIO(sample[self.latent_key]), allow_pickle=False)
        except Exception as exn:
            raise BadSample(f"latent member {self.latent_key!r} does not load: {exn!r}") from exn
        if array.ndim != 4 or array.shape[0] not in (1, 2):
            raise BadSample(f"latent member {self.latent_key!r} has shape {array.shape}, expected (2 or 1, C, h, w)")
        return torch.from_numpy(array.astype(np.float32, copy=False))

    def image(self, sample: dict[str, Any], rng: np.random.Generator) -> torch.Tensor:
        """(3, R, R) float32 pixels in [-1, 1]: decoded, resized, cropped."""
        data = self._image_bytes(sample)
        try:
            img = decode_image(data)
        except Exception as exn:
            raise BadSample(f"image does not decode: {exn!r}") from exn
        return self._pixels(img, rng)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> tuple[torch.Tensor, str, str | None]:
        """(pixels or latent moments, prompt, caption column or None when dropped).

        The column is what a text-feature cache is looked up by: the cache holds both columns'
        features, so the caption draw and the dropout stay this function's, with the image stream's RNG.
        """
        u_caption, u_drop = rng.random(), rng.random()
        column, caption = self._caption(sample, u_caption)
        # A cached latent was made from the centre crop, which draws nothing from rng: the caption
        # draws, and so the whole stream, are those of the image shards the cache came from.
        visual = self._latent(sample) if self.latent_key else self.image(sample, rng)
        if u_drop < self.random_dropping_rate:
            return visual, "", None
        return visual, self.instruction + caption, column


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Layout:
    """Where this rank's samples sit in the global order (see the module docstring)."""

    global_batch: int  # G: samples per optimizer step, all ranks
    num_streams: int  # V
    world_size: int  # N
    rank: int
    micro_batch: int  # samples per micro-batch on this rank
    accumulation: int  # micro-batches per step

    @property
    def per_stream(self) -> int:
        return self.global_batch // self.num_streams

    @property
    def streams(self) -> list[int]:
        """This rank's streams: consecutive, so its samples are one slice of the global batch."""
        per_rank = self.num_streams // self.world_size
        return list(range(self.rank * per_rank, (self.rank + 1) * per_rank))

    def check(self) -> None:
        """Refuse a split that does not tile the global batch, naming the numbers."""
        g, v, n = self.global_batch, self.num_streams, self.world_size
        if g % v:
            raise ValueError(f"data.num_streams: {v} does not divide the global batch {g}")
        if v % n:
            raise ValueError(
                f"data.num_streams: {v} streams cannot be split over {n} processes; "
                f"use a multiple of {n} that divides the global batch {g}"
            )


class _StreamParts(IterableDataset):
    """Worker w of W reads every W-th of the rank's streams and yields one part per step."""

    def __init__(
        self,
        urls: list[str],
        transform: SampleTransform,
        layout: Layout,
        *,
        seed: int,
        num_open_shards: int,
        stream_states: dict[int, dict],
        start_step: int,
        tokenizer: Any = None,
        max_length: int = 0,
        text_features: TextFeatureReader | None = None,
    ) -> None:
        super().__init__()
        self.urls, self.transform, self.layout = urls, transform, layout
        self.tokenizer = None if text_features is not None else tokenizer  # a text cache needs no ids
        self.max_length = max_length
        self.seed, self.num_open_shards = seed, num_open_shards
        self.stream_states, self.start_step, self.text_features = stream_states, start_step, text_features

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.layout.streams[worker::workers]
        streams = {v: _Stream(self.urls, self.seed, v, self.num_open_shards, self.stream_states.get(v)) for v in mine}
        step = self.start_step
        try:
            while True:
                yield self._part(streams, step)
                step += 1
        finally:  # an abandoned iterator releases its open shards (files, pipes)
            for stream in streams.values():
                stream.close()

    def _part(self, streams: dict[int, _Stream], step: int) -> dict[str, Any]:
        """This worker's samples of ``step``: ``per_stream`` from each of its streams, in stream order."""
        visuals, captions, features, order, skipped = [], [], [], [], 0
        for v, stream in streams.items():
            for j in range(self.layout.per_stream):
                visual, caption, feature, bad = self._next_usable(stream)
                skipped += bad
                visuals.append(visual)
                captions.append(caption)
                features.append(feature)
                order.append((v, j))
            skipped += stream.pop_skipped()
        return {
            "step": step,
            "order": order,
            # one tensor per part: a list of tensors would cross to the main process one by one
            "visuals": _to_wire(torch.stack(visuals) if visuals else torch.empty(0)),
            "captions": captions,
            "tokens": token_rows(self.tokenizer, captions, self.max_length) if self.tokenizer and captions else [],
            "features": _pack(features) if self.text_features is not None and features else None,
            "skipped": skipped,
            "streams": {v: stream.state() for v, stream in streams.items()},
        }

    def _next_usable(self, stream: _Stream) -> tuple[torch.Tensor, str, Any, int]:
        """The stream's next sample that decodes, and how many unusable ones came before it."""
        for bad in range(MAX_BAD_SAMPLES_IN_A_ROW):
            sample, k, offset = stream.next_sample()
            rng = _rng(*stream.key, _SAMPLE, k, offset)
            try:
                visual, caption, column = self.transform(sample, rng)
            except BadSample as exn:
                stream.warnings.warn("%s key %s: %s", sample.get("__url__"), sample.get("__key__"), exn)
                continue
            feature = None
            if self.text_features is not None:
                feature = self.text_features.features(sample["__url__"], offset, sample["__key__"], column)
            return visual, caption, feature, bad
        raise DataError(
            f"data.data_path: {MAX_BAD_SAMPLES_IN_A_ROW} samples in a row were unusable (last: "
            f"{sample.get('__url__')} key {sample.get('__key__')}); check the shards' image and caption members"
        )


def _to_wire(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    """A part's tensor as a numpy array and its dtype's name, for the trip from a worker.

    Why: a tensor leaves a DataLoader worker through shared memory, one file descriptor and one
    authenticated socket handshake per tensor (~2 ms each on 2 cores); a part is a few hundred kB,
    which the pipe carries by value faster. bfloat16, which numpy lacks, travels as int16 bits.
    """
    name = str(tensor.dtype).removeprefix("torch.")
    bits = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return bits.numpy(), name


def _as_is(part: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate function: a part crosses from its worker as it is."""
    return part


def _from_wire(wire: tuple[np.ndarray, str]) -> torch.Tensor:
    array, name = wire
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if name == "bfloat16" else tensor


def _pack(rows: list[torch.Tensor]) -> tuple[tuple[np.ndarray, str], list[int]]:
    """A part's text-feature rows as one array and the row lengths.

    Why: one object per part, not one per sample (one shared-memory tensor per sample made the
    1-worker loader 7x slower than reading in the main process: 260 vs 1,900 samples/s on the
    demo's caches, and its worker starved the training threads).
    """
    return _to_wire(torch.cat(rows)), [row.shape[0] for row in rows]


def _unpack(packed: tuple[tuple[np.ndarray, str], list[int]] | None, n: int) -> list[torch.Tensor | None]:
    """The rows :func:`_pack` joined (views), or ``n`` Nones for a part without text features."""
    if packed is None:
        return [None] * n
    wire, lengths = packed
    return list(torch.split(_from_wire(wire), lengths))


class GlobalOrderLoader:
    """This rank's micro-batches of the global order: the workers' parts of each step, put back in
    stream order, tokenised and cut into ``accumulation`` micro-batches.

    Every micro-batch carries ``state``: the position after its step (the step, and this rank's
    streams), which :class:`StreamState` keeps for the checkpoint.
    """

    def __init__(
        self,
        parts: DataLoader,
        layout: Layout,
        tokenizer: Any,
        *,
        max_length: int,
        pad_to_multiple_of: int | None,
        latent_key: str | None,
        text_features: bool,
        meta: dict[str, Any],
    ) -> None:
        self.parts, self.layout, self.tokenizer = parts, layout, tokenizer
        self.max_length, self.pad_to_multiple_of = max_length, pad_to_multiple_of
        self.visual_key = "latent_moments" if latent_key else "pixel_values"
        self.text_features, self.meta = text_features, meta
        self.num_parts = max(1, min(parts.num_workers, len(layout.streams)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        parts = iter(self.parts)
        while True:
            step = [next(parts) for _ in range(self.num_parts)]
            if len({p["step"] for p in step}) != 1:  # the DataLoader returns workers round-robin, in order
                raise RuntimeError(f"data loader parts out of step: {[p['step'] for p in step]}")
            yield from self._micro_batches(step)

    def _micro_batches(self, step_parts: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rows = sorted(
            (
                (pos, visuals[i], part["captions"][i], part["tokens"][i] if part["tokens"] else None, features[i])
                for part in step_parts
                for visuals, features in [(_from_wire(part["visuals"]), _unpack(part["features"], len(part["order"])))]
                for i, pos in enumerate(part["order"])
            ),
            key=lambda row: row[0],  # (stream, index in the stream's share): the global order
        )  # fmt: skip
        streams: dict[int, dict] = {}
        for part in step_parts:
            streams.update(part["streams"])
        state = {**self.meta, "step": step_parts[0]["step"] + 1, "streams": streams}
        skipped = sum(p["skipped"] for p in step_parts)
        b = self.layout.micro_batch
        for micro in range(self.layout.accumulation):
            chunk = rows[micro * b : (micro + 1) * b]
            yield {
                self.visual_key: torch.stack([row[1] for row in chunk]),
                **self._text(chunk),
                "captions": [row[2] for row in chunk],
                "skipped": skipped if micro == 0 else 0,
                "state": state,
            }

    def _text(self, chunk: list[tuple]) -> dict[str, torch.Tensor]:
        """Token ids for the encoder, or (with a text cache) the features it would have produced."""
        if not self.text_features:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids, mask = pad_token_rows([row[3] for row in chunk], self.max_length, self.pad_to_multiple_of, pad)
            return {"input_ids": ids, "attention_mask": mask}
        hidden, mask = pad_features([row[4] for row in chunk], self.max_length, self.pad_to_multiple_of)
        return {"text_features": hidden, "attention_mask": mask}


class StreamState:
    """What the trainer checkpoints: the step the stream is at and this rank's streams' positions.

    Call :meth:`update` with every micro-batch *consumed* (not merely prefetched); pass
    :meth:`state_dict` (plain JSON; each rank's, or several ranks' merged by
    :func:`merge_stream_states`) back to :func:`build_dataloader` as ``resume_state``.
    """

    def __init__(self, state: dict | None = None) -> None:
        self.batches = int(state.get("batches", 0)) if state else 0
        self.state: dict[str, Any] = dict(state) if state and state.get("version") == STATE_VERSION else {}

    def update(self, batch: Mapping[str, Any]) -> None:
        self.state = batch["state"]
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        streams = self.state.get("streams", {})
        return {
            **{k: v for k, v in self.state.items() if k != "streams"},
            "version": STATE_VERSION,
            "batches": self.batches,
            "streams": {str(v): {**s, "slots": [list(x) for x in s["slots"]]} for v, s in streams.items()},
        }


def merge_stream_states(states: list[dict]) -> dict | None:
    """The run's position from every rank's saved state (any world size), or None when they are not
    states of the global order (written before it: they cannot be continued exactly)."""
    if not states or any(s.get("version") != STATE_VERSION for s in states):
        return None
    first = states[0]
    for s in states[1:]:
        for key in ("step", "seed", "urls", "num_streams", "global_batch"):
            if s.get(key) != first.get(key):
                raise ValueError(f"data states of one checkpoint disagree on {key}: {s.get(key)} != {first.get(key)}")
    streams: dict[str, dict] = {}
    for s in states:
        streams.update(s.get("streams", {}))
    return {**first, "streams": streams}


def _resume_positions(
    resume_state: dict | None, *, seed: int, layout: Layout, urls: list[str]
) -> tuple[dict[int, dict], int]:
    """This rank's stream states and the step to start at, checked against this run."""
    if not resume_state:
        return {}, 0
    if resume_state.get("version") != STATE_VERSION:
        raise ValueError(
            f"data resume state: version {resume_state.get('version')!r} != {STATE_VERSION} "
            "(written before the global sample order; the trainer restarts such a stream re-seeded)"
        )
    for key, ours in (("seed", seed), ("num_streams", layout.num_streams), ("global_batch", layout.global_batch)):
        if resume_state.get(key) != ours:
            raise ValueError(f"data resume state has {key} {resume_state.get(key)}, this run {ours}")
    if resume_state.get("urls") != _fingerprint(urls):
        log.warning("data resume state was written for another shard list; positions refer to other shards")
    saved = {int(v): s for v, s in resume_state.get("streams", {}).items()}
    missing = [v for v in layout.streams if v not in saved]
    if missing and saved:
        raise ValueError(f"data resume state lacks streams {missing[:8]} of rank {layout.rank}")
    return saved, int(resume_state.get("step", 0))


def caption_columns(caption_column: Any) -> tuple[str, str]:
    """(original, synthetic) member names from a dict, DictConfig or dataclass."""
    if isinstance(caption_column, Mapping):
        return str(caption_column.get("original") or ""), str(caption_column.get("synthetic") or "")
    return str(getattr(caption_column, "original", "") or ""), str(getattr(caption_column, "synthetic", ""))


def prompt_token_budget(tokenizer: Any, max_prompt_length: int, instruction: str) -> int:
    """Tokens a prompt may keep: the reference's max_prompt_length (BOS included) plus the instruction's."""
    return max_prompt_length + len(tokenizer(instruction.rstrip(), add_special_tokens=False)["input_ids"])


def build_dataloader(
    data_path: list[str] | str,
    tokenizer: Any,
    *,
    batch_size: int,
    resolution: int,
    center_crop: bool = True,
    image_column: str = "jpg",
    caption_column: Any = None,
    original_caption_rate: float = 0.0,
    random_dropping_rate: float = 0.1,
    instruction: str = "",
    max_prompt_length: int = 256,
    pad_to_multiple_of: int | None = 8,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    accumulation: int = 1,
    num_streams: int | None = None,
    num_open_shards: int = 4,
    resume_state: dict | None = None,
    pin_memory: bool = False,
    cached_latents: bool = False,
    text_cache: str | None = None,
) -> GlobalOrderLoader:
    """An infinite iterable of this rank's micro-batches (see the module docstring for the order).

    The global batch is ``batch_size x accumulation x world_size``; ``num_streams`` defaults to it
    (one stream per sample of the global batch) and must divide it and be divisible by
    ``world_size``. Micro-batch: ``pixel_values`` (B,3,R,R) float32 in [-1,1];
    ``input_ids``/``attention_mask`` (B,L) int64, L = longest prompt rounded up to
    ``pad_to_multiple_of`` (at most ``max_prompt_length`` + the instruction's tokens, as in the
    reference); ``captions`` after dropout; ``skipped`` (corrupt samples/shards skipped for this
    step, on its first micro-batch); ``state`` (the position after the step, for :class:`StreamState`).

    ``caption_column``: ``{"original": member or "", "synthetic": member}``, default
    ``{"original": "", "synthetic": "txt"}``. ``resume_state``: a :meth:`StreamState.state_dict`
    of this run (any world size: :func:`merge_stream_states` joins the ranks' files).

    ``cached_latents``: the shards come from :mod:`fusedit.data.latent_cache`; batches hold
    ``latent_moments`` (B, 2, C, h, w) float32 (posterior mean, std; (B, 1, ...) for an RAE) instead of
    ``pixel_values``.

    ``text_cache``: a folder written by :mod:`fusedit.data.text_cache` for these shards;
    batches hold ``text_features`` (B, L, D) (the cache's dtype) instead of ``input_ids``, with the
    same ``attention_mask`` and L the tokenised captions would have had.
    """
    if batch_size < 1 or resolution < 1 or num_open_shards < 1 or num_workers < 0 or accumulation < 1:
        raise ValueError("batch_size, resolution, accumulation, num_open_shards must be >= 1, num_workers >= 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    global_batch = batch_size * accumulation * world_size
    layout = Layout(global_batch, num_streams or global_batch, world_size, rank, batch_size, accumulation)
    layout.check()
    urls = validate_data_paths(data_path)
    original, synthetic = caption_columns(caption_column or {"original": "", "synthetic": "txt"})
    if not synthetic:
        raise ValueError("caption_column.synthetic must name the caption member (e.g. 'txt')")
    stream_states, start_step = _resume_positions(resume_state, seed=seed, layout=layout, urls=urls)
    latent_key = LATENT_MEMBER if cached_latents else None
    max_length = prompt_token_budget(tokenizer, max_prompt_length, instruction)
    transform = SampleTransform(
        resolution=resolution,
        center_crop=center_crop,
        image_column=image_column,
        caption_column=(original, synthetic),
        original_caption_rate=original_caption_rate,
        random_dropping_rate=random_dropping_rate,
        instruction=instruction,
        latent_key=latent_key,
    )
    parts = _StreamParts(
        urls,
        transform,
        layout,
        seed=seed,
        num_open_shards=num_open_shards,
        stream_states=stream_states,
        start_step=start_step,
        tokenizer=tokenizer,
        max_length=max_length,
        text_features=TextFeatureReader(text_cache, urls) if text_cache else None,
    )
    workers = min(num_workers, len(layout.streams))  # a worker without streams would have nothing to read
    loader = DataLoader(
        parts,
        batch_size=None,  # the dataset yields whole parts
        collate_fn=_as_is,  # the default would turn the parts' arrays back into shared-memory tensors
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=workers > 0,
    )
    meta = {
        "seed": seed,
        "urls": _fingerprint(urls),
        "num_streams": layout.num_streams,
        "global_batch": global_batch,
        "world_size": world_size,
        "rank": rank,
    }
    return GlobalOrderLoader(
        loader,
        layout,
        tokenizer,
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        latent_key=latent_key,
        text_features=text_cache is not None,
        meta=meta,
    )


__all__ = [
    "BadSample",
    "GlobalOrderLoader",
    "Layout",
    "SampleTransform",
    "ShardReader",
    "StreamState",
    "build_dataloader",
    "caption_columns",
    "merge_stream_states",
    "decode_image",
    "prompt_token_budget",
    "validate_data_paths",
]
