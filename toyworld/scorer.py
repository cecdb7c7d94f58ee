"""Attribute classifier for toy-world images: the toy stand-in for GenEval-style evaluation.

A generated image for "a red circle in the top left corner on a black background" is scored by
predicting each attribute independently and comparing with the prompt's attributes. The network
is trained during the world build, for a fixed number of steps, on augmented images (blur, noise,
colour jitter, small shifts, and round trips through the toy VAE with perturbed latents) because
DiT samples are blurrier and noisier than the clean JPEGs; otherwise a correct-but-soft sample
would be mis-scored.

Stored as ``model.safetensors`` + ``config.json`` (no pickle), loaded with
``ToyScorer.from_pretrained(dir)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.files import write_json_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REPORT_NAME = "report.json"


class ToyScorer(nn.Module):
    """Small CNN with one classification head per attribute.

    The position head reads a flattened 4x4 grid of features (it needs to know *where*); the
    other heads read globally pooled features, so recognising a shape or colour does not have to
    be relearned for every location, which is what lets a held-out (colour, shape, position)
    combination be recognised from its parts.
    """

    spatial_heads = ("position",)

    def __init__(self, attributes: dict[str, Sequence[str]], resolution: int = 32, width: int = 32, hidden: int = 128):
        super().__init__()
        self.config = {
            "model_type": "toy_scorer",
            "attributes": {k: list(v) for k, v in attributes.items()},
            "resolution": resolution,
            "width": width,
            "hidden": hidden,
        }
        w = width
        self.trunk = nn.Sequential(
            _conv(3, w, stride=1),
            _conv(w, 2 * w, stride=2),
            _conv(2 * w, 2 * w, stride=1),
            _conv(2 * w, 2 * w, stride=2),
        )
        self.grid = nn.AdaptiveAvgPool2d(4)
        self.heads = nn.ModuleDict(
            {k: _mlp(2 * w * (16 if k in self.spatial_heads else 2), hidden, len(v)) for k, v in attributes.items()}
        )

    @property
    def attributes(self) -> dict[str, list[str]]:
        return self.config["attributes"]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images in [-1, 1], resized to the training resolution."""
        size = self.config["resolution"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        h = self.trunk(images)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        grid = self.grid(h).flatten(1)
        return {k: head(grid if k in self.spatial_heads else pooled) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted class index per attribute, ``{attr: LongTensor (B,)}``."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        logits = self(images.to(device=device, dtype=torch.float32).clamp(-1, 1))
        self.train(was_training)
        return {k: v.argmax(-1).cpu() for k, v in logits.items()}

    def decode(self, predictions: dict[str, torch.Tensor]) -> list[dict[str, str]]:
        """Turn ``predict``'s indices into attribute names, one dict per image."""
        n = len(next(iter(predictions.values())))
        return [{k: self.attributes[k][int(v[i])] for k, v in predictions.items()} for i in range(n)]

    def labels(self, attributes: Sequence[dict[str, Any]], name: str) -> torch.Tensor:
        """Class indices of one attribute; values may be names or indices."""
        vocab = self.attributes[name]
        return torch.tensor([vocab.index(a[name]) if isinstance(a[name], str) else int(a[name]) for a in attributes])

    def correct(self, images: torch.Tensor, attributes: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Per-image right/wrong (BoolTensor (N,)) of every attribute present in every dict.

        ``"joint"`` is true where every scored attribute is right. Only attributes present in all
        dicts are scored (a prompt may not name a background).
        """
        if len(images) != len(attributes):
            raise ValueError(f"{len(images)} images but {len(attributes)} attribute dicts")
        names = [k for k in self.attributes if all(k in a for a in attributes)]
        predictions = self.predict(images)
        result = {k: predictions[k] == self.labels(attributes, k) for k in names}
        if names:
            result["joint"] = torch.stack([result[k] for k in names]).all(0)
        return result

    def score(self, images: torch.Tensor, attributes: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Per-attribute accuracy against the intended attributes, with chance levels.

        ``joint_accuracy`` counts images with every scored attribute right, the strict,
        GenEval-like number.
        """
        correct = self.correct(images, attributes)
        joint = correct.pop("joint", None)
        return {
            "n": len(attributes),
            "accuracy": {k: c.float().mean().item() for k, c in correct.items()},
            "chance": {k: 1.0 / len(self.attributes[k]) for k in correct},
            "joint_accuracy": joint.float().mean().item() if joint is not None else float("nan"),
            "joint_chance": math.prod(1.0 / len(self.attributes[k]) for k in correct),
        }

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME))
        write_json_atomic(out / CONFIG_NAME, self.config, sort_keys=False)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> ToyScorer:
        from safetensors.torch import load_file

        path = Path(directory)
        config = json.loads((path / CONFIG_NAME).read_text())
        model = cls(config["attributes"], config["resolution"], config["width"], config["hidden"])
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return model.to(device).eval()


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.SiLU(), nn.Linear(hidden, cout))


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: identical behaviour in train and eval even after a
    # few-second quick build, where running statistics would not have settled.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


# --------------------------------------------------------------------------------------------
# Augmentations that mimic generated images
# --------------------------------------------------------------------------------------------
def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` px, replicating the border (plain backgrounds)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def random_blur(x: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur with a different sigma per image (grouped convolution)."""
    b, c, h, w = x.shape
    sigma = _uniform(b, 0.2, max_sigma, generator).repeat_interleave(c)
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    flat = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def random_color(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small per-channel gain, brightness and contrast changes (generated colours drift)."""
    b = x.shape[0]
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.2
    offset = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.16
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.3
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast + mean + (x * (gain - 1)) + offset


def augment(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Apply each augmentation to a random subset of the batch."""

    def pick() -> torch.Tensor:
        return (torch.rand(x.shape[0], generator=generator) < p)[:, None, None, None]

    x = torch.where(pick(), random_shift(x, 2, generator), x)
    x = torch.where(pick(), random_blur(x, 1.2, generator), x)
    x = torch.where(pick(), random_color(x, generator), x)
    noise = torch.randn(x.shape, generator=generator) * _uniform(x.shape[0], 0.0, 0.1, generator)[:, None, None, None]
    x = torch.where(pick(), x + noise, x)
    return x.clamp(-1, 1)


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor, generator: torch.Generator, batch_size: int = 256) -> torch.Tensor:
    """Encode/decode through the VAE with latent noise of random strength (per image).

    Latents produced by an imperfect DiT are off-manifold; perturbing the normalised latents by
    up to 0.3 std produces the smudged shapes and colour bleeding such samples show.
    """
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor or 1.0
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        z = (vae.encode(x).latent_dist.sample(generator) - shift) * scale
        z = z + torch.randn(z.shape, generator=generator) * _uniform(len(z), 0.0, 0.3, generator)[:, None, None, None]
        out.append(vae.decode(z / scale + shift).sample.clamp(-1, 1))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Training (called by toyworld.world.build_toy_world)
# --------------------------------------------------------------------------------------------
def _targets(model: ToyScorer, attributes: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: model.labels(attributes, k) for k in model.attributes}


def _evaluate(model: ToyScorer, images: torch.Tensor, attributes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    result = model.score(images, attributes)
    result["accuracy"] = {k: round(v, 4) for k, v in result["accuracy"].items()}
    result["joint_accuracy"] = round(result["joint_accuracy"], 4)
    return result


def train_scorer(
    out_dir: str | Path,
    train_images: torch.Tensor,
    train_attributes: Sequence[dict[str, str]],
    val_images: torch.Tensor,
    val_attributes: Sequence[dict[str, str]],
    *,
    vae=None,
    resolution: int = 32,
    steps: int = 600,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    progress: bool = True,
) -> dict[str, Any]:
    """Train for a fixed number of ``steps`` on uint8 images, save to ``out_dir``, return the report.

    The report's ``heldout_clean`` accuracy is measured on the validation images, whose
    (colour, shape, position) triples never occur in training, so it also checks that the heads
    recognise attributes independently of each other; ``heldout_vae`` is the same on their VAE
    round trips (what the demo's scores are read through).
    """
    from toyworld.training import train_fixed_steps
    from toyworld.world import ATTRIBUTES

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ToyScorer(ATTRIBUTES, resolution)
    clean = train_images.float() / 127.5 - 1
    targets = _targets(model, train_attributes)
    pool, pool_targets = clean, targets
    if vae is not None:
        rows = torch.randperm(len(clean), generator=generator)[:2048]
        pool = torch.cat([clean, vae_round_trip(vae, clean[rows], generator)])
        pool_targets = {k: torch.cat([v, v[rows]]) for k, v in targets.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    def loss_at(step: int) -> torch.Tensor:
        rows = torch.randint(len(pool), (batch_size,), generator=generator)
        logits = model(augment(pool[rows], generator))
        return sum(F.cross_entropy(logits[k], pool_targets[k][rows], label_smoothing=0.05) for k in logits)

    model.train()
    train_fixed_steps(optimizer, loss_at, steps=steps, lr=lr, desc="toy scorer", progress=progress, warmup=10)
    model.eval()
    val = val_images.float() / 127.5 - 1
    report: dict[str, Any] = {"steps": steps, "batch_size": batch_size}
    report["heldout_clean"] = _evaluate(model, val, val_attributes)
    if vae is not None:
        with torch.no_grad():
            recon = vae.decode(vae.encode(val).latent_dist.mode()).sample.clamp(-1, 1)
        report["heldout_vae"] = _evaluate(model, recon, val_attributes)
    model.save_pretrained(out_dir)
    write_json_atomic(Path(out_dir) / REPORT_NAME, report, sort_keys=False)
    return report
