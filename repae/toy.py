"""The toy world as a class-conditional dataset with its own REPA alignment target.

REPA-E is class-conditional and aligns SiT tokens with a pretrained vision encoder's patch
tokens. Neither exists offline for the toy world (:mod:`toyworld.world`: 32 px images of one
coloured shape), so this module provides both:

* class labels from the attributes in each sample's ``json`` member: a *rule* such as
  ``"color+shape"`` names the attributes, and the label is their mixed-radix index (24 classes);
* a small semantic encoder: a timm ViT (4x4 patches -> 8x8 = 64 tokens) trained for a fixed
  number of seeded steps to classify all four attributes from its pooled patch tokens. Its tokens therefore
  carry colour / shape / position / background information, which is what alignment needs: a
  random network would give targets without semantics, and the test of REPA's effect would be
  void. It is saved as a ``local:`` encoder (:mod:`repae.encoders`), so training code loads it
  exactly like DINOv2.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common import numerics
from common.files import write_json_atomic
from toyworld.labels import toy_label
from toyworld.world import ATTRIBUTES as TOY_ATTRIBUTES

ENCODER_DIR = ("repae", "encoder")
HEADS_NAME = "heads.safetensors"
REPORT_NAME = "report.json"
# [-1, 1] inputs: the toy images have saturated colours on neutral backgrounds, nothing like
# ImageNet statistics.
TOY_MEAN = (0.5, 0.5, 0.5)
TOY_STD = (0.5, 0.5, 0.5)
# Sizes were chosen by measurement on one CPU thread, judged by held-out shape accuracy (the
# slowest attribute to learn): embed 64 / depth 2 reaches 0.99 in 1200 steps of batch 64 (~50 s),
# while embed 96 / depth 4 at batch 128 costs 6x more per step and embed 96 / depth 3 was still at
# chance after 600 steps. Quick builds (tests, ~10 s) use one block: 0.72-0.78 after 300-400
# steps against 0.44-0.52 for two blocks after the 200 steps that fit in the same time.
TOY_VIT = {
    "patch_size": 4,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "class_token": False,
    "global_pool": "avg",
    "fc_norm": False,
}
QUICK_VIT = {**TOY_VIT, "depth": 1}
HEAD_HIDDEN = 128
BATCH_SIZE = 64
LEARNING_RATE = 3e-3  # 5e-3 was measured to stall shape learning
# Fixed training lengths (never a time budget: a slow machine must get the same encoder) and the
# quality gate on held-out accuracy, every attribute. Quick builds (tests) use the one-block ViT.
STEPS = {"full": 1200, "quick": 300}
ACCURACY_GATE = {"full": 0.95, "quick": 0.4}  # chance is at most 1/3 (background)


# --------------------------------------------------------------------------------------------
# The semantic encoder
# --------------------------------------------------------------------------------------------
def toy_encoder_config(resolution: int, vit: Mapping[str, Any] = TOY_VIT) -> dict[str, Any]:
    """The ``encoder.json`` of the toy encoder (see :func:`repae.encoders.load_encoder`, ``local:``)."""
    return {
        "format": "repae-local-encoder",
        "timm_kwargs": dict(vit),
        "trained_resolution": resolution,
        "mean": list(TOY_MEAN),
        "std": list(TOY_STD),
        "resize": None,
        "resize_first": False,
        "final_norm": True,
        "num_prefix_tokens": 0,
        "embed_dim": vit["embed_dim"],
        "heads": {"file": HEADS_NAME, "attributes": {k: list(v) for k, v in TOY_ATTRIBUTES.items()}},
    }


def make_heads(embed_dim: int) -> nn.ModuleDict:
    """One small MLP classifier per attribute, reading mean- and max-pooled patch tokens.

    Max pooling matters: shape evidence (corners, slanted edges) sits in the few tokens on the
    shape's outline and is diluted by the background in a mean; with mean pooling and linear heads
    held-out shape accuracy stayed at chance after 300 steps, with both it is ~0.5.
    """
    return nn.ModuleDict(
        {
            name: nn.Sequential(nn.Linear(2 * embed_dim, HEAD_HIDDEN), nn.GELU(), nn.Linear(HEAD_HIDDEN, len(vocab)))
            for name, vocab in TOY_ATTRIBUTES.items()
        }
    )


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, 2D): concatenated mean and max over tokens, what the heads read."""
    return torch.cat([tokens.mean(dim=1), tokens.amax(dim=1)], dim=1)


def load_toy_heads(folder: str | Path) -> nn.ModuleDict:
    """The attribute heads saved next to a toy encoder (for evaluation; training never needs them)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "encoder.json").read_text())
    heads = make_heads(int(config["embed_dim"]))
    heads.load_state_dict(load_file(str(folder / config["heads"]["file"])))
    return heads.eval()


def attribute_targets(attributes: Sequence[Mapping[str, str]]) -> dict[str, torch.Tensor]:
    """Class index of every attribute, ``{name: LongTensor (N,)}``."""
    return {name: torch.tensor([toy_label(a, name) for a in attributes]) for name in TOY_ATTRIBUTES}


@torch.no_grad()
def evaluate_toy_encoder(encoder: nn.Module, heads: nn.ModuleDict, images: torch.Tensor, attributes) -> dict:
    """Per-attribute accuracy (with chance levels) of the heads on pooled encoder tokens.

    ``encoder`` maps uint8 images to tokens (B, N, D): a loaded :class:`repae.encoders.VisionEncoder`,
    so the numbers describe exactly what training will align to.
    """
    targets = attribute_targets(attributes)
    correct: dict[str, list[torch.Tensor]] = {name: [] for name in TOY_ATTRIBUTES}
    for start in range(0, len(images), 256):
        pooled = pool_tokens(encoder(images[start : start + 256]))
        for name, head in heads.items():
            prediction = head(pooled).argmax(-1).cpu()
            correct[name].append(prediction == targets[name][start : start + 256])
    return {
        "n": len(images),
        "accuracy": {k: round(torch.cat(v).float().mean().item(), 4) for k, v in correct.items()},
        "chance": {k: round(1.0 / len(v), 4) for k, v in TOY_ATTRIBUTES.items()},
    }


def _unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> the normalised input the saved encoder's preprocessing produces (TOY_MEAN / TOY_STD)."""
    mean = torch.tensor(TOY_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(TOY_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled final-norm patch tokens: the same tokens the loaded encoder returns."""
    tokens = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)[-1]
    return pool_tokens(tokens)


# Horizontal flips keep every shape (all four are left-right symmetric) and mirror the position.
_MIRRORED_POSITION = torch.tensor(
    [
        TOY_ATTRIBUTES["position"].index(p.replace("left", "@").replace("right", "left").replace("@", "right"))
        for p in TOY_ATTRIBUTES["position"]
    ]
)


def augment_batch(
    images: torch.Tensor, targets: dict[str, torch.Tensor], generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Label-aware augmentation that breaks the shortcuts of a small world.

    Held-out validation triples never occur in training, so a network that guesses the shape from
    (colour, position) scores *below* chance there. Two cheap transforms decorrelate them: a random
    RGB channel permutation on half the batch (colour no longer predicts shape; the colour label
    is then unknown, so the returned mask drops those rows from the colour loss; backgrounds are
    neutral and keep their label) and a horizontal flip on half (position label mirrored). Measured
    at 300 steps: held-out shape accuracy 0.48 without, 0.65-0.72 with (3 seeds).
    """
    b = len(images)
    permute = torch.rand(b, generator=generator) < 0.5
    order = torch.stack([torch.randperm(3, generator=generator) for _ in range(b)])
    order[~permute] = torch.arange(3)
    images = torch.gather(images, 1, order[:, :, None, None].expand_as(images))
    flip = torch.rand(b, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    targets = dict(targets)
    targets["position"] = torch.where(flip, _MIRRORED_POSITION[targets["position"]], targets["position"])
    return images, targets, ~permute


def train_toy_encoder(
    images: torch.Tensor,
    attributes: Sequence[Mapping[str, str]],
    *,
    steps: int,
    seed: int = 0,
    vit: Mapping[str, Any] = TOY_VIT,
    batch_size: int = BATCH_SIZE,
    lr: float = LEARNING_RATE,
    progress: bool = True,
) -> tuple[nn.Module, nn.ModuleDict, dict[str, Any]]:
    """Train the ViT and its heads on uint8 images for a fixed number of ``steps``.

    Batches go through :func:`augment_batch`; batches, augmentations and the learning-rate
    schedule depend only on ``seed`` and the step index. Returns (vit, heads, stats).
    """
    from timm.models.vision_transformer import VisionTransformer

    from toyworld.training import train_fixed_steps

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = VisionTransformer(img_size=images.shape[-1], num_classes=0, **vit)
    heads = make_heads(model.embed_dim)
    targets = attribute_targets(attributes)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)

    def loss_at(step: int) -> torch.Tensor:
        rows = torch.randint(len(images), (batch_size,), generator=generator)
        batch = {name: labels[rows] for name, labels in targets.items()}
        x, batch, colour_known = augment_batch(images[rows], batch, generator)
        return _loss(heads, _pooled(model, _unit(x)), batch, colour_known)

    model.train()
    loss = train_fixed_steps(
        optimizer, loss_at, steps=steps, lr=lr, desc="toy REPA encoder", progress=progress, warmup=10
    )
    return model.eval(), heads.eval(), {"steps": steps, "batch_size": batch_size, "final_loss": round(loss, 4)}


def _loss(heads: nn.ModuleDict, pooled: torch.Tensor, targets: dict, colour_known: torch.Tensor) -> torch.Tensor:
    """Sum of per-attribute cross-entropies; colour only over rows whose colours were not permuted."""
    total = pooled.new_zeros(())
    for name, head in heads.items():
        losses = F.cross_entropy(head(pooled), targets[name], reduction="none")
        if name == "color":
            losses = losses[colour_known]
        total = total + (losses.mean() if len(losses) else losses.sum())
    return total


def _shards(world: Path, split: str) -> list[Path]:
    shards = sorted((world / "shards").glob(f"{split}-*.tar"))
    if not shards:
        raise FileNotFoundError(
            f"no {split} shards in {world}/shards: build the world first (dataset_download.py --toy)"
        )
    return shards


def build_toy_encoder(
    world: str | Path,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    quick: bool = False,
) -> Path:
    """Train the toy world's semantic encoder and save it to ``<world>/repae/encoder``; returns that folder.

    The folder holds ``encoder.json`` + ``model.safetensors`` (load with
    ``load_encoder("local:<folder>", resolution=32)`` -> (B, 64, D) tokens), the attribute heads
    and ``report.json``, whose held-out accuracy is measured through the *saved* encoder on the
    val shards (held-out colour/shape/position combinations). Training is ``STEPS`` steps unless
    given; ``quick`` trains the one-block ``QUICK_VIT`` for fewer steps (tests). The held-out
    accuracy of every attribute must clear ``ACCURACY_GATE``: the gate values go to ``report.json``
    and to ``world.json`` (``repae_encoder``), and a miss raises ``QualityGateError`` naming it.
    """
    from safetensors.torch import save_file

    from repae.encoders import load_encoder
    from toyworld.training import Gate, check_gates, evaluate_gates
    from toyworld.world import load_images

    world = Path(world)
    out = world.joinpath(*ENCODER_DIR)
    kind = "quick" if quick else "full"
    steps = STEPS[kind] if steps is None else steps
    vit = QUICK_VIT if quick else TOY_VIT
    start = time.perf_counter()
    train_images, train_attributes = load_images(_shards(world, "train"))
    val_images, val_attributes = load_images(_shards(world, "val"))
    train_images, val_images = torch.from_numpy(train_images), torch.from_numpy(val_images)
    resolution = int(train_images.shape[-1])
    _say(progress, f"training the REPA encoder for {steps} steps on {len(train_images)} images")
    with numerics.pinned_threads():
        model, heads, stats = train_toy_encoder(
            train_images, train_attributes, steps=steps, seed=seed, vit=vit, progress=progress
        )
        path = numerics.numeric_path()
    out.mkdir(parents=True, exist_ok=True)
    save_file(_cpu_state(model), str(out / "model.safetensors"))
    save_file(_cpu_state(heads), str(out / HEADS_NAME))
    write_json_atomic(out / "encoder.json", toy_encoder_config(resolution, vit), sort_keys=False)
    encoder = load_encoder(f"local:{out}", resolution=resolution)
    report = {
        **stats,
        "seed": seed,
        "quick": quick,
        "resolution": resolution,
        "vit": dict(vit),
        "num_tokens": encoder.num_tokens,
        "embed_dim": encoder.embed_dim,
        "val": evaluate_toy_encoder(encoder, heads, val_images, val_attributes),
        "build_seconds": round(time.perf_counter() - start, 2),
        "numerics": path,
    }
    gates = [Gate("repae_encoder", f"val.accuracy.{name}", ACCURACY_GATE[kind]) for name in TOY_ATTRIBUTES]
    report["gates"] = evaluate_gates(gates, report)
    write_json_atomic(out / REPORT_NAME, report, sort_keys=False)
    _record_in_world(world, report)
    _say(progress, f"REPA encoder: {steps} steps, held-out accuracy {report['val']['accuracy']}")
    check_gates(report["gates"], str(world))
    return out


def _record_in_world(world: Path, report: dict[str, Any]) -> None:
    """Add the encoder's steps and gate values to ``world.json`` (rewritten atomically)."""
    path = world / "world.json"
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    record["repae_encoder"] = {
        k: report[k] for k in ("steps", "batch_size", "seed", "quick", "val", "gates", "numerics")
    }
    write_json_atomic(path, record, sort_keys=False)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[toy] {message}", flush=True)
