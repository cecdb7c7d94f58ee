"""Text-feature cache: the frozen text encoder's hidden states of every caption, computed once.

The text encoder is frozen, so encoding the same caption again each time its sample comes round is
wasted work: for Gemma-2B about 2 x 2.5e9 FLOPs per token, more than the 3B DiT's forward on the
text half of its sequence. This module runs the encoder once over ``data.data_path`` (image shards
or a latent cache's shards, which keep the captions) and writes, per source shard, the features of
*both* caption columns of every sample (``data.caption_column.original`` / ``.synthetic``), after
the processing the stream applies (UTF-8, stripped, ``data.instruction`` prepended, BOS, truncated
at the token budget), real tokens only, at ``model.text_hidden_states_index``; plus the empty
prompt's features once (what caption dropout produces). Format: :mod:`fusedit.data.text_features`.

Training reads it with ``data.text_cache=DIR`` (next to ``data.latent_cache`` or not):

* the stream is *the same stream*: it reads the same shards and samples and makes the same caption
  choice and dropout decision with the same per-sample generator, then looks the chosen caption's
  features up by (shard, position) instead of tokenising it. Batches are padded exactly as the
  encoder's output would be (same length rule, same attention mask), so a float32 cache trains like
  the encoder it came from (tests/test_text_cache.py); bf16 (the default) rounds the features once;
* ``cache.json`` records the encoder (a fingerprint of its weights rounded to bf16), the tokenizer
  (a fingerprint of its definition), ``max_prompt_length``, the layer, the instruction and the caption
  columns. Training refuses a cache that differs, naming the field: the cheap fields before anything
  loads, the fingerprints right after the encoder loads.

Building is resumable (each shard is written to a hidden partial file and renamed; finished shards
are kept) and splittable (``--part I/N``); it prints the storage it expects before it starts.

    python -m fusedit.data.text_cache -c configs/e2e-vae/toy.yaml --out toy/text-features
    python train.py -c configs/e2e-vae/toy.yaml data.text_cache=toy/text-features
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from common.config import ConfigError
from common.files import write_json_atomic
from common.shards import BadSample, validate_data_paths
from common.weights import weights_fingerprint
from fusedit.config import TrainConfig, load_config
from fusedit.data.text_features import CACHE_INFO, COLUMNS, DTYPES, EMPTY_FILE, FORMAT, shard_name
from fusedit.data.webdata import SampleTransform, ShardReader, caption_columns, prompt_token_budget
from fusedit.text import TextEncoder, tokenize

log = logging.getLogger(__name__)

REQUEST = ".request.json"  # what a partial build was started with; a resumed build must match it
ESTIMATE_SAMPLES = 1024  # samples whose captions the storage estimate tokenises
INDEX_BYTES = 32  # starts + lengths (2 x 2 int64) per sample


# ----------------------------------------------------------------------------- what a cache records


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's definition (vocabulary, merges, normaliser, BOS/pad ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    ids = json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256((ids + body).encode()).hexdigest()[:16]


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    """The config fields the features depend on, cheap to compare before anything loads."""
    d = cfg.data
    original, synthetic = caption_columns(d.caption_column)
    return {
        "max_prompt_length": d.max_prompt_length,
        "text_hidden_states_index": cfg.model.text_hidden_states_index,
        "instruction": d.instruction,
        "caption_column": {"original": original, "synthetic": synthetic},
    }


# Record key -> the config field a mismatch is reported under.
FIELDS = {
    "max_prompt_length": "data.max_prompt_length",
    "text_hidden_states_index": "model.text_hidden_states_index",
    "instruction": "data.instruction",
    "caption_column": "data.caption_column",
    "encoder_fingerprint": "model.base",
    "tokenizer_fingerprint": "data.tokenizer",
    "encoder": "model.base",
    "hidden_size": "model.base",
    "encoder_dtype": "trainer.mixed_precision",
    "dtype": "--dtype",
    "max_length": "data.max_prompt_length",
    "sources": "data.data_path",
    "shards": "data.data_path",
}


def _encoder_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the trainer runs the frozen encoder in, so the cache holds what training would compute."""
    from common.precision import Precision

    return Precision(cfg.trainer.mixed_precision).frozen_dtype


def load_encoder(cfg: TrainConfig, device: torch.device | str) -> TextEncoder:
    """The frozen text encoder exactly as :func:`fusedit.train.trainer.build_components` loads it."""
    return TextEncoder.from_config(cfg, _encoder_dtype(cfg)).to(device)


def _record(cfg: TrainConfig, encoder: TextEncoder, urls: list[str], dtype: str) -> dict[str, Any]:
    m = cfg.model
    return {
        **_settings(cfg),
        "encoder": {"base": m.base, "subfolder": m.base_subfolder, "tokenizer": cfg.data.tokenizer},
        "encoder_fingerprint": weights_fingerprint(encoder.model),
        "tokenizer_fingerprint": tokenizer_fingerprint(encoder.tokenizer),
        "encoder_dtype": str(_encoder_dtype(cfg)).removeprefix("torch."),
        "dtype": dtype,
        "hidden_size": encoder.hidden_size,
        "max_length": prompt_token_budget(encoder.tokenizer, cfg.data.max_prompt_length, cfg.data.instruction),
        "sources": urls,
        "shards": len(urls),
    }


def _check_resume(out: Path, record: dict[str, Any]) -> None:
    """A folder holding part of a build continues only with the settings it was started with."""
    path = out / REQUEST
    if not path.exists():
        write_json_atomic(path, record, sort_keys=False)
        return
    old = json.loads(path.read_text())
    for key, value in record.items():
        if old.get(key) != value:
            have, want = (repr(v)[:200] for v in (old.get(key), value))  # a shard list can be long
            raise ConfigError(
                f"{FIELDS.get(key, key)}: {out} holds a text cache (or part of one) made with {key}={have}, "
                f"this build has {want}; use another --out or delete the folder"
            )


# ----------------------------------------------------------------------------- encoding


class _ShardEncoder:
    """Encodes both caption columns of every sample of a shard; features kept in shard order."""

    def __init__(
        self, encoder: TextEncoder, transform: SampleTransform, max_length: int, batch_size: int, dtype: torch.dtype
    ) -> None:
        self.encoder, self.transform, self.max_length = encoder, transform, max_length
        self.batch_size, self.dtype = batch_size, dtype
        self.keys = (transform.original_key, transform.synthetic_key)

    def prompts(self, sample: dict[str, Any]) -> list[str | None]:
        """(original, synthetic) prompts as the stream builds them; None where a column is absent."""
        out: list[str | None] = []
        for key in self.keys:
            try:
                out.append(self.transform.instruction + self.transform.caption_text(sample, key) if key else None)
            except BadSample:  # absent or not UTF-8: the stream never picks it (or skips the sample)
                out.append(None)
        return out

    def read(self, url: str) -> tuple[list[str], list[list[str | None]], bool]:
        """Keys and prompts of a shard's samples in order, and whether a broken tar ended it (as in training)."""
        reader = ShardReader(url, 0, 0)
        keys, prompts = [], []
        try:
            while True:
                try:
                    sample = reader.next()
                except Exception as exn:  # truncated or unreadable: the stream stops at the same place
                    log.warning("shard %s after %d samples: %r", url, reader.offset, exn)
                    return keys, prompts, True
                if sample is None:
                    return keys, prompts, False
                keys.append(sample["__key__"])
                prompts.append(self.prompts(sample))
        finally:
            reader.close()

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Real-token features of each prompt, in order; batched by length so little padding is computed.

        The encoder is causal and right-padded, so a token's state does not depend on the padding
        (or the other prompts) of its batch: training's batches would give the same rows.
        """
        if not prompts:
            return []
        ids, mask = tokenize(self.encoder.tokenizer, prompts, self.max_length, None)
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True).tolist()
        out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
        for first in range(0, len(order), self.batch_size):
            chunk = order[first : first + self.batch_size]
            width = int(lengths[chunk].max())
            hidden = self.encoder.encode(ids[chunk, :width], mask[chunk, :width]).to("cpu", self.dtype)
            for row, i in enumerate(chunk):
                out[i] = hidden[row, : int(lengths[i])].clone()  # not a view: the batch can be freed
        return out

    def encode_shard(self, url: str, dest: Path) -> int:
        """Write ``dest`` (via a hidden partial file); returns the shard's sample count."""
        keys, prompts, broken = self.read(url)
        features = self.encode([p for row in prompts for p in row if p is not None])
        tensors = _pack(prompts, features, torch.zeros((0, self.encoder.hidden_size), dtype=self.dtype))
        counts = {
            "samples": len(keys),
            "captions": len(features),
            "missing_captions": len(keys) * sum(bool(k) for k in self.keys) - len(features),
            "tokens": tensors["features"].shape[0],
            "broken_shards": int(broken),
        }
        # The counts travel with the shard, so a killed or split build still totals every shard.
        meta = {"keys": json.dumps(keys), "source": url, "format": str(FORMAT), "counts": json.dumps(counts)}
        partial = dest.with_name(f".{dest.name}.partial")
        save_file(tensors, str(partial), metadata=meta)
        os.replace(partial, dest)
        return len(keys)

    def write_empty(self, out: Path) -> None:
        """The empty prompt's features (BOS alone after tokenisation), once per cache."""
        dest = out / EMPTY_FILE
        if not dest.exists():
            partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")  # parts may race here
            save_file({"features": self.encode([""])[0].contiguous()}, str(partial))
            os.replace(partial, dest)


def _pack(
    prompts: list[list[str | None]], features: list[torch.Tensor], empty: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Features concatenated in (sample, column) order, and each caption's start and length (-1: absent)."""
    starts = torch.full((len(prompts), 2), -1, dtype=torch.long)
    lengths = torch.full((len(prompts), 2), -1, dtype=torch.long)
    it, total = iter(features), 0
    for n, row in enumerate(prompts):
        for c, prompt in enumerate(row):
            if prompt is not None:
                starts[n, c], lengths[n, c] = total, next(it).shape[0]
                total += int(lengths[n, c])
    return {"features": torch.cat(features) if features else empty, "starts": starts, "lengths": lengths}


# ----------------------------------------------------------------------------- storage estimate


def estimate_storage(
    encoder: _ShardEncoder, url: str, shards_total: int, shards_todo: int, limit: int = ESTIMATE_SAMPLES
) -> dict[str, Any]:
    """Bytes per sample and in total, from one shard's sample count and its first samples' token counts."""
    keys, prompts, _ = encoder.read(url)
    prompts = prompts[:limit]
    item = torch.empty((), dtype=encoder.dtype).element_size()
    width = encoder.encoder.hidden_size
    tokens = {}
    for c, column in enumerate(COLUMNS):  # mean tokens per sample (0 for samples without the column)
        texts = [row[c] for row in prompts if row[c] is not None]
        mask = tokenize(encoder.encoder.tokenizer, texts, encoder.max_length, None)[1] if texts else torch.zeros(1)
        tokens[column] = float(mask.sum()) / max(1, len(prompts))
    per_sample = sum(tokens.values()) * width * item + INDEX_BYTES
    samples = len(keys) * shards_total
    return {
        "source": url,
        "samples_in_source": len(keys),
        "tokens_per_sample": tokens,
        "bytes_per_token": width * item,
        "bytes_per_sample": per_sample,
        "bytes_per_sample_max": 2 * encoder.max_length * width * item + INDEX_BYTES,
        "samples_total": samples,
        "bytes_total": per_sample * samples,
        "samples_todo": len(keys) * shards_todo,
        "bytes_todo": per_sample * len(keys) * shards_todo,
    }


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def _shards(n: int) -> str:
    return f"{n} shard" + ("s" if n != 1 else "")


def render_estimate(e: dict[str, Any], shards_total: int, shards_todo: int) -> str:
    """One line: per sample (mean tokens per column x bytes per token) and in total, before any encoding."""
    t = e["tokens_per_sample"]
    return (
        f"text cache estimate: {_size(e['bytes_per_sample'])} per sample ({t['original']:.1f} original + "
        f"{t['synthetic']:.1f} synthetic tokens x {e['bytes_per_token']:,} B; at most "
        f"{_size(e['bytes_per_sample_max'])} at the token budget), from {e['samples_in_source']} samples in "
        f"{e['source']}; ~{_size(e['bytes_total'])} for ~{e['samples_total']:,} samples in {_shards(shards_total)}, "
        f"this run ~{_size(e['bytes_todo'])} ({_shards(shards_todo)})"
    )


# ----------------------------------------------------------------------------- build


def _transform(cfg: TrainConfig) -> SampleTransform:
    d = cfg.data
    return SampleTransform(
        resolution=d.resolution,
        center_crop=d.center_crop,
        image_column=d.image_column,
        caption_column=caption_columns(d.caption_column),
        original_caption_rate=d.original_caption_rate,
        random_dropping_rate=d.random_dropping_rate,
        instruction=d.instruction,
    )


def _check_options(dtype: str, part: tuple[int, int], batch_size: int) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    if not 0 <= part[0] < part[1]:
        raise ConfigError(f"--part: {part[0]}/{part[1]} is not a valid part")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")


def build_text_cache(
    cfg: TrainConfig,
    out: str | Path,
    *,
    batch_size: int = 64,
    dtype: str = "bfloat16",
    device: str | None = None,
    part: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict[str, Any] | None:
    """Encode the captions of ``cfg.data.data_path`` into ``out``; returns cache.json's content once complete.

    ``part=(i, n)`` takes every n-th source shard from the i-th, so n processes can share the work;
    whichever finds every shard done writes ``cache.json``. Finished shards are never redone.
    """
    _check_options(dtype, part, batch_size)
    urls = validate_data_paths(cfg.data.data_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder(cfg, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    record = _record(cfg, encoder, urls, dtype)
    _check_resume(out, record)
    shards = _ShardEncoder(encoder, _transform(cfg), record["max_length"], batch_size, DTYPES[dtype])
    todo = [(i, u) for i, u in enumerate(urls) if i % part[1] == part[0] and not (out / shard_name(i)).exists()]
    shards.write_empty(out)
    if todo:
        estimate = estimate_storage(shards, todo[0][1], len(urls), len(todo))
        print(render_estimate(estimate, len(urls), len(todo)), flush=True)
        with tqdm(total=estimate["samples_todo"], desc="text cache", unit="sample", disable=not progress) as bar:
            for i, url in todo:
                bar.update(shards.encode_shard(url, out / shard_name(i)))
    if not all((out / shard_name(i)).exists() for i in range(len(urls))):
        return None
    return _finish(out, record)


def _finish(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """cache.json: the record, the counts of every part, and the storage actually used."""
    files = [out / shard_name(i) for i in range(record["shards"])]
    counts: dict[str, int] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:  # the header only
            for key, n in json.loads(f.metadata()["counts"]).items():
                counts[key] = counts.get(key, 0) + n
    files.append(out / EMPTY_FILE)
    total = sum(f.stat().st_size for f in files)
    info = {
        "format": FORMAT,
        **record,
        "counts": counts,
        "bytes": total,
        "bytes_per_sample": total / max(1, counts.get("samples", 0)),
    }
    write_json_atomic(out / CACHE_INFO, info, sort_keys=False)
    return info


# ----------------------------------------------------------------------------- checks at train time


def _info(cfg: TrainConfig) -> tuple[Path, dict[str, Any]]:
    folder = Path(cfg.data.text_cache).expanduser()
    path = folder / CACHE_INFO
    if not path.is_file():
        raise ConfigError(
            f"data.text_cache: {folder} has no {CACHE_INFO} (a build not finished, or none); build it "
            f"with `python -m fusedit.data.text_cache -c CONFIG --out {folder}`"
        )
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise ConfigError(f"data.text_cache: {path} has format {info.get('format')!r}, expected {FORMAT}")
    return path, info


def _refuse(field: str, path: Path, key: str, have: Any, want: Any) -> None:
    raise ConfigError(
        f"{field}: the text cache {path} was made with {key}={have!r}, this config has {want!r}; "
        "rebuild the cache or set data.text_cache=null"
    )


def check_text_cache_matches(cfg: TrainConfig) -> None:
    """Cheap checks before any model loads: token budget, layer, instruction, caption columns, shards."""
    path, info = _info(cfg)
    want = _settings(cfg)
    for key in ("max_prompt_length", "text_hidden_states_index", "instruction"):
        if info.get(key) != want[key]:
            _refuse(FIELDS[key], path, key, info.get(key), want[key])
    have_cols, want_cols = info.get("caption_column", {}), want["caption_column"]
    used = ("original", "synthetic") if cfg.data.original_caption_rate > 0 else ("synthetic",)
    for column in used:
        if have_cols.get(column) != want_cols[column]:
            _refuse(
                f"data.caption_column.{column}",
                path,
                f"caption_column.{column}",
                have_cols.get(column),
                want_cols[column],
            )
    shards = len(validate_data_paths(cfg.data.data_path))
    if info.get("shards") != shards:
        _refuse("data.data_path", path, "shards", info.get("shards"), shards)


def check_text_cache_fingerprint(cfg: TrainConfig, encoder: TextEncoder) -> None:
    """The loaded encoder and tokenizer are those the cache was made with (a fine-tuned twin is not)."""
    path, info = _info(cfg)
    have = {"tokenizer_fingerprint": tokenizer_fingerprint(encoder.tokenizer)}
    have["encoder_fingerprint"] = weights_fingerprint(encoder.model)
    for key, value in have.items():
        if info.get(key) != value:
            field = "data.tokenizer" if key == "tokenizer_fingerprint" and cfg.data.tokenizer else "model.base"
            raise ConfigError(
                f"{field}: the {'tokenizer' if key.startswith('tokenizer') else 'text encoder weights'} at "
                f"{cfg.data.tokenizer or cfg.model.base!r} (fingerprint {value}) are not those the text cache {path} "
                f"was made with ({info.get(key)}); rebuild the cache"
            )


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fusedit.data.text_cache",
        description="Encode both caption columns of a training config's shards once with its frozen text encoder.",
        epilog=__doc__.rsplit("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", required=True, help="training YAML whose data and model.base to use")
    p.add_argument("--out", required=True, help="folder for text-NNNNNN.safetensors, empty.safetensors, cache.json")
    p.add_argument("--batch-size", type=int, default=64, help="captions per encoder call (default: %(default)s)")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=sorted(DTYPES),
        help="storage dtype (default: %(default)s; float32 trains like the encoder up to float rounding)",
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--part", default="0/1", help="I/N: this process encodes source shards i with i %% N == I")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        index, parts = (int(x) for x in args.part.split("/"))
        cfg = load_config(args.config, args.overrides)
        info = build_text_cache(
            cfg, args.out, batch_size=args.batch_size, dtype=args.dtype, device=args.device, part=(index, parts)
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if info is None:
        print(f"part {args.part} done; other parts still running (cache.json is written by the last one)")
        return 0
    print(json.dumps(info["counts"]))
    print(f"stored {_size(info['bytes'])}, {_size(info['bytes_per_sample'])} per sample")
    print(f"train with: data.text_cache={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
