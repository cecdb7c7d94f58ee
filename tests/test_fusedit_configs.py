"""The reference's FuseDiT ablation configs: ours, and theirs read through the alias table.

(a) every YAML of configs/fusedit/ and configs/baselinedit/ loads and validates; (b) each reference
ablation, written here in the reference's key layout from the facts of its file (not a copy of it),
loads through ``fusedit.config.ALIASES`` / ``FUSE_DIT_ALIASES`` with a notice per ignored key and gives
the same model and recipe as our file; (c) what we cannot honour is one error naming the key; (d) the
real-size parameter counts of our FuseDiT configs (meta-device builds) are those in
docs/fusedit-family.md. No weights are loaded and nothing touches the hub.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import ConfigError
from fusedit.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
FUSEDIT = ROOT / "configs" / "fusedit"
BASELINEDIT = ROOT / "configs" / "baselinedit"
OURS = sorted(FUSEDIT.glob("*.yaml")) + sorted(BASELINEDIT.glob("*.yaml"))
SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"

# The keys every reference ablation shares (its configs/fusedit/baseline.yaml), in its layout. The XLA
# trainer's and no-effect keys are here so that their notices can be checked.
REFERENCE_BASE: dict[str, Any] = {
    "trainer": {
        "cache_dir": "../.cache/torch_xla",
        "checkpoint_dir": "../output/512-Gemma-AdaLN-Zero-APE",
        "checkpointing_steps": 5000,
        "consolidation_steps": 50000,
        "enable_gradient_checkpointing": False,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "hard_skip_resume": False,
        "logging_steps": 100,
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "max_steps": 500_000,
        "mixed_precision": "bf16",
        "mode_scale": 1.29,
        "precondition_outputs": False,
        "project": "FuseDiT",
        "resume_from": None,
        "run": "512-Gemma-AdaLN-Zero-APE",
        "seed": 42,
        "train_dit": True,
        "train_llm": False,
        "weighting_scheme": "logit_normal",
    },
    "model": {
        "attention": "self",
        "base": "google/gemma-2b",
        "dit_num_hidden_layers": 18,
        "encoder_type": "llm",
        "name": "FuseDiT",
        "patch_size": 2,
        "pos_embed": "ape",
        "qk_norm": True,
        "sandwich_norm": False,
        "shared_attention_layers": "all",
        "timestep_conditioning": "adaln-zero",
    },
    "ema": {"decay": 0.99, "update_steps": 100},
    "vae": {"pretrained_model_name_or_path": SD3, "subfolder": "vae"},
    "noise_scheduler": {"pretrained_model_name_or_path": SD3, "subfolder": "scheduler"},
    "optimizer": {"lr": 1e-4, "weight_decay": 1e-4},
    "lr_scheduler": {"name": "constant", "num_warmup_steps": 0},
    "data": {
        "apply_chat_template": False,
        "batch_size": 16,
        "caption_column": {"original": "original_caption.txt", "synthetic": "synthetic_caption.txt"},
        "center_crop": True,
        "dataloader_num_workers": 32,
        "data_path": "../output/cc12m-recaptioned/cc12m-train-{0000..2175}.tar",
        "device_prefetch_size": 64,
        "image_column": "image.jpg",
        "instruction": "",
        "loader_prefetch_size": 64,
        "max_prompt_length": 256,
        "original_caption_rate": 0.0,
        "random_dropping_rate": 0.1,
        "resolution": 512,
        "tokenizer": "google/gemma-2b",
    },
}
IGNORED = (
    "trainer.cache_dir",
    "trainer.consolidation_steps",
    "trainer.hard_skip_resume",
    "data.device_prefetch_size",
    "data.loader_prefetch_size",
    "data.apply_chat_template",
)
_GEMMA_2 = {"model.base": "google/gemma-2-2b", "model.dit_num_hidden_layers": 26, "model.sandwich_norm": True}
_GEMMA_IT = {"model.base": "google/gemma-2b-it", "data.tokenizer": "google/gemma-2b-it"}
_NO_FUSION = {"model.shared_attention_layers": None, "trainer.train_dit": None, "trainer.train_llm": None}
# The clip-llm type (the reference's clip-mod.yaml): its clip_l section and data.tokenizer.{clip, llm}.
CLIP_MOD = {
    "model.encoder_type": "clip-llm",
    "model.text_modulation_embeds_dim": 768,
    "clip_l.pretrained_model_name_or_path": SD3,
    "clip_l.subfolder": "text_encoder",
    "data.tokenizer": None,
    "data.tokenizer.clip.pretrained_model_name_or_path": SD3,
    "data.tokenizer.clip.subfolder": "tokenizer",
    "data.tokenizer.llm": "google/gemma-2b",
}
# Each reference file: what it changes in REFERENCE_BASE (None deletes a key) -> our file.
REFERENCE: dict[str, dict[str, Any]] = {
    "fusedit/baseline": {},
    "fusedit/1d-rope": {"model.pos_embed": "1d-rope"},
    "fusedit/2d-rope": {"model.pos_embed": "2d-rope"},
    "fusedit/m-rope": {"model.pos_embed": "m-rope"},
    "fusedit/adaln-single": {"model.timestep_conditioning": "adaln-single"},
    "fusedit/addition": {"model.timestep_conditioning": "addition"},
    "fusedit/no-temb": {"model.timestep_conditioning": "null"},
    "fusedit/cross-attention": {"model.attention": "cross"},
    "fusedit/gemma-it": _GEMMA_IT,
    "fusedit/gemma-it-instruction": {**_GEMMA_IT, "data.instruction": "Imagine: "},
    "fusedit/hidden-size-1280": {"model.dit_hidden_size": 1280},
    "fusedit/hidden-size-1536": {"model.dit_hidden_size": 1536},
    "fusedit/hidden-size-1792": {"model.dit_hidden_size": 1792},
    "fusedit/layers-10": {
        "model.dit_num_hidden_layers": 10,
        "model.initial_layers": 4,
        "model.shared_attention_layers": list(range(4, 14)),
    },
    "fusedit/layers-14": {
        "model.dit_num_hidden_layers": 14,
        "model.initial_layers": 2,
        "model.shared_attention_layers": list(range(2, 16)),
    },
    "fusedit/paligemma": {"model.base": "google/paligemma-3b-pt-448", "data.tokenizer": "google/paligemma-3b-pt-448"},
    "fusedit/gemma-2": {**_GEMMA_2, "data.tokenizer": "google/gemma-2-2b"},
    "fusedit/large-scale": {
        **_GEMMA_2,
        "data.tokenizer": "google/gemma-2-2b",
        "model.pos_embed": "2d-rope",
        "model.timestep_conditioning": "null",
        "trainer.max_steps": 1_000_000,
        "data.data_path": "../output/cc12m-recaptioned/cc12m-train-{0000..2175}.tar"
        "::../output/sa1b/sa1b-train-{0000..1109}.tar::../output/journeydb/journeydb-train-{000..199}.tar",
    },
    "baselinedit/self-attention": {**_NO_FUSION, "model.name": "DiT", "model.text_hidden_states_index": -1},
    "baselinedit/cross-attention": {
        **_NO_FUSION,
        "model.name": "DiT",
        "model.text_hidden_states_index": -1,
        "model.attention": "cross",
        "trainer.validation_steps": "null",
    },
    "fusedit/clip-mod": CLIP_MOD,
}


def reference_yaml(tmp_path: Path, changes: dict[str, Any], name: str = "reference.yaml") -> Path:
    """REFERENCE_BASE with ``changes`` (dotted keys; None deletes, "null" writes a YAML null)."""
    tree = copy.deepcopy(REFERENCE_BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = None if value == "null" else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def load_with_notices(path: Path, caplog: pytest.LogCaptureFixture, overrides=None) -> tuple[TrainConfig, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.config"):
        cfg = load_config(path, overrides)
    return cfg, [r.getMessage() for r in caplog.records if r.name == "common.config"]


def science(cfg: TrainConfig) -> dict[str, Any]:
    """What a run's result depends on: the whole model section and the recipe (not paths, names, cadence)."""
    model = dataclasses.asdict(cfg.model)
    model["name"] = "FuseDiT" if cfg.model.is_fuse_dit else "baseline-dit"  # the reference says "DiT"
    for name in ("in_channels", "out_channels"):
        model[name] = model[name] or 16  # null = the VAE's latent channels: 16 for SD3's VAE
    t, d = cfg.trainer, cfg.data
    recipe = (
        "max_steps gradient_accumulation_steps gradient_clipping mixed_precision seed weighting_scheme "
        "logit_mean logit_std mode_scale precondition_outputs enable_gradient_checkpointing train_dit train_llm"
    )
    return {
        "model": model,
        "trainer": {name: getattr(t, name) for name in recipe.split()},
        "ema": dataclasses.asdict(cfg.ema),
        "optimizer": dataclasses.asdict(cfg.optimizer),
        "lr_scheduler": dataclasses.asdict(cfg.lr_scheduler),
        "vae": (cfg.vae.pretrained_model_name_or_path, cfg.vae.subfolder),
        "data": {
            **{
                name: getattr(d, name)
                for name in (
                    "batch_size_per_gpu",
                    "resolution",
                    "center_crop",
                    "image_column",
                    "original_caption_rate",
                    "random_dropping_rate",
                    "instruction",
                    "max_prompt_length",
                )
            },
            "caption_column": dataclasses.asdict(d.caption_column),
            "tokenizer": d.tokenizer or cfg.model.base,
            "clip_tokenizer": (d.clip_tokenizer, d.clip_tokenizer_subfolder),
            "shards": [Path(p).name for p in d.data_path],
        },
    }


# ------------------------------------------------------------------------------- (a) our files
@pytest.mark.parametrize("path", OURS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_our_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data.resolution == 512 and cfg.trainer.gradient_accumulation_steps == 1
    assert cfg.model.is_fuse_dit == (path.parent == FUSEDIT)
    assert cfg.data.text_cache is None  # a FuseDiT has no text features to cache
    assert "/PATH/TO/" not in "".join(cfg.data.data_path)


def test_every_reference_config_has_a_file_or_a_reason_in_the_docs() -> None:
    assert {f"{p.parent.name}/{p.stem}" for p in OURS} == set(REFERENCE)
    table = (ROOT / "docs" / "fusedit-family.md").read_text()
    for name in REFERENCE:
        assert f"`configs/{name}.yaml`" in table, name


# ------------------------------------------------------------------ (b) the reference's own layout
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_layout_loads_to_our_config(tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str) -> None:
    theirs, notices = load_with_notices(reference_yaml(tmp_path, REFERENCE[name]), caplog)
    ours = load_config(ROOT / "configs" / f"{name}.yaml")
    assert science(theirs) == science(ours)
    for key in IGNORED:
        assert sum(n.startswith(f"config: '{key}' is accepted and ignored") for n in notices) == 1, key
    assert "config: 'model.dit_num_hidden_layers' is accepted as 'model.num_hidden_layers'" in notices
    assert "config: 'data.batch_size' is accepted as 'data.batch_size_per_gpu' (per GPU" in "\n".join(notices)
    # the sizes the reference takes from its LLM's config, stated by one notice
    assert sum(n.startswith("config: reference layout (model.dit_num_hidden_layers): ") for n in notices) == 1
    assert any(n.startswith("config: data.data_path given as one string") for n in notices)
    if name.endswith("no-temb") or name.endswith("large-scale"):
        assert theirs.model.timestep_conditioning == "none"
        assert any("model.timestep_conditioning: null" in n for n in notices)
    assert len(notices) == len(set(notices))


def test_large_scale_reads_the_three_joined_datasets(tmp_path: Path) -> None:
    cfg = load_config(reference_yaml(tmp_path, REFERENCE["fusedit/large-scale"]))
    assert [Path(p).parent.name for p in cfg.data.data_path] == ["cc12m-recaptioned", "sa1b", "journeydb"]


def test_base_config_override_has_no_effect_on_a_fuse_dit(tmp_path: Path, caplog) -> None:
    """The reference's FuseDiT builder never reads it (only the baseline DiT's does): ignored, not mapped."""
    path = reference_yaml(tmp_path, {"model.base_config_override.hidden_size": 1280})
    cfg, notices = load_with_notices(path, caplog, ["model.base_config_override.vocab_size=7"])
    assert cfg.model.hidden_size == 2048 and cfg.model.intermediate_size == 16384
    for key in ("hidden_size", "vocab_size"):
        assert f"config: 'model.base_config_override.{key}' is accepted and ignored (no effect on a FuseDiT" in (
            "\n".join(notices)
        )
    # for the baseline DiT it still sets the DiT's sizes, as the reference fork's builder does
    base = reference_yaml(tmp_path, {**REFERENCE["baselinedit/self-attention"]}, "dit.yaml")
    dit = load_config(base, ["model.base_config_override.intermediate_size=8192"])
    assert (dit.model.intermediate_size, dit.model.num_attention_heads, dit.model.text_hidden_size) == (8192, 8, 2048)


def test_our_spelling_of_a_size_wins_over_the_llm_default(tmp_path: Path) -> None:
    cfg = load_config(reference_yaml(tmp_path, {}), ["model.intermediate_size=4096", "model.dit_hidden_size=1024"])
    assert (cfg.model.hidden_size, cfg.model.intermediate_size, cfg.model.head_dim) == (1024, 4096, 256)


# -------------------------------------------------------------------------------- (c) refusals
def test_the_clip_mod_ablation_maps_its_clip_sections(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reference's clip_l section and data.tokenizer.{clip, llm}: one notice per key, mapped onto our fields."""
    cfg, notices = load_with_notices(reference_yaml(tmp_path, CLIP_MOD), caplog)
    assert (cfg.model.clip_text_encoder, cfg.model.clip_text_encoder_subfolder) == (SD3, "text_encoder")
    assert (cfg.data.clip_tokenizer, cfg.data.clip_tokenizer_subfolder) == (SD3, "tokenizer")
    assert cfg.data.tokenizer == "google/gemma-2b" and cfg.model.encoder_type == "clip-llm"
    for old, new in (
        ("clip_l.pretrained_model_name_or_path", "model.clip_text_encoder"),
        ("clip_l.subfolder", "model.clip_text_encoder_subfolder"),
        ("data.tokenizer.clip.pretrained_model_name_or_path", "data.clip_tokenizer"),
        ("data.tokenizer.clip.subfolder", "data.clip_tokenizer_subfolder"),
    ):
        assert sum(n.startswith(f"config: '{old}' is accepted as '{new}'") for n in notices) == 1, old


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        (["clip_l.torch_dtype=float16"], "clip_l.torch_dtype"),  # from_pretrained arguments we do not read
        (["data.tokenizer.clip.use_fast=false"], "data.tokenizer.clip.use_fast"),
        (["clip_l.pretrained_model_name_or_path=null"], "model.clip_text_encoder"),  # width, no CLIP
        (["model.text_modulation_embeds_dim=null"], "model.text_modulation_embeds_dim"),  # CLIP, no width
        (["model.encoder_type=llm"], "model.encoder_type"),
        (["model.name=DiT", "model.text_modulation_embeds_dim=null"], "model.clip_text_encoder"),  # baseline
    ],
)
def test_clip_settings_that_do_not_go_together_are_one_error(tmp_path: Path, overrides, culprit: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(reference_yaml(tmp_path, CLIP_MOD), overrides)
    message = str(err.value)
    assert message.startswith(f"{culprit}: ") and "\n" not in message, message
    assert "; model." not in message and "; data." not in message, message  # one culprit, not a list


def test_an_llm_we_cannot_size_offline_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.base: 'google/gemma-7b': a reference YAML .*model\.hidden_size"):
        load_config(reference_yaml(tmp_path, {"model.base": "google/gemma-7b"}))
    # stated sizes need no table
    sizes = ["model.dit_hidden_size=3072", "model.intermediate_size=24576"]
    sizes += ["model.num_attention_heads=16", "model.num_key_value_heads=16", "model.head_dim=256"]
    assert load_config(reference_yaml(tmp_path, {"model.base": "google/gemma-7b"}), sizes).model.hidden_size == 3072


def test_a_data_path_that_is_not_patterns_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.data_path: a list of shard patterns"):
        load_config(reference_yaml(tmp_path, {"data.data_path": 7}))


# ------------------------------------------------------------------- (d) real-size parameter counts
GEMMA_2B_VOCAB, PALIGEMMA_VOCAB = 256_000, 257_216
# docs/fusedit-family.md, "The reference's ablation configs": DiT and LLM parameters of each FuseDiT file
COUNTS = {
    "baseline": (2_448_479_296, 2_506_172_416),
    "1d-rope": (2_448_479_296, 2_506_172_416),
    "2d-rope": (2_448_479_296, 2_506_172_416),
    "m-rope": (2_448_479_296, 2_506_172_416),
    "adaln-single": (2_012_283_968, 2_506_172_416),
    "addition": (1_986_880_576, 2_506_172_416),
    "no-temb": (1_982_157_888, 2_506_172_416),
    "cross-attention": (2_599_478_848, 2_506_172_416),
    "gemma-it": (2_448_479_296, 2_506_172_416),
    "gemma-it-instruction": (2_448_479_296, 2_506_172_416),
    "hidden-size-1280": (1_421_185_600, 2_506_172_416),
    "hidden-size-1536": (1_749_067_840, 2_506_172_416),
    "hidden-size-1792": (2_091_499_072, 2_506_172_416),
    "layers-10": (1_366_213_696, 2_065_754_112),
    "layers-14": (1_907_346_496, 2_285_963_264),
    "paligemma": (2_448_479_296, 2_508_662_784),
    "gemma-2": (2_869_825_088, 2_614_341_888),
    "large-scale": (2_024_828_480, 2_614_341_888),
    "clip-mod": (2_454_251_328, 2_506_172_416),  # the baseline + condition_embedder (768 -> 2048 -> 2048)
}


def llm_config(base: str) -> dict[str, Any]:
    from transformers import Gemma2Config, GemmaConfig

    from tests.test_fuse_dit import GEMMA2_2B, GEMMA_2B

    if base == "google/gemma-2-2b":
        return Gemma2Config(**GEMMA2_2B).to_dict()
    vocab = PALIGEMMA_VOCAB if "paligemma" in base else GEMMA_2B_VOCAB  # PaliGemma's decoder: Gemma-2B's
    return GemmaConfig(**{**GEMMA_2B, "vocab_size": vocab}).to_dict()


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts_of_our_fuse_dit_configs(name: str) -> None:
    from fusedit.models import fuse_dit_parameter_counts

    cfg = load_config(FUSEDIT / f"{name}.yaml")
    counts = fuse_dit_parameter_counts(dict(llm_config=llm_config(cfg.model.base), **cfg.fuse_dit_kwargs(16)))
    assert (counts["dit"], counts["llm"]) == COUNTS[name]


@pytest.mark.parametrize(("name", "count"), [("self-attention", 2_471_552_064), ("cross-attention", 2_622_556_224)])
def test_parameter_counts_of_our_baseline_dit_configs(name: str, count: int) -> None:
    import torch

    from fusedit.models.dit import DiT

    cfg = load_config(BASELINEDIT / f"{name}.yaml")
    with torch.device("meta"):
        model = DiT(**cfg.dit_kwargs(16, cfg.model.text_hidden_size))
    assert sum(p.numel() for p in model.parameters()) == count
