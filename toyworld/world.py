"""The toy world: a procedurally drawn captioned-image dataset plus tiny stand-in models.

Tests and ``make demo`` must exercise the real training code without any model hub, so this
module builds, offline and from one seed, everything a real run downloads:

* webdataset shards of ``jpg`` / ``txt`` / ``short.txt`` / ``json`` samples (one filled shape on a
  plain background, captioned from templates), with ~10% of (colour, shape, position) triples held
  out of training so compositional generalisation can be measured;
* a word-level tokenizer with Gemma's special-token ids and a tiny Gemma text encoder, both saved
  so ``AutoTokenizer`` / ``AutoModel.from_pretrained(dir)`` load them like ``google/gemma-2b``;
* a tiny ``diffusers.AutoencoderKL`` trained for a fixed number of steps, carrying per-channel
  ``latents_mean`` / ``latents_std`` (what the trainers normalise with) and FLUX-style scalar
  ``shift_factor`` / ``scaling_factor`` in its config;
* an attribute classifier (:mod:`toyworld.scorer`) that scores generated images.

Data (shards, captions, prompts, manifest) is byte-identical for a given seed. Model weights train
for fixed, seeded step counts (:mod:`toyworld.training`), so they are bit-identical for a
given seed, library versions and thread count, however fast the machine; the build checks
quality gates (VAE PSNR, scorer accuracy on clean images and VAE round trips) before it writes
``world.json``.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from common.files import write_json_atomic
from common.shards import TAR_MTIME

# --------------------------------------------------------------------------------------------
# Vocabulary of the world. Colours are saturated and far apart in RGB so that a blurry sample
# from an undertrained model is still classifiable; backgrounds are neutral so they never
# collide with a shape colour.
# --------------------------------------------------------------------------------------------
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 10),
    "yellow": (245, 215, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "purple": (145, 45, 195),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
# Shape centre as a fraction of the side: quadrant centres sit a little inside 1/4 and 3/4 so
# the largest jittered shape never leaves the canvas.
POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
POSITION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
}
TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} {pos} on a {background} background",
    "a {background} background with a {color} {shape} {pos}",
    "a picture of a {color} {shape} {pos}, set against a {background} background",
    "on a plain {background} background, one {color} {shape} {pos}",
)
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>")  # Gemma ids 0, 1, 2, 3

# 2: text encoder left at its seeded init (LM training collapsed colour words)
# 3: fixed-step training with quality gates (no wall-clock budgets)
FORMAT_VERSION = 4  # 4: the toy VAE carries per-channel latents_mean/latents_std
SUPERSAMPLE = 4  # draw at 4x and box-downsample: cheap, exact antialiasing
JPEG_QUALITY = 95
HOLDOUT_FRACTION = 0.1

# Independent RNG streams: changing one count (e.g. num_train) must not change other outputs.
_STREAM_SPLIT, _STREAM_TRAIN, _STREAM_VAL, _STREAM_PROMPTS, _STREAM_GUIDANCE = range(5)

Triple = tuple[str, str, str]


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


# --------------------------------------------------------------------------------------------
# Drawing and captions
# --------------------------------------------------------------------------------------------
def _shape_polygons(shape: str, cx: float, cy: float, h: float) -> list[list[tuple[float, float]]]:
    """Polygons (in pixel coordinates) of one shape of half-extent ``h``.

    Sizes keep the four shapes' areas within a factor of two of each other (triangle 1.8 h^2,
    cross 2.4, square 2.9, circle 3.1), so the amount of colour alone is a weak cue.
    """
    if shape == "square":
        s = 0.85 * h
        return [[(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]]
    if shape == "triangle":
        return [[(cx, cy - h), (cx + h, cy + 0.8 * h), (cx - h, cy + 0.8 * h)]]
    if shape == "cross":
        t = 0.36 * h
        return [
            [(cx - h, cy - t), (cx + h, cy - t), (cx + h, cy + t), (cx - h, cy + t)],
            [(cx - t, cy - h), (cx + t, cy - h), (cx + t, cy + h), (cx - t, cy + h)],
        ]
    raise ValueError(f"unknown polygon shape {shape!r}")


def _jitter_color(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + noise, 0, 255))


def draw_image(attributes: dict[str, str], resolution: int, rng: np.random.Generator) -> Image.Image:
    """Render one RGB image: a jittered filled shape on a slightly noisy plain background.

    The jitter (size, +-1.5 px at 32 px, colour noise) keeps images distinct so the VAE and the
    DiT cannot just memorise a lookup table.
    """
    unit = resolution / 32.0
    background = _jitter_color(BACKGROUNDS[attributes["background"]], rng, 6)
    fill = _jitter_color(COLORS[attributes["color"]], rng, 12)
    half = float(rng.uniform(0.16, 0.19)) * resolution
    fx, fy = POSITION_CENTERS[attributes["position"]]
    dx, dy = rng.uniform(-1.5, 1.5, size=2) * unit
    k = SUPERSAMPLE
    cx, cy, h = (fx * resolution + dx) * k, (fy * resolution + dy) * k, half * k
    canvas = Image.new("RGB", (resolution * k, resolution * k), background)
    draw = ImageDraw.Draw(canvas)
    if attributes["shape"] == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        for polygon in _shape_polygons(attributes["shape"], cx, cy, h):
            draw.polygon(polygon, fill=fill)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def caption(attributes: dict[str, str], template: int = 0) -> str:
    """Detailed caption (the ``txt`` column) naming all four attributes."""
    return TEMPLATES[template % len(TEMPLATES)].format(
        color=attributes["color"],
        shape=attributes["shape"],
        pos=POSITION_PHRASES[attributes["position"]],
        background=attributes["background"],
    )


def short_caption(attributes: dict[str, str]) -> str:
    """Short "original" caption (the ``short.txt`` column), like alt-text: colour and shape only."""
    return f"{attributes['color']} {attributes['shape']}"


def all_captions() -> Iterator[str]:
    """Every caption the world can produce, in a fixed order (tokenizer corpus, LM training)."""
    for color in COLORS:
        for shape in SHAPES:
            for position in POSITIONS:
                for background in BACKGROUNDS:
                    attrs = {"color": color, "shape": shape, "position": position, "background": background}
                    yield short_caption(attrs)
                    for template in range(len(TEMPLATES)):
                        yield caption(attrs, template)


# --------------------------------------------------------------------------------------------
# Train / held-out split
# --------------------------------------------------------------------------------------------
def all_triples() -> list[Triple]:
    return [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


def split_triples(seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[list[Triple], list[Triple]]:
    """Choose held-out (colour, shape, position) triples, spread evenly over every attribute.

    A greedy pass over a seeded permutation caps how often each colour, shape and position is
    held out, so every value keeps most of its training combinations and the held-out set tests
    recombination rather than an unseen word.
    """
    triples = all_triples()
    count = max(1, round(fraction * len(triples)))
    caps = [math.ceil(count / len(values)) for values in (COLORS, SHAPES, POSITIONS)]
    used: list[dict[str, int]] = [{}, {}, {}]
    heldout: list[Triple] = []
    for index in _rng(seed, _STREAM_SPLIT).permutation(len(triples)):
        triple = triples[int(index)]
        if all(used[i].get(v, 0) < caps[i] for i, v in enumerate(triple)):
            heldout.append(triple)
            for i, v in enumerate(triple):
                used[i][v] = used[i].get(v, 0) + 1
        if len(heldout) == count:
            break
    heldout_set = set(heldout)
    train = [t for t in triples if t not in heldout_set]
    for i, values in enumerate((COLORS, SHAPES, POSITIONS)):
        assert {t[i] for t in train} == set(values), "every attribute value must stay in training"
    return train, sorted(heldout_set, key=triples.index)


def attributes_of(triple: Triple, background: str) -> dict[str, str]:
    return {"color": triple[0], "shape": triple[1], "position": triple[2], "background": background}


# --------------------------------------------------------------------------------------------
# Shards, manifest, prompts
# --------------------------------------------------------------------------------------------
@dataclass
class _Sample:
    key: str
    attributes: dict[str, str]
    jpg: bytes
    txt: str


def _make_samples(
    split: str, triples: list[Triple], count: int, resolution: int, rng: np.random.Generator
) -> Iterator[_Sample]:
    backgrounds = list(BACKGROUNDS)
    for index in range(count):
        triple = triples[int(rng.integers(len(triples)))]
        attrs = attributes_of(triple, backgrounds[int(rng.integers(len(backgrounds)))])
        template = int(rng.integers(len(TEMPLATES)))
        image = draw_image(attrs, resolution, rng)
        yield _Sample(f"{split}_{index:07d}", attrs, encode_jpeg(image), caption(attrs, template))


def _write_tar(path: Path, samples: list[_Sample]) -> None:
    """Write one shard with fixed metadata so identical content gives identical bytes.

    ``webdataset.TarWriter`` is used (not ``tarfile`` directly) so the member naming and grouping
    are exactly what webdataset readers expect.
    """
    import webdataset as wds

    with open(path, "wb") as stream:
        writer = wds.TarWriter(stream, mtime=TAR_MTIME, user="toy", group="toy", mode=0o444)
        for s in samples:
            writer.write(
                {
                    "__key__": s.key,
                    "jpg": s.jpg,
                    "txt": s.txt.encode(),
                    "short.txt": short_caption(s.attributes).encode(),
                    "json": json.dumps(s.attributes, sort_keys=True).encode(),
                }
            )
        writer.close()


def _write_split(
    out_dir: Path,
    split: str,
    samples: Iterator[_Sample],
    per_shard: int,
    manifest: list[dict[str, Any]],
    progress: Any,
) -> list[str]:
    names: list[str] = []
    buffer: list[_Sample] = []

    def flush() -> None:
        name = f"shards/{split}-{len(names):06d}.tar"
        _write_tar(out_dir / name, buffer)
        names.append(name)
        buffer.clear()

    for sample in samples:
        buffer.append(sample)
        manifest.append({"key": sample.key, "split": split, **sample.attributes})
        progress.update(1)
        if len(buffer) == per_shard:
            flush()
    if buffer:
        flush()
    return names


def _heldout_prompts(heldout: list[Triple]) -> list[dict[str, str]]:
    """Two differently worded prompts for every held-out triple on every background."""
    prompts = []
    n = len(TEMPLATES)
    for i, triple in enumerate(heldout):
        for j, background in enumerate(BACKGROUNDS):
            attrs = attributes_of(triple, background)
            for template in ((i + j) % n, (i + j + 2) % n):
                prompts.append({"prompt": caption(attrs, template), **attrs})
    return prompts


def _val_prompts(train: list[Triple], heldout: list[Triple], seed: int, count: int = 8) -> list[dict[str, Any]]:
    """A few prompts for training-time sample grids: half seen triples, half held-out ones."""
    rng = _rng(seed, _STREAM_PROMPTS)
    backgrounds = list(BACKGROUNDS)
    prompts = []
    for i in range(count):
        pool, is_heldout = (heldout, True) if i % 2 else (train, False)
        attrs = attributes_of(pool[int(rng.integers(len(pool)))], backgrounds[i % len(backgrounds)])
        prompts.append({"prompt": caption(attrs, i), **attrs, "heldout": is_heldout})
    return prompts


def _guidance_prompts(train: list[Triple], seed: int, count: int = 48) -> list[dict[str, str]]:
    """Prompts for choosing the demo's guidance scale: *training* triples only, distinct, seeded.

    The demo reports held-out triples; tuning a knob on them would make the report optimistic, so
    the scale is chosen here, on combinations the DiT has seen, in differently drawn wordings.
    """
    rng = _rng(seed, _STREAM_GUIDANCE)
    cells = [(t, b, k) for t in train for b in BACKGROUNDS for k in range(len(TEMPLATES))]
    chosen = rng.choice(len(cells), size=min(count, len(cells)), replace=False)
    prompts = []
    for index in sorted(int(i) for i in chosen):
        triple, background, template = cells[index]
        attrs = attributes_of(triple, background)
        prompts.append({"prompt": caption(attrs, template), **attrs})
    return prompts


def write_toy_data(
    out_dir: str | Path,
    *,
    seed: int = 0,
    resolution: int = 32,
    num_train: int = 8192,
    num_val: int = 1024,
    samples_per_shard: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the deterministic part of the world: shards, ``attributes.jsonl`` and prompts.

    Kept separate from model training so that determinism can be checked (and the data rebuilt)
    without paying for the VAE and scorer.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    train_triples, heldout_triples = split_triples(seed)
    manifest: list[dict[str, Any]] = []
    with tqdm(total=num_train + num_val, desc="toy shards", unit="img", disable=not progress) as bar:
        train_rng, val_rng = _rng(seed, _STREAM_TRAIN), _rng(seed, _STREAM_VAL)
        train_samples = _make_samples("train", train_triples, num_train, resolution, train_rng)
        val_samples = _make_samples("val", heldout_triples, num_val, resolution, val_rng)
        train_shards = _write_split(out, "train", train_samples, samples_per_shard, manifest, bar)
        val_shards = _write_split(out, "val", val_samples, max(num_val, 1), manifest, bar)
    with open(out / "attributes.jsonl", "w") as f:
        for row in manifest:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    heldout_prompts = _heldout_prompts(heldout_triples)
    write_json_atomic(out / "prompts" / "heldout.json", heldout_prompts, sort_keys=False)
    write_json_atomic(out / "prompts" / "val.json", _val_prompts(train_triples, heldout_triples, seed), sort_keys=False)
    write_json_atomic(out / "prompts" / "guidance.json", _guidance_prompts(train_triples, seed), sort_keys=False)
    return {
        "train_shards": train_shards,
        "val_shards": val_shards,
        "train_pattern": _brace_pattern("train", len(train_shards)),
        "val_pattern": _brace_pattern("val", len(val_shards)),
        "num_train": num_train,
        "num_val": num_val,
        "train_triples": [list(t) for t in train_triples],
        "heldout_triples": [list(t) for t in heldout_triples],
        "num_heldout_prompts": len(heldout_prompts),
    }


def _brace_pattern(split: str, count: int) -> str:
    if count == 1:
        return f"shards/{split}-000000.tar"
    return f"shards/{split}-{{000000..{count - 1:06d}}}.tar"


def read_shard_samples(paths: list[str | Path]) -> Iterator[dict[str, bytes]]:
    """Group the members of plain tar shards into samples (key -> {suffix: bytes}).

    Used by the builder and tests to read back what was written without a webdataset pipeline
    (no shuffling, no decoding, exact bytes).
    """
    for path in paths:
        current: dict[str, bytes] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if current and current["__key__"] != key.encode():
                    yield current
                    current = {}
                current["__key__"] = key.encode()
                current[suffix] = tar.extractfile(member).read()
        if current:
            yield current


def load_images(paths: list[str | Path]) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Decode every ``jpg`` of some shards into a uint8 (N, 3, H, W) array plus attributes."""
    images, attributes = [], []
    for sample in read_shard_samples(paths):
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            images.append(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
        attributes.append(json.loads(sample["json"]))
    return np.stack(images), attributes
