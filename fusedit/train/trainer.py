"""The text-to-image training loop under DeepSpeed (ZeRO-1/2), for 1 process or many.

The trainer wires the modules together and owns the run: it does not know how attention,
the VAE or the data stream work inside, only their contracts (docs/interfaces.md).

Randomness is explicit: the timestep, posterior noise and flow noise of sample ``i`` of the
global batch of optimizer step ``s`` come from a CPU generator seeded with (seed, s, i)
(`common.randomness`), where ``i = (rank * accumulation + micro) * micro_batch + j``. Ranks
therefore draw different noise (the reference seeded all ranks alike); a resumed run draws exactly
what an uninterrupted one would have, without restoring RNG states; and the same global batch gets
the same draws on 1 process or N, so ZeRO-2 runs at different world sizes are equivalent
(tests/test_zero2_equivalence.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common import checkpoint as ckpt
from common.config import ConfigError, save_config
from common.distributed import DistEnv, all_reduce_mean, all_reduce_sum, barrier, init_distributed
from common.files import write_json_atomic
from common.lifecycle import Cadence, NonFiniteGuard, last_good_checkpoint, preview_path, run_loop
from common.machine import device_peak
from common.metrics import MetricsLogger
from common.precision import Precision
from common.randomness import data_seed_after_restart, sample_generators
from common.signals import StopSignal
from common.vae_config import VaeSpec
from fusedit.config import TrainConfig, check_fuse_dit_heads, check_geometry, derive_batch
from fusedit.flops import TrainingFlops, clip_text_arch, clip_text_forward_flops, decoder_arch
from fusedit.flow import FlowMatching, build_scheduler
from fusedit.latents import LatentCodec
from fusedit.models import DiT, model_class
from fusedit.text import CLIP_MAX_LENGTH, ClipSource, ClipTextEncoder, TextEncoder
from fusedit.train import engine_checkpoint
from fusedit.train.deepspeed_config import load_deepspeed_json, resolve_deepspeed_config
from fusedit.train.ema import ModuleEMA, ShardedEMA, copy_weights
from fusedit.train.init_from import RECORD_NAME, load_parent_weights, read_record, resolve_parent

log = logging.getLogger("fusedit.train")


def compile_in_place(engine, cfg: TrainConfig) -> None:
    """torch.compile the engine's DiT with one static graph per text-length bucket.

    In place (DeepSpeed's ``engine.compile``): parameter names, ZeRO hooks and checkpoints stay
    those of the eager module. Text is padded to multiples of ``data.pad_to_multiple_of``, so there
    are at most ``max_prompt_length / pad`` shapes; dynamo's recompile limit (8) is raised to that,
    or longer-caption batches would silently fall back to eager.
    """
    allow_a_graph_per_text_bucket(cfg)
    engine.compile(compile_kwargs={"dynamic": False})


def allow_a_graph_per_text_bucket(cfg: TrainConfig) -> None:
    """Raise dynamo's recompile limit to the number of padded text lengths the data can produce."""
    import torch._dynamo

    buckets = math.ceil(cfg.data.max_prompt_length / max(1, cfg.data.pad_to_multiple_of or 1)) + 1
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, buckets)


@dataclass
class Components:
    """The frozen encoders, the flow-matching objective and the (trainable) DiT; ``clip``: the
    frozen CLIP text encoder of a "fuse-dit-clip" FuseDiT (``model.clip_text_encoder``), else None."""

    text_encoder: TextEncoder
    codec: LatentCodec
    flow: FlowMatching
    dit: DiT
    clip: ClipTextEncoder | None = None


def load_codec(cfg: TrainConfig, device: torch.device | str, dtype: torch.dtype) -> LatentCodec:
    """The frozen VAE as training loads it (the bench loads it here too)."""
    return LatentCodec.from_spec(_vae_spec(cfg), torch_dtype=dtype).to(device)


def build_components(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Components:
    """Load the frozen text encoder and VAE, then build the DiT sized to fit them."""
    text_encoder = TextEncoder.from_config(cfg, dtype).to(device)
    if cfg.data.text_cache:  # the cache's features must be this encoder's, checked before the VAE loads
        from fusedit.data.text_cache import check_text_cache_fingerprint

        check_text_cache_fingerprint(cfg, text_encoder)
    codec = load_codec(cfg, device, dtype)
    check_geometry(cfg, codec.spatial_factor, codec.latent_channels, codec.native_resolution)
    if cfg.model.text_hidden_size and cfg.model.text_hidden_size != text_encoder.hidden_size:
        raise ConfigError(
            f"model.text_hidden_size: {cfg.model.text_hidden_size} but the text encoder "
            f"{cfg.model.base} has hidden size {text_encoder.hidden_size}; set it to null or match"
        )
    clip = load_clip(cfg, dtype, device)
    torch.manual_seed(cfg.trainer.seed)  # identical initialisation on every rank
    if cfg.model.is_fuse_dit:
        dit = build_fuse_dit(cfg, text_encoder, codec.latent_channels)
    else:
        dit = DiT(**cfg.dit_kwargs(codec.latent_channels, text_encoder.hidden_size))
    flow = FlowMatching(
        build_scheduler(cfg, codec.latent_numel(cfg.data.resolution)),
        weighting_scheme=cfg.trainer.weighting_scheme,
        logit_mean=cfg.trainer.logit_mean,
        logit_std=cfg.trainer.logit_std,
        mode_scale=cfg.trainer.mode_scale,
        precondition_outputs=cfg.trainer.precondition_outputs,
    )
    return Components(text_encoder, codec, flow, dit, clip)


def load_clip(cfg: TrainConfig, dtype: torch.dtype, device: torch.device) -> ClipTextEncoder | None:
    """The frozen CLIP text encoder of the "fuse-dit-clip" type, in the frozen encoders' dtype; None without.

    It stays outside the trained module (no optimizer, ZeRO partition, EMA or checkpoint: the
    config names it, as it names the baseline's text encoder), and its pooled width must be the
    one the model's ``condition_embedder`` takes.
    """
    source = ClipSource.from_config(cfg)
    if source is None:
        return None
    clip = ClipTextEncoder.load(source, torch_dtype=dtype).to(device)
    if clip.embed_dim != cfg.model.text_modulation_embeds_dim:
        raise ConfigError(
            f"model.text_modulation_embeds_dim: {cfg.model.text_modulation_embeds_dim}, but the CLIP text "
            f"encoder {cfg.model.clip_text_encoder} gives pooled embeddings of width {clip.embed_dim}; set it to that"
        )
    return clip


def build_fuse_dit(cfg: TrainConfig, text_encoder: TextEncoder, in_channels: int):
    """A FuseDiT around the loaded LLM (the text encoder's model, now part of the trained module).

    The LLM keeps the frozen dtype it was loaded in; ``trainer.train_llm`` makes it trainable (it
    then joins the optimizer, ZeRO's partitions and the EMA), ``trainer.train_dit: false`` freezes
    the DiT side. The text encoder object stays for its tokenizer: the loader and the sample
    grids tokenise with it, and nothing calls its ``encode``.
    """
    from fusedit.models.fuse_dit import FuseDiT

    check_fuse_dit_heads(cfg, text_encoder.model.config)
    model = FuseDiT.from_llm(text_encoder.model, **cfg.fuse_dit_kwargs(in_channels))
    model.set_trainable(train_dit=cfg.trainer.train_dit, train_llm=cfg.trainer.train_llm)
    text_encoder.model = model.llm  # one copy of the LLM in memory; the encoder object keeps its tokenizer
    return model


def loader_from_config(
    cfg: TrainConfig,
    tokenizer,
    *,
    seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    resume_state: dict | None = None,
    pin_memory: bool = False,
):
    """The training data stream described by ``cfg.data`` (shared by the trainer and the benchmark).

    ``seed`` defaults to ``trainer.seed``; a run resumed at another world size passes a new one.
    """
    from fusedit.data.latent_cache import training_urls
    from fusedit.data.webdata import build_dataloader

    d = cfg.data
    return build_dataloader(
        training_urls(cfg),
        tokenizer,
        batch_size=d.batch_size_per_gpu,
        resolution=d.resolution,
        center_crop=d.center_crop,
        image_column=d.image_column,
        caption_column={"original": d.caption_column.original, "synthetic": d.caption_column.synthetic},
        original_caption_rate=d.original_caption_rate,
        random_dropping_rate=d.random_dropping_rate,
        instruction=d.instruction,
        max_prompt_length=d.max_prompt_length,
        pad_to_multiple_of=d.pad_to_multiple_of,
        num_workers=d.dataloader_num_workers,
        seed=cfg.trainer.seed if seed is None else seed,
        rank=rank,
        world_size=world_size,
        accumulation=cfg.trainer.gradient_accumulation_steps,
        num_streams=d.num_streams,
        num_open_shards=d.num_open_shards,
        resume_state=resume_state,
        cached_latents=d.uses_latent_cache,
        text_cache=d.text_cache,
        pin_memory=pin_memory,
    )


def _vae_spec(cfg: TrainConfig) -> VaeSpec:
    return VaeSpec.from_config(cfg.vae)


def load_val_prompts(cfg: TrainConfig) -> list[str]:
    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    if cfg.sample.prompt_file:
        import json

        items = json.loads(Path(cfg.sample.prompt_file).read_text())
        return [it["prompt"] if isinstance(it, dict) else str(it) for it in items]
    return []


class Trainer:
    """Build everything from a validated config, then :meth:`train` until ``max_steps``."""

    def __init__(self, cfg: TrainConfig, deepspeed_config_path: str | None = None) -> None:
        self.cfg = cfg
        self.stop_signal = StopSignal()  # early: a preemption during start-up still stops cleanly
        self.run_dir = Path(cfg.trainer.checkpoint_dir)
        ds_path = deepspeed_config_path or cfg.trainer.deepspeed_config
        ds_raw = load_deepspeed_json(ds_path)  # parse errors before any heavy work
        self._validate_inputs()
        self.parent = resolve_parent(cfg)  # trainer.init_from: folder, tag, architecture (None if resuming)
        self.env: DistEnv = init_distributed()
        self.batch_derived = derive_batch(cfg, self.env.world_size)  # data.global_batch_size: kept at any N
        if self.batch_derived and self.env.is_main:
            log.info(
                "global batch %(global_batch_size)d on %(world_size)d processes: %(batch_size_per_gpu)d "
                "per micro-batch x %(gradient_accumulation_steps)d accumulation steps",
                self.batch_derived,
            )
        self.ds_config = resolve_deepspeed_config(ds_raw, cfg, self.env.world_size)
        # ZeRO-0 (fp32, bf16) cannot skip a step: there the guard inspects gradients before it.
        zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.device = self.env.device
        self.precision = Precision.resolve(cfg.trainer.mixed_precision, self.device)  # once per run
        self.check_grads_before_step = zero_stage == 0 and not self.precision.loss_scaling
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.precision.loss_scaling and self.device.type == "cpu":  # DeepSpeed's fp16 optimizer
            raise ConfigError("trainer.mixed_precision: 'fp16' needs a GPU; use 'bf16' or 'no' on CPU")
        self.checkpoints = ckpt.CheckpointWriter(
            self.run_dir, self.env.rank, self.env.is_main, cfg.trainer.checkpoints_total_limit
        )
        self.checkpoints.claim()  # one writer per run folder, before anything reads or writes it
        frozen = self.precision.frozen_dtype
        self.parts = build_components(cfg, self.device, frozen)
        if cfg.data.uses_latent_cache:
            from fusedit.data.latent_cache import check_cache_fingerprint

            check_cache_fingerprint(cfg, self.parts.codec)
        if cfg.data.text_cache:  # only the sample grids' prompts need it: keep it off the accelerator
            self.parts.text_encoder.to("cpu")
        self.model_config = json.loads(self.parts.dit.to_json_string())
        self.flops = self._training_flops()
        self.peak_flops, peak_note = device_peak(self.device, frozen, cfg.trainer.peak_tflops, "trainer.peak_tflops")
        self.work = {"flops": 0.0, "text_tokens": 0.0}  # this rank's model FLOPs and real text tokens per window
        if self.env.is_main:
            log.info("MFU: %s", peak_note if self.peak_flops is None else f"against {peak_note}")
        if cfg.trainer.enable_gradient_checkpointing:
            self.parts.dit.enable_gradient_checkpointing()
        self.step = 0
        self.samples_seen = 0
        self.guard = NonFiniteGuard(cfg.trainer.max_nonfinite_steps)
        self._ema_gathered: tuple[int, dict[str, torch.Tensor] | None] | None = None
        self.data_seed = cfg.trainer.seed
        self.stream = None
        resume_step = self.checkpoints.resume_step(cfg.trainer.resume_from)
        self.resume_universal = resume_step is not None and self._prepare_universal_resume(resume_step)
        parent_weights = self._load_parent(resume_step)
        self.engine = self._build_engine()
        self.ema = self._build_ema()
        if parent_weights is not None:
            self._start_from_parent(parent_weights)
        data_state = self._resume(resume_step) if resume_step is not None else None
        self.loader = self._build_loader(data_state)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLogger(
            self.run_dir,
            cfg.trainer.report_to,
            cfg.trainer.project,
            cfg.trainer.run,
            cfg.to_dict(),
            enabled=self.env.is_main,
        )

    # ----------------------------------------------------------------- set-up
    def _validate_inputs(self) -> None:
        """Cheap checks on files before processes, models or data are touched."""
        from common.shards import validate_data_paths

        try:
            validate_data_paths(self.cfg.data.data_path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.data_path: {err}") from None
        if self.cfg.data.uses_latent_cache:
            from fusedit.data.latent_cache import check_cache_matches

            check_cache_matches(self.cfg)
        if self.cfg.data.text_cache:
            from fusedit.data.text_cache import check_text_cache_matches

            check_text_cache_matches(self.cfg)
        for name, value in (
            ("model.base", self.cfg.model.base),
            ("vae.pretrained_model_name_or_path", self.cfg.vae.pretrained_model_name_or_path),
            ("model.clip_text_encoder", self.cfg.model.clip_text_encoder or ""),
            ("data.clip_tokenizer", self.cfg.data.clip_tokenizer or ""),
        ):
            if not value:
                continue
            looks_local = value.startswith((".", "/", "~")) or Path(value).exists()
            if looks_local and not Path(value).expanduser().exists():
                raise ConfigError(f"{name}: local path {value!r} does not exist")

    def _training_flops(self) -> TrainingFlops:
        """Model FLOPs per sample for the log's MFU: the planner's formulas (fusedit.flops) on this run.

        The VAE encoder has no closed form; its FLOPs are counted once on one image of the training
        resolution (0 with a latent cache). The text encoder is not counted with a text-feature cache.
        """
        cfg, codec = self.cfg, self.parts.codec
        side = cfg.data.resolution // codec.spatial_factor // cfg.model.patch_size
        vae_flops = 0
        if not cfg.data.uses_latent_cache:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                codec.moments(torch.zeros(1, 3, cfg.data.resolution, cfg.data.resolution, device=self.device))
            vae_flops = int(counter.get_total_flops())
        if cfg.model.is_fuse_dit:  # the LLM runs inside the model: counted there, trained or not
            clip, clip_flops = self.parts.clip, 0
            if clip is not None:  # its captions are padded to CLIP's context
                clip_flops = clip_text_forward_flops(clip_text_arch(clip.model.config), CLIP_MAX_LENGTH)
            return TrainingFlops(
                {**self.model_config, "train_llm": cfg.trainer.train_llm}, side * side, None, vae_flops, clip_flops
            )
        arch = None if cfg.data.text_cache else decoder_arch(self.parts.text_encoder.model.config)
        return TrainingFlops(self.model_config, side * side, arch, vae_flops)

    def _count_work(self, mask: torch.Tensor) -> None:
        """Add one micro-batch (its padded text length is what the kernels compute) to the window."""
        self.work["flops"] += self.flops.per_sample(int(mask.shape[1])) * int(mask.shape[0])
        self.work["text_tokens"] += float(mask.sum())

    def _build_engine(self):
        import deepspeed
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        params = [p for p in self.parts.dit.parameters() if p.requires_grad]
        use_fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.optimizer.lr,
            betas=tuple(cfg.optimizer.betas),
            eps=cfg.optimizer.eps,
            weight_decay=cfg.optimizer.weight_decay,
            fused=use_fused,
            foreach=None if use_fused else True,
        )
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler.name,
            optimizer,
            num_warmup_steps=cfg.lr_scheduler.num_warmup_steps,
            num_training_steps=cfg.trainer.max_steps,
        )
        engine, _, _, _ = deepspeed.initialize(
            model=self.parts.dit,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            config=self.ds_config,
        )
        if cfg.trainer.compile:
            compile_in_place(engine, cfg)
        return engine

    def _build_ema(self) -> ShardedEMA | ModuleEMA:
        """The EMA of this rank's fp32 master-weight partition under ZeRO-1/2; of the module under stage 0."""
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "single_partition_of_fp32_groups"):
            ema = ShardedEMA(self.engine.module, optimizer, self.cfg.ema.decay)
        else:
            ema = ModuleEMA(self.engine.module, self.cfg.ema.decay).to(self.device)
        if self.env.is_main:
            log.info("EMA (%s): %.2f MiB of fp32 on this rank", type(ema).__name__, 4 * ema.numel_per_rank / 2**20)
        return ema

    # ------------------------------------------------ trainer.init_from (a new run from another's weights)
    def _load_parent(self, resume_step: int | None) -> dict[str, torch.Tensor] | None:
        """Load the parent's weights into the DiT before the engine is built; return them for the EMA.

        A run that resumes (``resume_step``) keeps the record of the parent it started from.
        """
        if resume_step is not None or self.parent is None:
            self.parent_record = read_record(self.run_dir)
            return None
        self.parent_record = self.parent.record()
        return load_parent_weights(self.parent, self.parts.dit, self.model_config)

    def _start_from_parent(self, weights: dict[str, torch.Tensor]) -> None:
        """EMA == the loaded weights at step 0; ZeRO's fp32 masters get them exactly too.

        DeepSpeed builds its fp32 master partitions from the module's (bf16) weights, which would
        round the parent's fp32 weights; the EMA partitions have the masters' layout, so they are
        copied over. Optimizer moments, LR schedule, step and data stream start fresh.
        """
        self.ema.load_full_state_dict(weights)
        masters = getattr(self.engine.optimizer, "single_partition_of_fp32_groups", None)
        if isinstance(self.ema, ShardedEMA) and masters is not None:
            with torch.no_grad():
                for master, shadow in zip(masters, self.ema.shadow):
                    master.copy_(shadow)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / RECORD_NAME, self.parent_record)

    def _build_loader(self, data_state: dict | None):
        from fusedit.data.webdata import StreamState

        loader = loader_from_config(
            self.cfg,
            self.parts.text_encoder.tokenizer,
            seed=self.data_seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
            resume_state=data_state,
            pin_memory=self.device.type == "cuda",
        )
        self.stream = StreamState(data_state)
        return loader

    def _prepare_universal_resume(self, step: int) -> bool:
        """True when ``step`` was written at another world size: convert it (rank 0, once) to
        DeepSpeed's universal form and have the engine load that, re-partitioning the ZeRO
        optimizer state (fp32 master weights and Adam moments) for this world size."""
        folder = self.checkpoints.folder(step)
        saved = self.checkpoints.trainer_state(step).get("world_size")
        if saved == self.env.world_size:
            return False
        if self.env.is_main:
            log.warning(
                "checkpoint %s was written by %s processes, resuming with %d: converting its "
                "ZeRO state to DeepSpeed's universal form",
                folder,
                saved,
                self.env.world_size,
            )
            engine_checkpoint.ensure_universal(folder)
        barrier()
        self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
        return True

    def _resume(self, step: int) -> dict | None:
        """Restore engine, EMA and counters of ``step``; return the data position (every rank's
        streams, merged: a run continues its sample order at any world size)."""
        folder = self.checkpoints.folder(step)
        tag = engine_checkpoint.UNIVERSAL_TAG if self.resume_universal else "deepspeed"
        load_path, _ = self.engine.load_checkpoint(
            str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {folder / tag}")
        self.ema.load_full_state_dict(ckpt.load_weights(folder / "ema"))
        state = self.checkpoints.trainer_state(step)
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.guard.total = int(state.get("nonfinite_total", 0))
        self.data_seed = int(state.get("data_seed", self.cfg.trainer.seed))
        if self.env.is_main:
            log.info("resumed from %s at step %d", folder, self.step)
        from fusedit.data.webdata import merge_stream_states

        data_state = self._continuable(merge_stream_states(self.checkpoints.data_states(step)))
        if data_state is not None:
            return data_state
        # A fresh stream under the old seed would replay the run's first samples: a new seed.
        self.data_seed = data_seed_after_restart(self.cfg.trainer.seed, self.step)
        if self.env.is_main:
            log.warning(
                "the data stream of %s cannot continue exactly (written before the global sample order, "
                "or with another global batch or data.num_streams): it restarts, re-seeded with %d",
                folder,
                self.data_seed,
            )
        return None

    def _continuable(self, merged: dict | None) -> dict | None:
        """The saved global position when this run's order is the saved one (same global batch and
        streams), else None: the stream then restarts (see :meth:`_resume`)."""
        if merged is None:
            return None
        d = self.cfg.data
        global_batch = d.batch_size_per_gpu * self.cfg.trainer.gradient_accumulation_steps * self.env.world_size
        streams = d.num_streams or global_batch
        if merged.get("global_batch") != global_batch or merged.get("num_streams") != streams:
            return None
        return merged if len(merged.get("streams", {})) == streams else None  # a rank's file is missing

    # --------------------------------------------------------------- training
    def sample_generators(self, micro: int, count: int) -> list[torch.Generator]:
        """One generator per sample of this micro-batch, keyed by its place in the global batch."""
        first = (
            self.env.rank * self.cfg.trainer.gradient_accumulation_steps + micro
        ) * self.cfg.data.batch_size_per_gpu
        return sample_generators(self.cfg.trainer.seed, self.step, first, count)

    def micro_step(self, batch: dict[str, Any], micro: int) -> torch.Tensor:
        """Loss of one micro-batch (fp32 scalar); DeepSpeed does the backward bookkeeping."""
        p, dev = self.parts, self.device
        moments = batch.get("latent_moments")
        pixels = batch["pixel_values"].to(dev, non_blocking=True) if moments is None else None
        cached_text = batch.get("text_features")  # a text cache: the encoder's output, already padded
        mask = batch["attention_mask"].to(dev, non_blocking=True)
        gens = self.sample_generators(micro, mask.shape[0])
        with torch.no_grad():
            if moments is not None:  # a latent cache: the same posterior draw, no encoder
                x0 = p.codec.from_cached(moments, gens, self.cfg.vae.sample_posterior)
            else:
                x0 = p.codec.encode(pixels, generator=gens, sample=self.cfg.vae.sample_posterior)
            pooled = None if p.clip is None else p.clip.embed(batch["captions"])  # dropped captions: ""
            if self.cfg.model.is_fuse_dit:  # token ids: the LLM runs inside the model, with the image
                text = batch["input_ids"].to(dev, non_blocking=True)
            elif cached_text is not None:
                text = cached_text.to(dev, non_blocking=True).float()
            else:
                text = p.text_encoder.encode(batch["input_ids"].to(dev, non_blocking=True), mask)
        dtype = next(self.engine.module.parameters()).dtype
        return p.flow.training_loss(self.engine, x0, text, mask, gens, dtype, pooled_text=pooled)

    def train(self) -> dict[str, Any]:
        """Train to ``trainer.max_steps`` or an agreed stop (common.lifecycle); the last logged metrics."""
        cfg = self.cfg
        self._data_iter = iter(self.loader)
        self._window = {"loss": torch.zeros((), device=self.device), "skipped": 0, "nonfinite": 0, "data_wait": 0.0}
        self.last_logged: dict[str, Any] = {}
        bar = tqdm(total=cfg.trainer.max_steps, initial=self.step, disable=not self.env.is_main, desc="train")
        self.engine.train()
        try:
            run_loop(self, Cadence.of(cfg.trainer), self.stop_signal, self.device, bar)
        finally:
            bar.close()
            self.metrics.close()
        return self.last_logged

    # ------------------------------------------------ the stage's part of the loop
    def loop_step(self) -> None:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches, then the EMA."""
        accum = self.cfg.trainer.gradient_accumulation_steps
        window = self._window
        step_loss = torch.zeros((), device=self.device)
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(self._data_iter)
            window["data_wait"] += time.perf_counter() - t0
            self.stream.update(batch)
            window["skipped"] += int(batch.get("skipped", 0))
            loss = self.micro_step(batch, micro)
            self._count_work(batch["attention_mask"])
            self.engine.backward(loss)
            if micro == accum - 1 and self.check_grads_before_step:
                self._refuse_nonfinite_gradient()
            self.engine.step()
            step_loss += loss.detach()
        self.samples_seen += self.cfg.data.batch_size_per_gpu * accum * self.env.world_size
        if self._step_applied():
            window["loss"] += step_loss
            if (self.step + 1) % self.cfg.ema.update_steps == 0:
                self.ema.update(self.engine.module)
        else:
            window["nonfinite"] += 1

    def log_window(self, steps: int, seconds: float) -> dict[str, str]:
        window, accum = self._window, self.cfg.trainer.gradient_accumulation_steps
        good = (steps - window["nonfinite"]) * accum
        mean = window["loss"] / good if good else torch.full((), math.nan, device=self.device)
        last = self._log(mean, window["skipped"], steps, seconds, window["data_wait"], window["nonfinite"])
        self.last_logged = last
        window["loss"].zero_()
        window.update(skipped=0, nonfinite=0, data_wait=0.0)
        return {
            "loss": f"{last['train/loss']:.4f}",
            "lr": f"{last['train/lr']:.2e}",
            "img_s": f"{last['perf/images_per_s']:.1f}",
        }

    def save(self) -> Path:
        return self.save_checkpoint()

    def preview(self) -> Path | None:
        return self.sample_grid()

    def end_step(self) -> None:
        self._ema_gathered = None  # the step's gathered EMA (grid, checkpoint) is not kept past it

    # ------------------------------------------------------ non-finite guard
    def _step_applied(self) -> bool:
        """Whether the optimizer step just taken changed the weights (common.lifecycle counts and limits skips).

        DeepSpeed's ZeRO-1/2 optimizer (fp32 and bf16; fp16 by loss scaling) computes the global
        gradient norm, all-reduced over ranks, and skips the update on *every* rank when it is not
        finite: weights, optimizer moments and the learning-rate schedule stay where they were. A
        non-finite loss gives a non-finite norm, so one check covers both; the EMA is then skipped
        here. Every rank sees the same answer, so no collective is needed.
        """
        return self.guard.record(
            self.engine.was_step_applied(),
            self.step + 1,
            lambda: last_good_checkpoint(self.run_dir),
            warn=self.env.is_main,
        )

    def _refuse_nonfinite_gradient(self) -> None:
        """ZeRO stage 0 (fp32, bf16) has no skip path: stop before a non-finite gradient reaches the weights.

        Its gradients are already all-reduced when backward returns at the accumulation boundary,
        so every rank reaches the same verdict. (fp16 never gets here: its loss scaler skips.)
        """
        for param in self.engine.module.parameters():
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                raise FloatingPointError(
                    f"step {self.step + 1}: non-finite gradient under ZeRO stage 0, which cannot skip a "
                    f"step; the weights are untouched. Use ZeRO-1/2 (configs/deepspeed/zero2.json) to skip "
                    f"such steps instead (trainer.max_nonfinite_steps)"
                )

    def _log(
        self, mean_loss: torch.Tensor, skipped: int, steps: int, elapsed: float, data_wait: float, nonfinite: int
    ) -> dict:
        cfg = self.cfg
        loss = all_reduce_mean(mean_loss.float().reshape(1)).item()
        counts = [float(skipped), self.work["text_tokens"], self.work["flops"]]
        totals = all_reduce_sum(torch.tensor(counts, device=self.device, dtype=torch.float64)).tolist()
        skipped_all, text_tokens, flops = int(totals[0]), totals[1], totals[2]
        self.work = {"flops": 0.0, "text_tokens": 0.0}
        images = steps * cfg.data.batch_size_per_gpu * cfg.trainer.gradient_accumulation_steps * self.env.world_size
        seconds = max(elapsed, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "train/loss": loss,
            "train/lr": float(self.engine.get_lr()[0]),
            "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "data/skipped": skipped_all,
            "train/nonfinite_skipped": nonfinite,
            "perf/images_per_s": images / seconds,
            "perf/image_tokens_per_s": images * self.flops.image_tokens / seconds,
            "perf/text_tokens_per_s": text_tokens / seconds,
            "perf/model_tflop_per_s_per_gpu": flops / self.env.world_size / seconds / 1e12,
            "perf/data_wait_frac": data_wait / seconds,
            "train/samples_seen": self.samples_seen,
        }
        if self.peak_flops is not None:
            values["perf/mfu"] = flops / self.env.world_size / seconds / self.peak_flops
        if skipped_all and self.env.is_main:
            log.warning("skipped %d corrupt or incomplete samples in the last %d steps", skipped_all, steps)
        self.metrics.log(self.step, values)
        return values

    # ---------------------------------------------------------- checkpointing
    def save_checkpoint(self) -> Path:
        """Collective: DeepSpeed state on every rank, weights and records on rank 0 (common.checkpoint)."""
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "world_size": self.env.world_size,
            "seed": self.cfg.trainer.seed,
            "data_seed": self.data_seed,
            "nonfinite_total": self.guard.total,
            "ema_bytes_per_rank": 4 * self.ema.numel_per_rank,
            "init_from": self.parent_record,
            "time": time.time(),
        }
        ema = self._gathered_ema()
        return self.checkpoints.save(
            self.step,
            state,
            self.stream.state_dict(),
            write_main=lambda partial: self._write_weights(partial, ema),
            write_all=self._write_engine,
        )

    def _gathered_ema(self) -> dict[str, torch.Tensor] | None:
        """Collective: the full EMA on rank 0, gathered once per step (a grid and a checkpoint often share one).

        The training loop drops it at the end of the step, so no full copy outlives it.
        """
        if self._ema_gathered is None or self._ema_gathered[0] != self.step:
            self._ema_gathered = (self.step, self.ema.full_state_dict())
        return self._ema_gathered[1]

    def _write_engine(self, partial: Path) -> None:
        client_state = engine_checkpoint.universal_checkpoint_info()
        tag = engine_checkpoint.ENGINE_TAG
        self.engine.save_checkpoint(str(partial), tag=tag, client_state=client_state, save_latest=False)
        if self.env.is_main:
            engine_checkpoint.write_engine_latest(partial)  # <step>/latest -> "deepspeed": zero_to_fp32's defaults
            # save_checkpoint ends with a barrier: every rank's shards are final, hash them while
            # rank 0 writes the weights
            self.checkpoints.hash_soon(partial / engine_checkpoint.ENGINE_TAG)

    def _write_weights(self, partial: Path, ema: dict[str, torch.Tensor]) -> None:
        module = self.engine.module
        hashing = self.checkpoints.manifest_builder  # hashes each weights file from memory while the next is written
        ckpt.save_weights_folder(self.model_config, _with_buffers(ema, module), partial / "ema", hashing)
        raw = dict(module.named_parameters())
        ckpt.save_weights_folder(self.model_config, _with_buffers(raw, module), partial / "model", hashing)
        write_json_atomic(partial / "vae.json", _vae_spec(self.cfg).__dict__)

    # --------------------------------------------------------------- sampling
    def sample_grid(self) -> Path | None:
        """Rank 0 renders the validation prompts with the EMA weights to ``samples/<step>.png``."""
        prompts = load_val_prompts(self.cfg)
        if not prompts:
            return None
        out = None
        ema = self._gathered_ema() if self.cfg.sample.use_ema else None
        if self.env.is_main:
            from common.images import save_grid
            from fusedit.pipeline import DiTPipeline

            g = self.cfg.sample
            dit = model_class(self.model_config).from_config(self.model_config).to(self.device).eval()
            if ema is not None:
                copy_weights(_with_buffers(ema, self.engine.module), dit)  # + frozen weights (a FuseDiT's LLM)
            else:
                dit.load_state_dict(self.engine.module.state_dict())
            pipe = DiTPipeline(
                dit,
                self.parts.text_encoder,
                self.parts.codec,
                self.parts.flow.scheduler,
                max_prompt_length=self.cfg.data.max_prompt_length,
                clip=self.parts.clip,
            )
            images = pipe(
                prompts,
                height=g.height,
                width=g.width,
                num_inference_steps=g.num_steps,
                guidance_scale=g.cfg_scale,
                negative_prompt=g.negative_prompt,
                seed=g.seed,
                num_images_per_prompt=g.num_images_per_prompt,
            )
            out = preview_path(self.run_dir, self.step)
            save_grid(images, out, ncol=min(len(prompts), 8))
            self.metrics.log_image(self.step, "gen/images", out)
            del dit, pipe
        barrier()
        return out


def _with_buffers(params: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Complete ``params`` (trained weights) into a folder that loads on its own with from_pretrained.

    Adds the persistent buffers (e.g. the APE table) and the frozen parameters, which neither the
    optimizer nor the EMA holds: a FuseDiT's LLM when ``trainer.train_llm`` is false.
    """
    persistent = module.state_dict()
    out = dict(params)
    for name, buf in module.named_buffers():
        if name in persistent:
            out.setdefault(name, buf)
    for name, param in module.named_parameters():
        out.setdefault(name, param.detach())
    return out
