"""ImageNet folder -> labelled webdataset shards of ADM centre crops (``python -m repae.preprocess``).

The reference packs ImageNet into one HDF5 file of uncompressed PNGs through a single writer
(docs/reference-facts.md, REPAE-6.4). We keep its image recipe exactly (sorted file list, labels
from the sorted top-level folder names or a ``dataset.json``, the ADM centre crop) but write plain
tar shards, because

* shards are independent files: a killed run leaves finished shards usable, and a rerun skips
  them (each tar is written under a temporary name and renamed, so a truncated tar never sits
  under a final name);
* the loader (:mod:`repae.data`) opens them per worker after fork, unlike the shared HDF5 handle
  of the reference (REPAE-D9), and other webdataset tools can read them too.

Sample ``i`` of the sorted source list goes to shard ``i // shard_size`` under key
``img{i:08d}``; a corrupt source image is skipped (its key is simply absent) and listed in the
manifest, so shard contents never depend on which other images failed. Members: ``png``
(lossless, default) or ``jpg``; ``cls`` (the label as ASCII digits); ``json``
(``{"source": relative path, "class": synset}``). Also written: ``classes.json`` (a JSON list,
index -> synset), one ``<shard>.meta.json`` per finished shard (what a rerun checks to skip it),
and ``manifest.json`` (count, shards, resolution, the brace pattern to train on, corrupt files).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import multiprocessing
import os
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from common.files import write_json_atomic
from common.shards import TAR_MTIME

log = logging.getLogger(__name__)

SHARD_PREFIX = "imagenet"
PNG_COMPRESS_LEVEL = 1  # lossless; level 1 writes fast and halves the reference's level-0 files
META_VERSION = 1


# ----------------------------------------------------------------------------- the crop


def adm_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """The ADM centre crop (REPAE-6.4): BOX-halve while the short side >= 2*res, BICUBIC, centre crop.

    Halving with a box filter first is a cheap, alias-free downscale; the final bicubic resize
    brings the short side to exactly ``resolution`` (sizes rounded) and the crop offsets are
    floored, so odd margins lose their extra pixel on the right/bottom.
    """
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.Resampling.BICUBIC)
    width, height = img.size
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


# ----------------------------------------------------------------------------- sources and labels


@dataclass(frozen=True)
class Source:
    index: int  # position in the sorted file list: the key and the shard are derived from it
    path: str  # relative to the ImageNet root, '/' separated
    label: int
    synset: str

    @property
    def key(self) -> str:
        return f"img{self.index:08d}"


def _image_extensions() -> set[str]:
    """Extensions of formats PIL can *open* (registered_extensions also lists save-only ones)."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def list_images(root: Path) -> list[str]:
    """Relative paths of every image file under ``root``, sorted (the reference's order)."""
    extensions = _image_extensions()
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def _labels_from_dataset_json(root: Path, paths: list[str]) -> tuple[list[int], list[str]]:
    """Labels from ``dataset.json`` (``{"labels": [[relpath, label], ...]}``, as the reference reads)."""
    table = {str(p).replace("\\", "/"): int(c) for p, c in json.loads((root / "dataset.json").read_text())["labels"]}
    missing = [p for p in paths if p not in table]
    if missing:
        raise ValueError(f"{root}/dataset.json has no label for {len(missing)} image(s), e.g. {missing[0]!r}")
    labels = [table[p] for p in paths]
    # A class name per label: the top-level folder when it is consistent, else the number.
    names: dict[int, set[str]] = {}
    for p, c in zip(paths, labels):
        names.setdefault(c, set()).add(p.split("/")[0] if "/" in p else str(c))
    classes = [str(c) for c in range(max(labels) + 1)] if labels else []
    for c, found in names.items():
        classes[c] = found.pop() if len(found) == 1 else str(c)
    return labels, classes


def _labels_from_folders(paths: list[str]) -> tuple[list[int], list[str]]:
    """Labels = index of the top-level folder (synset) among the sorted folder names."""
    loose = [p for p in paths if "/" not in p]
    if loose:
        raise ValueError(f"{len(loose)} image(s) outside a class folder (e.g. {loose[0]!r}) and no dataset.json")
    classes = sorted({p.split("/")[0] for p in paths})
    index = {c: i for i, c in enumerate(classes)}
    return [index[p.split("/")[0]] for p in paths], classes


def list_sources(root: Path, max_images: int | None = None) -> tuple[list[Source], list[str], str]:
    """(sources, class names, where the labels came from) for an ImageNet-style folder.

    Labels are decided on the *whole* sorted list before ``max_images`` truncates it, so a
    truncated run still uses the full dataset's class indices.
    """
    paths = list_images(root)
    if not paths:
        raise FileNotFoundError(f"no image files under {root}")
    if (root / "dataset.json").is_file():
        labels, classes = _labels_from_dataset_json(root, paths)
        origin = "dataset.json"
    else:
        labels, classes = _labels_from_folders(paths)
        origin = "folders"
    count = len(paths) if max_images is None else min(max_images, len(paths))
    sources = [Source(i, paths[i], labels[i], classes[labels[i]]) for i in range(count)]
    return sources, classes, origin


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class _Job:
    root: str
    resolution: int
    fmt: str
    jpeg_quality: int


def encode_sample(job: _Job, source: Source) -> tuple[Source, bytes | None, str | None]:
    """Decode, crop and encode one image in a worker: (source, image bytes or None, error)."""
    try:
        with Image.open(Path(job.root, source.path)) as img:
            img.load()  # full decode here: truncated files raise instead of going grey
            rgb = img.convert("RGB")
        crop = adm_center_crop(rgb, job.resolution)
        if crop.size != (job.resolution, job.resolution):
            raise ValueError(f"crop has size {crop.size}")
        buffer = io.BytesIO()
        if job.fmt == "png":
            crop.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        else:
            crop.save(buffer, format="JPEG", quality=job.jpeg_quality, subsampling=0)
        return source, buffer.getvalue(), None
    except Exception as exn:  # any undecodable file is skipped and reported, never fatal
        return source, None, f"{type(exn).__name__}: {exn}"


# ----------------------------------------------------------------------------- shards


def shard_name(k: int) -> str:
    return f"{SHARD_PREFIX}-{k:06d}.tar"


def _meta_path(out: Path, k: int) -> Path:
    return out / f"{SHARD_PREFIX}-{k:06d}.meta.json"


def _shard_request(job: _Job, sources: list[Source]) -> dict[str, Any]:
    """What a shard must have been made from to count as finished on a rerun."""
    return {
        "version": META_VERSION,
        "resolution": job.resolution,
        "format": job.fmt,
        "jpeg_quality": job.jpeg_quality if job.fmt == "jpg" else None,
        "first": sources[0].path,
        "last": sources[-1].path,
        "sources": len(sources),
    }


def _is_done(out: Path, k: int, request: dict[str, Any]) -> dict[str, Any] | None:
    """The shard's meta if tar and meta exist and the meta matches this request, else None."""
    meta_path = _meta_path(out, k)
    if not (out / shard_name(k)).is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("request") == request else None


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    info.uname = info.gname = "repae"
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """Writes one shard to ``<name>.tmp`` and renames it into place when complete."""

    def __init__(self, out: Path, k: int, request: dict[str, Any], fmt: str) -> None:
        self.out, self.k, self.request, self.fmt = out, k, request, fmt
        self.final = out / shard_name(k)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self._file = open(self.tmp, "wb")  # a stale .tmp of a killed run is truncated here
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.count, self.corrupt = 0, []

    def add(self, source: Source, data: bytes | None, error: str | None) -> None:
        if data is None:
            self.corrupt.append({"source": source.path, "error": error})
            return
        _add_member(self._tar, f"{source.key}.{self.fmt}", data)
        _add_member(self._tar, f"{source.key}.cls", str(source.label).encode("ascii"))
        meta = {"source": source.path, "class": source.synset}
        _add_member(self._tar, f"{source.key}.json", json.dumps(meta, sort_keys=True).encode())
        self.count += 1

    def finish(self) -> dict[str, Any]:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _meta_path(self.out, self.k).unlink(missing_ok=True)  # the meta vouches for the tar: never a stale one
        os.replace(self.tmp, self.final)
        meta = {"shard": self.final.name, "count": self.count, "corrupt": self.corrupt, "request": self.request}
        write_json_atomic(_meta_path(self.out, self.k), meta, indent=1, sort_keys=False)
        return meta


CHUNK = 16  # sources per task sent to a worker: amortises the pickling round trip


def _encode_chunk(job: _Job, sources: list[Source]) -> list[tuple[Source, bytes | None, str | None]]:
    return [encode_sample(job, source) for source in sources]


def _encoded(job: _Job, sources: list[Source], num_workers: int) -> Iterator[tuple[Source, bytes | None, str | None]]:
    """Encoded samples in source order: worker processes, or in-process for 0 workers.

    Workers are *spawned*, not forked: a fork copies every lock that another thread of the parent
    holds at that instant (a progress bar's monitor, a tracker's writer, a library's pool), and a
    forked worker that needs one waits forever; a pool whose worker hangs or dies then hangs its
    caller too. A spawned worker starts clean, and ``concurrent.futures`` turns a dead worker into
    ``BrokenProcessPool`` instead of a wait without end. At most ``4 * num_workers`` chunks are in
    flight, so encoded images never pile up in memory ahead of the shard writer.
    """
    if num_workers == 0:
        for source in sources:
            yield encode_sample(job, source)
        return
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    chunks = iter([sources[i : i + CHUNK] for i in range(0, len(sources), CHUNK)])
    pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        window = deque(pool.submit(_encode_chunk, job, chunk) for chunk in itertools.islice(chunks, 4 * num_workers))
        while window:
            done = window.popleft().result()
            if (chunk := next(chunks, None)) is not None:
                window.append(pool.submit(_encode_chunk, job, chunk))
            yield from done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- driver


def preprocess(
    imagenet_path: str | Path,
    out: str | Path,
    *,
    resolution: int = 256,
    num_workers: int = 8,
    max_images: int | None = None,
    shard_size: int = 1000,
    fmt: str = "png",
    jpeg_quality: int = 95,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the shards (skipping finished ones), ``classes.json`` and ``manifest.json``; return the manifest."""
    if fmt not in ("png", "jpg"):
        raise ValueError(f"format must be png or jpg, not {fmt!r}")
    if resolution < 1 or shard_size < 1 or num_workers < 0:
        raise ValueError("resolution and shard_size must be >= 1, num_workers >= 0")
    from tqdm.auto import tqdm

    root, out = Path(imagenet_path), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources, classes, origin = list_sources(root, max_images)
    job = _Job(str(root), resolution, fmt, jpeg_quality)
    groups = [sources[i : i + shard_size] for i in range(0, len(sources), shard_size)]
    requests = [_shard_request(job, group) for group in groups]
    metas: dict[int, dict[str, Any]] = {}
    for k, request in enumerate(requests):
        if (meta := _is_done(out, k, request)) is not None:
            metas[k] = meta
    todo = [k for k in range(len(groups)) if k not in metas]
    log.info("%d source images in %d shards; %d already done", len(sources), len(groups), len(metas))
    pending = [s for k in todo for s in groups[k]]
    with tqdm(total=len(pending), desc="preprocess", unit="img", disable=not progress) as bar:
        encoded = _encoded(job, pending, num_workers)
        for k in todo:
            writer = _ShardWriter(out, k, requests[k], fmt)
            for _ in groups[k]:
                writer.add(*next(encoded))
                bar.update(1)
            metas[k] = writer.finish()
    write_json_atomic(out / "classes.json", classes, indent=1, sort_keys=False)
    return _write_manifest(out, root, metas, len(groups), resolution, fmt, len(classes), origin)


def _write_manifest(
    out: Path,
    root: Path,
    metas: dict[int, dict[str, Any]],
    num_shards: int,
    resolution: int,
    fmt: str,
    num_classes: int,
    origin: str,
) -> dict[str, Any]:
    corrupt = [c for k in range(num_shards) for c in metas[k]["corrupt"]]
    last = num_shards - 1
    relative = f"{SHARD_PREFIX}-{{000000..{last:06d}}}.tar"
    manifest = {
        "count": sum(metas[k]["count"] for k in range(num_shards)),
        "shards": [shard_name(k) for k in range(num_shards)],
        "shard_counts": [metas[k]["count"] for k in range(num_shards)],
        "pattern": str(out.resolve() / relative),
        "relative_pattern": relative,
        "resolution": resolution,
        "format": fmt,
        "num_classes": num_classes,
        "labels_from": origin,
        "source": str(root.resolve()),
        "skipped_corrupt": len(corrupt),
        "corrupt": corrupt,
    }
    stale = sorted(p.name for p in out.glob(f"{SHARD_PREFIX}-*.tar") if p.name not in set(manifest["shards"]))
    if stale:
        log.warning("%d shard(s) in %s are not part of this run (e.g. %s)", len(stale), out, stale[0])
    if corrupt:
        log.warning("skipped %d corrupt source image(s), e.g. %s", len(corrupt), corrupt[0]["source"])
    write_json_atomic(out / "manifest.json", manifest, indent=1, sort_keys=False)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--imagenet-path", required=True, help="root with one folder per class (or a dataset.json)")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="png is lossless (default)")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    manifest = preprocess(
        args.imagenet_path,
        args.out,
        resolution=args.resolution,
        num_workers=args.num_workers,
        max_images=args.max_images,
        shard_size=args.shard_size,
        fmt=args.format,
        jpeg_quality=args.jpeg_quality,
        progress=not args.no_progress,
    )
    print(
        f"{manifest['count']} images in {len(manifest['shards'])} shards "
        f"({manifest['skipped_corrupt']} corrupt skipped); train on: {manifest['pattern']}"
    )


if __name__ == "__main__":
    from common.lifecycle import run_cli

    sys.exit(run_cli("python -m repae.preprocess", main))
