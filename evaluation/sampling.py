"""Benchmark sampling shared by the five ``evaluation/sample_*_ckpt.py`` scripts.

One module, five output layouts. What it fixes over the reference scripts (docs/reference-facts.md, T2I-6 and
reference defects T2I-D6 to T2I-D9, T2I-D12):

* every image's noise comes from (seed, global prompt index, sample index), so the images do not
  depend on the number of processes, the batch size or which prompts share a batch;
* files are named by the *global* prompt index (no per-process counters that collide across
  nodes), and ``index_to_prompt.json`` is written once, by the main process, with every prompt;
* the VAE is the one recorded with the checkpoint (``<tag>/vae.json``) unless ``--vae`` says
  otherwise; weights come from safetensors, never from a pickle;
* bf16 autocast on CUDA (training's precision; latents stay fp32), plain fp32 on CPU;
* runs are resumable: a prompt whose outputs all exist is skipped, images are written atomically,
  and a folder made with different image-affecting settings is refused instead of mixed.

Launch one process or many, the result is the same::

    python evaluation/sample_coco_ckpt.py --checkpoint RUN --save-dir out/coco
    accelerate launch --num_processes 8 evaluation/sample_coco_ckpt.py --checkpoint RUN ...
    torchrun --standalone --nproc_per_node 2 evaluation/sample_coco_ckpt.py ...   # CPU, gloo
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.argtypes import DashedArgumentParser, finite_float, positive_int
from common.files import write_text_atomic, write_with
from common.images import quantise

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_DIR = ROOT / "prompts"
SETTINGS_NAME = "sampling_settings.json"
INDEX_NAME = "index_to_prompt.json"
# fuse-dit-clip: a FuseDiT whose timestep embedding is modulated by a pooled CLIP text embedding
# (model.text_modulation_embeds_dim); its CLIP text encoder is the run's (model.clip_text_encoder),
# the export's, or --clip-l's.
SUPPORTED_TYPES = ("baseline-dit", "fuse-dit", "fuse-dit-clip")
DPG_GRID = 4  # DPG-Bench's scorer crops four tiles out of a 2x2 grid
# Settings that change the pixels; a folder must not mix images made with different values.
IMAGE_SETTINGS = (
    "checkpoint",
    "step",
    "ema_weights",
    "vae",
    "resolution",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "images_per_prompt",
    "clip_l",
)


class SamplingError(ValueError):
    """A problem the user can fix (bad file, setting or folder); printed without a traceback."""


class PromptFileError(SamplingError):
    """A prompt file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt and where it sits in its file: ``index`` seeds its images, ``name`` names its output."""

    index: int
    text: str
    name: str
    record: dict[str, Any] = field(default_factory=dict, compare=False)


# --------------------------------------------------------------------------------------------
# Prompt files
# --------------------------------------------------------------------------------------------
def read_json_file(path: str | Path) -> Any:
    """Parse a JSON file, turning every failure into an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found (see prompts/build_prompts.py --help)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}: not valid JSON ({e})") from e


def _prompt_text(path: Path, where: str, value: Any) -> str:
    """A prompt is a string or an object with a string ``prompt`` (the toy world's held-out format)."""
    if isinstance(value, dict):
        value = value.get("prompt")
    if not isinstance(value, str) or not value.strip():
        raise PromptFileError(f"{path}: {where} is not a non-empty string or an object with a 'prompt' string")
    return value


def _record(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def load_prompt_list(path: str | Path) -> list[PromptItem]:
    """COCO / MJHQ / GenAI-Bench: a JSON array of strings or of ``{"prompt": ...}`` objects."""
    path = Path(path)
    data = read_json_file(path)
    if not isinstance(data, list):
        raise PromptFileError(f"{path}: expected a JSON array of prompts, got a JSON {type(data).__name__}")
    return [PromptItem(i, _prompt_text(path, f"item {i}", v), f"{i:05d}", _record(v)) for i, v in enumerate(data)]


def load_geneval_metadata(path: str | Path) -> list[PromptItem]:
    """GenEval: JSON Lines, one object per prompt with a ``prompt`` key (kept whole for the scorer)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: metadata file not found (see prompts/build_prompts.py --help)")
    items = []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for n, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}: line {n + 1} is not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise PromptFileError(f"{path}: line {n + 1} is not a JSON object")
        items.append(PromptItem(n, _prompt_text(path, f"line {n + 1}", obj), f"{n:05d}", obj))
    return items


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_named_prompts(path: str | Path) -> list[PromptItem]:
    """DPG-Bench: ``{prompt_name: text}`` (names become file names) or an array named ``prompt_{i:05d}``."""
    path = Path(path)
    data = read_json_file(path)
    if isinstance(data, list):
        pairs = [(f"prompt_{i:05d}", v) for i, v in enumerate(data)]
    elif isinstance(data, dict):
        pairs = list(data.items())
    else:
        raise PromptFileError(f"{path}: expected a JSON object {{name: prompt}} or an array, got {type(data).__name__}")
    items = []
    for i, (name, value) in enumerate(pairs):
        if not _SAFE_NAME.match(name):
            raise PromptFileError(f"{path}: prompt name {name!r} cannot be a file name (letters, digits, . _ -)")
        items.append(PromptItem(i, _prompt_text(path, f"prompt {name!r}", value), name, _record(value)))
    return items


# --------------------------------------------------------------------------------------------
# Writing images
# --------------------------------------------------------------------------------------------
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> (B,H,W,3) uint8, rounded like the reference's PIL conversion."""
    return quantise(images, low=0.0).permute(0, 2, 3, 1).contiguous()


def save_png(pixels: torch.Tensor, path: Path) -> None:
    """One (H,W,3) uint8 image as PNG, atomically."""
    from PIL import Image

    image = Image.fromarray(pixels.numpy())
    write_with(path, lambda tmp: image.save(tmp, format="PNG"))


def grid_2x2(pixels: torch.Tensor) -> torch.Tensor:
    """Four (H,W,3) images -> one (2H,2W,3) canvas, image i at column i % 2, row i // 2 (DPG-Bench)."""
    if len(pixels) != DPG_GRID:
        raise ValueError(f"a DPG-Bench grid needs {DPG_GRID} images, got {len(pixels)}")
    return torch.cat([torch.cat([pixels[0], pixels[1]], dim=1), torch.cat([pixels[2], pixels[3]], dim=1)], dim=0)


# --------------------------------------------------------------------------------------------
# Output layouts: which files a prompt produces, and how they are written
# --------------------------------------------------------------------------------------------
class Layout:
    """Where a benchmark's scorer expects the images of one prompt."""

    def __init__(self, save_dir: Path, images_per_prompt: int = 1) -> None:
        self.save_dir = save_dir
        self.images_per_prompt = images_per_prompt

    def outputs(self, item: PromptItem) -> list[Path]:
        raise NotImplementedError

    def write(self, item: PromptItem, pixels: torch.Tensor) -> None:
        raise NotImplementedError

    def check(self, items: Sequence[PromptItem]) -> None:
        """Every rank, read only: refuse a folder whose existing outputs belong to other prompts."""

    def prepare(self, items: Sequence[PromptItem]) -> None:
        """Main process only, before any image is written."""

    def done(self, item: PromptItem) -> bool:
        return all(p.is_file() for p in self.outputs(item))


class FlatLayout(Layout):
    """COCO, MJHQ, GenAI-Bench: ``{global_index:05d}.png`` plus one ``index_to_prompt.json``."""

    def outputs(self, item: PromptItem) -> list[Path]:
        return [self.save_dir / f"{item.name}.png"]

    def write(self, item: PromptItem, pixels: torch.Tensor) -> None:
        save_png(pixels[0], self.outputs(item)[0])

    def _existing_index(self) -> dict[str, str]:
        path = self.save_dir / INDEX_NAME
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def check(self, items: Sequence[PromptItem]) -> None:
        existing = self._existing_index()
        clash = next((item for item in items if existing.get(item.name, item.text) != item.text), None)
        if clash is not None:
            raise SamplingError(
                f"{self.save_dir / INDEX_NAME}: {clash.name} was sampled for {existing[clash.name]!r}, "
                f"the prompt file now says {clash.text!r}; use another --save-dir"
            )

    def prepare(self, items: Sequence[PromptItem]) -> None:
        """One index for the whole folder, kept across resumes (a smaller --max-prompts drops nothing)."""
        index = self._existing_index() | {item.name: item.text for item in items}
        index = dict(sorted(index.items()))
        write_text_atomic(self.save_dir / INDEX_NAME, json.dumps(index, indent=1, ensure_ascii=False) + "\n")


class GenEvalLayout(Layout):
    """``{index:05d}/metadata.jsonl`` (the prompt's object on one line) + ``samples/{k:05d}.png``."""

    def folder(self, item: PromptItem) -> Path:
        return self.save_dir / f"{item.index:05d}"

    def outputs(self, item: PromptItem) -> list[Path]:
        samples = [self.folder(item) / "samples" / f"{k:05d}.png" for k in range(self.images_per_prompt)]
        return [self.folder(item) / "metadata.jsonl", *samples]

    def check(self, items: Sequence[PromptItem]) -> None:
        for item in items:
            path = self.folder(item) / "metadata.jsonl"
            if path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("prompt") != item.text:
                raise SamplingError(f"{path}: written for another prompt than {item.text!r}; use another --save-dir")

    def write(self, item: PromptItem, pixels: torch.Tensor) -> None:
        metadata, *samples = self.outputs(item)
        for path, image in zip(samples, pixels):
            save_png(image, path)
        # GenEval reads this with json.load: one object, no trailing newline (as its own generator writes).
        write_text_atomic(metadata, json.dumps(item.record or {"prompt": item.text}, ensure_ascii=False))


class GridLayout(Layout):
    """DPG-Bench: ``{prompt_name}.png``, a 2x2 grid of the prompt's four images."""

    def outputs(self, item: PromptItem) -> list[Path]:
        return [self.save_dir / f"{item.name}.png"]

    def write(self, item: PromptItem, pixels: torch.Tensor) -> None:
        save_png(grid_2x2(pixels), self.outputs(item)[0])


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark reads its prompts and lays out its images."""

    name: str
    title: str
    load: Callable[[str | Path], list[PromptItem]]
    layout: type[Layout]
    default_prompts: Path
    prompts_flag: str = "--prompts"
    default_batch_size: int = 32
    fixed_images_per_prompt: int | None = 1  # None: --images-per-prompt decides


BENCHMARKS: dict[str, Benchmark] = {
    "coco": Benchmark("coco", "COCO-30K", load_prompt_list, FlatLayout, PROMPTS_DIR / "coco30k.json"),
    "mjhq": Benchmark("mjhq", "MJHQ-30K", load_prompt_list, FlatLayout, PROMPTS_DIR / "mjhq30k.json"),
    "geneval": Benchmark(
        "geneval",
        "GenEval",
        load_geneval_metadata,
        GenEvalLayout,
        PROMPTS_DIR / "geneval_metadata.jsonl",
        prompts_flag="--metadata-file",
        default_batch_size=4,
        fixed_images_per_prompt=None,
    ),
    "dpgbench": Benchmark(
        "dpgbench",
        "DPG-Bench",
        load_named_prompts,
        GridLayout,
        PROMPTS_DIR / "dpgbench.json",
        default_batch_size=4,
        fixed_images_per_prompt=DPG_GRID,
    ),
    "genaibench": Benchmark("genaibench", "GenAI-Bench", load_prompt_list, FlatLayout, PROMPTS_DIR / "genaibench.json"),
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the epilog's layout and show every default that is a value (not None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and not action.required and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser(bench: Benchmark) -> argparse.ArgumentParser:
    p = DashedArgumentParser(
        prog=f"sample_{bench.name}_ckpt.py",
        description=f"Sample {bench.title} prompts from a training checkpoint (one or many processes).",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=_HelpFormatter,
        # the old names; the underscore spellings of every flag (--batch_size) are accepted as well
        renamed={"--num-samples": "--max-prompts", "--n-samples": "--images-per-prompt"},
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="training run folder (holds config.yaml, latest, <step>/), or a pipeline folder from fusedit.export",
    )
    p.add_argument("--tag", default="latest", help="checkpoint step, or 'latest'")
    p.add_argument(
        "--type",
        default="baseline-dit",
        help="model family of the checkpoint: baseline-dit, fuse-dit or fuse-dit-clip",
    )
    p.add_argument(
        "--clip-l",
        default=None,
        metavar="PATH",
        help="fuse-dit-clip: CLIP text encoder replacing the checkpoint's: a diffusers pipeline with "
        "text_encoder/ and tokenizer/ (e.g. SD3's, the reference's meaning) or a folder holding a CLIP "
        "text model and its tokenizer (default: the run's model.clip_text_encoder, or the export's)",
    )
    p.add_argument("--vae", default=None, help="VAE path overriding the one stored in <tag>/vae.json")
    p.add_argument("--vae-subfolder", default=None, help="subfolder of --vae (default: the folder itself)")
    flag = bench.prompts_flag
    p.add_argument(flag, dest="prompts", metavar="FILE", default=str(bench.default_prompts), help=_format_help(bench))
    p.add_argument(
        "--resolution", type=positive_int, default=None, help="image side in px (default: the run's sample.height)"
    )
    p.add_argument("--num-inference-steps", type=positive_int, default=25, help="Euler steps")
    p.add_argument("--guidance-scale", type=finite_float, default=6.0, help="classifier-free guidance (1 = off)")
    p.add_argument("--batch-size", type=positive_int, default=bench.default_batch_size, help="images per forward pass")
    p.add_argument("--save-dir", default=None, help="output folder (default: <checkpoint>/eval/<benchmark>_<settings>)")
    p.add_argument("--ema-weights", action=argparse.BooleanOptionalAction, default=True, help="EMA or raw weights")
    p.add_argument("--seed", type=int, default=42, help="base seed; image k of prompt i uses (seed, i, k)")
    p.add_argument("--max-prompts", type=positive_int, default=None, help="use only the first N prompts")
    if bench.fixed_images_per_prompt is None:
        p.add_argument("--images-per-prompt", type=positive_int, default=4, help="images per prompt")
    return p


def _format_help(bench: Benchmark) -> str:
    formats = {
        "geneval": "JSON Lines, one object with 'prompt' per line",
        "dpgbench": "JSON object {name: prompt} or array",
    }
    return "prompt file: " + formats.get(bench.name, "JSON array of strings or {'prompt': ...} objects")


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what the reference silently accepted or that would fail late, on every process."""
    if args.type not in SUPPORTED_TYPES:
        parser.error(f"--type {args.type!r} is not a model family here; choose from {SUPPORTED_TYPES}")
    if args.clip_l is not None and args.type != "fuse-dit-clip":
        parser.error(f"--clip-l: only --type fuse-dit-clip reads a CLIP text encoder, not {args.type}")
    clip_l = args.clip_l or ""
    if clip_l.startswith((".", "/", "~")) and not Path(clip_l).expanduser().exists():
        parser.error(f"--clip-l {clip_l}: no such folder")
    # counts and steps are refused at the flag (common.argtypes.positive_int)
    if args.vae_subfolder and not args.vae:
        parser.error("--vae-subfolder needs --vae")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def export_info(folder: Path) -> dict[str, Any] | None:
    """``fusedit_export.json`` of a pipeline folder ``python -m fusedit.export`` wrote; None for a run."""
    from fusedit.diffusers_pipeline import is_pipeline_folder
    from fusedit.tools.export import EXPORT_INFO

    if not is_pipeline_folder(folder):
        return None
    path = folder / EXPORT_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_step(run_dir: Path, tag: str) -> int:
    """The step to sample: from ``--tag`` for a run, from the export's record for a pipeline folder."""
    from common.checkpoint import CheckpointNotFound, checkpoint_folder

    info = export_info(run_dir)
    if info is not None:
        step = int(info.get("step", -1))
        if str(tag) not in ("latest", str(step)):
            raise SamplingError(f"--tag {tag}: {run_dir} is an exported pipeline of step {step}")
        return step
    try:
        return int(checkpoint_folder(run_dir, tag, needs="vae.json", flag="--checkpoint").name)
    except CheckpointNotFound as err:
        raise SamplingError(str(err)) from None


def vae_spec(args: argparse.Namespace, run_dir: Path, step: int) -> dict[str, Any]:
    """The VAE to decode with: the checkpoint's own unless overridden (the reference forced subfolder 'vae')."""
    if args.vae:
        return {"pretrained_model_name_or_path": args.vae, "subfolder": args.vae_subfolder, "kind": "auto"}
    if export_info(run_dir) is not None:
        return {"pretrained_model_name_or_path": str(run_dir.resolve()), "subfolder": "vae", "kind": "auto"}
    return json.loads((run_dir / str(step) / "vae.json").read_text())


def uses_ema(args: argparse.Namespace, run_dir: Path) -> bool:
    """A run: ``--ema-weights``; a pipeline folder: whichever weights were exported."""
    info = export_info(run_dir)
    if info is None:
        return bool(args.ema_weights)
    return info.get("weights", "ema") == "ema"


def default_resolution(run_dir: Path) -> int:
    """The run's ``sample.height``; for a pipeline folder, the one recorded at export (else the DiT's own)."""
    from fusedit.config import load_config

    info = export_info(run_dir)
    if info is None:
        return load_config(run_dir / "config.yaml").sample.height
    if info.get("resolution"):
        return int(info["resolution"])
    from common.vae_config import spatial_factor

    transformer = json.loads((run_dir / "transformer" / "config.json").read_text())
    vae = json.loads((run_dir / "vae" / "config.json").read_text())
    return int(transformer["sample_size"]) * spatial_factor(vae)


def settings(args: argparse.Namespace, bench: Benchmark, run_dir: Path, step: int, resolution: int) -> dict[str, Any]:
    return {
        "benchmark": bench.name,
        "checkpoint": str(run_dir.resolve()),
        "step": step,
        "ema_weights": uses_ema(args, run_dir),
        "vae": vae_spec(args, run_dir, step),
        "resolution": resolution,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "images_per_prompt": images_per_prompt(bench, args),
        "prompts": str(Path(args.prompts).resolve()),
        "type": args.type,
        "clip_l": args.clip_l,  # null: the checkpoint's own CLIP text encoder (or none)
    }


def images_per_prompt(bench: Benchmark, args: argparse.Namespace) -> int:
    return bench.fixed_images_per_prompt or args.images_per_prompt


def check_settings(save_dir: Path, current: dict[str, Any]) -> None:
    """Resuming into a folder made with other settings would silently mix two experiments.

    Every rank checks (read only), so all of them fail together instead of some waiting forever
    at a barrier; the main process records the settings afterwards.
    """
    path = save_dir / SETTINGS_NAME
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = [k for k in IMAGE_SETTINGS if previous.get(k) != current.get(k)]
        if changed:
            diffs = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise SamplingError(f"{save_dir} holds images made with other settings ({diffs}); use another --save-dir")


def default_save_dir(run_dir: Path, bench: Benchmark, s: dict[str, Any]) -> Path:
    weights = "ema" if s["ema_weights"] else "raw"
    name = (
        f"{bench.name}_step{s['step']}_{weights}_cfg{s['guidance_scale']:g}_n{s['num_inference_steps']}_seed{s['seed']}"
    )
    # next to an exported pipeline folder, not inside it (push_to_hub would upload the images)
    root = run_dir.with_name(run_dir.name + "-eval") if export_info(run_dir) is not None else run_dir / "eval"
    return root / f"{name}_r{s['resolution']}"


def chunks(items: Sequence[PromptItem], per_chunk: int) -> list[list[PromptItem]]:
    return [list(items[i : i + per_chunk]) for i in range(0, len(items), per_chunk)]


def load_pipeline(args: argparse.Namespace, run_dir: Path, step: int, device: torch.device):
    """Our sampler over a run's checkpoint or an exported folder, with ``--vae`` / ``--clip-l`` applied;
    a component that does not load is one error line, and so is a ``--type`` the model is not."""
    from common.checkpoint import CheckpointDamaged
    from common.vae_config import VaeSpec
    from fusedit.diffusers_pipeline import sampler_from_folder
    from fusedit.pipeline import DiTPipeline
    from fusedit.text import ClipSource

    spec = VaeSpec(**vae_spec(args, run_dir, step)) if args.vae else None
    clip = ClipSource.from_path(args.clip_l) if args.clip_l else None
    try:
        if export_info(run_dir) is not None:
            pipe = sampler_from_folder(run_dir, device=device, vae=spec, clip=clip)
        else:  # the weights are checked against the tag's manifest before they load
            pipe = DiTPipeline.from_checkpoint(run_dir, step, args.ema_weights, device=device, vae=spec, clip=clip)
    except CheckpointDamaged as err:
        raise SamplingError(str(err)) from err
    except OSError as err:  # a component that does not load (e.g. a CLIP path from another machine)
        raise SamplingError((str(err).strip().splitlines() or [type(err).__name__])[0]) from err
    check_type(args.type, pipe)
    return pipe


def model_type(transformer: torch.nn.Module) -> str:
    """The ``--type`` a model is: baseline-dit, fuse-dit, or fuse-dit-clip (a FuseDiT taking pooled text)."""
    from fusedit.models import is_fuse_dit, takes_pooled_text

    if not is_fuse_dit(transformer):
        return "baseline-dit"
    return "fuse-dit-clip" if takes_pooled_text(transformer) else "fuse-dit"


def check_type(expected: str, pipe) -> None:
    """``--type`` must name the family the checkpoint holds (the reference loaded whatever it was told)."""
    held = model_type(pipe.transformer)
    if held != expected:
        raise SamplingError(f"--type {expected}, but the checkpoint holds a {held} model; pass --type {held}")
    if held == "fuse-dit-clip" and pipe.clip.embed_dim != pipe.transformer.config.text_modulation_embeds_dim:
        raise SamplingError(
            f"--clip-l: its pooled embeddings have width {pipe.clip.embed_dim}, the model takes "
            f"{pipe.transformer.config.text_modulation_embeds_dim} (text_modulation_embeds_dim)"
        )


def check_resolution(pipe, resolution: int) -> None:
    """Latents must tile into whole patches; say so instead of failing inside the DiT."""
    multiple = pipe.codec.spatial_factor * int(pipe.transformer.config.patch_size)
    if resolution < multiple or resolution % multiple:
        raise SamplingError(f"--resolution {resolution} must be a positive multiple of {multiple} (VAE factor x patch)")


def generate(pipe, chunk: list[PromptItem], args: argparse.Namespace, per_prompt: int, resolution: int) -> torch.Tensor:
    """Images of a chunk of prompts, seeded by their global indices; (n_prompts, per_prompt, H, W, 3) uint8."""
    autocast = torch.bfloat16 if pipe.device.type == "cuda" else None
    images = pipe(
        [item.text for item in chunk],
        height=resolution,
        width=resolution,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        num_images_per_prompt=per_prompt,
        prompt_indices=[item.index for item in chunk],
        batch_size=args.batch_size,
        autocast_dtype=autocast,
    )
    return to_uint8(images).reshape(len(chunk), per_prompt, *images.shape[-2:], 3)


def unfinished_share(state, layout: Layout, items: list[PromptItem]) -> tuple[list[PromptItem], list[PromptItem]]:
    """(all unfinished prompts, this rank's contiguous slice of them).

    Every rank lists the unfinished prompts before any rank writes (barrier), so all ranks split
    the same list; the split is over positions in it, and items keep their global indices.
    """
    todo = [item for item in items if not layout.done(item)]
    state.wait_for_everyone()
    with state.split_between_processes(list(range(len(todo)))) as positions:
        return todo, [todo[p] for p in positions]


def run(bench: Benchmark, args: argparse.Namespace) -> dict[str, Any]:
    """Sample this process's share of the unfinished prompts; returns a summary (same on all ranks)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    # Without cpu=True accelerate ignores torchrun's environment on a machine without CUDA and every
    # process would sample everything; with it the processes form a gloo group.
    state = PartialState(cpu=not torch.cuda.is_available())
    run_dir = Path(args.checkpoint)
    step = resolve_step(run_dir, args.tag)
    resolution = args.resolution or default_resolution(run_dir)
    items = bench.load(args.prompts)[: args.max_prompts]
    if not items:
        raise PromptFileError(f"{args.prompts}: no prompts")
    current = settings(args, bench, run_dir, step, resolution)
    save_dir = Path(args.save_dir) if args.save_dir else default_save_dir(run_dir, bench, current)
    per_prompt = images_per_prompt(bench, args)
    layout = bench.layout(save_dir, per_prompt)
    pipe = load_pipeline(args, run_dir, step, state.device)
    check_resolution(pipe, resolution)
    check_settings(save_dir, current)
    layout.check(items)
    if state.is_main_process:
        save_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(save_dir / SETTINGS_NAME, json.dumps(current, indent=2) + "\n")
        layout.prepare(items)
    state.wait_for_everyone()
    todo, mine = unfinished_share(state, layout, items)
    desc = f"{bench.title} (rank 0 of {state.num_processes})"
    with tqdm(total=len(mine), desc=desc, unit="prompt", disable=not state.is_main_process) as bar:
        for chunk in chunks(mine, max(1, args.batch_size // per_prompt)):
            pixels = generate(pipe, chunk, args, per_prompt, resolution)
            for item, images in zip(chunk, pixels):
                layout.write(item, images)
            bar.update(len(chunk))
    state.wait_for_everyone()
    summary = {
        "save_dir": str(save_dir),
        "prompts": len(items),
        "generated": len(todo),
        "skipped": len(items) - len(todo),
    }
    if state.is_main_process:
        print(json.dumps(summary), flush=True)
    return summary


def main(benchmark: str, argv: list[str] | None = None) -> int:
    """Entry point of ``evaluation/sample_<benchmark>_ckpt.py``."""
    bench = BENCHMARKS[benchmark]
    parser = build_parser(bench)
    args = parser.parse_args(argv)
    validate_args(parser, args)
    from common.lifecycle import user_errors

    try:
        run(bench, args)
    except (SamplingError, *user_errors()) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return 0
