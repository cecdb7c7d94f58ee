"""Encode labelled shards once with a frozen VAE: posterior mean/std per image, plus latent statistics.

``python -m repae.cache_latents --vae NAME_OR_PATH --shards PATTERN --out DIR`` (also under
``torchrun``). What differs from the reference's ``cache_latents.py`` (docs/reference-facts.md, REPAE-6.2):

* **No single writer** (reference defect REPAE-D15): shard ``i`` belongs to rank ``i mod W``, and each rank
  writes its own ``<shard-stem>.safetensors`` (``mean``, ``std`` (n,C,h,w), ``labels`` (n,)) and
  ``<shard-stem>.json`` (the n sample keys in order). Nothing is gathered; there is no padding
  to de-duplicate.
* **Resumable**: both files are written under temporary names and renamed, the key list last, so
  a shard counts as done exactly when its ``.json`` exists (and was made with the same label rule
  and resolution); a rerun skips done shards.
* **Paired by key**: :class:`repae.data.LabeledImageLoader` matches latents to images through the
  key lists, never through sort order (REPAE-D9).
* **Latent statistics** (the reference computed none, REPAE-D19): every shard file also
  stores float64 per-channel sums of ``E[z]`` and ``E[z^2]`` over its posteriors, where
  ``z = mean + std * eps``; once all ranks are done, one process adds up the sums of *all* files
  (so resumed shards count too) and writes ``stats.json`` and ``latents_stats.safetensors``
  (``latents_scale = 1/std``, ``latents_bias = mean``, shape [1,C,1,1], readable by
  :func:`repae.vae.load_latents_stats`). The expectation over ``eps`` is taken exactly
  (``E[z^2] = mean^2 + std^2``), so the statistics carry no sampling noise.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.files import write_json_atomic, write_with
from common.shards import BadSample, validate_data_paths
from repae.data import LabelRule, RateLimitedLog, ShardFiles, index_shard, local_shard_path, to_uint8_chw

log = logging.getLogger(__name__)

FORMAT = "repae-latents-v1"
STATS_JSON = "stats.json"
STATS_TENSORS = "latents_stats.safetensors"
_RESERVED_STEMS = ("stats", "latents_stats")


# ----------------------------------------------------------------------------- files


def shard_stem(url: str) -> str:
    """File stem of a shard: ``.../imagenet-000012.tar`` -> ``imagenet-000012``."""
    name = Path(local_shard_path(url)).name
    return name[: -len(".tar")] if name.endswith(".tar") else Path(name).stem


def _stems(urls: list[str]) -> list[str]:
    stems = [shard_stem(u) for u in urls]
    seen: dict[str, str] = {}
    for stem, url in zip(stems, urls):
        if stem in _RESERVED_STEMS:
            raise ValueError(f"shard {url}: the stem {stem!r} is reserved for the statistics files")
        if stem in seen:
            raise ValueError(f"shards {seen[stem]} and {url} share the file stem {stem!r}: outputs would collide")
        seen[stem] = url
    return stems


def is_done(out: Path, stem: str, request: dict[str, str]) -> bool:
    """A shard is done when its key list exists and its tensors were made for the same request."""
    keys, tensors = out / f"{stem}.json", out / f"{stem}.safetensors"
    if not (keys.is_file() and tensors.is_file()):
        return False
    try:
        with safe_open(str(tensors), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged file is simply redone
        return False
    return all(meta.get(k) == v for k, v in request.items())


def _write_shard(out: Path, stem: str, acc: _Accumulator, settings: _Settings, source: str) -> None:
    """Tensors then key list, each to a temporary name and renamed: the .json is the commit marker
    (an older one is removed first, so it can never vouch for tensors of another run)."""
    (out / f"{stem}.json").unlink(missing_ok=True)
    metadata = {**settings.request, "source": source, "storage": "fp16" if settings.fp16 else "fp32"}
    write_with(
        out / f"{stem}.safetensors", lambda tmp: save_file(acc.tensors(settings.fp16), str(tmp), metadata=metadata)
    )
    write_json_atomic(out / f"{stem}.json", acc.keys, indent=None, sort_keys=False)


class _Accumulator:
    """One shard's encoded posteriors and its float64 moment sums."""

    def __init__(self) -> None:
        self.means: list[torch.Tensor] = []
        self.stds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.keys: list[str] = []
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.elements = 0

    def add(self, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, keys: list[str]) -> None:
        m, s = mean.double(), std.double()
        part_sum, part_sq = m.sum(dim=(0, 2, 3)), (m * m + s * s).sum(dim=(0, 2, 3))
        self.sum = part_sum if self.sum is None else self.sum + part_sum
        self.sumsq = part_sq if self.sumsq is None else self.sumsq + part_sq
        self.elements += mean.shape[0] * mean.shape[2] * mean.shape[3]
        self.means.append(mean)
        self.stds.append(std)
        self.labels.append(labels)
        self.keys.extend(keys)

    def tensors(self, fp16: bool) -> dict[str, torch.Tensor]:
        dtype = torch.float16 if fp16 else torch.float32
        if not self.keys:  # a shard without one usable image: empty, but marked done
            empty = torch.zeros(0, dtype=dtype)
            return {"mean": empty, "std": empty, "labels": torch.zeros(0, dtype=torch.int64)}
        return {
            "mean": torch.cat(self.means).to(dtype).contiguous(),
            "std": torch.cat(self.stds).to(dtype).contiguous(),
            "labels": torch.cat(self.labels).to(torch.int64),
            "sum": self.sum,
            "sumsq": self.sumsq,
            "elements": torch.tensor([self.elements], dtype=torch.int64),
        }


# ----------------------------------------------------------------------------- reading shards


class _ShardBatches(IterableDataset):
    """Decoded batches of whole shards, in shard order; worker j of n reads shards j, j+n, ...

    Each item: ``{"shard": i, "images", "labels", "keys", "last": bool, "skipped": int}``; the
    last batch of a shard may be short (even empty), so every shard ends with ``last=True``.
    """

    def __init__(self, urls: list[str], label: str, resolution: int, batch_size: int) -> None:
        super().__init__()
        self.urls, self.label = urls, label
        self.resolution, self.batch_size = resolution, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        files, warnings = ShardFiles(), RateLimitedLog()
        try:
            for shard in range(worker, len(self.urls), workers):
                yield from self._shard(shard, files, warnings)
        finally:
            files.close()

    def _shard(self, shard: int, files: ShardFiles, warnings: RateLimitedLog) -> Iterator[dict[str, Any]]:
        url = self.urls[shard]
        index = index_shard(url, self.label, warnings)
        path, skipped = local_shard_path(url), index.skipped
        images, labels, keys = [], [], []
        for key, offset, size, label in zip(index.keys, index.offsets, index.sizes, index.labels):
            try:
                images.append(to_uint8_chw(files.read(path, offset, size), self.resolution))
            except BadSample as exn:
                skipped += 1
                warnings.warn("%s key %s: %s", url, key, exn)
                continue
            labels.append(label)
            keys.append(key)
            if len(images) == self.batch_size:
                yield self._item(shard, images, labels, keys, False, skipped)
                images, labels, keys, skipped = [], [], [], 0
        yield self._item(shard, images, labels, keys, True, skipped)

    def _item(self, shard: int, images: list, labels: list, keys: list, last: bool, skipped: int) -> dict[str, Any]:
        r = self.resolution
        return {
            "shard": shard,
            "images": torch.stack(images) if images else torch.zeros(0, 3, r, r, dtype=torch.uint8),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "keys": keys,
            "last": last,
            "skipped": skipped,
        }


def _count_samples(urls: list[str], label: str) -> int:
    """Indexed samples of the shards to encode, for the progress bar (header scans only)."""
    return sum(len(index_shard(url, label).keys) for url in urls)


# ----------------------------------------------------------------------------- encoding


def _device(vae: torch.nn.Module) -> torch.device:
    return next(iter(vae.parameters()), torch.empty(0)).device


@torch.inference_mode()
def _encode(vae: Any, images: torch.Tensor, device: torch.device, autocast: torch.dtype | None):
    """uint8 images -> (mean, std) float32 on the CPU; the VAE sees x/127.5 - 1 like the reference."""
    x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with context:
        posterior = vae.encode(x)
    return posterior.mean.float().cpu(), posterior.std.float().cpu()


@dataclass(frozen=True)
class _Settings:
    label: str
    resolution: int
    batch_size: int
    fp16: bool
    num_workers: int
    autocast: torch.dtype | None
    progress: bool

    @property
    def request(self) -> dict[str, str]:
        """What a cached file must have been made with to be reused (safetensors metadata)."""
        return {"format": FORMAT, "label": self.label, "resolution": str(self.resolution)}


def cache_latents(
    vae: Any,
    shards: list[str] | str,
    out_dir: str | Path,
    *,
    resolution: int,
    batch_size: int,
    label: str = "cls",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    fp16: bool = False,
    num_workers: int = 0,
    autocast: torch.dtype | None = None,
) -> Path:
    """Encode this rank's shards (``i % world_size == rank``) that are not done yet; merge stats when all are.

    ``vae``: a module with ``encode(x in [-1,1]) -> posterior`` exposing ``.mean``/``.std``
    (B,C,h,w) (:class:`repae.vae.TrainableVAE`), already on its device; it is put in eval mode.
    ``fp16`` stores mean/std in float16 (the loader returns float32 either way); ``num_workers``
    DataLoader workers decode shards; ``autocast`` is an optional dtype to encode under.
    Returns ``out_dir``.
    """
    if batch_size < 1 or resolution < 1 or not 0 <= rank < world_size:
        raise ValueError("batch_size and resolution must be >= 1 and 0 <= rank < world_size")
    LabelRule.parse(label)
    settings = _Settings(label, resolution, batch_size, fp16, num_workers, autocast, progress)
    urls = validate_data_paths(shards)
    stems = _stems(urls)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(urls), world_size))
    todo = [i for i in mine if not is_done(out, stems[i], settings.request)]
    log.info("rank %d: %d of its %d shards to encode", rank, len(todo), len(mine))
    if todo:
        vae.eval()
        _encode_shards(vae, [urls[i] for i in todo], [stems[i] for i in todo], out, settings)
    _finish(out, stems, settings.request, rank, world_size)
    return out


def _encode_shards(vae: Any, urls: list[str], stems: list[str], out: Path, settings: _Settings) -> None:
    """Encode whole shards (decoded by DataLoader workers) and write each as soon as it is complete."""
    from tqdm.auto import tqdm

    device = _device(vae)
    dataset = _ShardBatches(urls, settings.label, settings.resolution, settings.batch_size)
    batches = DataLoader(dataset, batch_size=None, num_workers=settings.num_workers, pin_memory=device.type == "cuda")
    pending: dict[int, _Accumulator] = {}
    skipped = 0
    total = _count_samples(urls, settings.label) if settings.progress else None
    with tqdm(total=total, desc="cache latents", unit="img", disable=not settings.progress) as bar:
        for item in batches:
            acc = pending.setdefault(item["shard"], _Accumulator())
            if item["keys"]:
                mean, std = _encode(vae, item["images"], device, settings.autocast)
                acc.add(mean, std, item["labels"], item["keys"])
            skipped += item["skipped"]
            bar.update(len(item["keys"]) + item["skipped"])
            if item["last"]:
                shard = item["shard"]
                _write_shard(out, stems[shard], pending.pop(shard), settings, urls[shard])
    if skipped:
        log.warning("skipped %d corrupt or unlabelled samples", skipped)


# ----------------------------------------------------------------------------- statistics


def _finish(out: Path, stems: list[str], request: dict[str, str], rank: int, world_size: int) -> None:
    """Merge the statistics once every shard is done: rank 0 after a barrier under torch.distributed,
    otherwise whichever process first finds all shards done (the write is atomic, so a second
    process finishing at the same moment writes the same file)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        if rank == 0:
            merge_stats(out, stems)
        dist.barrier()
        return
    missing = [s for s in stems if not is_done(out, s, request)]
    if missing:
        log.info(
            "%d shard(s) not encoded yet (e.g. %s): stats.json is written by the last rank", len(missing), missing[0]
        )
        return
    merge_stats(out, stems)


def merge_stats(out_dir: str | Path, stems: list[str]) -> dict[str, Any]:
    """Add up the per-file float64 moment sums; write ``stats.json`` and ``latents_stats.safetensors``."""
    out = Path(out_dir)
    total, total_sq, elements, samples, shape = None, None, 0, 0, None
    for stem in stems:
        with safe_open(str(out / f"{stem}.safetensors"), framework="pt") as f:
            if "sum" not in f.keys():
                continue  # an empty shard
            s, sq = f.get_tensor("sum"), f.get_tensor("sumsq")
            elements += int(f.get_tensor("elements")[0])
            file_shape = f.get_slice("mean").get_shape()
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        samples += file_shape[0]
        shape = list(file_shape[1:])
    if total is None:
        raise ValueError(f"{out}: no encoded sample at all, no statistics to compute")
    mean = total / elements
    std = (total_sq / elements - mean * mean).clamp_min(0).sqrt()
    stats = {
        "num_samples": samples,
        "latent_shape": shape,
        "channels": len(mean),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "definition": "per-channel moments of z = mean + std * eps over all cached posteriors (exact in eps)",
    }
    write_json_atomic(out / STATS_JSON, stats, indent=None, sort_keys=False)
    scale = (1.0 / std).float().view(1, -1, 1, 1)
    tensors = {"latents_scale": scale, "latents_bias": mean.float().view(1, -1, 1, 1)}
    write_with(out / STATS_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    if not all(math.isfinite(v) and v > 0 for v in stats["std"]):
        log.warning("latent statistics have a zero or non-finite channel std: %s", stats["std"])
    return stats


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", required=True, help="VAE preset name (f8d4, f16d32), diffusers folder or hub id")
    parser.add_argument("--vae-checkpoint", default=None, help="weights for the VAE (reference .pt or .safetensors)")
    parser.add_argument("--vae-subfolder", default=None)
    parser.add_argument("--shards", required=True, nargs="+", help="brace pattern(s) of labelled tar shards")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128, help="images per process per encoder call")
    parser.add_argument("--label", default="cls", help="'cls' or 'toy:<attr>+<attr>'")
    parser.add_argument("--fp16", action="store_true", help="store mean/std as float16")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast for encoding")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from common.distributed import cleanup, init_distributed
    from repae.vae import TrainableVAE, load_vae

    env = init_distributed(use_deepspeed=False)
    try:
        vae = TrainableVAE(load_vae(args.vae, subfolder=args.vae_subfolder, checkpoint=args.vae_checkpoint))
        vae = vae.to(env.device).requires_grad_(False)
        autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        out = cache_latents(
            vae,
            args.shards,
            args.out,
            resolution=args.resolution,
            batch_size=args.batch_size,
            label=args.label,
            rank=env.rank,
            world_size=env.world_size,
            progress=not args.no_progress and env.is_main,
            fp16=args.fp16,
            num_workers=args.num_workers,
            autocast=autocast,
        )
        if env.is_main and (out / STATS_JSON).is_file():
            print(f"latents in {out}; statistics in {out / STATS_JSON}")
    finally:
        cleanup()


if __name__ == "__main__":
    from common.lifecycle import run_cli

    sys.exit(run_cli("python -m repae.cache_latents", main))
