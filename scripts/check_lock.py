"""Compare the packages installed in this Python with requirements.lock, or write the lock.

    python scripts/check_lock.py requirements.lock            # exit 1 naming every mismatch
    python scripts/check_lock.py --write requirements.lock    # freeze this environment (make lock)
    python scripts/check_lock.py --diff requirements.lock     # report what differs, exit 0

The lock is a pip constraints file: one ``name==version`` line per distribution that `make setup`
installs (this project itself excluded). The Makefile installs with ``-c requirements.lock`` and
then runs this check, so a venv that drifted from the lock (an older venv, a package installed by
hand) is reported instead of silently producing other numbers than the README's.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

PROJECT = "e2e-vae-training"


def normalize(name: str) -> str:
    """PEP 503 name normalisation: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Normalised name -> version of every installed distribution except this project.

    Importing setuptools (torch and DeepSpeed do) puts its ``_vendor`` folder on ``sys.path``, and
    the copies bundled there (jaraco, zipp, an older importlib-metadata, ...) would then count as
    installed, even shadow the real versions; only real install locations are read.
    """
    paths = [p for p in sys.path if "_vendor" not in Path(p).parts]
    dists = metadata.distributions(path=paths)
    found = {normalize(d.metadata["Name"]): d.version for d in dists if d.metadata["Name"]}
    found.pop(normalize(PROJECT), None)
    return dict(sorted(found.items()))


def read_lock(path: Path) -> dict[str, str]:
    """Normalised name -> version from a ``name==version`` file (comments and blanks ignored)."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[normalize(name.strip())] = version.strip()
    return pins


def differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(pins) | set(have)):
        want, got = pins.get(name), have.get(name)
        if want == got:
            continue
        if got is None:
            lines.append(f"{name}: locked {want}, not installed")
        elif want is None:
            lines.append(f"{name}: installed {got}, not in the lock")
        else:
            lines.append(f"{name}: locked {want}, installed {got}")
    return lines


def write_lock(path: Path) -> None:
    header = (
        "# Every package version `make setup` installs (pip constraints; `make lock` regenerates it).\n"
        f"# Resolved on Python {platform.python_version()} ({platform.machine()}); torch and torchvision come\n"
        "# from the machine's local wheel store. No hashes: those wheels are not PyPI's files.\n"
    )
    body = "".join(f"{name}=={version}\n" for name, version in installed().items())
    path.write_text(header + body)
    print(f"wrote {path}: {body.count(chr(10))} pins")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("lock", type=Path, help="the lock file (requirements.lock)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the lock from this environment")
    mode.add_argument("--diff", action="store_true", help="print the differences and exit 0")
    args = parser.parse_args(argv)
    if args.write:
        write_lock(args.lock)
        return 0
    if not args.lock.is_file():
        print(f"check_lock.py: error: {args.lock} not found (run `make lock`)", file=sys.stderr)
        return 1
    lines = differences(read_lock(args.lock), installed())
    if args.diff:
        print("\n".join(lines) if lines else f"the newest releases match {args.lock}")
        return 0
    if lines:
        print(f"check_lock.py: this environment differs from {args.lock}:\n  " + "\n  ".join(lines), file=sys.stderr)
        print("rebuild it (rm -rf .venv && make setup) or regenerate the lock (make lock)", file=sys.stderr)
        return 1
    print(f"environment matches {args.lock} ({len(installed())} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
