"""Scoring one checkpoint of a toy study run: per-prompt right/wrong cubes and a toy Fréchet distance.

A study compares arms by what their checkpoints generate, so every checkpoint of every run is
scored with *the same* prompts, sampling seeds and guidance:

* text-to-image (``kind="t2i"``): every held-out (colour, shape, position) triple on every
  background is one *prompt unit*; each unit is rendered in every caption template x
  ``samples`` sampling seeds. The toy scorer reads the attributes back, giving a 0/1 matrix
  (units, templates x samples) per attribute — what :mod:`evaluation.paired_stats` bootstraps.
* class-conditional SiT (``kind="ldm"``, :mod:`repae.train_ldm`): every class (colour x shape) is
  one unit, rendered ``samples`` times.

The toy Fréchet distance mirrors FID: the Gaussian Fréchet distance between the scorer's pooled
trunk features (128 numbers per image, the features its attribute heads read) of the generated
images and of real toy images the DiT never trained on (the held-out validation shard) — or, for
class-conditional generation, which covers the training classes, of the first training shard.
Image k of prompt i gets noise seeded by (seed, i, k) (t2i) or by (seed, image index) (ldm) in
every arm, so paired comparisons share their noise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLING_SEED = 0  # reported images; guidance selection uses another
SELECTION_SEED = 1000
FD_REFERENCE_IMAGES = 1024


# --------------------------------------------------------------------------------------------
# Prompt units
# --------------------------------------------------------------------------------------------
def heldout_units(toy: Path) -> list[dict[str, str]]:
    """Every held-out triple on every background, once (heldout.json lists each in two wordings)."""
    prompts = json.loads((toy / "prompts" / "heldout.json").read_text())
    keys = ("color", "shape", "position", "background")
    seen: dict[tuple[str, ...], dict[str, str]] = {}
    for p in prompts:
        seen.setdefault(tuple(p[k] for k in keys), {k: p[k] for k in keys})
    return list(seen.values())


def class_units(rule: str = "color+shape") -> list[dict[str, Any]]:
    """One unit per class of a toy label rule, in label order, with its attributes."""
    import itertools

    from toyworld.labels import parse_rule, toy_label
    from toyworld.world import ATTRIBUTES

    names = parse_rule(rule)
    units = []
    for values in itertools.product(*(ATTRIBUTES[n] for n in names)):
        attrs = dict(zip(names, values))
        units.append({**attrs, "label": toy_label(attrs, rule)})
    return sorted(units, key=lambda u: u["label"])


def template_prompts(units: Sequence[dict[str, str]], templates: int) -> list[dict[str, str]]:
    """Unit-major prompt list: unit 0 in templates 0..T-1, unit 1, ..."""
    from toyworld.world import caption

    return [{"prompt": caption(u, t), **u} for u in units for t in range(templates)]


# --------------------------------------------------------------------------------------------
# Scoring helpers
# --------------------------------------------------------------------------------------------
def scorer_features(scorer, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Pooled trunk features (mean and max over space) of images in [-1, 1], float64 (N, D)."""
    size = scorer.config["resolution"]
    out = []
    scorer.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].float().clamp(-1, 1)
            if x.shape[-2:] != (size, size):
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            h = scorer.trunk(x)
            out.append(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1).double().numpy())
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the formula FID uses)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as clean-fid does
        eps = 1e-6 * np.eye(len(cov_a))
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def reference_features(toy: Path, scorer, split: str) -> np.ndarray:
    """Scorer features of real toy images, cached next to the world (they never change)."""
    from common.files import write_with
    from toyworld.world import load_images

    cache = toy / "study" / f"fd_reference_{split}.npy"
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    pattern = "val-*.tar" if split == "val" else "train-000000.tar"
    images, _ = load_images(sorted((toy / "shards").glob(pattern)))
    x = torch.from_numpy(images[:FD_REFERENCE_IMAGES]).float() / 127.5 - 1.0  # (N, 3, H, W) uint8
    features = scorer_features(scorer, x)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_with(cache, lambda tmp: np.save(tmp, features, allow_pickle=False), suffix=".npy")
    return features


def correct_cube(scorer, images: torch.Tensor, units: Sequence[dict], per_unit: int) -> dict[str, list]:
    """{attribute | "joint": (units, per_unit) 0/1 nested lists} for unit-major images in [-1, 1]."""
    attributes = [u for u in units for _ in range(per_unit)]
    correct = scorer.correct(images, attributes)
    return {k: v.numpy().astype(np.int8).reshape(len(units), per_unit).tolist() for k, v in correct.items()}


# --------------------------------------------------------------------------------------------
# The two kinds of checkpoint
# --------------------------------------------------------------------------------------------
def t2i_images(run: Path, step: int, prompts: list[dict], scale: float, seed: int, samples: int) -> torch.Tensor:
    """EMA DiT of ``<run>/<step>``: prompt-major images in [-1, 1]."""
    from fusedit.config import load_config
    from fusedit.pipeline import DiTPipeline
    from fusedit.tools.demo import sample

    cfg = load_config(run / "config.yaml")
    pipe = DiTPipeline.from_checkpoint(run, step, use_ema=True)
    images = sample(pipe, cfg, prompts, scale, seed, samples)
    return images * 2.0 - 1.0


def ldm_images(run: Path, step: int, units: list[dict], scale: float, seed: int, samples: int) -> torch.Tensor:
    """EMA SiT of a ``repae.train_ldm`` checkpoint: class-major images in [-1, 1] (ODE, 25 steps)."""
    from repae.checkpoint import load_sampling_bundle
    from repae.generate import generate_images, make_velocity

    bundle = load_sampling_bundle(run, step, use_ema=True)
    labels = torch.tensor([u["label"] for u in units for _ in range(samples)])
    kwargs = {"mode": "ode", "num_steps": 25, "cfg_scale": scale}
    out = []
    with torch.inference_mode():
        for start in range(0, len(labels), 128):
            idx = range(start, min(start + 128, len(labels)))
            out.append(
                generate_images(bundle, idx, labels, kwargs, seed, make_velocity(bundle.sit), torch.device("cpu"))
            )
    pixels = torch.from_numpy(np.concatenate(out)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0


def validation_units(toy: Path) -> list[dict[str, str]]:
    """The guidance prompts' attributes (training triples): a set for choosing knobs, never reported."""
    prompts = json.loads((toy / "prompts" / "guidance.json").read_text())
    keys = ("color", "shape", "position", "background")
    return list({tuple(p[k] for k in keys): {k: p[k] for k in keys} for p in prompts}.values())


def score_checkpoint(
    toy: Path,
    kind: str,
    run: Path,
    step: int,
    *,
    scale: float,
    samples: int,
    seed: int = SAMPLING_SEED,
    prompt_set: str = "heldout",
) -> dict[str, Any]:
    """Right/wrong cubes, accuracies and the toy Fréchet distance of one checkpoint.

    ``prompt_set="validation"`` scores training triples (the guidance prompts) against real
    training images instead: what a sweep chooses a recipe on, so the reported held-out set stays
    untouched.
    """
    from toyworld.scorer import ToyScorer
    from toyworld.world import TEMPLATES

    scorer = ToyScorer.from_pretrained(toy / "scorer")
    if kind == "t2i":
        units = heldout_units(toy) if prompt_set == "heldout" else validation_units(toy)
        per_unit = len(TEMPLATES) * samples
        images = t2i_images(run, step, template_prompts(units, len(TEMPLATES)), scale, seed, samples)
        reference = reference_features(toy, scorer, "val" if prompt_set == "heldout" else "train")
    else:
        units = class_units()
        per_unit = samples
        images = ldm_images(run, step, units, scale, seed, samples)
        reference = reference_features(toy, scorer, "train")
    cubes = correct_cube(scorer, images, units, per_unit)
    return {
        "kind": kind,
        "step": step,
        "units": len(units),
        "per_unit": per_unit,
        "images": len(images),
        "guidance_scale": scale,
        "seed": seed,
        "accuracy": {k: float(np.mean(v)) for k, v in cubes.items()},
        "fd": frechet_distance(scorer_features(scorer, images), reference),
        "correct": cubes,
        "grid": images[:: max(1, per_unit)][:64],
    }


def selection_scores(toy: Path, kind: str, run: Path, step: int, scales: Sequence[float], samples: int) -> list[dict]:
    """Joint accuracy per guidance scale on the *validation* set (another prompt set or seed)."""
    from toyworld.scorer import ToyScorer

    scorer = ToyScorer.from_pretrained(toy / "scorer")
    rows = []
    for scale in scales:
        if kind == "t2i":
            units = json.loads((toy / "prompts" / "guidance.json").read_text())
            images = t2i_images(run, step, units, scale, SELECTION_SEED, samples)
        else:
            units = class_units()
            images = ldm_images(run, step, units, scale, SELECTION_SEED, samples)
        cubes = correct_cube(scorer, images, units, samples)
        rows.append({"scale": scale, **{k: float(np.mean(v)) for k, v in cubes.items()}})
    return rows
