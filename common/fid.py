"""FID of a folder of generated images against a folder of real images (clean-fid, "clean" mode).

    python evaluation/fid.py --real-images data/mjhq30k --fake-images out/mjhq --resolution 256 \\
        --dataset-name mjhq --out out/mjhq_fid.json

What changes from the reference's ``evaluation/fid.py`` (docs/reference-facts.md, T2I-6.3 and T2I-D10):

* real images are centre-cropped and resized to the evaluation resolution (PIL bicubic, then
  quantised to uint8, as if they had been sampled at that size) *before* clean-fid's own 299 px
  resize, so a 1024 px MJHQ photo is compared with a 256 px sample on equal terms; generated
  images go through the same function (a no-op when they already have that size);
* reference statistics are cached in our own folder (``--cache-dir``, default
  ``~/.cache/fusedit/fid``) under a key made of the dataset name, the resolution, the feature
  extractor and a hash of the sorted real file list with sizes and mtimes, so changing, adding or
  removing a real image, or the resolution, can never reuse stale statistics (the reference
  keyed them by name only, inside the installed package);
* ``--feature-extractor module:function`` swaps clean-fid's InceptionV3 for any local network,
  which is how the tests run without downloading anything.

The default extractor is clean-fid's TorchScript InceptionV3; clean-fid downloads its weights to
``/tmp/inception-2015-12-05.pt`` on first use (copy the file there on an offline machine).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.argtypes import DashedArgumentParser
from common.files import write_text_atomic, write_with

DEFAULT_CACHE = Path(os.environ.get("FUSEDIT_FID_CACHE", "~/.cache/fusedit/fid")).expanduser()
EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
INCEPTION = "inception_v3"

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class ResizeTo:
    """Centre-crop to a square and resize to ``size`` px: the evaluation resolution of both image sets.

    A class rather than a closure so clean-fid's DataLoader workers can pickle it.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = image.shape[:2]
        if (h, w) == (self.size, self.size):
            return image
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = Image.fromarray(image[top : top + side, left : left + side])
        return np.asarray(square.resize((self.size, self.size), resample=Image.BICUBIC))


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------
def load_feature_extractor(spec: str | None, device: torch.device) -> tuple[FeatureFn, str]:
    """``module:function`` -> the callable it returns; None -> clean-fid's InceptionV3.

    The callable receives what clean-fid feeds Inception in clean mode: a float32 NCHW batch with
    values in [0, 255] at 299x299, and returns (B, D) features. ``function`` may take a
    ``device`` argument.
    """
    if spec is None:
        from cleanfid.features import build_feature_extractor

        return build_feature_extractor("clean", device, use_dataparallel=False), INCEPTION
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--feature-extractor {spec!r}: expected 'module:function'")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if not callable(factory):
        raise ValueError(f"--feature-extractor {spec!r}: {module_name} has no callable {attr!r}")
    wants_device = "device" in inspect.signature(factory).parameters
    return (factory(device=device) if wants_device else factory()), spec


class RandomConvFeatures(torch.nn.Module):
    """A fixed, randomly initialised conv net: a local stand-in for Inception in tests and smoke runs.

    Its FID values are only comparable with each other, never with published numbers; what it
    keeps is the property tests need: identical image sets score ~0, different ones score more.
    """

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.convs = torch.nn.ModuleList()
        channels = [3, 16, 32, dim]
        for cin, cout in zip(channels[:-1], channels[1:]):
            conv = torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / (cin * 9) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(batch.float() / 127.5 - 1, size=64, mode="area")
        for conv in self.convs:
            x = torch.tanh(conv(x))
        return x.mean(dim=(2, 3))


def random_conv_extractor(device: torch.device | str = "cpu") -> FeatureFn:
    """``--feature-extractor common.fid:random_conv_extractor`` (offline tests, smoke runs)."""
    return RandomConvFeatures().to(device).eval()


# --------------------------------------------------------------------------------------------
# Files, cache keys, statistics
# --------------------------------------------------------------------------------------------
def list_images(folder: str | Path, list_file: str | Path | None = None) -> list[Path]:
    """Every image under ``folder`` (recursive, sorted), or only those named in ``list_file``.

    Hidden files are skipped: they are the samplers' unfinished temporary files.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    if list_file is not None:
        names = [line.strip() for line in Path(list_file).read_text().splitlines() if line.strip()]
        files = [root / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{list_file}: {len(missing)} listed images missing, e.g. {missing[0]}")
        return sorted(files)
    files = [
        p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file() and not p.name.startswith(".")
    ]
    if not files:
        raise FileNotFoundError(f"{root}: no images ({', '.join(sorted(EXTENSIONS))})")
    return sorted(files)


def file_list_digest(files: Sequence[Path], root: str | Path) -> str:
    """Hash of the sorted relative paths with sizes and mtimes: any change to the real set changes it."""
    digest = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        digest.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def stats_key(dataset_name: str, resolution: int, extractor: str, digest: str) -> str:
    """File stem of cached statistics; the extractor is part of it, features of two nets never mix."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "x"
    return f"{safe(dataset_name)}_r{resolution}_{safe(extractor)}_{digest[:20]}"


def folder_features(
    files: Sequence[Path],
    extractor: FeatureFn,
    resolution: int,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device,
    verbose: bool = False,
    description: str = "",
) -> np.ndarray:
    """Features of ``files`` through clean-fid's clean-mode loader, after resizing to ``resolution``."""
    from cleanfid.fid import get_files_features

    return get_files_features(
        [str(f) for f in files],
        model=extractor,
        num_workers=num_workers,
        batch_size=batch_size,
        device=device,
        mode="clean",
        custom_image_tranform=ResizeTo(resolution),  # (sic) clean-fid's spelling
        description=description,
        verbose=verbose,
    )


def mean_cov(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def reference_statistics(
    files: Sequence[Path],
    root: Path,
    dataset_name: str,
    resolution: int,
    extractor: FeatureFn,
    extractor_name: str,
    cache_dir: Path,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray, Path, bool]:
    """(mu, sigma, cache file, whether it was a cache hit) for the real images."""
    path = cache_dir / f"{stats_key(dataset_name, resolution, extractor_name, file_list_digest(files, root))}.npz"
    if path.is_file():
        with np.load(path) as stats:
            return stats["mu"], stats["sigma"], path, True
    mu, sigma = mean_cov(folder_features(files, extractor, resolution, description="real", **kwargs))
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_with(
        path, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma, num_images=len(files), resolution=resolution), ".npz"
    )
    return mu, sigma, path, False


def compute_fid(
    real_images: str | Path,
    fake_images: str | Path,
    *,
    resolution: int,
    dataset_name: str = "custom",
    feature_extractor: str | None = None,
    cache_dir: str | Path = DEFAULT_CACHE,
    real_list: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """FID and the settings that produced it (what ``--out`` records)."""
    from cleanfid.fid import frechet_distance

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractor, extractor_name = load_feature_extractor(feature_extractor, device)
    real_root = Path(real_images)
    real = list_images(real_root, real_list)
    fake = list_images(fake_images)
    kwargs = {"batch_size": batch_size, "num_workers": num_workers, "device": device, "verbose": verbose}
    mu_r, sigma_r, cache_path, cached = reference_statistics(
        real, real_root, dataset_name, resolution, extractor, extractor_name, Path(cache_dir).expanduser(), **kwargs
    )
    mu_f, sigma_f = mean_cov(folder_features(fake, extractor, resolution, description="generated", **kwargs))
    with warnings.catch_warnings():  # clean-fid passes scipy's deprecated sqrtm(disp=...); not actionable here
        warnings.simplefilter("ignore", DeprecationWarning)
        value = float(frechet_distance(mu_f, sigma_f, mu_r, sigma_r))
    return {
        "fid": value,
        "mode": "clean",
        "resolution": resolution,
        "dataset_name": dataset_name,
        "feature_extractor": extractor_name,
        "real_images": str(real_root),
        "num_real": len(real),
        "fake_images": str(fake_images),
        "num_fake": len(fake),
        "reference_stats": str(cache_path),
        "reference_stats_cached": cached,
        "clean_fid_version": _version("clean-fid"),
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = DashedArgumentParser(  # also reads the old spellings (--real_images)
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--real-images", required=True, help="folder of real images (searched recursively)")
    p.add_argument("--real-list", default=None, help="text file of image paths relative to --real-images to use")
    p.add_argument("--fake-images", required=True, help="folder of generated images")
    p.add_argument("--resolution", type=int, required=True, help="evaluation resolution (the sampling resolution)")
    p.add_argument("--dataset-name", default="custom", help="name in the statistics cache key (mjhq, coco, ...)")
    p.add_argument(
        "--feature-extractor",
        dest="feature_extractor",
        default=None,
        help="module:function returning a features callable (default: clean-fid InceptionV3); "
        "common.fid:random_conv_extractor is a local, offline one for smoke tests",
    )
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="reference statistics cache")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding workers")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="write the result JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from common.lifecycle import UsageExit

    args = parse_args(argv)
    if args.resolution < 1:
        raise UsageExit(f"--resolution must be positive, got {args.resolution}")
    for flag, folder in (("--real-images", args.real_images), ("--fake-images", args.fake_images)):
        if folder is not None and not Path(folder).is_dir():  # before the feature extractor loads
            raise UsageExit(f"{flag} {folder}: not a folder")
    try:
        result = compute_fid(
            args.real_images,
            args.fake_images,
            resolution=args.resolution,
            dataset_name=args.dataset_name,
            feature_extractor=args.feature_extractor,
            cache_dir=args.cache_dir,
            real_list=args.real_list,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            verbose=True,
        )
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise UsageExit(str(e)) from e
    text = json.dumps(result, indent=2)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
