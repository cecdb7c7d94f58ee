"""Warm training-step benchmark of the DiT hot path, optionally against the reference formulation.

``python -m fusedit.tools.bench -c CONFIG [--steps N] [--warmup W] [--batch-size B] [--text-tokens L]
[--text-lengths SPEC] [--loader] [--compare-reference] [--compile] [--cached-latents] [--cached-text]
[--out FILE.json] [key=value ...]``

Why a separate tool rather than timing ``train.py``: the trainer's numbers mix the DiT with
checkpointing, logging and DeepSpeed's engine, and give one images/s figure. Deciding whether a
hot-path fix pays needs the step split into phases, the same batches fed to both formulations,
and a FLOP count to turn seconds into MFU. What is measured:

* the components are built as :func:`fusedit.train.trainer.build_components` builds them (text
  encoder and VAE from the config, DiT seeded by ``trainer.seed``). A text encoder or VAE that
  cannot be loaded (a hub name on an offline machine) is replaced by random tensors of the right
  shape, and the report says so: the DiT step is then exact, the frozen-encoder phases are zero;
* one training step = text encoder, VAE encode, noising + DiT forward + backward, optimizer
  (global-norm clipping + AdamW), EMA. The optimizer is a plain ``torch.optim.AdamW`` (foreach on
  CPU, fused on CUDA; with bf16 weights an fp32 master copy, as DeepSpeed's bf16 mode keeps).
  No DeepSpeed engine: on one device ZeRO partitions nothing, and its bookkeeping would blur the
  phases. Gradient all-reduce is therefore not measured;
* ``--compare-reference`` adds, with the SAME weights (our state dict loaded into
  :class:`~fusedit.reference.reference_dit.ReferenceDiT`, which has the same key layout): the
  reference formulation (dense additive float mask, text padded to ``data.max_prompt_length``,
  ``repeat_kv``, the redundant zero modulation, a Python-loop EMA over named parameters) and a
  middle point "ours_padded" (our model and EMA, text padded like the reference), so the speed-up
  splits into what the model formulation, the EMA and the text padding each contribute;
* variants run INTERLEAVED: repetition r runs one step of every variant on batch r (same captions,
  noise and timesteps), in an order rotated every repetition. Load from other processes then
  hits all variants alike, and the headline ratio is the median of per-repetition ratios.

Weights are the trainer's initialisation plus N(0, 0.02^2) noise on every parameter: the trainer's
zero-initialised output and modulation layers would make every formulation return exactly 0 and
the loss check below trivially pass. Speed does not depend on the values. The first step of every
variant starts from identical weights, so its loss and gradient norm must agree (``loss_check``).

A FuseDiT config (``model.name: FuseDiT``) is timed the same way, with what differs said in the
report: the model is built around the loaded LLM as the trainer builds it (or around a random-weight
LLM of the known architecture with ``--random-init-frozen``; token ids cannot be faked, so there is
no random-feature stand-in), the step has no text-encoder phase because the LLM runs inside the
model's forward (and backward with ``trainer.train_llm``), the model FLOPs are the training log's
(:class:`fusedit.flops.TrainingFlops`), and the reference is
:class:`~fusedit.reference.reference_fuse_dit.ReferenceFuseDiT` with our weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from common.config import ConfigError
from common.files import write_json_atomic
from common.machine import PEAK_BF16_DENSE, device_peak, machine_info
from common.randomness import STREAM_BENCH, derive_seed

if TYPE_CHECKING:
    from fusedit.flops import TrainingFlops

# A FuseDiT has no text-encoder phase: its LLM runs inside "llm_and_dit_forward_backward".
PHASES = (
    "data_wait",
    "text_encoder",
    "vae_encode",
    "dit_forward_backward",
    "llm_and_dit_forward_backward",
    "optimizer",
    "ema",
)
PERTURB_STD = 0.02


# --------------------------------------------------------------------------------------------
# Machine and precision
# --------------------------------------------------------------------------------------------
def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def train_dtype(cfg: Any, device: torch.device, notes: list[str]) -> torch.dtype:
    """Weight dtype as the trainer would use it; CPUs train fp32, so a bf16 config is downgraded."""
    mp = cfg.trainer.mixed_precision
    if device.type == "cpu" and mp != "no":
        notes.append(
            f"trainer.mixed_precision={mp}: this CPU run uses fp32 weights (the trainer can run bf16 on a CPU, "
            "but CPU bf16 GEMMs say nothing about a GPU's)"
        )
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)


# --------------------------------------------------------------------------------------------
# Frozen encoders (or their stand-ins)
# --------------------------------------------------------------------------------------------
@dataclass
class Frozen:
    """The frozen text encoder and VAE, each None when replaced by random tensors."""

    text_encoder: Any
    codec: Any
    text_hidden: int
    latent_channels: int
    spatial_factor: int
    text_flops_arch: dict[str, int] | None
    vae_flops_per_image: int | None
    sources: dict[str, str]
    native_resolution: int | None = None  # an RAE's one image side; None for a convolutional VAE


def _first_line(err: Exception) -> str:
    """The first line of an error, cut: a loader's message can be a page long."""
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def _try_load(what: str, name: str, load: Callable[[], Any], notes: list[str]) -> Any:
    """Load a frozen model or return None with a note: an offline benchmark must still time the DiT."""
    try:
        return load()
    except Exception as err:  # any loader failure (no network, no cache, bad folder) means "stand in"
        notes.append(
            f"{what} {name!r} could not be loaded ({_first_line(err)}); random tensors of the right shape stand in"
        )
        return None


def random_init_codec(cfg: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A VAE of the config's architecture with random weights (``--random-init-frozen``)."""
    from fusedit.latents import LatentCodec
    from fusedit.tools.plan import build_vae, known_vae_architecture

    known = known_vae_architecture(cfg)
    if known is None:
        raise SystemExit(
            f"--random-init-frozen: the architecture of VAE {cfg.vae.pretrained_model_name_or_path!r} is not known"
        )
    with torch.device(device):
        return LatentCodec(build_vae(*known).to(dtype))


def _random_init_tokenizer(cfg: Any) -> Any:
    from transformers import AutoTokenizer

    if not cfg.data.tokenizer:
        raise SystemExit("--random-init-frozen: set data.tokenizer=PATH (any local tokenizer, e.g. toy/text_encoder)")
    return AutoTokenizer.from_pretrained(cfg.data.tokenizer)


def random_init_frozen(cfg: Any, device: torch.device, dtype: torch.dtype, text_layers: int | None, notes: list[str]):
    """(text encoder, codec) of the config's architectures with random weights (``--random-init-frozen``).

    What a node without the hub weights (Gemma-2B, FLUX's VAE) needs to time the real encoders:
    random weights cost the same FLOPs. ``text_layers`` shortens the text encoder as
    ``model.num_hidden_layers`` shortens the DiT, so the encoder's share of the step is kept.
    """
    from transformers import AutoModel, GemmaConfig

    from fusedit.text import TextEncoder
    from fusedit.tools.plan import describe_text_encoder

    tokenizer = _random_init_tokenizer(cfg)
    arch = describe_text_encoder(cfg).arch
    if arch is None:
        raise ConfigError(f"--random-init-frozen: the architecture of {cfg.model.base!r} is not known offline")
    arch = {**arch, "num_hidden_layers": text_layers or arch["num_hidden_layers"]}
    with torch.device(device):
        model = AutoModel.from_config(GemmaConfig(**arch, vocab_size=max(len(tokenizer), 256)), **{"dtype": dtype})
    te = TextEncoder.from_model(model, tokenizer, cfg.model.text_hidden_states_index)
    notes.append(
        f"--random-init-frozen: random-weight text encoder ({arch['num_hidden_layers']} layers of the "
        f"{cfg.model.base} architecture) and VAE of the {cfg.vae.pretrained_model_name_or_path} architecture"
    )
    return te, random_init_codec(cfg, device, dtype)


def load_frozen(
    cfg: Any,
    device: torch.device,
    dtype: torch.dtype,
    notes: list[str],
    stand_in: bool = False,
    random_init: bool = False,
    text_layers: int | None = None,
) -> Frozen:
    """Text encoder and VAE as the trainer loads them, sized offline (fusedit.tools.plan) when absent.

    ``stand_in`` skips loading on purpose (``--random-frozen``): the DiT's own MFU, without Gemma.
    """
    from fusedit.text import TextEncoder
    from fusedit.tools.plan import describe_text_encoder, describe_vae, vae_encoder_forward_flops
    from fusedit.train.trainer import load_codec

    text_info, vae_info = describe_text_encoder(cfg), describe_vae(cfg)
    m = cfg.model
    vae_name = cfg.vae.pretrained_model_name_or_path
    if random_init:
        te, codec = random_init_frozen(cfg, device, dtype, text_layers, notes)
        if text_layers:
            text_info.arch = {**text_info.arch, "num_hidden_layers": text_layers}
    elif stand_in:
        te = codec = None
        notes.append("--random-frozen: text encoder and VAE replaced by random tensors on purpose")
    else:
        te = _try_load("text encoder", m.base, lambda: TextEncoder.from_config(cfg, dtype).to(device), notes)
        codec = _try_load("VAE", vae_name, lambda: load_codec(cfg, device, dtype), notes)
    sources = {
        "text_encoder": f"loaded {m.base}" if te else f"random (B, L, {text_info.hidden_size}) features",
        "vae": f"loaded {vae_name}" if codec else f"random (B, {vae_info.latent_channels}, R/f, R/f) latents",
    }
    if random_init:
        layers = text_info.arch["num_hidden_layers"]
        sources = {
            "text_encoder": f"random weights, {m.base} architecture, {layers} layers",
            "vae": f"random weights, {vae_name} architecture",
        }
    return Frozen(
        text_encoder=te,
        codec=codec,
        text_hidden=te.hidden_size if te else text_info.hidden_size,
        latent_channels=codec.latent_channels if codec else vae_info.latent_channels,
        spatial_factor=codec.spatial_factor if codec else vae_info.spatial_factor,
        native_resolution=vae_info.native_resolution,
        text_flops_arch=text_info.arch if te else None,
        vae_flops_per_image=vae_encoder_forward_flops(vae_info, cfg.data.resolution) if codec else None,
        sources=sources,
    )


# --------------------------------------------------------------------------------------------
# The FuseDiT family: the LLM is part of the timed model
# --------------------------------------------------------------------------------------------
def random_init_llm(cfg: Any, device: torch.device, dtype: torch.dtype, text_layers: int | None) -> Any:
    """A text encoder object holding a random-weight LLM of a FuseDiT's architecture (``--random-init-frozen``).

    The architecture is the planner's (:func:`fusedit.tools.plan.describe_llm`: a local config.json
    or the known-LLM table), so a Gemma-2 comes out as a Gemma-2. The vocabulary keeps the LLM's
    size (widened if the tokenizer has more ids): with ``train_llm`` the embedding is trained, and
    the optimizer and EMA should pay for it as in a real run. ``text_layers`` cuts the depth.
    """
    from transformers import AutoModel, Gemma2Config, GemmaConfig

    from fusedit.text import TextEncoder
    from fusedit.tools.plan import describe_llm

    tokenizer = _random_init_tokenizer(cfg)
    d = {k: v for k, v in describe_llm(cfg).config.items() if not k.startswith("_")}
    d["vocab_size"] = max(d.get("vocab_size") or 0, len(tokenizer))
    if text_layers:
        d["num_hidden_layers"] = text_layers
        if d.get("layer_types"):
            d["layer_types"] = list(d["layer_types"])[:text_layers]
    config = (Gemma2Config if d.get("model_type") == "gemma2" else GemmaConfig).from_dict(d)
    with torch.device(device):
        model = AutoModel.from_config(config, **{"dtype": dtype})
    return TextEncoder.from_model(model, tokenizer, cfg.model.text_hidden_states_index)


def load_llm(cfg: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """The FuseDiT's LLM, or one error naming what to pass: the model runs it on real token ids, so
    the baseline's "random text features stand in" fallback cannot apply."""
    from fusedit.text import TextEncoder

    try:
        return TextEncoder.from_config(cfg, dtype).to(device)
    except Exception as err:  # no network, no cache, bad folder: all end the same way
        raise ConfigError(
            f"model.base: the FuseDiT's LLM {cfg.model.base!r} could not be loaded ({_first_line(err)}); it runs "
            "inside the model on token ids, so random text features cannot stand in: pass --random-init-frozen "
            "with data.tokenizer=PATH (random weights of its architecture) or set model.base to a local copy"
        ) from err


def load_fuse_dit_frozen(
    cfg: Any, device: torch.device, dtype: torch.dtype, notes: list[str], random_init: bool, text_layers: int | None
) -> Frozen:
    """A FuseDiT's LLM (with its tokenizer; it becomes part of the model) and the frozen VAE.

    The VAE falls back to random latents as for the baseline; the LLM cannot (:func:`load_llm`).
    No text FLOPs are kept here: the LLM's are the model's (:func:`fuse_dit_flops`).
    """
    from fusedit.tools.plan import describe_vae, vae_encoder_forward_flops
    from fusedit.train.trainer import load_codec

    vae_info, base, vae_name = describe_vae(cfg), cfg.model.base, cfg.vae.pretrained_model_name_or_path
    if random_init:
        codec = random_init_codec(cfg, device, dtype)  # first: an unknown VAE is refused before a big LLM is built
        te = random_init_llm(cfg, device, dtype, text_layers)
        layers = te.model.config.num_hidden_layers
        sources = {"llm": f"random weights, {base} architecture, {layers} layers", "vae": f"random weights, {vae_name}"}
        notes.append(f"--random-init-frozen: random-weight LLM ({layers} layers of {base}) and VAE ({vae_name})")
    else:
        te = load_llm(cfg, device, dtype)
        codec = _try_load("VAE", vae_name, lambda: load_codec(cfg, device, dtype), notes)
        vae = f"loaded {vae_name}" if codec else f"random (B, {vae_info.latent_channels}, R/f, R/f) latents"
        sources = {"llm": f"loaded {base}", "vae": vae}
    sources["llm"] += ", inside the model: " + ("trained" if cfg.trainer.train_llm else "frozen")
    return Frozen(
        text_encoder=te,
        codec=codec,
        text_hidden=te.hidden_size,
        latent_channels=codec.latent_channels if codec else vae_info.latent_channels,
        spatial_factor=codec.spatial_factor if codec else vae_info.spatial_factor,
        native_resolution=vae_info.native_resolution,
        text_flops_arch=None,
        vae_flops_per_image=vae_encoder_forward_flops(vae_info, cfg.data.resolution) if codec else None,
        sources=sources,
    )


# --------------------------------------------------------------------------------------------
# Caption lengths and batches
# --------------------------------------------------------------------------------------------
def toy_caption(rng: np.random.Generator, drop_rate: float, original_rate: float) -> str:
    """A caption drawn like the toy loader draws one: dropped, short ("original") or detailed."""
    from toyworld import world as toy

    attrs = {k: str(rng.choice(v)) for k, v in toy.ATTRIBUTES.items()}
    if rng.random() < drop_rate:
        return ""
    if rng.random() < original_rate:
        return toy.short_caption(attrs)
    return toy.caption(attrs, int(rng.integers(len(toy.TEMPLATES))))


def approx_token_count(caption: str) -> int:
    """BOS + one token per word or punctuation mark: the length proxy when no tokenizer loads
    (common English words are single tokens in Gemma's 256k vocabulary)."""
    return 1 + len(re.findall(r"\w+|[^\w\s]", caption))


def parse_lengths(spec: str) -> tuple[str, list[float]]:
    """``toy`` | ``fixed:N`` | ``uniform:LO:HI`` | ``normal:MEAN:STD`` -> (kind, numbers)."""
    kind, *nums = spec.split(":")
    arity = {"toy": 0, "fixed": 1, "uniform": 2, "normal": 2}
    if kind not in arity or len(nums) != arity[kind]:
        raise ValueError(f"--text-lengths {spec!r}: expected toy, fixed:N, uniform:LO:HI or normal:MEAN:STD")
    return kind, [float(x) for x in nums]


def draw_length(kind: str, nums: list[float], rng: np.random.Generator, max_len: int) -> int:
    """One caption length in tokens (BOS included), clipped to [1, max_len] like truncation does."""
    if kind == "fixed":
        n = nums[0]
    elif kind == "uniform":
        n = rng.integers(int(nums[0]), int(nums[1]) + 1)
    else:
        n = round(rng.normal(nums[0], nums[1]))
    return int(min(max(n, 1), max_len))


@dataclass
class Batch:
    """One micro-batch as every variant sees it. Text is held padded to ``max_len``; each
    variant slices it to its own padded length (the longest prompt rounded up, or ``max_len``)."""

    index: int
    lengths: list[int]
    ours_len: int
    device: torch.device
    ids: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    moments: torch.Tensor | None = None  # (B, 2 or 1, C, h, w) posterior (mean, std) or RAE latent: a cache's
    text_features: torch.Tensor | None = None
    cached_text: torch.Tensor | None = None  # (B, ours_len, T): what a text cache would hold for these captions
    data_seconds: float = 0.0

    def mask(self, pad: int) -> torch.Tensor:
        """(B, pad) int64 attention mask: 1 on each caption's real tokens, 0 on padding."""
        lengths = torch.tensor(self.lengths, device=self.device)
        return (torch.arange(pad, device=self.device)[None] < lengths[:, None]).long()


class BatchSource:
    """Deterministic batches: batch r is the same for every variant and every run with the seed.

    Synthetic batches (default) draw captions from the toy world's caption process or a length
    distribution, and random pixels (only their shape matters to the timing). ``--loader`` reads
    the config's webdataset stream instead and times the wait for each batch.
    """

    def __init__(
        self,
        cfg: Any,
        frozen: Frozen,
        spec: str,
        device: torch.device,
        use_loader: bool,
        cached: bool = False,
        cached_text: bool = False,
    ) -> None:
        from fusedit.text import padded_length

        self.cfg, self.frozen, self.device, self.cached = cfg, frozen, device, cached
        self.cached_text = cached_text
        self.kind, self.nums = parse_lengths(spec)
        self.max_len = cfg.data.max_prompt_length
        self.batch_size = cfg.data.batch_size_per_gpu
        self.padded_length = lambda longest: padded_length(longest, self.max_len, cfg.data.pad_to_multiple_of)
        self.latent_side = cfg.data.resolution // frozen.spatial_factor
        self.loader = self._loader() if use_loader else None

    def _loader(self) -> Iterator[dict[str, Any]]:
        from fusedit.train.trainer import loader_from_config

        if self.frozen.text_encoder is None:
            raise SystemExit("--loader needs the config's tokenizer, but the text encoder could not be loaded")
        if self.cfg.data.uses_latent_cache:
            raise SystemExit(
                "--loader: a latent cache (data.latent_cache) has no pixels for the reference to encode; point the "
                "benchmark at the image shards and pass --cached-latents instead"
            )
        if self.cfg.data.text_cache:
            raise SystemExit(
                "--loader: data.text_cache has no token ids for the reference to encode; set it to "
                "null and pass --cached-text instead"
            )
        loader = loader_from_config(self.cfg, self.frozen.text_encoder.tokenizer, pin_memory=self.device.type == "cuda")
        return iter(loader)

    def get(self, index: int) -> Batch:
        if self.loader is not None:
            return self._from_loader(index)
        rng = np.random.default_rng([self.cfg.trainer.seed, index])
        gen = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.cfg.trainer.seed, (STREAM_BENCH,), index)
        )
        lengths, ids = self._text(rng)
        batch = Batch(index, lengths, self.padded_length(max(lengths)), self.device, ids=ids)
        self._images(batch, gen)
        self._cache(batch)
        return batch

    def _cache(self, batch: Batch) -> None:
        """--cached-latents / --cached-text: what the caches would hold for this batch, computed untimed."""
        if self.cached and batch.pixels is not None:
            mean, std = self.frozen.codec.moments(batch.pixels)
            batch.moments = torch.stack([mean] if std is None else [mean, std], dim=1)
        if self.cached_text and batch.ids is not None:
            pad = batch.ours_len
            batch.cached_text = self.frozen.text_encoder.encode(batch.ids[:, :pad], batch.mask(pad))

    def _text(self, rng: np.random.Generator) -> tuple[list[int], torch.Tensor | None]:
        """Caption lengths, plus token ids padded to ``max_len`` when a real encoder will read them."""
        te, b, d = self.frozen.text_encoder, self.batch_size, self.cfg.data
        if self.kind == "toy":
            captions = [toy_caption(rng, d.random_dropping_rate, d.original_caption_rate) for _ in range(b)]
            if te is not None:
                ids, mask = te.tokenize(captions, self.max_len, pad_to_multiple_of=None)
                return mask.sum(1).tolist(), self._pad_ids(ids).to(self.device)
            return [min(approx_token_count(c), self.max_len) for c in captions], None
        lengths = [draw_length(self.kind, self.nums, rng, self.max_len) for _ in range(b)]
        if te is None:
            return lengths, None
        tok = te.tokenizer
        ids = torch.full((b, self.max_len), tok.pad_token_id or 0, dtype=torch.long)
        for i, n in enumerate(lengths):  # BOS, then arbitrary in-vocabulary ids: only the length matters
            ids[i, :n] = torch.from_numpy(rng.integers(4, len(tok), size=n))
            ids[i, 0] = tok.bos_token_id
        return lengths, ids.to(self.device)

    def _pad_ids(self, ids: torch.Tensor) -> torch.Tensor:
        pad = self.frozen.text_encoder.tokenizer.pad_token_id or 0
        width = max(self.max_len, ids.shape[1])
        return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=pad)

    def _images(self, batch: Batch, gen: torch.Generator) -> None:
        """Pixels for a real VAE, else latents; random text features when no encoder loads."""
        b, r, dev = self.batch_size, self.cfg.data.resolution, self.device
        if self.frozen.codec is not None:
            batch.pixels = torch.rand((b, 3, r, r), generator=gen, device=dev) * 2 - 1
        else:
            shape = (b, self.frozen.latent_channels, self.latent_side, self.latent_side)
            batch.latents = torch.randn(shape, generator=gen, device=dev)
        if self.frozen.text_encoder is None:
            shape = (b, self.max_len, self.frozen.text_hidden)
            batch.text_features = torch.randn(shape, generator=gen, device=dev)

    def _from_loader(self, index: int) -> Batch:
        t0 = time.perf_counter()
        raw = next(self.loader)
        wait = time.perf_counter() - t0
        lengths = raw["attention_mask"].sum(1).tolist()
        ids = self._pad_ids(raw["input_ids"]).to(self.device)
        batch = Batch(index, lengths, self.padded_length(max(lengths)), self.device, ids=ids, data_seconds=wait)
        batch.pixels = raw["pixel_values"].to(self.device)
        self._cache(batch)
        return batch


# --------------------------------------------------------------------------------------------
# Optimizer and EMA
# --------------------------------------------------------------------------------------------
class AdamWStep:
    """Clip + AdamW as the trainer's DeepSpeed engine runs it for this weight dtype.

    fp32 weights: AdamW straight on the parameters. bf16/fp16 weights: an fp32 master copy takes
    the step and is copied back, which is what DeepSpeed's bf16 mode does (and what it costs).
    """

    def __init__(self, model: nn.Module, cfg: Any, device: torch.device) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = self.params
        if self.params[0].dtype != torch.float32:
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
            for m in self.master:  # persistent fp32 gradient buffers, like DeepSpeed's fp32 grad partition
                m.grad = torch.zeros_like(m)
        o, fused = cfg.optimizer, device.type == "cuda"
        self.opt = torch.optim.AdamW(
            self.master,
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            fused=fused,
            foreach=None if fused else True,
        )
        self.clip = cfg.trainer.gradient_clipping or math.inf

    def step(self) -> torch.Tensor:
        """One optimizer step; returns the pre-clip global gradient norm (a tensor: no host sync)."""
        mixed = self.master is not self.params
        if mixed:
            torch._foreach_copy_([m.grad for m in self.master], [p.grad for p in self.params])
        norm = torch.nn.utils.clip_grad_norm_(self.master, self.clip, foreach=True)
        self.opt.step()
        if mixed:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)
        else:
            self.opt.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
        return norm


class LoopEMA:
    """The reference's EMA: ``ema = decay * ema + (1 - decay) * theta`` one tensor at a time in a
    Python loop over named parameters, names checked against the model every step (docs/reference-facts.md, T2I-3.5)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if params.keys() != self.shadow.keys():
            raise KeyError("EMA and model parameter names differ")
        for name, ema in self.shadow.items():
            ema.mul_(self.decay).add_(params[name].detach().float(), alpha=1.0 - self.decay)


# --------------------------------------------------------------------------------------------
# Models and variants
# --------------------------------------------------------------------------------------------
def reference_config(kw: dict[str, Any]) -> dict:
    """The reference DiTConfig of ``DiT(**kw)``: the inverse of convert.dit_kwargs_from_reference_config,
    checked by a round trip so the two models cannot silently differ in a field."""
    from fusedit.reference.convert import dit_kwargs_from_reference_config
    from fusedit.reference.reference_dit import make_reference_config

    base = {
        "hidden_size": kw["hidden_size"],
        "num_attention_heads": kw["num_attention_heads"],
        "num_key_value_heads": kw["num_key_value_heads"],
        "head_dim": kw["head_dim"],
        "intermediate_size": kw["intermediate_size"],
        "hidden_activation": kw["hidden_act"],
        "rms_norm_eps": kw["rms_norm_eps"],
        "attention_bias": kw.get("attention_bias", False),
        "rope_theta": kw["rope_theta"],
        "initializer_range": kw["initializer_range"],
    }
    fields = ("attention", "in_channels", "out_channels", "patch_size", "pos_embed", "pos_embed_max_size")
    fields += ("qk_norm", "sample_size", "sandwich_norm", "text_hidden_size", "timestep_conditioning")
    ref = make_reference_config(
        base, dit_num_hidden_layers=kw["num_layers"], dit_hidden_size=kw["hidden_size"], **{f: kw[f] for f in fields}
    )
    back = dit_kwargs_from_reference_config(ref)
    diff = {k: (v, back.get(k)) for k, v in kw.items() if back.get(k) != v}
    if diff:
        raise RuntimeError(f"reference config round trip changed fields: {diff}")
    return ref


def to_reference(dit: nn.Module, kw: dict[str, Any]) -> nn.Module:
    """A ReferenceDiT holding a copy of ``dit``'s weights (identical key layout, strict load)."""
    from fusedit.reference.reference_dit import ReferenceDiT

    with torch.device("meta"):
        ref = ReferenceDiT(reference_config(kw))
    state = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    ref.load_state_dict(state, strict=True, assign=True)
    return ref


def fused_gelu(ref: nn.Module) -> nn.Module:
    """Give the reference's MLPs torch's fused tanh-GELU kernel.

    ReferenceDiT spells tanh-GELU out as a Python formula (about eight elementwise kernels) so that
    it does not share torch's kernel with our model. The original ran Gemma's MLP, whose
    ``gelu_pytorch_tanh`` IS ``F.gelu(approximate="tanh")``; timing the formula would credit our
    model with a speed-up the original never paid for. Same function up to float rounding.
    """
    from fusedit.models.layers import ACTIVATIONS
    from fusedit.reference.reference_dit import RefMLP

    fused = ACTIVATIONS["gelu_pytorch_tanh"]
    for module in ref.modules():
        if isinstance(module, RefMLP) and ref.config["base_config"].get("hidden_activation") == "gelu_pytorch_tanh":
            module.act = fused
    return ref


def build_dit(cfg: Any, kw: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The trainer's DiT (seeded init), perturbed so every layer is active (see module docstring)."""
    from fusedit.models.dit import DiT

    torch.manual_seed(cfg.trainer.seed)
    with torch.device(device):
        dit = DiT(**kw)
    perturb(dit.parameters(), cfg.trainer.seed + 1, device)
    return dit.to(dtype).train()


@torch.no_grad()
def perturb(params: Iterator[nn.Parameter], seed: int, device: torch.device) -> None:
    """Add N(0, PERTURB_STD^2) to each parameter: zero-initialised layers would make every
    formulation return exactly 0 and the loss check pass trivially (see module docstring)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen, device=device) * PERTURB_STD)


def build_fuse_dit(cfg: Any, frozen: Frozen, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The trainer's FuseDiT (its own builder: seeded, around the loaded LLM, the trained sides set by
    ``trainer.train_dit`` / ``train_llm``), with its DiT side perturbed as :func:`build_dit` perturbs.

    Only the DiT side is perturbed: its zero-initialised output and modulation layers are what would
    make the loss check trivial, while the LLM already holds loaded (or random) weights. As in the
    trainer, the text encoder object keeps only its tokenizer (one copy of the LLM in memory).
    """
    from fusedit.train.trainer import build_fuse_dit as trainer_build_fuse_dit

    torch.manual_seed(cfg.trainer.seed)
    with torch.device(device):
        model = trainer_build_fuse_dit(cfg, frozen.text_encoder, frozen.latent_channels)
    perturb(model.dit.parameters(), cfg.trainer.seed + 1, device)
    return model.to(dtype).train()


# FuseDiT fields the reference config spells as ours does
REFERENCE_FUSE_FIELDS = (
    "in_channels",
    "out_channels",
    "patch_size",
    "attention",
    "qk_norm",
    "sandwich_norm",
    "timestep_conditioning",
    "pos_embed",
    "pos_embed_max_size",
    "sample_size",
    "initial_layers",
    "text_modulation_embeds_dim",
)


def reference_fuse_dit_config(model: nn.Module) -> dict:
    """The reference FuseDiTConfig of our FuseDiT, or a ConfigError where the reference cannot run it.

    Its LLM config is ours as the model holds it (cut after the last shared layer, which is listed),
    with the MLP activation spelled the way the reference's transformers read it. The reference's DiT
    MLP is the LLM's, so another width has no reference formulation. Its own refusals
    (``check_runnable``: e.g. cross + 1d-rope, DiT layers without an LLM partner) are passed on with
    their message. A round trip through the converter's mapping checks no field changed on the way.
    """
    from fusedit.models.fuse_dit import shared_llm_layers
    from fusedit.reference.convert_fuse_dit import fuse_dit_kwargs_from_reference_config
    from fusedit.reference.reference_fuse_dit import (
        ReferenceNotRunnable,
        check_runnable,
        make_reference_fuse_dit_config,
    )

    ours, llm = dict(model.config), model.llm.config
    if (ours["intermediate_size"] or llm.intermediate_size) != llm.intermediate_size:
        raise ConfigError(
            f"--compare-reference: model.intermediate_size={ours['intermediate_size']}, but the reference's DiT "
            f"MLP is its LLM's ({llm.intermediate_size}): set model.intermediate_size={llm.intermediate_size}"
        )
    gemma2 = llm.model_type == "gemma2"  # our Gemma-2 side prefers hidden_activation, our Gemma side hidden_act
    activation = (getattr(llm, "hidden_activation", None) if gemma2 else None) or llm.hidden_act
    ref = make_reference_fuse_dit_config(
        {**llm.to_dict(), "hidden_activation": activation},
        dit_hidden_size=ours["hidden_size"] or llm.hidden_size,
        dit_num_hidden_layers=ours["num_layers"],
        shared_attention_layers=list(shared_llm_layers(ours)),
        **{k: ours[k] for k in REFERENCE_FUSE_FIELDS},
    )
    try:
        check_runnable(ref)
    except ReferenceNotRunnable as err:
        raise ConfigError(f"--compare-reference: {err}") from err
    back = fuse_dit_kwargs_from_reference_config(ref)
    want = {k: ours[k] for k in REFERENCE_FUSE_FIELDS} | {"num_layers": ours["num_layers"]}
    diff = {k: (v, back[k]) for k, v in want.items() if back[k] != v}
    if diff or back["hidden_size"] != (ours["hidden_size"] or llm.hidden_size):
        raise RuntimeError(f"reference FuseDiT config round trip changed fields: {diff or 'hidden_size'}")
    return ref


def to_reference_fuse_dit(model: nn.Module, device: torch.device) -> nn.Module:
    """A ReferenceFuseDiT holding a copy of ``model``'s weights (same key layout, strict load) and
    training exactly the parameters ours trains.

    Built with empty parameters (no second random initialisation of an LLM-sized model) but real
    buffers (the LLM's rotary frequencies are in no state dict). Mirroring ours' trainable set by
    name makes both optimizers and EMAs hold the same tensors, and the loss check compare gradient
    norms over them; the weights ours leaves out with ``train_llm`` (final norm, the last layer's
    query, output and MLP) get no or all-zero gradients in the reference formulation anyway.
    """
    from accelerate import init_empty_weights

    from fusedit.reference.reference_fuse_dit import ReferenceFuseDiT

    config = reference_fuse_dit_config(model)
    with torch.device(device), init_empty_weights(include_buffers=False):
        ref = ReferenceFuseDiT(config)
    ref.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, p in ref.named_parameters():
        p.requires_grad_(trains[name])
    return ref.to(next(model.parameters()).dtype).train()


@dataclass
class Variant:
    """One formulation under test: its model copy, optimizer, EMA and measurements."""

    name: str
    label: str
    module: nn.Module
    reference: bool
    pad_to_max: bool
    ema: Any
    optimizer: AdamWStep
    forward: Callable[..., torch.Tensor] | None = None  # the module, or its torch.compile wrapper
    records: list[dict[str, float]] = field(default_factory=list)  # timed steps: seconds per phase
    text_lengths: list[int] = field(default_factory=list)  # timed steps: padded text length
    real_tokens: list[int] = field(default_factory=list)  # timed steps: real caption tokens in the batch
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    peak_cuda_bytes: int = 0
    cached_latents: bool = False  # reads posterior moments from a latent cache instead of encoding
    cached_text: bool = False  # reads text features from a text cache instead of running the encoder


def reference_model(dit: nn.Module, kw: dict[str, Any], cfg: Any, device: torch.device) -> tuple[nn.Module, str]:
    """The reference formulation holding ``dit``'s weights, and its label."""
    max_len = cfg.data.max_prompt_length
    if cfg.model.is_fuse_dit:
        label = (
            f"reference: one attention over [text; image] with a dense float mask, text padded to {max_len}, "
            "repeat_kv, the last LLM layer whole, loop EMA"
        )
        return fused_gelu(to_reference_fuse_dit(dit, device)), label
    label = f"reference: dense float mask, text padded to {max_len}, repeat_kv, loop EMA"
    return fused_gelu(to_reference(dit, kw)), label


def make_variants(dit: nn.Module, kw: dict[str, Any], cfg: Any, args: argparse.Namespace, device) -> list[Variant]:
    """ "ours" always; with --compare-reference also "ours_padded" and "reference" (same weights)."""
    from fusedit.train.ema import EMA

    decay, max_len = cfg.ema.decay, cfg.data.max_prompt_length

    def ours(name: str, model: nn.Module, padded: bool, label: str) -> Variant:
        return Variant(name, label, model, False, padded, EMA(model, decay).to(device), AdamWStep(model, cfg, device))

    label = "ours: key mask, batch-max text padding, native GQA, fused EMA"
    if cfg.model.is_fuse_dit:
        label = "ours: text rows apart from image rows, " + label.removeprefix("ours: ")
    variants = [ours("ours", dit, False, label)]
    if args.compile:
        eager = copy.deepcopy(dit)
        variants.append(ours("ours_eager", eager, False, "ours without torch.compile"))
    if args.compare_reference:
        ref, label = reference_model(dit, kw, cfg, device)  # first: a configuration it cannot run is refused
        padded = copy.deepcopy(dit)
        variants.append(ours("ours_padded", padded, True, f"ours with text padded to {max_len} (middle point)"))
        variants.append(Variant("reference", label, ref, True, True, LoopEMA(ref, decay), AdamWStep(ref, cfg, device)))
    if args.compile or args.compile_reference:
        from fusedit.train.trainer import allow_a_graph_per_text_bucket

        allow_a_graph_per_text_bucket(cfg)
    for v in variants:
        v.cached_latents = args.cached_latents and v.name in ("ours", "ours_eager")
        v.cached_text = args.cached_text and v.name in ("ours", "ours_eager")
        compiled = args.compile_reference if v.name == "reference" else args.compile and v.name == "ours"
        v.forward = torch.compile(v.module, dynamic=False) if compiled else v.module
    return variants


# --------------------------------------------------------------------------------------------
# One training step, timed by phase
# --------------------------------------------------------------------------------------------
class PhaseClock:
    """Wall time per phase; on CUDA each boundary synchronises so kernels land in their phase."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class StepContext:
    """What every step needs besides the variant and the batch."""

    cfg: Any
    frozen: Frozen
    flow: Any
    device: torch.device
    dtype: torch.dtype
    max_len: int
    fuse_dit: bool = False  # the model takes token ids and runs its LLM inside its forward


def text_inputs(ctx: StepContext, batch: Batch, pad: int, cached: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (B, pad, T) fp32, mask (B, pad)) at a variant's padded length."""
    mask = batch.mask(pad)
    if cached and batch.cached_text is not None:
        return batch.cached_text[:, :pad], mask
    if ctx.frozen.text_encoder is None:
        return batch.text_features[:, :pad], mask
    return ctx.frozen.text_encoder.encode(batch.ids[:, :pad], mask), mask


def latents(ctx: StepContext, batch: Batch, gens: list[torch.Generator], cached: bool) -> torch.Tensor:
    codec, sample = ctx.frozen.codec, ctx.cfg.vae.sample_posterior
    if codec is None:
        return batch.latents
    if cached and batch.moments is not None:
        return codec.from_cached(batch.moments, gens, sample)
    return codec.encode(batch.pixels, generator=gens, sample=sample)


def train_step(v: Variant, batch: Batch, ctx: StepContext) -> dict[str, float]:
    """One step of ``v`` on ``batch``, mirroring Trainer.micro_step + engine.step + EMA.update.

    Random draws come from the trainer's per-sample generators (seed, step, index in the global
    batch) with step = batch index, so all variants noise the same latents with the same sigmas,
    and pay the same for drawing them.
    """
    from common.randomness import sample_generators

    clock = PhaseClock(ctx.device)
    pad = ctx.max_len if v.pad_to_max else batch.ours_len
    clock.times["data_wait"] = batch.data_seconds
    gens = sample_generators(ctx.cfg.trainer.seed, batch.index, 0, len(batch.lengths))
    with clock.phase("vae_encode"):
        x0 = latents(ctx, batch, gens, v.cached_latents)
    if ctx.fuse_dit:  # token ids: the LLM's forward (and backward) is timed with the model's
        text, mask = batch.ids[:, :pad], batch.mask(pad)
    else:
        with clock.phase("text_encoder"):
            text, mask = text_inputs(ctx, batch, pad, v.cached_text)
    with clock.phase("llm_and_dit_forward_backward" if ctx.fuse_dit else "dit_forward_backward"):
        loss = ctx.flow.training_loss(v.forward, x0, text, mask, gens, ctx.dtype)
        loss.backward()
    with clock.phase("optimizer"):
        norm = v.optimizer.step()
    with clock.phase("ema"):
        v.ema.update(v.module)
    v.losses.append(float(loss.detach()))
    v.grad_norms.append(float(norm))
    clock.times["text_length"] = pad
    return clock.times


def run_interleaved(variants: list[Variant], source: BatchSource, ctx: StepContext, warmup: int, steps: int) -> None:
    """Warm-up then timed repetitions; each repetition runs every variant once on the same batch,
    starting with a different variant each time so no formulation always runs first."""
    cuda = ctx.device.type == "cuda"
    for rep in range(warmup + steps):
        batch = source.get(rep)
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:
            if cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            times = train_step(v, batch, ctx)
            if rep < warmup:
                continue
            v.text_lengths.append(times.pop("text_length"))
            v.real_tokens.append(sum(batch.lengths))
            v.records.append(times)
            if cuda:
                v.peak_cuda_bytes = max(v.peak_cuda_bytes, torch.cuda.max_memory_allocated(ctx.device))


# --------------------------------------------------------------------------------------------
# FLOPs and the report
# --------------------------------------------------------------------------------------------
def step_model_flops(
    kw: dict[str, Any],
    frozen: Frozen,
    n_image: int,
    n_text: int,
    batch: int,
    ckpt: bool,
    cached_text: bool = False,
    cached_latents: bool = False,
) -> int:
    """Model FLOPs of one step from fusedit.tools.plan's counts; frozen encoders only when they really ran
    (``cached_text`` / ``cached_latents``: that encoder ran once, ahead of training)."""
    from fusedit.tools.plan import StepFlops, dit_forward_flops, text_encoder_forward_flops

    fwd, blocks = dit_forward_flops(kw, n_image, n_text)
    arch = None if cached_text else frozen.text_flops_arch
    flops = StepFlops(
        dit_forward_per_sample=fwd,
        dit_blocks_forward_per_sample=blocks,
        text_encoder_forward_per_sample=text_encoder_forward_flops(arch, n_text) if arch else None,
        vae_encoder_forward_per_sample=0 if cached_latents else frozen.vae_flops_per_image,
        samples_per_gpu=batch,
        world_size=1,
        gradient_checkpointing=ckpt,
    )
    return flops.model_per_gpu


def dit_step_flops(args: argparse.Namespace, cfg: Any, kw: dict[str, Any], frozen: Frozen) -> Callable[[int], int]:
    """Model FLOPs of one baseline-DiT step as a function of its padded text length."""
    b, n_image, ckpt = cfg.data.batch_size_per_gpu, image_tokens(cfg, frozen), cfg.trainer.enable_gradient_checkpointing
    return lambda n: step_model_flops(kw, frozen, n_image, n, b, ckpt, args.cached_text, args.cached_latents)


def fuse_dit_flops(
    config: dict[str, Any], cfg: Any, frozen: Frozen, n_image: int, cached_latents: bool
) -> TrainingFlops:
    """The training log's FLOP count of this FuseDiT (:class:`fusedit.flops.TrainingFlops`, built as the
    trainer builds it): DiT side 3x its forward, the LLM 1x when frozen and 3x with ``train_llm``, plus
    the VAE encoder when it ran; what ``train.py --dry-run`` prints too (its StepFlops adds the LLM's
    backward with ``train_llm``). Recompute under gradient checkpointing is not model work."""
    from fusedit.flops import TrainingFlops

    vae = 0 if cached_latents else frozen.vae_flops_per_image or 0
    return TrainingFlops({**config, "train_llm": cfg.trainer.train_llm}, n_image, None, vae)


def fuse_dit_flops_split(config: dict[str, Any], n_image: int, text_lengths: list[int]) -> dict[str, Any]:
    """What share of the FuseDiT's model FLOPs (VAE excluded) is its LLM's, over ours' timed steps: the
    phase timing cannot split the LLM from the DiT (they run layer by layer together), the FLOPs can."""
    from fusedit.flops import fuse_dit_forward_flops

    passes = 3 if config.get("train_llm") else 1
    shares = []
    for n in text_lengths:
        dit, llm = fuse_dit_forward_flops(config, n_image, n)
        shares.append(passes * llm / (3 * dit + passes * llm))
    return {
        "counted_by": "fusedit.flops.TrainingFlops (the training log's MFU; train.py --dry-run's StepFlops)",
        "llm_passes": passes,
        "llm_share_excluding_vae": statistics.fmean(shares),
    }


def summarize_variant(v: Variant, useful_flops: list[int], batch: int, n_image: int, peak: float | None) -> dict:
    """Throughput from the median step (robust to a busy machine), phases as median and mean."""
    steps = [sum(r.values()) for r in v.records]
    med, mean = statistics.median(steps), statistics.fmean(steps)
    real_text = statistics.fmean(v.real_tokens) / batch
    phases = {p: {"median_s": statistics.median(r[p] for r in v.records)} for p in PHASES if p in v.records[0]}
    for p in phases:
        phases[p]["mean_s"] = statistics.fmean(r[p] for r in v.records)
    achieved = sum(useful_flops) / sum(steps)
    out = {
        "label": v.label,
        "step_s_median": med,
        "step_s_mean": mean,
        "step_s": [round(x, 5) for x in steps],
        "images_per_s": batch / med,
        "image_tokens_per_s": batch * n_image / med,
        "text_tokens_per_s": batch * real_text / med,
        "tokens_per_s": batch * (n_image + real_text) / med,
        "text_padded_length_mean": statistics.fmean(v.text_lengths),
        "text_padded_lengths": list(v.text_lengths),
        "text_real_tokens_mean": real_text,
        "phases": phases,
        "model_tflop_per_s": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "first_loss": v.losses[0],
        "first_grad_norm": v.grad_norms[0],
    }
    if v.peak_cuda_bytes:
        out["peak_memory_gib"] = v.peak_cuda_bytes / 2**30
    return out


def ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Speed-up of ``den`` over ``num`` (time ratio) per paired repetition (median) and in total."""
    paired = [a / b for a, b in zip(num, den)]
    return {"paired_median": statistics.median(paired), "total_time": sum(num) / sum(den)}


def compare(variants: dict[str, Variant]) -> dict[str, Any]:
    """Headline ratios and what each fix saves per step (means: they add up to the total)."""
    times = {n: [sum(r.values()) for r in v.records] for n, v in variants.items()}
    out = {
        "speedup_ours_vs_reference": ratio(times["reference"], times["ours"]),
        "speedup_ours_padded_vs_reference": ratio(times["reference"], times["ours_padded"]),
        "speedup_ours_vs_ours_padded": ratio(times["ours_padded"], times["ours"]),
    }

    def mean(name: str, phase: str | None = None) -> float:
        recs = variants[name].records
        return statistics.fmean(sum(r.values()) if phase is None else r[phase] for r in recs)

    # ours_padded differs from the reference only in the model formulation and the EMA; the eager
    # "ours" (ours_eager under --compile) from ours_padded in text padding and the latent cache.
    base = "ours_eager" if "ours_eager" in variants else "ours"
    cached, cached_text = variants[base].cached_latents, variants[base].cached_text
    saved = {
        "ema_fused_vs_loop": mean("reference", "ema") - mean("ours_padded", "ema"),
        "model_formulation": (mean("reference") - mean("reference", "ema"))
        - (mean("ours_padded") - mean("ours_padded", "ema")),
    }
    padding = mean("ours_padded") - mean(base)
    if cached:
        saved["latent_cache"] = mean("ours_padded", "vae_encode") - mean(base, "vae_encode")
        padding -= saved["latent_cache"]
    if cached_text:  # ours_padded encodes at max_prompt_length: this share includes that padding's encoder time
        saved["text_cache"] = mean("ours_padded", "text_encoder") - mean(base, "text_encoder")
        padding -= saved["text_cache"]
    saved["text_padding_batch_max_vs_max_length"] = padding
    if base == "ours_eager":  # --compile: ours_padded and ours_eager are eager, ours is compiled
        out["speedup_ours_vs_ours_eager"] = ratio(times["ours_eager"], times["ours"])
        out["speedup_ours_eager_vs_reference"] = ratio(times["reference"], times["ours_eager"])
        saved["torch_compile"] = mean("ours_eager") - mean("ours")
    total = mean("reference") - mean("ours")
    out["saved_s_per_step"] = {**saved, "total": total}
    out["saved_share"] = {k: (s / total if total else None) for k, s in saved.items()}
    out["phase_speedups_ours_vs_reference"] = {
        p: mean("reference", p) / mean("ours", p)
        for p in PHASES
        if p in variants["ours"].records[0] and mean("ours", p) > 0
    }
    return out


def loss_check(variants: list[Variant], dtype: torch.dtype) -> dict[str, Any]:
    """First-step loss and gradient norm of each variant: identical weights and batch, so any
    difference beyond float rounding would mean a formulation computes something else."""
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2  # bf16 rounds at ~4e-3 relative
    first = {v.name: {"loss": v.losses[0], "grad_norm": v.grad_norms[0]} for v in variants}
    base = first["reference"]
    diffs = {
        n: {
            "loss_abs_diff": abs(f["loss"] - base["loss"]),
            "grad_norm_rel_diff": abs(f["grad_norm"] - base["grad_norm"]) / max(base["grad_norm"], 1e-12),
        }
        for n, f in first.items()
        if n != "reference"
    }
    agree = all(d["loss_abs_diff"] <= tolerance and d["grad_norm_rel_diff"] <= tolerance for d in diffs.values())
    return {"first_step": first, "vs_reference": diffs, "tolerance": tolerance, "agree": agree}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fusedit.tools.bench",
        description="Time warm DiT or FuseDiT training steps (ours, optionally vs the reference formulation).",
    )
    p.add_argument("-c", "--config", required=True, help="training YAML")
    p.add_argument("--steps", type=int, default=10, help="timed repetitions (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (compile, allocator, caches)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch (default: data.batch_size_per_gpu)")
    p.add_argument("--text-tokens", type=int, default=None, help="every caption exactly L tokens (= fixed:L)")
    p.add_argument(
        "--text-lengths",
        default="toy",
        help="caption lengths: toy (the toy world's caption process; default), fixed:N, uniform:LO:HI, normal:MEAN:STD",
    )
    p.add_argument("--loader", action="store_true", help="read the config's webdataset stream and time its wait")
    p.add_argument("--compare-reference", action="store_true", help="also run the reference formulation, interleaved")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT of variant ours (as trainer.compile=true does); adds ours_eager, its eager twin",
    )
    p.add_argument("--compile-reference", action="store_true", help="torch.compile the reference formulation's DiT too")
    p.add_argument(
        "--cached-latents",
        action="store_true",
        help="ours (and ours_eager) read posterior moments from a latent cache (data.latent_cache) "
        "instead of running the VAE encoder; the reference and ours_padded encode every step",
    )
    p.add_argument(
        "--cached-text",
        action="store_true",
        help="ours (and ours_eager) read text features from a text cache (data.text_cache) instead of "
        "running the text encoder, whose FLOPs then leave the model count; the reference and ours_padded encode "
        "every step (baseline DiT only: a FuseDiT's LLM runs inside the model)",
    )
    p.add_argument(
        "--random-frozen",
        action="store_true",
        help="random text features/latents even if loadable (baseline DiT only: a FuseDiT needs its LLM)",
    )
    p.add_argument(
        "--random-init-frozen",
        action="store_true",
        help="real text encoder (a FuseDiT's LLM) and VAE architectures, random weights (no hub needed; needs "
        "data.tokenizer)",
    )
    p.add_argument(
        "--text-layers",
        type=int,
        default=None,
        help="with --random-init-frozen: text encoder (or LLM) depth (default: full)",
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU when not in the table")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.text_tokens is not None:
        args.text_lengths = f"fixed:{args.text_tokens}"
    return args


def settings(args: argparse.Namespace, cfg: Any, dtype: torch.dtype, n_image: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "config": args.config,
        "model": cfg.model.name,
        "overrides": args.overrides,
        "batch_size": cfg.data.batch_size_per_gpu,
        "steps": args.steps,
        "warmup": args.warmup,
        "image_tokens": n_image,
        "max_prompt_length": cfg.data.max_prompt_length,
        "pad_to_multiple_of": cfg.data.pad_to_multiple_of,
        "text_lengths": args.text_lengths,
        "data": "webdataset loader" if args.loader else "synthetic in-memory batches (no data wait)",
        "dtype": str(dtype).replace("torch.", ""),
        "compile": args.compile,
        "compile_reference": args.compile_reference,
        "cached_latents": args.cached_latents,
        "cached_text": args.cached_text,
        "gradient_checkpointing": cfg.trainer.enable_gradient_checkpointing,
        "optimizer": "torch.optim.AdamW + clip_grad_norm_, no DeepSpeed engine (single-device hot path)",
    }
    if cfg.model.is_fuse_dit:  # which side trains decides the LLM's backward, optimizer and EMA work
        out |= {"train_dit": cfg.trainer.train_dit, "train_llm": cfg.trainer.train_llm}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, run interleaved, and return the report as a dict."""
    from fusedit.config import load_config
    from fusedit.flow import FlowMatching, build_scheduler

    overrides = list(args.overrides) + ([f"data.batch_size_per_gpu={args.batch_size}"] if args.batch_size else [])
    cfg = load_config(args.config, overrides)
    fuse = cfg.model.is_fuse_dit
    device, notes = pick_device(args.device), []
    dtype = train_dtype(cfg, device, notes)
    frozen, model, kw = (setup_fuse_dit if fuse else setup_dit)(args, cfg, device, dtype, notes)
    t = cfg.trainer
    side = cfg.data.resolution // frozen.spatial_factor
    scheduler = build_scheduler(cfg, frozen.latent_channels * side * side)
    flow = FlowMatching(scheduler, t.weighting_scheme, t.logit_mean, t.logit_std, t.mode_scale)
    if t.enable_gradient_checkpointing:
        model.enable_gradient_checkpointing()
        if args.compare_reference:
            notes.append("gradient checkpointing: on for our model, absent from the reference formulation")
    variants = make_variants(model, kw, cfg, args, device)
    source = BatchSource(
        cfg, frozen, args.text_lengths, device, args.loader, cached=args.cached_latents, cached_text=args.cached_text
    )
    if args.loader and args.compare_reference:
        notes.append("data_wait: each batch is read once and fed to every variant; each is charged the wait")
    ctx = StepContext(cfg, frozen, flow, device, dtype, cfg.data.max_prompt_length, fuse_dit=fuse)
    machine = machine_info(device)
    run_interleaved(variants, source, ctx, args.warmup, args.steps)
    machine["load_average_end"] = list(os.getloadavg())
    if not fuse:
        step_flops = dit_step_flops(args, cfg, kw, frozen)
        return build_report(args, cfg, step_flops, frozen, variants, device, dtype, machine, notes)
    n_image, b = image_tokens(cfg, frozen), cfg.data.batch_size_per_gpu
    counter = fuse_dit_flops(kw, cfg, frozen, n_image, args.cached_latents)
    report = build_report(
        args, cfg, lambda n: counter.per_sample(n) * b, frozen, variants, device, dtype, machine, notes
    )
    report["model_flops"] = fuse_dit_flops_split(counter.dit_kwargs, n_image, variants[0].text_lengths)
    return report


def setup_dit(
    args: argparse.Namespace, cfg: Any, device: torch.device, dtype: torch.dtype, notes: list[str]
) -> tuple[Frozen, nn.Module, dict[str, Any]]:
    """(frozen encoders, the baseline DiT, its constructor arguments)."""
    from fusedit.config import check_geometry

    frozen = load_frozen(
        cfg,
        device,
        dtype,
        notes,
        stand_in=args.random_frozen,
        random_init=args.random_init_frozen,
        text_layers=args.text_layers,
    )
    check_geometry(cfg, frozen.spatial_factor, frozen.latent_channels, frozen.native_resolution)
    kw = cfg.dit_kwargs(frozen.latent_channels, frozen.text_hidden)
    return frozen, build_dit(cfg, kw, device, dtype), kw


def refuse_fuse_dit_options(args: argparse.Namespace, cfg: Any) -> None:
    """Options that have no meaning for a FuseDiT, refused by name before anything loads."""
    if args.cached_text:
        raise ConfigError(
            "--cached-text: a FuseDiT has no text-encoder output to cache (its LLM runs layer by layer inside the "
            "model, next to the image); drop --cached-text"
        )
    if args.random_frozen:
        raise ConfigError(
            "--random-frozen: a FuseDiT runs its LLM on token ids inside the model, so random text features cannot "
            "stand in; pass --random-init-frozen (random weights of the LLM's and VAE's architectures) instead"
        )
    if cfg.model.text_modulation_embeds_dim is not None:
        raise ConfigError(
            "model.text_modulation_embeds_dim: the bench does not time the fuse-dit-clip type yet (it feeds no "
            "pooled CLIP embedding); the training log gives its step time and MFU"
        )


def setup_fuse_dit(
    args: argparse.Namespace, cfg: Any, device: torch.device, dtype: torch.dtype, notes: list[str]
) -> tuple[Frozen, nn.Module, dict[str, Any]]:
    """(the LLM's tokenizer and the VAE, the FuseDiT built around the LLM, its saved config)."""
    from fusedit.config import check_geometry

    refuse_fuse_dit_options(args, cfg)
    frozen = load_fuse_dit_frozen(cfg, device, dtype, notes, args.random_init_frozen, args.text_layers)
    check_geometry(cfg, frozen.spatial_factor, frozen.latent_channels, frozen.native_resolution)
    model = build_fuse_dit(cfg, frozen, device, dtype)
    train_llm = cfg.trainer.train_llm
    notes.append(
        f"FuseDiT: its LLM ({model.llm.config.num_hidden_layers} layers, {'trained' if train_llm else 'frozen'}) "
        f"runs inside the model on token ids: its forward{' and backward' if train_llm else ''} is timed in "
        "llm_and_dit_forward_backward, and there is no text_encoder phase. Model FLOPs: "
        "fusedit.flops.TrainingFlops (the training log's MFU): DiT side 3x forward, the LLM "
        + ("3x (trained)" if train_llm else "1x (frozen: forward only)")
    )
    return frozen, model, json.loads(model.to_json_string())


def image_tokens(cfg: Any, frozen: Frozen) -> int:
    """Image tokens per sample, from the VAE actually used (or the one its stand-in mimics)."""
    side = cfg.data.resolution // frozen.spatial_factor // cfg.model.patch_size
    return side * side


def build_report(
    args: argparse.Namespace,
    cfg: Any,
    step_flops: Callable[[int], int],
    frozen: Frozen,
    variants: list[Variant],
    device: torch.device,
    dtype: torch.dtype,
    machine: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    """The JSON report: machine, settings, per-variant throughput/phases/MFU, comparison, loss check.

    ``step_flops(L)``: model FLOPs of one step whose text is padded to L tokens.
    """
    b, n_image = cfg.data.batch_size_per_gpu, image_tokens(cfg, frozen)
    ours = variants[0]
    # Model FLOPs count the text at OUR padded length for every variant: padding beyond it is waste,
    # so the reference's MFU is lower exactly by its extra time.
    useful = [step_flops(n) for n in ours.text_lengths]
    peak, peak_note = device_peak(device, dtype, args.peak_tflops)
    report: dict[str, Any] = {
        "machine": machine,
        "settings": settings(args, cfg, dtype, n_image),
        "frozen": frozen.sources,
        "mfu_peak": {"flops_per_s": peak, "source": peak_note, "table_bf16_dense": PEAK_BF16_DENSE},
        "model_flops_per_step_mean": statistics.fmean(useful),
        "variants": {v.name: summarize_variant(v, useful, b, n_image, peak) for v in variants},
        "notes": notes,
    }
    report["peak_memory"] = peak_memory(device, variants)
    if args.compare_reference:
        named = {v.name: v for v in variants}
        report["comparison"] = compare(named)
        report["loss_check"] = loss_check(variants, dtype)
    return report


def peak_memory(device: torch.device, variants: list[Variant]) -> dict[str, Any]:
    """CUDA: max_memory_allocated during each variant's steps (other variants' resident weights
    included). CPU: the process's RSS high-water mark, which cannot be split per variant."""
    if device.type == "cuda":
        return {
            "kind": "torch.cuda.max_memory_allocated during each variant's steps (all variants' states resident)",
            "gib": {v.name: v.peak_cuda_bytes / 2**30 for v in variants},
        }
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "kind": "CPU: process RSS high-water mark (getrusage ru_maxrss), all variants together",
        "gib": rss_kib / 2**20,
    }


def print_summary(report: dict[str, Any], out: Any = sys.stdout) -> None:
    """A human-readable digest of the JSON report."""
    m, s = report["machine"], report["settings"]
    print(
        f"machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"device {m.get('gpu', m['device'])}, load {m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}",
        file=out,
    )
    print(
        f"batch {s['batch_size']}, {s['image_tokens']} image tokens, text {s['text_lengths']}, {s['dtype']}", file=out
    )
    for k, v in report["frozen"].items():
        print(f"{k}: {v}", file=out)
    phases = [p for p in PHASES if any(p in v["phases"] for v in report["variants"].values())]
    header = f"{'variant':<12} {'step s':>8} {'img/s':>8} {'text L':>7} " + " ".join(f"{p[:10]:>10}" for p in phases)
    print(header, file=out)
    for name, v in report["variants"].items():
        cells = " ".join(f"{v['phases'].get(p, {}).get('median_s', 0.0):>10.4f}" for p in phases)
        row = f"{name:<12} {v['step_s_median']:>8.4f} {v['images_per_s']:>8.2f} {v['text_padded_length_mean']:>7.1f}"
        print(f"{row} {cells}", file=out)
        if v["mfu"] is not None:
            print(f"{'':<12} MFU {100 * v['mfu']:.1f}% ({v['model_tflop_per_s']:.1f} TFLOP/s)", file=out)
    mem = report["peak_memory"]
    gib = mem["gib"] if isinstance(mem["gib"], dict) else {"process": mem["gib"]}
    print(f"peak memory ({mem['kind']}): " + ", ".join(f"{k} {v:.2f} GiB" for k, v in gib.items()), file=out)
    print(f"MFU: {report['mfu_peak']['source']}", file=out)
    if "comparison" in report:
        c = report["comparison"]
        for key in [k for k in c if k.startswith("speedup_")]:
            print(f"{key}: {c[key]['paired_median']:.3f}x paired median, {c[key]['total_time']:.3f}x total", file=out)
        shares = ", ".join(f"{k} {v:.0%}" for k, v in c["saved_share"].items() if v is not None)
        print(f"share of the time saved: {shares}", file=out)
        check = report["loss_check"]
        verdict = "agree" if check["agree"] else "DISAGREE"
        print(f"loss check (first step, vs reference, tol {check['tolerance']}): {verdict} ", end="", file=out)
        print(json.dumps(check["vs_reference"]), file=out)
    for note in report["notes"]:
        print(f"note: {note}", file=out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark must not start a multi-GB download
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    report = run(args)
    print_summary(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, report, sort_keys=False)
    return report


if __name__ == "__main__":
    from common.lifecycle import run_cli

    sys.exit(run_cli("python -m fusedit.tools.bench", main))
