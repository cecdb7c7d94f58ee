"""Write tests/world_digests.json: the bit-exact weight digests of the quick toy world on the pinned path.

    python scripts/world_digests.py            # build the quick world in a temporary folder, print the digests
    python scripts/world_digests.py --write    # ... and commit them as what every machine must reproduce
    python scripts/world_digests.py --ship WORLD   # ship WORLD's VAE and scorer (toyworld/shipped)

Run it when a lock update (torch, diffusers, transformers, safetensors) changes the weights on
purpose; tests/test_numerics.py skips while the installed versions differ from the recorded ones.
``--ship`` takes a full default world trained here on the pinned path
(``python dataset_download.py --toy WORLD --train-here``) and makes its VAE and scorer the ones
every default build copies in instead of training (docs/toy-world.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "tests" / "world_digests.json"
# The versions that decide the bits (the rest of toyworld.training.VERSIONED_PACKAGES do not touch weights).
PINNED_VERSIONS = ("torch", "numpy", "diffusers", "transformers", "safetensors", "pillow")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--write", action="store_true", help=f"write {OUT.relative_to(ROOT)}")
    parser.add_argument("--ship", metavar="WORLD", help="ship this full pinned world's VAE and scorer instead")
    args = parser.parse_args(argv)
    if args.ship:
        from toyworld.build import SHIPPED, ship_world

        try:
            shipped = ship_world(Path(args.ship))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(json.dumps(shipped["weights_sha256"], indent=2))
        print(f"wrote {SHIPPED}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        world_dir = Path(tmp) / "world"
        cmd = [sys.executable, str(ROOT / "dataset_download.py"), "--toy", str(world_dir), "--quick", "--quiet"]
        subprocess.run(cmd, cwd=ROOT, check=True)
        world = json.loads((world_dir / "world.json").read_text())
    if not world["numerics"]["pinned"]:
        print(f"error: the build was not on the pinned path: {world['numerics']['why']}", file=sys.stderr)
        return 2
    record = {
        "about": "bit-exact weight digests of `dataset_download.py --toy DIR --quick` on the pinned numeric path "
        "(common/numerics.py); written by scripts/world_digests.py, checked by tests/test_numerics.py",
        "cpu_model": world["numerics"]["cpu_model"],
        "versions": {k: world["versions"][k] for k in PINNED_VERSIONS},
        "quick": world["weights_sha256"],
    }
    print(json.dumps(record, indent=2))
    if args.write:
        OUT.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
