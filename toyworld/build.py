"""Build (or reuse) the whole toy world in one folder, checking its quality gates.

``build_toy_world`` writes the shards and prompts (:mod:`toyworld.world`), trains the text
encoder (:mod:`toyworld.text_encoder`), the VAE (:mod:`toyworld.vae`) and the attribute scorer
(:mod:`toyworld.scorer`) for fixed, seeded step counts, and records everything it did in
``world.json``. A folder built by the same request (seed, sizes, steps, format) is reused.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import numerics
from common.files import write_json_atomic
from common.vae_config import latent_channels, spatial_factor
from common.weights import safetensors_digest
from toyworld.text_encoder import build_tokenizer, train_text_encoder
from toyworld.training import Gate, check_gates, evaluate_gates, library_versions, torch_threads
from toyworld.vae import VAE_LR, calibrate_vae, train_vae, vae_psnr
from toyworld.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    FORMAT_VERSION,
    TEMPLATES,
    all_captions,
    attributes_of,
    caption,
    load_images,
    short_caption,
    write_toy_data,
)

# --------------------------------------------------------------------------------------------
# The whole build
# --------------------------------------------------------------------------------------------
# Everything a build writes; a rebuild clears it all, including what `python -m repae.demo` derived
# from the previous world's VAE (its alignment encoder and the exported E2E-VAE) and the demo's encoder caches.
_OWNED = (
    "world.json",
    "attributes.jsonl",
    "shards",
    "prompts",
    "text_encoder",
    "vae",
    "scorer",
    "repae",
    "e2e-vae",
    "flux2-vae",  # the toy tokenizers of the other families (toyworld.families, --families)
    "rae",
    "latents",  # the demo's caches of this world's encoders (fusedit.tools.demo)
    "text-features",
)


# The folders whose weights the build trains or initialises; world.json records a bit-exact digest of
# each (``weights_sha256``), the same on every machine on the pinned numeric path.
TRAINED_PARTS = ("text_encoder", "vae", "scorer")


QUICK = {"num_train": 512, "num_val": 96, "samples_per_shard": 128, "lm": 60}


# Fixed training lengths, (full build, quick build). Chosen by measurement so that the full build
# clears its quality gates with a margin (see docs/toy-world.md); quick builds are for tests.
STEPS = {"vae": (1500, 120), "scorer": (500, 120)}


SCORER_BATCH = (128, 64)


# VAE round trips only teach the scorer robustness if the VAE keeps the shape; a blurrier VAE
# (quick builds) would mostly teach it to guess.
MIN_PSNR_FOR_SCORER = 23.0


# Quality gates of a full build (DEVELOPERS' issue 10): a VAE that erases colour or shape, or a
# scorer that misreads its round trips, makes every demo score meaningless. Quick builds check
# looser gates that still catch a broken build.
VAE_PSNR_GATE = (26.0, 15.0)


SCORER_GATE = (0.97, 0.5)


def quality_gates(quick: bool) -> list[Gate]:
    """The gates a build of this kind must pass (recorded with their values in world.json)."""
    q = int(quick)
    gates = [Gate("vae", "psnr_db", VAE_PSNR_GATE[q])]
    readings = ("heldout_clean",) if quick else ("heldout_clean", "heldout_vae")
    gates += [Gate("scorer", f"{r}.accuracy.{a}", SCORER_GATE[q]) for r in readings for a in ATTRIBUTES]
    return gates


def build_request(
    seed: int, resolution: int, num_train: int, num_val: int, per_shard: int, steps: dict[str, int], quick: bool
) -> dict:
    """What a build was asked for; a world is reused only for an identical request.

    ``numerics`` says whether the build runs on the pinned numeric path (:mod:`common.numerics`):
    a world built with the machine's own kernels (``E2E_UNPINNED=1``, or a library call from an
    unpinned process) is never reused as the pinned one, nor the other way round. ``weights`` is
    added by :func:`build_toy_world`: ``shipped`` or ``trained`` (here).
    """
    return {
        "numerics": "pinned" if numerics.process_pinned() else "unpinned",
        "seed": seed,
        "resolution": resolution,
        "num_train": num_train,
        "num_val": num_val,
        "samples_per_shard": per_shard,
        "steps": dict(steps),
        "quick": quick,
    }


def existing_world(out: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    path = out / "world.json"
    if not path.exists():
        return None
    try:
        world = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = world.get("format_version") == FORMAT_VERSION and world.get("request") == request
    return world if same else None


def _clear(out: Path) -> None:
    """Remove only what a previous build wrote (world.json first: a half-deleted world is invalid)."""
    for name in _OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[toy] {message}", flush=True)


def build_toy_world(
    out_dir: str | Path,
    *,
    seed: int = 0,
    resolution: int = 32,
    num_train: int = 8192,
    num_val: int = 1024,
    samples_per_shard: int = 1024,
    vae_steps: int | None = None,
    scorer_steps: int | None = None,
    text_encoder_steps: int = 0,
    quick: bool = False,
    force: bool = False,
    progress: bool = True,
    use_shipped: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) the whole toy world in ``out_dir`` and return its summary (= world.json).

    The VAE and scorer of the default full world are shipped with the project
    (``toyworld/shipped``, built on the pinned path by :func:`ship_world`): a request that matches
    theirs copies them in and checks their digests instead of training them for ~4 minutes, as a
    real run downloads a released VAE. ``use_shipped=False`` (``--train-here``) trains them here.

    Every trained part trains for a fixed number of steps (``STEPS`` unless given), so the same
    request, library versions and thread count give bit-identical weights on any machine, however
    slow or busy. ``quick`` caps sizes and steps (a few hundred images, seconds of training) for
    the test suite. The build then checks its quality gates (:func:`quality_gates`) and raises
    :class:`~toyworld.training.QualityGateError` naming every gate it missed; the record
    goes to ``world.failed.json`` and no ``world.json`` is written. An existing world with the same
    request is reused unless ``force``; ``world.json`` is written last, so its presence means the
    build completed and passed.
    """
    q = int(quick)
    if quick:
        num_train = min(num_train, QUICK["num_train"])
        num_val = min(num_val, QUICK["num_val"])
        samples_per_shard = min(samples_per_shard, QUICK["samples_per_shard"])
        text_encoder_steps = min(text_encoder_steps, QUICK["lm"])
    steps = {
        "vae": STEPS["vae"][q] if vae_steps is None else vae_steps,
        "scorer": STEPS["scorer"][q] if scorer_steps is None else scorer_steps,
        "text_encoder": text_encoder_steps,
    }
    out = Path(out_dir)
    request = build_request(seed, resolution, num_train, num_val, samples_per_shard, steps, quick)
    shipped = shipped_for(request) if use_shipped else None
    request["weights"] = "trained" if shipped is None else "shipped"
    existing = None if force else existing_world(out, request)
    if existing is not None:
        _say(progress, f"reusing the toy world in {out} (same request; pass force/--force to rebuild)")
        return {**existing, "reused": True}
    if not force and (out / "world.json").exists():
        _say(progress, f"{out}/world.json was built with other settings: rebuilding")
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    _say(progress, f"building the toy world in {out} (seed {seed}, {resolution}px, quick={quick}, steps {steps})")
    clock = _Laps()
    with _hf_progress_bars(progress), numerics.pinned_threads():
        _say_numerics(progress)
        data = write_toy_data(
            out,
            seed=seed,
            resolution=resolution,
            num_train=num_train,
            num_val=num_val,
            samples_per_shard=samples_per_shard,
            progress=progress,
        )
        train, val = _ImageSet.load(out, data["train_shards"]), _ImageSet.load(out, data["val_shards"])
        clock.lap("data")
        text = _build_text_encoder(out, data, seed, text_encoder_steps, progress)
        clock.lap("text_encoder")
        if shipped is None:
            vae, vae_report = _build_vae(out, train, val, seed, steps["vae"], progress)
            clock.lap("vae")
            scorer_report = _build_scorer(out, train, val, vae, vae_report, seed, steps["scorer"], quick, progress)
            clock.lap("scorer")
            vae_config = vae.config
        else:
            vae_config, vae_report, scorer_report = _ship_in(out, shipped, progress)
            clock.lap("shipped_weights")
        path = numerics.numeric_path()
    world = _summary(request, data, text, vae_config, vae_report, scorer_report, clock)
    world["numerics"] = path
    if shipped is not None:  # how the shipped VAE and scorer were built (this process built the rest)
        world["shipped_weights"] = {"parts": list(SHIPPED_PARTS), "built": shipped["built"]}
    world["weights_sha256"] = {part: safetensors_digest(out / part) for part in TRAINED_PARTS}
    gates = quality_gates(quick)
    world["gates"] = evaluate_gates([g for g in gates if g.part == "vae"], world["vae"]) + evaluate_gates(
        [g for g in gates if g.part == "scorer"], world["scorer"]
    )
    world["gates_passed"] = all(r["passed"] for r in world["gates"])
    if not world["gates_passed"]:
        write_json_atomic(out / "world.failed.json", world, sort_keys=False)
        check_gates(world["gates"], str(out))
    write_json_atomic(out / "world.json", world, sort_keys=False)
    _say(progress, f"toy world ready in {world['build_seconds']:.0f}s, all {len(gates)} quality gates passed: {out}")
    return {**world, "reused": False}


# --------------------------------------------------------------------------------------------
# The shipped VAE and scorer of the default full world
# --------------------------------------------------------------------------------------------
SHIPPED = Path(__file__).parent / "shipped"
SHIPPED_PARTS = ("vae", "scorer")


class ShippedWeightsError(RuntimeError):
    """A shipped part's weights are not the ones recorded (a damaged or edited install)."""


def shipped_record() -> dict[str, Any] | None:
    path = SHIPPED / "shipped.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _what_was_asked(request: dict[str, Any]) -> dict[str, Any]:
    """A request without how it is computed (numeric path, shipped or trained): what shipped parts answer."""
    return {k: v for k, v in request.items() if k not in ("numerics", "weights")}


def shipped_for(request: dict[str, Any]) -> dict[str, Any] | None:
    """The shipped record when its parts answer ``request`` (whatever numeric path this process is on)."""
    record = shipped_record()
    return record if record is not None and _what_was_asked(request) == record["request"] else None


def matches_shipped(request: dict[str, Any]) -> bool:
    return shipped_for(request) is not None


def _ship_in(out: Path, record: dict[str, Any], progress: bool) -> tuple[Any, dict, dict]:
    """Copy the shipped VAE and scorer into the world, check their digests, return (VAE config, reports)."""
    from diffusers import AutoencoderKL

    for part in SHIPPED_PARTS:
        shutil.copytree(SHIPPED / part, out / part)
        digest, want = safetensors_digest(out / part), record["weights_sha256"][part]
        if digest != want:
            raise ShippedWeightsError(
                f"{SHIPPED / part}: weights digest {digest[:12]}... is not the recorded {want[:12]}... "
                "(a damaged install: restore the folder from git, or train here with --train-here)"
            )
    vae_report = json.loads((out / "vae" / "report.json").read_text())
    scorer_report = json.loads((out / "scorer" / "report.json").read_text())
    _say(
        progress,
        f"VAE and scorer: the shipped ones (pinned build, VAE {vae_report['psnr_db']:.2f} dB; digests checked; "
        "--train-here trains them here in ~4 min)",
    )
    return AutoencoderKL.load_config(out / "vae"), vae_report, scorer_report


def ship_world(world: Path) -> dict[str, Any]:
    """Record ``world``'s VAE and scorer as the shipped ones (maintainers, after a change that
    changes them on purpose: ``python scripts/world_digests.py --ship WORLD``).

    The world must be a full default build, trained here on the pinned path, with every gate passed.
    """
    record = json.loads((world / "world.json").read_text())
    request = record["request"]
    steps = {"vae": STEPS["vae"][0], "scorer": STEPS["scorer"][0], "text_encoder": 0}
    default = _what_was_asked(build_request(0, 32, 8192, 1024, 1024, steps, False))
    problems = []
    if request.get("numerics") != "pinned" or request.get("weights", "trained") != "trained":
        problems.append(f"request numerics={request.get('numerics')} weights={request.get('weights')}")
    if _what_was_asked(request) != default:
        problems.append("not the default full request")
    if not record.get("gates_passed"):
        problems.append("gates not passed")
    if problems:
        raise ValueError(f"{world}: cannot ship this world: " + "; ".join(problems))
    if SHIPPED.exists():
        shutil.rmtree(SHIPPED)
    SHIPPED.mkdir(parents=True)
    for part in SHIPPED_PARTS:
        shutil.copytree(world / part, SHIPPED / part)
        if safetensors_digest(SHIPPED / part) != record["weights_sha256"][part]:
            raise ValueError(f"{world / part}: its weights are not the ones its world.json records")
    shipped = {
        "request": _what_was_asked(request),
        "weights_sha256": {part: record["weights_sha256"][part] for part in SHIPPED_PARTS},
        "built": {"numerics": record["numerics"], "versions": record["versions"], "threads": record["threads"]},
    }
    write_json_atomic(SHIPPED / "shipped.json", shipped, sort_keys=False)
    return shipped


def _say_numerics(progress: bool) -> None:
    """One line on the numeric path, and a warning when the world will not match other machines'."""
    path = numerics.numeric_path()
    if path["pinned"]:
        _say(progress, f"numeric path: pinned (the same weights on every x86-64 CPU with AVX2; {path['cpu_model']})")
    else:
        _say(progress, f"numeric path: UNPINNED ({path['why']}): this world may differ from other machines'")


@dataclass
class _ImageSet:
    images: Any  # uint8 torch tensor (N, 3, H, W)
    attributes: list[dict[str, str]]

    @classmethod
    def load(cls, out: Path, shards: list[str]) -> _ImageSet:
        import torch

        images, attributes = load_images([out / name for name in shards])
        return cls(torch.from_numpy(images), attributes)


class _Laps:
    """Wall-clock time of each build stage, for world.json."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 2)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars (e.g. "Writing model shards") unless ``enabled``."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build_text_encoder(out: Path, data: dict, seed: int, steps: int, progress: bool) -> dict[str, Any]:
    """Tokenizer (vocabulary of every caption the world can produce) + tiny Gemma, in one folder."""
    tokenizer = build_tokenizer(list(all_captions()))
    model, loss = train_text_encoder(tokenizer, _captions_of(data["train_triples"]), seed, steps, progress)
    model.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "text_encoder")
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": model.config.hidden_size,
        "num_layers": model.config.num_hidden_layers,
        "lm_steps": steps,
        "lm_loss": None if loss != loss else round(loss, 4),  # NaN when untrained; JSON has no NaN
    }


def _build_vae(
    out: Path, train: _ImageSet, val: _ImageSet, seed: int, steps: int, progress: bool
) -> tuple[Any, dict[str, Any]]:
    _say(progress, f"training the VAE for {steps} steps on {len(train.images)} images")
    vae = train_vae(train.images, train.images.shape[-1], steps, seed, progress)
    stats = calibrate_vae(vae, train.images[:1024], seed, channel_images=train.images)
    report = {**vae_psnr(vae, val.images), **stats, "steps": steps, "lr": VAE_LR}
    vae.save_pretrained(out / "vae", safe_serialization=True)
    write_json_atomic(out / "vae" / "report.json", report, sort_keys=False)
    _say(progress, f"VAE: {steps} steps, validation PSNR {report['psnr_db']:.2f} dB")
    return vae, report


def _build_scorer(
    out: Path,
    train: _ImageSet,
    val: _ImageSet,
    vae,
    vae_report: dict,
    seed: int,
    steps: int,
    quick: bool,
    progress: bool,
) -> dict[str, Any]:
    from toyworld import scorer as toy_scorer

    _say(progress, f"training the attribute scorer for {steps} steps")
    report = toy_scorer.train_scorer(
        out / "scorer",
        train.images,
        train.attributes,
        val.images,
        val.attributes,
        vae=vae if vae_report["psnr_db"] >= MIN_PSNR_FOR_SCORER else None,
        resolution=train.images.shape[-1],
        steps=steps,
        batch_size=SCORER_BATCH[int(quick)],
        seed=seed,
        progress=progress,
    )
    _say(progress, f"scorer held-out accuracy (clean): {report['heldout_clean']['accuracy']}")
    if "heldout_vae" in report:
        _say(progress, f"scorer held-out accuracy (VAE round trips): {report['heldout_vae']['accuracy']}")
    return report


def _summary(
    request: dict, data: dict, text: dict, vae_config, vae_report: dict, scorer_report: dict, clock: _Laps
) -> dict[str, Any]:
    """The world.json record: what was built, how well, with which library versions."""
    return {
        "format_version": FORMAT_VERSION,
        "request": request,
        "seed": request["seed"],
        "resolution": request["resolution"],
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        "templates": list(TEMPLATES),
        "counts": {
            "train": data["num_train"],
            "val": data["num_val"],
            "train_shards": len(data["train_shards"]),
            "train_triples": len(data["train_triples"]),
            "heldout_triples": len(data["heldout_triples"]),
            "heldout_prompts": data["num_heldout_prompts"],
        },
        "heldout_triples": data["heldout_triples"],
        "train_pattern": data["train_pattern"],
        "val_pattern": data["val_pattern"],
        "paths": {
            "text_encoder": "text_encoder",
            "tokenizer": "text_encoder",
            "vae": "vae",
            "scorer": "scorer",
            "heldout_prompts": "prompts/heldout.json",
            "val_prompts": "prompts/val.json",
            "guidance_prompts": "prompts/guidance.json",
            "manifest": "attributes.jsonl",
        },
        "text_encoder": text,
        "vae": {
            "latent_channels": latent_channels(vae_config),
            "spatial_factor": spatial_factor(vae_config),
            **vae_report,
        },
        "scorer": scorer_report,
        "versions": library_versions(),
        "threads": torch_threads(),
        "timings_s": clock.timings,
        "build_seconds": clock.total(),
    }


def _captions_of(triples: list[list[str]]) -> list[str]:
    """All detailed and short captions of the given triples (the LM sees only training triples)."""
    captions = []
    for triple in triples:
        for background in BACKGROUNDS:
            attrs = attributes_of(tuple(triple), background)
            captions.append(short_caption(attrs))
            captions.extend(caption(attrs, t) for t in range(len(TEMPLATES)))
    return captions
