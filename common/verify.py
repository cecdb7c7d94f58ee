"""Check a run's checkpoints against their manifests (every file: presence, size, SHA-256).

Examples:
  python -m common.verify output/toy                 # every tag of a run (either stage)
  python -m common.verify output/toy --tag 2500      # one tag ("latest" works too)
  python -m common.verify output/toy/2500            # the same: a tag folder

Prints one line per tag: "OK (files, size)", "DAMAGED" followed by one line per bad file, or
"no manifest (written before manifests)" (accepted, not verified). A tag without a manifest
while an older tag of the run has one counts as damaged. Also checks that `latest` names a tag.

Exit status: 0 when every tag is intact (or has no manifest), 1 when something is damaged,
2 on a usage error (missing folder, unknown tag, no checkpoints), with one "error: ..." line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.checkpoint import list_steps, step_dir, verify_tag


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m common.verify",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's checkpoint_dir (or one <step>/ folder in it)")
    parser.add_argument("--tag", default=None, help="check only this step tag (a number or 'latest')")
    parser.add_argument("--workers", type=int, default=None, help="hashing threads (default: one per core, <= 16)")
    return parser.parse_args(argv)


class UsageError(Exception):
    pass


def _tags(run_dir: Path, tag: str | None) -> tuple[Path, list[int]]:
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such folder")
    if tag is None and run_dir.name.isdigit() and not (run_dir / "latest").is_file() and not list_steps(run_dir):
        return run_dir.parent, [int(run_dir.name)]  # a tag folder itself
    if tag is None:
        steps = list_steps(run_dir)
        if not steps:
            raise UsageError(f"{run_dir}: no checkpoint tags (numbered <step>/ folders)")
        return run_dir, steps
    if tag == "latest":
        latest = run_dir / "latest"
        if not latest.is_file():
            raise UsageError(f"--tag latest: {latest} does not exist")
        text = latest.read_text().strip()
        if not text.isdigit():
            raise UsageError(f"--tag latest: {latest} names {text!r}, not a step")
        tag = text
    if not tag.isdigit():
        raise UsageError(f"--tag {tag}: expected a step number or 'latest'")
    if not step_dir(run_dir, int(tag)).is_dir():
        raise UsageError(f"--tag {tag}: no checkpoint folder {step_dir(run_dir, int(tag))}")
    return run_dir, [int(tag)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers: must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        run_dir, steps = _tags(Path(args.run_dir), args.tag)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    damaged = 0
    for step in steps:
        result = verify_tag(step_dir(run_dir, step), workers=args.workers)
        if not result.ok:
            damaged += 1
            print(f"{step}: DAMAGED")
            for problem in result.problems:
                print(f"  {problem}")
        elif not result.has_manifest:
            print(f"{step}: no manifest (written before manifests)")
        else:
            print(f"{step}: OK ({result.files} files, {_size(result.bytes)})")
    latest, bad_latest = run_dir / "latest", False
    if args.tag is None and latest.is_file():
        text = latest.read_text().strip()
        if not (text.isdigit() and step_dir(run_dir, int(text)).is_dir()):
            bad_latest = True
            print(f"latest: DAMAGED: names {text!r}, which is not a checkpoint folder")
    word = "tag" if len(steps) == 1 else "tags"
    print(f"{len(steps)} {word} checked: " + (f"{damaged} damaged" if damaged else "all intact"))
    return 1 if damaged or bad_latest else 0


if __name__ == "__main__":
    sys.exit(main())
