"""Build the benchmark prompt files the samplers read, from sources you downloaded yourself.

Nothing is downloaded here. Where each source comes from:

  coco        COCO 2014 captions: annotations/captions_val2014.json inside
              http://images.cocodataset.org/annotations/annotations_trainval2014.zip
              -> prompts/coco30k.json: one caption for each of 30,000 val2014 images (fixed seed)
  mjhq        MJHQ-30K meta_data.json from the Hugging Face dataset playgroundai/MJHQ-30K
              -> prompts/mjhq30k.json: the 30,000 `prompt` fields in the file's key order
  geneval     GenEval prompts/evaluation_metadata.jsonl from https://github.com/djghosh13/geneval
              -> prompts/geneval_metadata.jsonl (validated copy, one object per line)
  dpgbench    DPG-Bench dpg_bench/prompts/ (1,065 .txt files) from https://github.com/TencentQQGYLab/ELLA
              -> prompts/dpgbench.json: {file stem: prompt}
  genaibench  GenAI-Bench genai_image.json from the Hugging Face dataset BaiqiL/GenAI-Bench-1600
              (the file linzhiqiu/t2v_metrics evaluates against) -> prompts/genaibench.json,
              a JSON list in benchmark order; a plain JSON list of prompts is accepted too
  toy-geneval the toy world's <toy>/prompts/heldout.json -> a GenEval-style metadata JSONL whose
              objects keep the toy attributes, for sample_geneval_ckpt.py + evaluation/toy_eval.py

Examples:
  python prompts/build_prompts.py coco --captions annotations/captions_val2014.json
  python prompts/build_prompts.py mjhq --meta MJHQ-30K/meta_data.json
  python prompts/build_prompts.py geneval --metadata geneval/prompts/evaluation_metadata.jsonl
  python prompts/build_prompts.py dpgbench --prompts-dir ELLA/dpg_bench/prompts
  python prompts/build_prompts.py genaibench --prompts GenAI-Bench-1600/genai_image.json
  python prompts/build_prompts.py toy-geneval --toy toy --out prompts/toy_geneval.jsonl

(The COCO/MJHQ/GenAI-Bench samplers also read <toy>/prompts/heldout.json directly: a list of
{"prompt": ...} objects is accepted wherever a list of strings is.)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.argtypes import DashedArgumentParser
from common.files import write_text_atomic

HERE = Path(__file__).resolve().parent


class SourceError(ValueError):
    """A source file that does not look like the benchmark's; the message names file and problem."""


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from e


def dump_json(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def dump_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def clean(text: str) -> str:
    """Collapse whitespace: COCO captions carry trailing spaces and newlines."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def coco_prompts(captions_file: str | Path, num: int = 30_000, seed: int = 0) -> tuple[list[str], list[str]]:
    """One caption per image for ``num`` images drawn with ``seed``; returns (captions, image file names).

    Images are drawn from the sorted image ids and listed in id order, and each image's caption
    is drawn from its captions sorted by annotation id, so the result depends only on the seed.
    The file names let FID use exactly the real images whose captions were sampled.
    """
    data = read_json(captions_file)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise SourceError(f"{captions_file}: expected COCO captions JSON with an 'annotations' list")
    by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for a in data["annotations"]:
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or "image_id" not in a:
            raise SourceError(f"{captions_file}: annotation without 'image_id' and string 'caption': {a!r:.120}")
        by_image[a["image_id"]].append((a.get("id", 0), a["caption"]))
    if len(by_image) < num:
        raise SourceError(f"{captions_file}: {len(by_image)} captioned images, fewer than --num {num}")
    names = {im["id"]: im.get("file_name", str(im["id"])) for im in data.get("images", []) if "id" in im}
    rng = random.Random(seed)
    chosen = sorted(rng.sample(sorted(by_image), num))
    captions = [clean(rng.choice(sorted(by_image[i]))[1]) for i in chosen]
    return captions, [names.get(i, str(i)) for i in chosen]


def mjhq_prompts(meta_file: str | Path) -> list[str]:
    """MJHQ's ``{image_id: {"category": ..., "prompt": ...}}`` -> prompts in key order."""
    data = read_json(meta_file)
    if not isinstance(data, dict):
        raise SourceError(f"{meta_file}: expected MJHQ meta_data.json, an object {{image_id: {{prompt, category}}}}")
    out = []
    for key, value in data.items():
        if not isinstance(value, dict) or not isinstance(value.get("prompt"), str):
            raise SourceError(f"{meta_file}: entry {key!r} has no string 'prompt'")
        out.append(clean(value["prompt"]))
    return out


def geneval_rows(metadata_file: str | Path, require: tuple[str, ...] = ("tag", "include")) -> list[dict[str, Any]]:
    """GenEval metadata, validated: every line an object with a prompt and the keys its scorer reads."""
    path = Path(metadata_file)
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: line {n} is not valid JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise SourceError(f"{path}: line {n} is not an object with a string 'prompt'")
        missing = [k for k in require if k not in row]
        if missing:
            raise SourceError(f"{path}: line {n} lacks {missing} (needed by GenEval's scorer)")
        rows.append(row)
    if not rows:
        raise SourceError(f"{path}: no prompts")
    return rows


def dpgbench_prompts(prompts_dir: str | Path) -> dict[str, str]:
    """DPG-Bench's one-prompt-per-.txt folder -> {stem: prompt}, sorted by stem (names are the scorer's keys)."""
    folder = Path(prompts_dir)
    if not folder.is_dir():
        raise SourceError(f"{folder}: not a folder (expected ELLA's dpg_bench/prompts)")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise SourceError(f"{folder}: no .txt prompt files")
    out = {}
    for f in files:
        text = clean(f.read_text(encoding="utf-8"))
        if not text:
            raise SourceError(f"{f}: empty prompt")
        out[f.stem] = text
    return out


def genaibench_prompts(prompts_file: str | Path) -> list[str]:
    """GenAI-Bench prompts in benchmark order.

    Accepts its ``genai_image.json`` (``{id: {"prompt": ...}}``, ordered by numeric id when every id
    is a number, else in file order), a ``{id: prompt}`` object, or a list of strings / objects.
    """
    data = read_json(prompts_file)
    if isinstance(data, dict):
        keys = list(data)
        if all(str(k).isdigit() for k in keys):
            keys.sort(key=int)
        entries = [(repr(k), data[k]) for k in keys]
    elif isinstance(data, list):
        entries = [(f"item {i}", v) for i, v in enumerate(data)]
    else:
        raise SourceError(f"{prompts_file}: expected a JSON object or array, got {type(data).__name__}")
    out = []
    for where, value in entries:
        text = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(text, str) or not text.strip():
            raise SourceError(f"{prompts_file}: {where} has no prompt string")
        out.append(clean(text))
    return out


def toy_geneval_rows(toy: str | Path, split: str = "heldout") -> list[dict[str, Any]]:
    """The toy world's prompts as GenEval metadata: prompt + colour/shape/position/background."""
    path = Path(toy) / "prompts" / f"{split}.json"
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(p, dict) and isinstance(p.get("prompt"), str) for p in data):
        raise SourceError(f"{path}: expected a list of objects with a 'prompt' (a toy world's prompt file)")
    return [dict(p, tag=f"toy_{split}") if "tag" not in p else dict(p) for p in data]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = DashedArgumentParser(  # it and its subcommands also read the old spellings (--prompts_dir)
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="SOURCE")

    c = sub.add_parser("coco", help="COCO-30K from captions_val2014.json")
    c.add_argument("--captions", required=True, help="annotations/captions_val2014.json")
    c.add_argument("--num", type=int, default=30_000, help="number of images (one caption each)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=str(HERE / "coco30k.json"))
    c.add_argument("--image-list", default=None, help="also write the chosen val2014 file names (FID --real-list)")

    m = sub.add_parser("mjhq", help="MJHQ-30K from meta_data.json")
    m.add_argument("--meta", required=True, help="MJHQ-30K meta_data.json")
    m.add_argument("--out", default=str(HERE / "mjhq30k.json"))

    g = sub.add_parser("geneval", help="GenEval from evaluation_metadata.jsonl")
    g.add_argument("--metadata", required=True, help="geneval/prompts/evaluation_metadata.jsonl")
    g.add_argument("--out", default=str(HERE / "geneval_metadata.jsonl"))

    d = sub.add_parser("dpgbench", help="DPG-Bench from the folder of .txt prompts")
    d.add_argument("--prompts-dir", required=True, help="ELLA/dpg_bench/prompts")
    d.add_argument("--out", default=str(HERE / "dpgbench.json"))

    a = sub.add_parser("genaibench", help="GenAI-Bench from genai_image.json (or a JSON list)")
    a.add_argument("--prompts", required=True, help="GenAI-Bench-1600/genai_image.json")
    a.add_argument("--out", default=str(HERE / "genaibench.json"))

    t = sub.add_parser("toy-geneval", help="GenEval-style metadata from a toy world's prompts")
    t.add_argument("--toy", required=True, help="toy world folder")
    t.add_argument("--split", default="heldout", choices=("heldout", "val"), help="which toy prompt file")
    t.add_argument("--out", required=True, help="output .jsonl")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Path, int]:
    """Run one subcommand; returns (file written, number of prompts)."""
    if args.command == "coco":
        captions, files = coco_prompts(args.captions, args.num, args.seed)
        if args.image_list:
            write_text_atomic(args.image_list, "".join(f + "\n" for f in files))
        return dump_json(args.out, captions), len(captions)
    if args.command == "mjhq":
        prompts = mjhq_prompts(args.meta)
        return dump_json(args.out, prompts), len(prompts)
    if args.command == "geneval":
        rows = geneval_rows(args.metadata)
        return dump_jsonl(args.out, rows), len(rows)
    if args.command == "dpgbench":
        named = dpgbench_prompts(args.prompts_dir)
        return dump_json(args.out, named), len(named)
    if args.command == "genaibench":
        prompts = genaibench_prompts(args.prompts)
        return dump_json(args.out, prompts), len(prompts)
    rows = toy_geneval_rows(args.toy, args.split)
    return dump_jsonl(args.out, rows), len(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path, count = build(args)
    except SourceError as e:
        print(f"build_prompts.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} prompts to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
