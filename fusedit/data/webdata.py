"""The training data stream: image/caption samples from webdataset tar shards, as batches.

Design goal: a stream whose position is a handful of integers, so that a checkpoint can store it
and a resumed run continues with *exactly* the batches an uninterrupted run would have seen,
without decoding anything it already consumed. (The reference keeps no position and replays
``step x batch`` samples on resume, which takes hours at scale.)

How the stream is defined, per (rank, role); a role is the stream one DataLoader worker plays:

* **Shards**: the k-th shard a role opens is ``urls[draw(seed, rank, role, k)]``, a uniform
  draw *with replacement* (infinite resampling, no epochs). Being a pure function of the
  position, shard k can be found without drawing shards 0..k-1, and different ranks and roles
  read different shard sequences, which is how the data is split without node/worker splitting.
* **Shuffle**: a role keeps ``num_open_shards`` shards open and takes each next sample from the
  slot ``draw(seed, rank, role, draw_index)``; an exhausted (or broken) shard is replaced in its
  slot by the role's next shard. This interleaving shuffle is weaker than webdataset's shuffle
  buffer but its state is a few positions; a buffer of decoded samples cannot be checkpointed
  cheaply (storing it means storing thousands of samples, rebuilding it means replaying).
* **Position** of a role = the open slots' ``(k, offset)`` + the next k + the draw count.
  Resuming a slot at offset ``o`` re-reads that shard's first ``o`` samples (tar members, no
  image decoding): at most one shard per open slot.
* **Per-sample randomness** (caption column, caption dropout for CFG, random crop) comes from a
  generator seeded by ``(seed, rank, role, k, offset)``: the same sample at the same position
  always gets the same draws, and ranks differ (the reference seeded all ranks identically).
* **Batches**: each DataLoader worker builds whole batches of its own role. The DataLoader
  returns them round-robin, so batch b comes from role ``b % W``; a loader resumed after B
  batches gives physical worker j the role ``(B + j) % W``.

Corrupt data is never fatal: an unreadable or truncated shard ends that shard (the rest of it is
skipped), and a sample without its image or caption, or whose JPEG does not decode, is
skipped. Both are counted in the batch's ``skipped`` and logged (rate limited) with URL and key.
Truncated JPEGs are rejected: this module never sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
(the reference set it, silently training on grey-filled images).

Typical use by the trainer::

    loader = build_dataloader(paths, tokenizer, batch_size=32, resolution=256,
                              resume_state=checkpoint.get("data"))
    stream = StreamState(checkpoint.get("data"))
    for batch in loader:          # one iterator per loader: a new iterator restarts
        stream.update(batch)      # from resume_state
        ...
        checkpoint["data"] = stream.state_dict()
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from common.shards import BadSample, DataError, RateLimitedWarnings, decode_image, validate_data_paths
from fusedit.data.text_features import TextFeatureReader, pad_features
from fusedit.text import tokenize

log = logging.getLogger(__name__)

STATE_VERSION = 1
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


class _RoleStream:
    """The infinite raw-sample stream of one (rank, role), addressable by its state."""

    def __init__(
        self, urls: list[str], seed: int, rank: int, role: int, num_open_shards: int, state: dict | None
    ) -> None:
        self.urls, self.seed, self.rank, self.role = urls, seed, rank, role
        if state is None:
            slots, self.next_k, self.draws = [[k, 0] for k in range(num_open_shards)], num_open_shards, 0
        else:
            slots, self.next_k, self.draws = state["slots"], int(state["next_k"]), int(state["draws"])
        self.readers = [ShardReader(self._url(k), k, off) for k, off in slots]
        self.warnings = RateLimitedWarnings()
        self.skipped = 0  # broken shards since the last pop_skipped()

    def _url(self, k: int) -> str:
        return self.urls[_draw(len(self.urls), self.seed, self.rank, self.role, _SHARD, k)]

    def _replace(self, slot: int) -> None:
        self.readers[slot].close()
        self.readers[slot] = ShardReader(self._url(self.next_k), self.next_k, 0)
        self.next_k += 1

    def next_sample(self) -> tuple[dict[str, Any], int, int]:
        """The next raw sample and its position (k, offset) in the role's shard sequence."""
        slot = _draw(len(self.readers), self.seed, self.rank, self.role, _SLOT, self.draws)
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
        """(2, C, h, w) float32 posterior (mean, std) from a latent cache's ``.npy`` member."""
        if self.latent_key not in sample:
            raise BadSample(f"no latent member {self.latent_key!r} (the cache could not encode this image)")
        try:
            array = np.load(io.BytesIO(sample[self.latent_key]), allow_pickle=False)
        except Exception as exn:
            raise BadSample(f"latent member {self.latent_key!r} does not load: {exn!r}") from exn
        if array.ndim != 4 or array.shape[0] != 2:
            raise BadSample(f"latent member {self.latent_key!r} has shape {array.shape}, expected (2, C, h, w)")
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


class _WebBatches(IterableDataset):
    """Infinite whole batches; in worker j the role is ``(batches_done + j) % num_roles``."""

    def __init__(
        self,
        urls: list[str],
        tokenizer: Any,
        transform: SampleTransform,
        *,
        batch_size: int,
        max_length: int,
        pad_to_multiple_of: int | None,
        seed: int,
        rank: int,
        num_roles: int,
        num_open_shards: int,
        role_states: dict[int, dict],
        batches_done: int,
        text_features: TextFeatureReader | None = None,
    ) -> None:
        super().__init__()
        self.urls, self.tokenizer, self.transform = urls, tokenizer, transform
        self.text_features = text_features
        self.batch_size, self.max_length, self.pad_to_multiple_of = batch_size, max_length, pad_to_multiple_of
        self.seed, self.rank, self.num_roles, self.num_open_shards = seed, rank, num_roles, num_open_shards
        self.role_states, self.batches_done = role_states, batches_done
        self.fingerprint = _fingerprint(urls)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        role = (self.batches_done + (info.id if info is not None else 0)) % self.num_roles
        stream = _RoleStream(self.urls, self.seed, self.rank, role, self.num_open_shards, self.role_states.get(role))
        try:
            while True:
                yield self._batch(stream, role)
        finally:  # an abandoned iterator releases its open shards (files, pipes)
            stream.close()

    def _batch(self, stream: _RoleStream, role: int) -> dict[str, Any]:
        pixels, captions, features, skipped, in_a_row = [], [], [], 0, 0
        while len(pixels) < self.batch_size:
            sample, k, offset = stream.next_sample()
            rng = _rng(self.seed, self.rank, role, _SAMPLE, k, offset)
            try:
                image, caption, column = self.transform(sample, rng)
            except BadSample as exn:
                skipped += 1
                in_a_row += 1
                stream.warnings.warn("%s key %s: %s", sample.get("__url__"), sample.get("__key__"), exn)
                if in_a_row >= MAX_BAD_SAMPLES_IN_A_ROW:
                    raise DataError(
                        f"data.data_path: {in_a_row} samples in a row were unusable (last: {sample.get('__url__')} "
                        f"key {sample.get('__key__')}: {exn}); check the shards' image and caption members"
                    ) from exn
                continue
            in_a_row = 0
            pixels.append(image)
            captions.append(caption)
            if self.text_features is not None:
                features.append(self.text_features.features(sample["__url__"], offset, sample["__key__"], column))
        state = {
            "role": role,
            "num_roles": self.num_roles,
            "rank": self.rank,
            "seed": self.seed,
            "urls": self.fingerprint,
            **stream.state(),
        }
        return {
            "latent_moments" if self.transform.latent_key else "pixel_values": torch.stack(pixels),
            **self._text(captions, features),
            "captions": captions,
            "skipped": skipped + stream.pop_skipped(),
            "state": state,
        }

    def _text(self, captions: list[str], features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Token ids for the encoder, or (with a text cache) the features it would have produced."""
        if self.text_features is None:
            ids, mask = tokenize(self.tokenizer, captions, self.max_length, self.pad_to_multiple_of)
            return {"input_ids": ids, "attention_mask": mask}
        hidden, mask = pad_features(features, self.max_length, self.pad_to_multiple_of)
        return {"text_features": hidden, "attention_mask": mask}


class StreamState:
    """What the trainer checkpoints: batches consumed and each role's position after its last one.

    Call :meth:`update` with every batch *consumed* (not merely prefetched); pass
    :meth:`state_dict` (plain JSON) back to :func:`build_dataloader` as ``resume_state``.
    """

    def __init__(self, state: dict | None = None) -> None:
        self.batches = int(state["batches"]) if state else 0
        self.roles: dict[str, dict] = {str(r): dict(s) for r, s in (state or {}).get("roles", {}).items()}

    def update(self, batch: Mapping[str, Any]) -> None:
        role_state = dict(batch["state"])
        self.roles[str(role_state["role"])] = role_state
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "batches": self.batches,
            "roles": {r: {**s, "slots": [list(x) for x in s["slots"]]} for r, s in self.roles.items()},
        }


def _resume_positions(
    resume_state: dict | None, *, seed: int, rank: int, num_roles: int, urls: list[str]
) -> tuple[dict[int, dict], int]:
    """Role states and batch count from a :class:`StreamState` dict, checked against this run."""
    if not resume_state:
        return {}, 0
    if resume_state.get("version") != STATE_VERSION:
        raise ValueError(f"data resume state: version {resume_state.get('version')!r} != {STATE_VERSION}")
    roles = {int(r): s for r, s in resume_state.get("roles", {}).items()}
    for s in roles.values():
        if s["seed"] != seed or s["rank"] != rank:
            raise ValueError(
                f"data resume state belongs to seed {s['seed']} rank {s['rank']}, not seed {seed} rank {rank}"
            )
        if s["num_roles"] != num_roles:
            log.warning(
                "data resume state was written with %d stream roles (num_workers), this loader has %d: "
                "the stream continues but not batch-for-batch as the original run would have",
                s["num_roles"],
                num_roles,
            )
        if s["urls"] != _fingerprint(urls):
            log.warning("data resume state was written for another shard list; positions refer to other shards")
    return roles, int(resume_state["batches"])


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
    num_open_shards: int = 4,
    resume_state: dict | None = None,
    pin_memory: bool = False,
    cached_latents: bool = False,
    text_cache: str | None = None,
) -> DataLoader:
    """An infinite DataLoader of batches (see the module docstring for the stream's definition).

    Batch: ``pixel_values`` (B,3,R,R) float32 in [-1,1]; ``input_ids``/``attention_mask`` (B,L)
    int64, L = longest prompt rounded up to ``pad_to_multiple_of`` (at most ``max_prompt_length``
    + the instruction's tokens, as in the reference); ``captions`` after dropout; ``skipped``
    (corrupt samples/shards this worker skipped since its previous batch); ``state`` (the
    producing role's position after the batch, for :class:`StreamState`).

    ``caption_column``: ``{"original": member or "", "synthetic": member}``, default
    ``{"original": "", "synthetic": "txt"}``. ``resume_state``: a :meth:`StreamState.state_dict`
    of the same rank and seed; with the same ``num_workers`` the batches continue exactly.

    ``cached_latents``: the shards come from :mod:`fusedit.data.latent_cache`; batches hold
    ``latent_moments`` (B, 2, C, h, w) float32 (posterior mean, std) instead of ``pixel_values``.

    ``text_cache``: a folder written by :mod:`fusedit.data.text_cache` for these shards;
    batches hold ``text_features`` (B, L, D) (the cache's dtype) instead of ``input_ids``, with the
    same ``attention_mask`` and L the tokenised captions would have had.
    """
    if batch_size < 1 or resolution < 1 or num_open_shards < 1 or num_workers < 0:
        raise ValueError("batch_size, resolution and num_open_shards must be >= 1, num_workers >= 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    urls = validate_data_paths(data_path)
    original, synthetic = caption_columns(caption_column or {"original": "", "synthetic": "txt"})
    if not synthetic:
        raise ValueError("caption_column.synthetic must name the caption member (e.g. 'txt')")
    num_roles = max(1, num_workers)
    role_states, batches_done = _resume_positions(resume_state, seed=seed, rank=rank, num_roles=num_roles, urls=urls)
    transform = SampleTransform(
        resolution=resolution,
        center_crop=center_crop,
        image_column=image_column,
        caption_column=(original, synthetic),
        original_caption_rate=original_caption_rate,
        random_dropping_rate=random_dropping_rate,
        instruction=instruction,
        latent_key=LATENT_MEMBER if cached_latents else None,
    )
    dataset = _WebBatches(
        urls,
        tokenizer,
        transform,
        batch_size=batch_size,
        max_length=prompt_token_budget(tokenizer, max_prompt_length, instruction),
        pad_to_multiple_of=pad_to_multiple_of,
        seed=seed,
        rank=rank,
        num_roles=num_roles,
        num_open_shards=num_open_shards,
        role_states=role_states,
        batches_done=batches_done,
        text_features=TextFeatureReader(text_cache, urls) if text_cache else None,
    )
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )


__all__ = [
    "BadSample",
    "SampleTransform",
    "ShardReader",
    "StreamState",
    "build_dataloader",
    "caption_columns",
    "decode_image",
    "prompt_token_budget",
    "validate_data_paths",
]
