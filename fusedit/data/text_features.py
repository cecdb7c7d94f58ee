"""Text-feature cache format, and the reader the training stream looks features up with.

The cache (built by :mod:`fusedit.data.text_cache`) holds, for every sample of every source shard,
the frozen text encoder's hidden states of *both* caption columns, real tokens only. One file per
source shard, ``text-NNNNNN.safetensors``, for source shard ``NNNNNN`` of ``data.data_path``:

* ``features`` (T, D): every caption's token states, concatenated (bf16, or fp32 with
  ``--dtype float32``);
* ``starts``, ``lengths`` (N, 2) int64: row of the first token and token count of sample n's
  (original, synthetic) caption in ``features``; length -1 where the sample has no such caption;
* metadata ``keys``: the N sample keys in shard order (JSON), so a stream that reads another shard
  than the cache was made from fails on the first sample instead of training on other captions.

``empty.safetensors`` holds the features of the empty prompt (what caption dropout gives) once.

Lookup is by (source shard, position in the shard), which is how the stream addresses samples, so
the cache needs no key index, works next to a latent cache (same shard indices, same order), and a
resumed stream reads nothing it skips. Files are memory-mapped; only the rows a batch needs are read.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open

from fusedit.text import padded_length

CACHE_INFO = "cache.json"
FORMAT = 1
EMPTY_FILE = "empty.safetensors"
COLUMNS = ("original", "synthetic")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Open shard files a reader keeps (each is an mmap plus its small index).
OPEN_SHARDS = 16


def shard_name(index: int) -> str:
    return f"text-{index:06d}.safetensors"


class _Shard:
    """One cache file: its index in memory, its features memory-mapped."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"data.text_cache: {path} is missing; finish the cache build")
        self.path = path
        self.file = safe_open(str(path), framework="pt")
        self.keys: list[str] = json.loads(self.file.metadata()["keys"])
        self.starts = self.file.get_tensor("starts").tolist()
        self.lengths = self.file.get_tensor("lengths").tolist()
        self.features = self.file.get_slice("features")

    def rows(self, offset: int, key: str, column: int) -> torch.Tensor:
        if offset >= len(self.keys) or self.keys[offset] != key:
            have = repr(self.keys[offset]) if offset < len(self.keys) else f"only {len(self.keys)} samples"
            raise ValueError(
                f"data.text_cache: sample {offset} of the shard is {key!r}, the cache {self.path} "
                f"has {have}; the cache was made from other shards: rebuild it for data.data_path"
            )
        start, length = self.starts[offset][column], self.lengths[offset][column]
        if length < 0:
            raise ValueError(
                f"data.text_cache: {self.path} has no {COLUMNS[column]} caption for {key!r}, "
                "but the sample has one; rebuild the cache"
            )
        return self.features[start : start + length]


class TextFeatureReader:
    """Cached caption features by (shard URL, position, key, column), for the training stream.

    Opens files lazily (so a DataLoader can hand the reader to its workers) and keeps the
    :data:`OPEN_SHARDS` most recently used.
    """

    def __init__(self, folder: str | Path, urls: list[str]) -> None:
        self.folder = Path(folder)
        self.index: dict[str, int] = {}
        for i, url in enumerate(urls):
            self.index.setdefault(url, i)
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._empty: torch.Tensor | None = None

    def _shard(self, i: int) -> _Shard:
        if i in self._open:
            self._open.move_to_end(i)
        else:
            self._open[i] = _Shard(self.folder / shard_name(i))
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        return self._open[i]

    def empty(self) -> torch.Tensor:
        """(n, D) features of the empty prompt (BOS alone): every dropped caption's."""
        if self._empty is None:
            with safe_open(str(self.folder / EMPTY_FILE), framework="pt") as f:
                self._empty = f.get_tensor("features")
        return self._empty

    def features(self, url: str, offset: int, key: str, column: str | None) -> torch.Tensor:
        """(n, D) features of one caption; ``column`` None means dropped (the empty prompt)."""
        if column is None:
            return self.empty()
        return self._shard(self.index[url]).rows(offset, key, COLUMNS.index(column))


def pad_features(
    rows: list[torch.Tensor], max_length: int, pad_to_multiple_of: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) features and (B, L) int64 mask, padded by the rule :func:`fusedit.text.tokenize` uses.

    L is the longest row rounded up to ``pad_to_multiple_of`` (capped at ``max_length``), so a batch
    from the cache has the shape and mask the encoder's output for the same captions would have.
    Pad positions hold zeros: the DiT masks them as keys, so their values cannot reach the loss.
    """
    length = padded_length(max(r.shape[0] for r in rows), max_length, pad_to_multiple_of)
    hidden = torch.zeros((len(rows), length, rows[0].shape[1]), dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        hidden[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return hidden, mask
