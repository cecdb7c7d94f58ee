"""Latent cache: every training image's VAE posterior, computed once instead of every step.

The VAE encoder is frozen, so encoding the same centre crop again each time a sample comes round
is wasted work (about a quarter of the toy world's training step; 0.27 TFLOP per sample for the
FLUX VAE at 256 px). This module writes, for each source shard, a shard with the same samples in
the same order: every member but the image is copied, and the image is replaced by
``latent.npy``, the posterior's (mean, std) stacked as (2, C, h, w), un-normalised (an RAE, which
has no posterior, stores its one latent as (1, C, h, w)).

Training reads it with ``data.latent_cache=DIR`` (``data.data_path`` still naming the images: the
cache's ``cache.json`` must list those shards as its sources, so a cache cannot be paired with
another dataset by mistake). The old spelling, ``data.cached_latents=true`` with ``data.data_path``
at the cache's shards, still works.


* the stream is *the same stream*: same shard count and order, same sample positions, and the
  centre crop draws nothing from the per-sample generator, so caption choice and dropout are
  those of the image shards;
* the posterior sample is drawn from the cached moments with the trainer's per-sample generator
  (``LatentCodec.from_moments``), so a float32 cache trains exactly like the images it came from
  (tests/test_latent_cache.py);
* an image that does not decode keeps its place without ``latent.npy``; the loader skips and
  counts it, as it would have skipped the image.

Text features have their own cache (:mod:`fusedit.data.text_cache`, ``data.text_cache``),
which aligns with this one by shard index and sample key.

``cache.json`` next to the shards records the VAE (spec and a fingerprint of its weights), the
resolution and the sources; the trainer refuses a cache made with another VAE or resolution.

    python -m fusedit.data.latent_cache -c configs/e2e-vae/toy.yaml --out toy/latents
    python train.py -c configs/e2e-vae/toy.yaml data.latent_cache=toy/latents
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from common.config import ConfigError
from common.files import write_json_atomic
from common.shards import TAR_MTIME, BadSample, validate_data_paths
from common.vae_config import VaeSpec
from common.weights import weights_fingerprint
from fusedit.config import TrainConfig, load_config
from fusedit.data.webdata import LATENT_MEMBER, SampleTransform, ShardReader, caption_columns
from fusedit.latents import LatentCodec

log = logging.getLogger(__name__)

CACHE_INFO = "cache.json"
FORMAT = 1
DTYPES = {"float32": np.float32, "float16": np.float16}


def shard_name(index: int) -> str:
    return f"latents-{index:06d}.tar"


def vae_fingerprint(codec: LatentCodec) -> str:
    """SHA-256 of the VAE's weights rounded to bfloat16, so an fp32 and a bf16 load agree."""
    return weights_fingerprint(codec.vae)


def _vae_record(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(VaeSpec.from_config(cfg.vae))


def _transform(cfg: TrainConfig) -> SampleTransform:
    d = cfg.data
    return SampleTransform(
        resolution=d.resolution,
        center_crop=True,
        image_column=d.image_column,
        caption_column=caption_columns(d.caption_column),
        original_caption_rate=d.original_caption_rate,
        random_dropping_rate=d.random_dropping_rate,
        instruction=d.instruction,
    )


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class _ShardEncoder:
    """Copies one source shard to a cache shard, encoding images in batches, order kept."""

    def __init__(self, codec: LatentCodec, transform: SampleTransform, batch_size: int, dtype: np.dtype) -> None:
        self.codec, self.transform, self.batch_size, self.dtype = codec, transform, batch_size, dtype
        self.counts = {"samples": 0, "encoded": 0, "undecodable": 0, "broken_shards": 0}

    def _flush(self, writer: Any, pending: list[tuple[dict, torch.Tensor | None]]) -> None:
        images = [img for _, img in pending if img is not None]
        if images:
            mean, std = self.codec.moments(torch.stack(images))
            stored = [mean] if std is None else [mean, std]  # an RAE has no posterior: its latent alone
            moments = torch.stack(stored, dim=1).cpu().numpy().astype(self.dtype)
        it = iter(moments) if images else iter(())
        for sample, img in pending:
            out = {k: v for k, v in sample.items() if not k.startswith("__") and k not in self.transform.image_keys}
            out["__key__"] = sample["__key__"]
            if img is not None:
                out[LATENT_MEMBER] = _npy_bytes(next(it))
                self.counts["encoded"] += 1
            writer.write(out)
            self.counts["samples"] += 1
        pending.clear()

    def encode_shard(self, url: str, dest: Path) -> None:
        import webdataset as wds

        partial = dest.with_name(f".{dest.name}.partial")
        reader = ShardReader(url, 0, 0)
        pending: list[tuple[dict, torch.Tensor | None]] = []
        images = 0  # decoded images in `pending`
        rng = np.random.default_rng(0)  # the centre crop draws nothing; the API wants a generator
        with wds.TarWriter(str(partial), mtime=TAR_MTIME) as writer:
            while True:
                try:
                    sample = reader.next()
                except Exception as exn:  # a truncated or unreadable tar ends the shard, as in training
                    log.warning("shard %s after %d samples: %r", url, reader.offset, exn)
                    self.counts["broken_shards"] += 1
                    break
                if sample is None:
                    break
                try:
                    image = self.transform.image(sample, rng)
                except BadSample as exn:
                    log.warning("%s key %s: %s (kept without a latent)", url, sample.get("__key__"), exn)
                    self.counts["undecodable"] += 1
                    image = None
                pending.append((sample, image))
                images += image is not None
                if images >= self.batch_size:
                    self._flush(writer, pending)
                    images = 0
            self._flush(writer, pending)
        reader.close()
        os.replace(partial, dest)


def build_cache(
    cfg: TrainConfig,
    out: str | Path,
    *,
    batch_size: int = 64,
    dtype: str = "float32",
    device: str | None = None,
    part: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict[str, Any] | None:
    """Encode ``cfg.data.data_path`` into ``out``; returns cache.json's content once complete.

    Resumable: finished shards are kept (each is written to a hidden partial file and renamed).
    ``part=(i, n)`` takes every n-th source shard from the i-th, so n processes can share the work;
    whichever finds every shard done writes ``cache.json``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    index, parts = part
    if not 0 <= index < parts:
        raise ConfigError(f"--part: {index}/{parts} is not a valid part")
    if not cfg.data.center_crop:
        raise ConfigError("data.center_crop: a latent cache needs the centre crop (random crops cannot be cached)")
    urls = validate_data_paths(cfg.data.data_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    codec = LatentCodec.from_spec(VaeSpec.from_config(cfg.vae), torch_dtype=torch.float32).to(dev)
    encoder = _ShardEncoder(codec, _transform(cfg), batch_size, DTYPES[dtype])
    todo = [(i, u) for i, u in enumerate(urls) if i % parts == index and not (out / shard_name(i)).exists()]
    for i, url in tqdm(todo, desc="latent cache", unit="shard", disable=not progress):
        encoder.encode_shard(url, out / shard_name(i))
    _write_stats(out, index, encoder)
    if not all((out / shard_name(i)).exists() for i in range(len(urls))):
        return None
    info = {
        "format": FORMAT,
        "vae": _vae_record(cfg),
        "vae_fingerprint": vae_fingerprint(codec),
        "resolution": cfg.data.resolution,
        "center_crop": True,
        "image_column": cfg.data.image_column,
        "dtype": dtype,
        "latent_shape": _latent_shape(codec, cfg.data.resolution),
        "sources": urls,
        "shards": len(urls),
        "data_path": str(out / f"latents-{{000000..{len(urls) - 1:06d}}}.tar"),
        "counts": _sum_stats(out),
    }
    write_json_atomic(out / CACHE_INFO, info, sort_keys=False)
    return info


def _latent_shape(codec: LatentCodec, resolution: int) -> list[int]:
    """The stored (mean, std) pair's shape (or the lone latent's, k = 1, for an RAE): the VAE's own latent."""
    _, c, h, w = codec.moment_shape(1, resolution, resolution)
    return [2 if codec.has_posterior else 1, c, h, w]


def _write_stats(out: Path, index: int, encoder: _ShardEncoder) -> None:
    """Per-part counts (added to any earlier run's, so a resumed build reports every shard)."""
    path = out / f".stats-part{index}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = {k: int(old.get(k, 0)) + v for k, v in encoder.counts.items()}
    write_json_atomic(path, merged, indent=None, sort_keys=False)


def _sum_stats(out: Path) -> dict[str, int]:
    total: dict[str, int] = {}
    for path in sorted(out.glob(".stats-part*.json")):
        for k, v in json.loads(path.read_text()).items():
            total[k] = total.get(k, 0) + int(v)
    return total


# ----------------------------------------------------------------------------- checks at train time


def _remote(url: str) -> bool:
    """A shard this process cannot look at on disk (an URL or a ``pipe:`` command)."""
    return "://" in url or url.startswith("pipe:")


def _folder_info(folder: Path) -> tuple[Path, dict]:
    path = folder / CACHE_INFO
    if not path.is_file():
        raise ConfigError(
            f"data.latent_cache: {folder} has no {CACHE_INFO} (a build not finished, or none); build the cache "
            f"with `python -m fusedit.data.latent_cache -c CONFIG --out {folder}`"
        )
    return path, json.loads(path.read_text())


def _cache_infos(cfg: TrainConfig) -> list[tuple[Path, dict]]:
    """cache.json of the latent cache folder (or, old spelling, of every local folder the data paths name)."""
    if cfg.data.latent_cache:
        return [_folder_info(Path(cfg.data.latent_cache).expanduser())]
    folders = []
    for url in validate_data_paths(cfg.data.data_path):
        if _remote(url):
            continue
        folder = Path(url).parent
        if folder not in folders:
            folders.append(folder)
    return [_folder_info(folder) for folder in folders]


def training_urls(cfg: TrainConfig) -> list[str]:
    """The shards training reads: the latent cache's (one per source shard, same order) or data.data_path's."""
    if not cfg.data.latent_cache:
        return validate_data_paths(cfg.data.data_path)
    folder = Path(cfg.data.latent_cache).expanduser()
    _, info = _folder_info(folder)
    return [str(folder / shard_name(i)) for i in range(int(info.get("shards", 0)))]


def _same_shards(recorded: list[str], named: list[str]) -> bool:
    """The cache's sources are data_path's shards (local paths compared resolved: the cache may be
    built with relative paths and read with absolute ones)."""

    def key(url: str) -> str:
        return url if _remote(url) else str(Path(url).expanduser().resolve())

    return [key(u) for u in recorded] == [key(u) for u in named]


def check_cache_matches(cfg: TrainConfig) -> None:
    """Cheap checks before any model loads: same VAE spec, resolution and image column."""
    want = {"vae": _vae_record(cfg), "resolution": cfg.data.resolution, "image_column": cfg.data.image_column}
    named = validate_data_paths(cfg.data.data_path) if cfg.data.latent_cache else []
    for path, info in _cache_infos(cfg):
        if info.get("format") != FORMAT:
            raise ConfigError(f"data.latent_cache: {path} has format {info.get('format')!r}, expected {FORMAT}")
        if cfg.data.latent_cache and not _same_shards(info.get("sources", []), named):
            raise ConfigError(
                f"data.latent_cache: {path} was made from {len(info.get('sources', []))} other shards than the "
                f"{len(named)} of data.data_path; point data.latent_cache at this dataset's cache or rebuild it"
            )
        for key, value in want.items():
            if info.get(key) != value:
                field = {"vae": "vae", "resolution": "data.resolution", "image_column": "data.image_column"}[key]
                raise ConfigError(
                    f"{field}: the latent cache {path} was made with {key}={info.get(key)!r}, "
                    f"this config has {value!r}; rebuild the cache or point data.latent_cache elsewhere"
                )


def check_cache_fingerprint(cfg: TrainConfig, codec: LatentCodec) -> None:
    """The loaded VAE's weights are those the cache was made with (a fine-tuned twin is not)."""
    have = vae_fingerprint(codec)
    for path, info in _cache_infos(cfg):
        if info.get("vae_fingerprint") != have:
            raise ConfigError(
                f"vae: the weights at {cfg.vae.pretrained_model_name_or_path!r} (fingerprint {have}) are not "
                f"those the latent cache {path} was made with ({info.get('vae_fingerprint')}); rebuild the cache"
            )


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fusedit.data.latent_cache",
        description="Encode a training config's image shards once into VAE posterior shards.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", required=True, help="training YAML whose data.data_path and vae to use")
    p.add_argument("--out", required=True, help="folder for latents-NNNNNN.tar and cache.json")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="storage dtype (default: %(default)s)")
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
        info = build_cache(
            cfg, args.out, batch_size=args.batch_size, dtype=args.dtype, device=args.device, part=(index, parts)
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if info is None:
        print(f"part {args.part} done; other parts still running (cache.json is written by the last one)")
        return 0
    print(json.dumps(info["counts"]))
    print(f"train with: data.latent_cache={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
