"""Score a GenEval-layout folder of toy-world samples with the toy attribute scorer.

    python prompts/build_prompts.py toy-geneval --toy toy --out prompts/toy_geneval.jsonl
    python evaluation/sample_geneval_ckpt.py --checkpoint output/toy \\
        --metadata-file prompts/toy_geneval.jsonl --save-dir output/toy/eval/geneval
    python evaluation/toy_eval.py --images output/toy/eval/geneval --toy toy --out output/toy/eval/toy_scores.json

This is the toy stand-in for GenEval's detector: the same folder layout
(``{index:05d}/metadata.jsonl`` + ``samples/{k:05d}.png``), but each image is read back by the
classifier trained with the toy world, and compared with the attributes stored in the metadata.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import write_text_atomic

SAMPLE = re.compile(r"^\d+\.png$")  # GenEval's own rule for what counts as a sample


def read_geneval_folder(folder: str | Path) -> tuple[list[Path], list[dict[str, Any]]]:
    """Image paths and, for each, its prompt's metadata object (GenEval's layout, same filters)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    paths: list[Path] = []
    records: list[dict[str, Any]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta = sub / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"{meta}: missing (was the folder written by sample_geneval_ckpt.py?)")
        record = json.loads(meta.read_text())
        samples = sorted(p for p in (sub / "samples").glob("*.png") if SAMPLE.match(p.name))
        paths += samples
        records += [record] * len(samples)
    if not paths:
        raise FileNotFoundError(f"{root}: no <index>/samples/<k>.png images")
    return paths, records


def load_images(paths: list[Path]) -> torch.Tensor:
    """PNG files -> (N,3,H,W) float in [-1, 1], the scorer's input range."""
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def score_folder(images_dir: str | Path, toy: str | Path) -> dict[str, Any]:
    """Per-attribute accuracy (plus chance and joint accuracy) of every sample in the folder."""
    from toyworld.scorer import ToyScorer

    scorer = ToyScorer.from_pretrained(Path(toy) / "scorer")
    paths, records = read_geneval_folder(images_dir)
    if not any(k in records[0] for k in scorer.attributes):
        raise ValueError(
            f"{images_dir}: metadata holds none of the scorer's attributes {list(scorer.attributes)}; "
            "sample from a file made by `build_prompts.py toy-geneval`"
        )
    result = scorer.score(load_images(paths), records)
    result.update(images=len(paths), prompts=len({path.parent.parent for path in paths}))
    result["folder"] = str(images_dir)
    settings = Path(images_dir) / "sampling_settings.json"
    if settings.is_file():  # written by evaluation/sampling.py: which checkpoint and settings were scored
        result["sampling"] = json.loads(settings.read_text())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", required=True, help="GenEval-layout folder written by sample_geneval_ckpt.py")
    p.add_argument("--toy", default="toy", help="toy world folder (holds scorer/)")
    p.add_argument("--out", default=None, help="write the scores JSON here")
    args = p.parse_args(argv)
    try:
        result = score_folder(args.images, args.toy)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"toy_eval.py: error: {e}\n")
    text = json.dumps(result, indent=2)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
