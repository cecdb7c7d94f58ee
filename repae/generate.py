"""Generate the 50k-sample set of a REPA-E run for FID (ADM evaluation suite format, REPAE-7.4).

    python -m repae.generate --run-dir exps/repae --mode sde --num-steps 250 --cfg-scale 1.8 \\
        --guidance-high 0.825 --num-samples 50000
    torchrun --nproc_per_node 8 -m repae.generate --run-dir exps/repae ...   # or accelerate launch

Output: ``<out>/samples.npz`` with ``arr_0`` uint8 (N, H, W, 3) in sample-index order and
``labels`` int64 (N,), next to ``generate.json`` (every setting that changes the images).

What differs from the reference ``generate.py`` (docs/reference-facts.md, reference defects
REPAE-D10 and REPAE-D15), on purpose:

* Image i's starting noise (and, for the SDE, its per-step noise) comes from its own generator
  seeded by (seed, i). Images therefore do not depend on the batch size, the number of processes
  or which images shared a batch, and different seeds never map to the same stream.
* Samples are written as fixed-size chunks per global index range (``parts/part-SSSSSS-EEEEEE.npy``,
  uint8 NHWC, atomic temp + rename); ranks take chunks round-robin, an interrupted run resumes by
  skipping the chunks already on disk, and rank 0 streams the chunks into the npz (no 50k PNGs,
  and no 10 GB array in memory).
* The output folder name is derived from *every* setting (checkpoint step, EMA, mode, steps,
  Heun, CFG and interval, seed, label sampling, number of samples, precision), so a finished set
  short-circuits only an identical configuration; an explicit ``--out`` holding a different
  configuration is refused instead of silently reused.
* Pixels are truncated to uint8 as in the reference (``--pixels truncate``, the default, so FID
  compares with published numbers); ``--pixels round`` takes the nearest level instead (+0.5 grey
  levels on average). The choice is a setting: it names the folder and is kept in generate.json.
* Labels are class-balanced by default (the later upstream protocol): N/C images per class.
* Optional bf16 autocast of the SiT on CUDA (the VAE decode stays float32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.argtypes import finite_float, positive_int
from common.files import write_json_atomic, write_with
from common.images import PIXEL_ROUNDING, quantise
from common.lifecycle import error_exit, user_errors
from common.randomness import index_generators
from repae.samplers import MODES, expected_nfe, run_sampler

CHUNK_SIZE = 250  # images per part file: 200 parts for 50k, an even split over 1, 2, 4, 5 or 8 ranks
LABEL_MODES = ("balanced", "random")
PRECISIONS = ("auto", "fp32", "bf16")
NPZ_NAME = "samples.npz"
SETTINGS_NAME = "generate.json"
PARTS_DIR = "parts"
# Used when neither the command line nor the run's config `sample` section says otherwise.
FALLBACK_SAMPLING = {"mode": "ode", "num_steps": 50, "heun": False, "cfg_scale": 1.0, "guidance_low": 0.0,
                     "guidance_high": 1.0}  # fmt: skip


# -------------------------------------------------------------------------------- labels, seeds
def plan_labels(num_samples: int, num_classes: int, mode: str = "balanced", seed: int = 0) -> torch.Tensor:
    """(num_samples,) int64 labels, a pure function of the arguments.

    ``balanced``: floor(N/C) copies of every class plus one more of N mod C distinct classes (drawn
    at random), in a seeded random order, so class counts differ by at most one (exactly N/C each
    when C divides N, e.g. 50 per class for 50k ImageNet samples). ``random``: uniform i.i.d.
    """
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"need num_samples >= 1 and num_classes >= 1, got {num_samples}, {num_classes}")
    g = torch.Generator().manual_seed(int(seed))
    if mode == "random":
        return torch.randint(num_classes, (num_samples,), generator=g, dtype=torch.int64)
    if mode != "balanced":
        raise ValueError(f"label sampling must be one of {LABEL_MODES}, got {mode!r}")
    full, rem = divmod(num_samples, num_classes)
    extra = torch.randperm(num_classes, generator=g)[:rem]
    labels = torch.cat([torch.arange(num_classes, dtype=torch.int64).repeat(full), extra])
    return labels[torch.randperm(num_samples, generator=g)]


# ------------------------------------------------------------------------------- chunks, parts
def chunk_ranges(num_samples: int, chunk_size: int = CHUNK_SIZE) -> list[tuple[int, int]]:
    """[(start, end)] global index ranges of ``chunk_size`` (the last may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, num_samples)) for s in range(0, num_samples, chunk_size)]


def rank_chunks(num_samples: int, rank: int, world_size: int, chunk_size: int = CHUNK_SIZE) -> list[tuple[int, int]]:
    """The chunks of ``rank``: every ``world_size``-th one, starting at ``rank`` (round-robin)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return chunk_ranges(num_samples, chunk_size)[rank::world_size]


def part_path(out_dir: Path, start: int, end: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"part-{start:06d}-{end:06d}.npy"


def part_done(path: Path, image_shape: tuple[int, int, int] | None = None, count: int | None = None) -> bool:
    """True if ``path`` holds a finished uint8 part (parts appear only by rename, so this is cheap)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        return False
    return (count is None or arr.shape[0] == count) and (image_shape is None or tuple(arr.shape[1:]) == image_shape)


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(file)`` into a temp file next to ``path``, fsync, then rename over it."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    write_with(path, to_file, fsync=True)


def save_part(path: Path, images: np.ndarray) -> None:
    _write_atomic(path, lambda f: np.save(f, images, allow_pickle=False))


def to_uint8(images: torch.Tensor, rounding: str = "truncate") -> np.ndarray:
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8 (:func:`common.images.quantise`; the reference truncates)."""
    return quantise(images, rounding=rounding).permute(0, 2, 3, 1).contiguous().cpu().numpy()


# ---------------------------------------------------------------------------------- generation
def make_velocity(sit: torch.nn.Module, precision: str = "fp32") -> Callable:
    """velocity(x, t, y) = sit(x, t, y).output, in eval mode without grad; bf16 autocast if asked."""
    sit.eval()
    device_type = _module_device(sit).type
    use_bf16 = precision == "bf16"

    def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
            return sit(x, t, y).output.float()

    return velocity


def _module_device(module: Any) -> torch.device:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")


def null_label_of(bundle: Any) -> int:
    """The SiT's null class (== num_classes in the reference layout)."""
    return int(getattr(bundle.sit, "null_class", bundle.num_classes))


@torch.no_grad()
def generate_images(
    bundle: Any,
    indices: range,
    labels: torch.Tensor,
    sampler_kwargs: dict,
    seed: int,
    velocity: Callable,
    device: torch.device,
    pixels: str = "truncate",
) -> np.ndarray:
    """uint8 (len(indices), H, W, 3): sample, decode and convert the images with these global indices."""
    generators = index_generators(seed, indices)
    noise = torch.stack([torch.randn(tuple(bundle.latent_shape), generator=g) for g in generators]).to(device)
    y = labels[indices.start : indices.stop].to(device)
    latents = run_sampler(velocity, noise, y, null_label=null_label_of(bundle), generator=generators, **sampler_kwargs)
    return to_uint8(bundle.decode(latents), pixels)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def generate_to_npz(
    bundle: Any,
    out_dir: str | Path,
    labels: torch.Tensor,
    sampler_kwargs: dict,
    batch_size: int = 64,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    *,
    chunk_size: int = CHUNK_SIZE,
    precision: str = "fp32",
    keep_parts: bool = False,
    pixels: str = "truncate",
) -> Path:
    """Generate this rank's missing chunks, then (rank 0, once every chunk exists) assemble the npz.

    ``labels`` (N,) fixes N and every image's class; ``sampler_kwargs`` are
    :func:`repae.samplers.run_sampler`'s (mode, num_steps, heun, cfg_scale, guidance_low/high,
    path_type). Under torch.distributed all ranks meet at a barrier before assembly. Without it
    (tests, or separate jobs sharing a folder) rank 0 assembles only if all chunks are already on
    disk; otherwise call :func:`assemble_npz` when they are. Returns the npz path either way.
    """
    out_dir = Path(out_dir)
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    num_samples = int(labels.numel())
    image_shape = (bundle.resolution, bundle.resolution, 3)
    mine = rank_chunks(num_samples, rank, world_size, chunk_size)
    todo = [(s, e) for s, e in mine if not part_done(part_path(out_dir, s, e), image_shape, e - s)]
    velocity = make_velocity(bundle.sit, precision)
    device = _module_device(bundle.sit)
    bar = _progress_bar(sum(e - s for s, e in mine), sum(e - s for s, e in todo), progress and rank == 0)
    for start, end in todo:
        batches = []
        for b in range(start, end, batch_size):
            indices = range(b, min(b + batch_size, end))
            batches.append(generate_images(bundle, indices, labels, sampler_kwargs, seed, velocity, device, pixels))
            bar.update(len(indices))
        save_part(part_path(out_dir, start, end), np.concatenate(batches))
    bar.close()
    _barrier()
    npz = out_dir / NPZ_NAME
    if rank == 0 and all(part_done(part_path(out_dir, s, e)) for s, e in chunk_ranges(num_samples, chunk_size)):
        assemble_npz(out_dir, labels, chunk_size=chunk_size, keep_parts=keep_parts)
    _barrier()
    return npz


def _progress_bar(total: int, todo: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=total - todo, disable=not enabled, unit="img", desc="generate", dynamic_ncols=True)


def assemble_npz(
    out_dir: str | Path, labels: torch.Tensor, *, chunk_size: int = CHUNK_SIZE, keep_parts: bool = False
) -> Path:
    """Stream every part, in index order, into ``samples.npz`` (``arr_0`` uint8 NHWC, ``labels`` int64).

    The zip is written entry by entry (stored, ZIP64, like ``np.savez``), so memory stays at one
    part; it appears under its final name only once complete. Parts are deleted afterwards unless
    ``keep_parts``.
    """
    out_dir = Path(out_dir)
    labels_np = torch.as_tensor(labels, dtype=torch.int64).cpu().numpy()
    ranges = chunk_ranges(len(labels_np), chunk_size)
    paths = [part_path(out_dir, s, e) for s, e in ranges]
    missing = [p.name for (s, e), p in zip(ranges, paths) if not part_done(p, count=e - s)]
    if missing:
        raise FileNotFoundError(f"{out_dir}: {len(missing)} chunk(s) not generated yet, e.g. {missing[:3]}")
    image_shape = tuple(np.load(paths[0], mmap_mode="r").shape[1:])
    if any(tuple(np.load(p, mmap_mode="r").shape[1:]) != image_shape for p in paths):
        raise ValueError(f"{out_dir}: parts disagree on the image shape")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(labels_np), *image_shape)}  # fmt: skip

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_1_0(entry, header)
                for path in paths:
                    entry.write(np.ascontiguousarray(np.load(path, allow_pickle=False)).data)
            with zf.open("labels.npy", "w") as entry:
                np.save(entry, labels_np, allow_pickle=False)

    npz = out_dir / NPZ_NAME
    _write_atomic(npz, write)
    if not keep_parts:
        shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
    return npz


# ------------------------------------------------------------------------------------ settings
def _config_get(config: Any, section: str, key: str) -> Any:
    value = config.get(section, {}) if isinstance(config, dict) else {}
    return value.get(key) if isinstance(value, dict) else None


def run_config(bundle: Any, run_dir: str | Path) -> dict:
    """The run's resolved config: the bundle's, else ``<run>/config.yaml`` (safe YAML), else {}.

    Only ``sample.*`` defaults and the training ``loss.path_type`` are read from it.
    """
    config = getattr(bundle, "config", None)
    if isinstance(config, dict) and config:
        return config
    path = Path(run_dir) / "config.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        from common.config import load_yaml_file

        loaded = OmegaConf.to_container(load_yaml_file(path), resolve=False)
        return loaded if isinstance(loaded, dict) else {}
    return {}


def resolve_sampling(args: argparse.Namespace, config: dict) -> dict:
    """Sampler settings: the command line, else the run config's ``sample`` section, else the fallback.

    ``path_type`` (only the SDE uses it) defaults to the path the run was trained with.
    """
    out = {}
    for key, fallback in FALLBACK_SAMPLING.items():
        value = getattr(args, key)
        if value is None:
            value = _config_get(config, "sample", key)
        out[key] = type(fallback)(fallback if value is None else value)
    if args.num_steps is None and args.mode is not None and args.mode != _config_get(config, "sample", "mode"):
        out["num_steps"] = 250 if out["mode"] == "sde" else 50  # the config's steps were for the other mode
    if out["mode"] == "sde":
        out["path_type"] = args.path_type or _config_get(config, "loss", "path_type") or "linear"
    else:
        out["path_type"] = "linear"  # ignored by the ODE; fixed so it never changes the folder name
    validate_sampling(out)
    return out


def validate_sampling(s: dict) -> None:
    """Reject what the reference asserts against (Heun with the SDE, scale < 1) and bad intervals."""
    if s["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {s['mode']!r}")
    if s["num_steps"] < 1:
        raise ValueError(f"num_steps must be >= 1, got {s['num_steps']}")
    if s["heun"] and s["mode"] != "ode":
        raise ValueError("--heun only exists for --mode ode")
    if s["cfg_scale"] < 1.0:
        raise ValueError(f"--cfg-scale must be >= 1 (1 disables guidance), got {s['cfg_scale']}")
    if not 0.0 <= s["guidance_low"] <= s["guidance_high"] <= 1.0:
        raise ValueError(f"need 0 <= guidance-low <= guidance-high <= 1, got {s['guidance_low']}, {s['guidance_high']}")


def build_settings(
    *, run: str, tag: str, step: int | None, ema: bool, sampling: dict, num_samples: int, seed: int,
    label_sampling: str, num_classes: int, precision: str, pixels: str = "truncate",
) -> dict:  # fmt: skip
    """Everything that changes the images; two runs with equal settings produce the same npz."""
    return {
        "run": run,
        "tag": str(tag),
        "step": step,
        "ema": bool(ema),
        **sampling,
        "num_samples": int(num_samples),
        "seed": int(seed),
        "label_sampling": label_sampling,
        "num_classes": int(num_classes),
        "precision": precision,
        "pixels": pixels,
    }


def _fmt(value: float) -> str:
    return f"{value:g}"


def output_name(settings: dict) -> str:
    """Folder name carrying every setting.

    e.g. ``myrun-400000-ema-sde250-cfg1.8-0-0.825-seed0-balanced-n50000-fp32-truncate``.
    """
    where = settings["step"] if settings["step"] is not None else settings["tag"]
    sampler = f"{settings['mode']}{settings['num_steps']}" + ("-heun" if settings["heun"] else "")
    if settings["mode"] == "sde" and settings["path_type"] != "linear":
        sampler += f"-{settings['path_type']}"
    cfg = f"cfg{_fmt(settings['cfg_scale'])}-{_fmt(settings['guidance_low'])}-{_fmt(settings['guidance_high'])}"
    parts = [
        Path(settings["run"]).name,
        str(where),
        "ema" if settings["ema"] else "raw",
        sampler,
        cfg,
        f"seed{settings['seed']}",
        settings["label_sampling"],
        f"n{settings['num_samples']}",
        settings["precision"],
        settings["pixels"],
    ]
    return "-".join(parts)


def read_settings(out_dir: Path) -> dict | None:
    path = Path(out_dir) / SETTINGS_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def write_settings(out_dir: Path, settings: dict, runtime: dict, complete: bool) -> None:
    record = {"settings": settings, "runtime": runtime, "complete": complete, "npz": NPZ_NAME}
    write_json_atomic(Path(out_dir) / SETTINGS_NAME, record)


def check_output(out_dir: Path, settings: dict) -> bool:
    """True if ``out_dir`` already holds a complete npz of exactly these settings.

    A folder recording other settings raises: its parts belong to another configuration.
    """
    record = read_settings(out_dir)
    if record is None:
        return False
    if record.get("settings") != settings:
        theirs = record.get("settings", {})
        diff = {k: (theirs.get(k), v) for k, v in settings.items() if theirs.get(k) != v}
        raise ValueError(f"{out_dir} holds samples of different settings (theirs, ours): {diff}; use another --out")
    return bool(record.get("complete")) and (Path(out_dir) / NPZ_NAME).is_file()


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m repae.generate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # `--run-dir` is the spelling to use under torchrun: its own parser rejects `--run` as an
    # ambiguous abbreviation of its `--run-path`, even after the script name.
    p.add_argument("--run-dir", "--run", dest="run", required=True, help="run directory (trainer.checkpoint_dir)")
    p.add_argument("--tag", default="latest", help="'latest' or a checkpoint step")
    p.add_argument("--no-ema", action="store_true", help="sample with the live SiT instead of the EMA")
    p.add_argument("--num-samples", type=positive_int, default=50_000)
    p.add_argument("--batch-size", type=positive_int, default=64, help="per process; does not change the images")
    p.add_argument("--mode", choices=MODES, default=None, help="default: the run's sample.mode, else ode")
    p.add_argument("--num-steps", type=positive_int, default=None, help="default: sample.num_steps (50 ode / 250 sde)")
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--cfg-scale", type=finite_float, default=None, help="1 disables guidance")
    p.add_argument("--guidance-low", type=finite_float, default=None)
    p.add_argument("--guidance-high", type=finite_float, default=None)
    p.add_argument("--path-type", choices=("linear", "cosine"), default=None, help="SDE only; default: the run's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-sampling", choices=LABEL_MODES, default="balanced")
    p.add_argument("--out", default=None, help="exact output folder (default: <sample-root>/<name from settings>)")
    p.add_argument("--sample-root", default=None, help="parent of the derived folder (default: <run>/samples)")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK) if available, else cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--pixels",
        choices=PIXEL_ROUNDING,
        default="truncate",
        help="uint8 conversion: truncate (the reference's; compare FID with published numbers) or round",
    )
    p.add_argument("--chunk-size", type=positive_int, default=CHUNK_SIZE, help="images per part file")
    p.add_argument("--keep-parts", action="store_true", help="keep the part files after assembling the npz")
    p.add_argument("--no-progress", action="store_true")
    return p


def init_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group torchrun / accelerate describe in the env."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is not None:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not _distributed():
        # Long timeout: ranks wait at the final barrier for the slowest rank and for the assembly.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=3))
    rank = dist.get_rank() if _distributed() else 0
    return rank, world_size, device


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[repae.generate] {message}", flush=True)


@dataclass
class Job:
    """A resolved generation request: the loaded model, its settings and where the samples go."""

    bundle: Any
    sampling: dict
    settings: dict
    out_dir: Path
    precision: str


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    """Load the checkpoint and resolve every setting; ValueError for anything inconsistent."""
    from repae.checkpoint import load_sampling_bundle

    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    bundle = load_sampling_bundle(args.run, args.tag, not args.no_ema, device)
    sampling = resolve_sampling(args, run_config(bundle, args.run))
    settings = build_settings(
        run=str(Path(args.run).resolve()),
        tag=args.tag,
        step=getattr(bundle, "step", None),
        ema=not args.no_ema,
        sampling=sampling,
        num_samples=args.num_samples,
        seed=args.seed,
        label_sampling=args.label_sampling,
        num_classes=bundle.num_classes,
        precision=precision,
        pixels=args.pixels,
    )
    root = Path(args.sample_root) if args.sample_root else Path(args.run) / "samples"
    out_dir = Path(args.out) if args.out else root / output_name(settings)
    return Job(bundle, sampling, settings, out_dir, precision)


def run_job(job: Job, args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> int:
    """Skip a finished identical set, else record the settings, generate, assemble and mark complete."""
    out_dir, sampling = job.out_dir, job.sampling
    if check_output(out_dir, job.settings):
        _log(rank, f"{out_dir / NPZ_NAME} already holds these settings; nothing to do")
        return 0
    runtime = {
        "batch_size": args.batch_size,
        "world_size": world_size,
        "device": str(device),
        "chunk_size": args.chunk_size,
        "nfe": expected_nfe(sampling["mode"], sampling["num_steps"], sampling["heun"]),
    }
    _log(rank, f"{args.num_samples} samples -> {out_dir} ({json.dumps(sampling)}, {job.precision}, {world_size} proc)")
    _barrier()  # every rank has read generate.json before rank 0 rewrites it
    if rank == 0:
        write_settings(out_dir, job.settings, runtime, complete=False)
    _barrier()
    labels = plan_labels(args.num_samples, job.bundle.num_classes, args.label_sampling, args.seed)
    npz = generate_to_npz(
        job.bundle,
        out_dir,
        labels,
        sampling,
        batch_size=args.batch_size,
        seed=args.seed,
        rank=rank,
        world_size=world_size,
        progress=not args.no_progress,
        chunk_size=args.chunk_size,
        precision=job.precision,
        keep_parts=args.keep_parts,
        pixels=job.settings["pixels"],
    )
    if rank == 0:
        write_settings(out_dir, job.settings, runtime, complete=True)
    _log(rank, f"wrote {npz}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world_size, device = init_distributed(args.device)
    try:
        try:
            job = prepare(args, device)
            check_output(job.out_dir, job.settings)  # raises early on a folder of another configuration
        except (ValueError, *user_errors()) as err:  # bad settings, run folder or --out: a message, not a traceback
            return error_exit(str(err), prog="repae.generate")
        try:
            return run_job(job, args, rank, world_size, device)
        except user_errors() as err:  # e.g. a weights file damaged since it was checked
            return error_exit(str(err), prog="repae.generate")
    finally:
        if _distributed():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
