"""Get training data: the real BLIP3o webdataset shards, or the offline toy world.

Real data (needs network; ~32M images, so check the printed total with --dry-run first):

    python dataset_download.py --output-dir data
    python dataset_download.py --repos BLIP3o/BLIP3o-Pretrain-Short-Caption --dry-run

Toy world (offline, deterministic; what the tests and ``make demo`` use):

    python dataset_download.py --toy toy --seed 0
    python dataset_download.py --toy /tmp/toy --quick

Compared with the reference script, a file already on disk is skipped only when its size matches
the Hub's (an interrupted or truncated shard is downloaded again), and a failed file does not stop
the remaining ones: they are reported at the end and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.argtypes import DashedArgumentParser

DEFAULT_REPOS = (
    "BLIP3o/BLIP3o-Pretrain-Long-Caption",
    "BLIP3o/BLIP3o-Pretrain-Short-Caption",
)


def build_parser() -> argparse.ArgumentParser:
    parser = DashedArgumentParser(  # also reads the old spellings (--output_dir)
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    real = parser.add_argument_group("real data (Hugging Face Hub)")
    real.add_argument(
        "--output-dir",
        default="data",
        help="each repository goes to <output_dir>/<repository name>/ (default: %(default)s)",
    )
    real.add_argument(
        "--repos",
        nargs="+",
        default=list(DEFAULT_REPOS),
        metavar="OWNER/NAME",
        help="dataset repositories to download (default: both BLIP3o pretraining sets)",
    )
    real.add_argument("--dry-run", action="store_true", help="list what would be downloaded, then stop")
    toy = parser.add_argument_group("toy world (offline)")
    toy.add_argument("--toy", metavar="DIR", help="build the procedurally generated toy world in DIR instead")
    toy.add_argument("--seed", type=int, default=0, help="toy world seed (default: %(default)s)")
    toy.add_argument("--resolution", type=int, default=32, help="toy image size in pixels (default: %(default)s)")
    toy.add_argument("--num-train", type=int, default=8192, help="toy training images (default: %(default)s)")
    toy.add_argument(
        "--vae-steps",
        type=int,
        default=None,
        help="toy VAE training steps (default: toyworld.world.STEPS; a fixed count, never a time budget)",
    )
    toy.add_argument(
        "--scorer-steps",
        type=int,
        default=None,
        help="toy attribute-scorer training steps (default: toyworld.world.STEPS)",
    )
    toy.add_argument("--quick", action="store_true", help="tiny world in ~15 s (what the tests build)")
    toy.add_argument(
        "--train-here",
        action="store_true",
        help="train the VAE and scorer here (~4 min) even where the shipped ones (toyworld/shipped) answer the request",
    )
    toy.add_argument(
        "--families",
        action="store_true",
        help="also build the toy FLUX.2 VAE and toy RAE (DIR/flux2-vae, DIR/rae; ~6 min) for a study across "
        "tokenizer families (docs/tokenizers.md)",
    )
    toy.add_argument("--force", action="store_true", help="rebuild even if DIR holds a matching world")
    toy.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


# ------------------------------------------------------------------------------------------
# Pure helpers (testable offline)
# ------------------------------------------------------------------------------------------
def files_to_download(remote_sizes: Mapping[str, int], local_dir: str | Path) -> list[str]:
    """Repository files that are missing locally or whose local size differs from the Hub's."""
    root = Path(local_dir)
    pending = []
    for name, size in sorted(remote_sizes.items()):
        path = root / name
        if not (path.is_file() and path.stat().st_size == size):
            pending.append(name)
    return pending


def format_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def repo_local_dir(output_dir: str | Path, repo_id: str) -> Path:
    return Path(output_dir) / repo_id.split("/")[-1]


# ------------------------------------------------------------------------------------------
# Network side
# ------------------------------------------------------------------------------------------
def remote_file_sizes(repo_id: str) -> dict[str, int]:
    """Path -> size in bytes of every file in a dataset repository (one recursive listing)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    tree = HfApi().list_repo_tree(repo_id, repo_type="dataset", recursive=True)
    return {entry.path: entry.size for entry in tree if isinstance(entry, RepoFile)}


def download_repo(repo_id: str, output_dir: str | Path, dry_run: bool = False) -> list[str]:
    """Download the missing files of one repository; returns the files that failed."""
    from huggingface_hub import hf_hub_download

    local_dir = repo_local_dir(output_dir, repo_id)
    sizes = remote_file_sizes(repo_id)
    pending = files_to_download(sizes, local_dir)
    total, remaining = sum(sizes.values()), sum(sizes[name] for name in pending)
    print(
        f"{repo_id}: {len(sizes)} files, {format_size(total)} in total; "
        f"{len(pending)} to download ({format_size(remaining)}) into {local_dir}",
        flush=True,
    )
    if dry_run:
        for name in pending:
            print(f"  would download {name} ({format_size(sizes[name])})")
        return []
    local_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for index, name in enumerate(pending, 1):
        print(f"[{index}/{len(pending)}] {name} ({format_size(sizes[name])})", flush=True)
        try:
            path = Path(hf_hub_download(repo_id, name, repo_type="dataset", local_dir=local_dir))
            if path.stat().st_size != sizes[name]:
                raise OSError(f"size {path.stat().st_size} != expected {sizes[name]}")
        except Exception as error:  # keep going: one bad shard must not stop a multi-TB download
            print(f"  FAILED {name}: {error}", file=sys.stderr, flush=True)
            failed.append(name)
    return failed


def download(repos: Sequence[str], output_dir: str | Path, dry_run: bool = False) -> int:
    failed = [f"{repo}/{name}" for repo in repos for name in download_repo(repo, output_dir, dry_run)]
    if failed:
        print(f"{len(failed)} files failed; run the command again to retry them:", file=sys.stderr)
        for name in failed:
            print(f"  {name}", file=sys.stderr)
        return 1
    return 0


def build_toy(args: argparse.Namespace) -> int:
    from toyworld.build import ShippedWeightsError, build_toy_world
    from toyworld.training import QualityGateError

    try:
        summary = build_toy_world(
            args.toy,
            seed=args.seed,
            resolution=args.resolution,
            num_train=args.num_train,
            vae_steps=args.vae_steps,
            scorer_steps=args.scorer_steps,
            quick=args.quick,
            force=args.force,
            progress=not args.quiet,
            use_shipped=not args.train_here,
        )
    except (QualityGateError, ShippedWeightsError) as error:  # named; no world.json was written
        print(f"dataset_download.py: error: {error}", file=sys.stderr)
        return 2
    scorer = summary["scorer"]["heldout_clean"]["accuracy"]
    if args.families:
        from toyworld.families import build_toy_families

        families = build_toy_families(args.toy, force=args.force, progress=not args.quiet)
        psnrs = ", ".join(f"{name} {report['psnr_db']:.2f} dB" for name, report in families.items())
        print(f"toy tokenizers: {psnrs}")
    print(
        f"toy world: {args.toy} | VAE PSNR {summary['vae']['psnr_db']:.2f} dB | "
        f"scorer held-out accuracy {scorer} | built in {summary['build_seconds']:.0f}s"
        + (" (reused)" if summary.get("reused") else "")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.toy:
        from common import numerics

        numerics.pin_process()  # one toy world on every x86-64 CPU (E2E_UNPINNED=1 opts out)
        return build_toy(args)
    return download(args.repos, args.output_dir, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
