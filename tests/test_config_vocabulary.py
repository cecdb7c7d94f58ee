"""One config vocabulary across the two stages, and the old spellings that keep working.

(a) a reference Fuse-DiT YAML loads (one-to-one keys mapped, no-effect keys ignored with a notice);
(b) an old-style REPA-E YAML (``run:``, ``optim:``, ``data.batch_size``, ``data.shards``) loads into
the new fields with the same meaning; (c) a reference ``train_repae.py`` command line parses into
the same config values; (d) two spellings of one key are an error; (e) the same word means the
same thing in both schemas. No model is built.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from common.config import ConfigError, apply_aliases, resolve_alias_key, save_config
from fusedit.config import TrainConfig, load_config
from fusedit.train.deepspeed_config import load_deepspeed_json, resolve_deepspeed_config
from repae.config import ALIASES as REPAE_ALIASES
from repae.config import RepaeConfig, load_repae_config

VAL_PROMPTS = [
    "A pink plain background of a lion",
    "A photo of a golden retriever",
]


def _notices(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "common.config"]


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "shards" / "sa_000000.tar"
    path.parent.mkdir()
    path.write_bytes(b"")
    return path


# ------------------------------------------------------------------ (a) a reference Fuse-DiT YAML
def fusedit_reference_yaml(shard: Path, **extra: str) -> str:
    """The shared fields of the reference configs (T2I-1.2 in docs/reference-facts.md), as it spells them."""
    data_extra = "".join(f"  {k}: {v}\n" for k, v in extra.items())
    return f"""
trainer:
  cache_dir: ""
  checkpoint_dir: output/sa-w2048-3b-res256-fluxvae-fulldataset-500k
  checkpointing_steps: 50000
  consolidation_steps: 999999999999
  enable_gradient_checkpointing: false
  gradient_accumulation_steps: 1
  gradient_clipping: 1.0
  hard_skip_resume: false
  logging_steps: 100
  sampling_steps: 50000
  logit_mean: 0.0
  logit_std: 1.0
  mode_scale: 1.29
  max_steps: 500000
  mixed_precision: "bf16"
  precondition_outputs: false
  project: "FuseDiT"
  resume_from: "latest"
  run: sa-w2048-3b-res256-fluxvae-fulldataset-500k
  seed: 42
  validation_steps: null
  weighting_scheme: "logit_normal"
model:
  attention: self
  base: google/gemma-2b
  dit_num_hidden_layers: 30
  encoder_type: llm
  name: DiT
  in_channels: 16
  out_channels: 16
  sample_size: 32
  patch_size: 2
  pos_embed: ape
  qk_norm: true
  sandwich_norm: false
  text_hidden_states_index: -1
  timestep_conditioning: adaln-zero
  text_hidden_size: 2048
  base_config_override:
    hidden_activation: gelu_pytorch_tanh
    head_dim: 128
    hidden_size: 2048
    intermediate_size: 8192
    num_attention_heads: 16
    num_key_value_heads: 4
ema: {{decay: 0.9999, update_steps: 1}}
vae: {{pretrained_model_name_or_path: black-forest-labs/FLUX.1-dev, subfolder: vae}}
noise_scheduler:
  pretrained_model_name_or_path: stabilityai/stable-diffusion-3-medium-diffusers
  subfolder: scheduler
optimizer: {{lr: 1e-4, weight_decay: 1e-4}}
lr_scheduler: {{name: constant, num_warmup_steps: 0}}
data:
  apply_chat_template: false
  batch_size: 32
  caption_column: {{original: "", synthetic: txt}}
  center_crop: true
  dataloader_num_workers: 32
  device_prefetch_size: 64
  loader_prefetch_size: 64
  image_column: jpg
  instruction: ""
  max_prompt_length: 256
  original_caption_rate: 0.0
  random_dropping_rate: 0.1
  resolution: 256
  tokenizer: google/gemma-2b
  data_path: ["{shard.parent}/sa_{{000000..000000}}.tar"]
{data_extra}gen:
  model_type: baseline-dit
  H: 256
  W: 256
  n_samples: 1
  scale: 6
  steps: 25
  negative_prompt: null
  instruction: ""
  seed: 114514
  val_prompt: {VAL_PROMPTS!r}
"""


def test_reference_fusedit_yaml_loads_with_per_gpu_batch(tmp_path, shard, caplog) -> None:
    path = tmp_path / "reference.yaml"
    path.write_text(fusedit_reference_yaml(shard))
    with caplog.at_level(logging.WARNING, logger="common.config"):
        cfg = load_config(path)
    m = cfg.model
    assert (m.num_hidden_layers, m.hidden_size, m.head_dim, m.intermediate_size) == (30, 2048, 128, 8192)
    assert (m.num_attention_heads, m.num_key_value_heads, m.hidden_act) == (16, 4, "gelu_pytorch_tanh")
    assert cfg.data.batch_size_per_gpu == 32 and cfg.data.dataloader_num_workers == 32
    ds = resolve_deepspeed_config(load_deepspeed_json(None), cfg, world_size=32)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["train_batch_size"] == 1024  # 4 nodes x 8 GPUs
    assert cfg.sample.prompts == VAL_PROMPTS and cfg.trainer.max_steps == 500_000

    notices = _notices(caplog)
    assert len(notices) == len(set(notices))  # one line per spelling
    assert "config: 'data.batch_size' is accepted as 'data.batch_size_per_gpu' (per GPU" in "\n".join(notices)
    assert "config: 'model.dit_num_hidden_layers' is accepted as 'model.num_hidden_layers'" in notices
    assert "config: 'model.base_config_override.hidden_activation' is accepted as 'model.hidden_act'" in notices
    for ignored in (
        "trainer.cache_dir",
        "trainer.consolidation_steps",
        "trainer.validation_steps",
        "trainer.hard_skip_resume",
        "data.device_prefetch_size",
        "data.loader_prefetch_size",
        "data.apply_chat_template",
        "gen.model_type",
        "gen.instruction",
    ):
        assert sum(n.startswith(f"config: '{ignored}' is accepted and ignored") for n in notices) == 1, ignored
    for old, new in (("gen.H", "sample.height"), ("gen.val_prompt", "sample.prompts"), ("gen.seed", "sample.seed")):
        assert f"config: '{old}' is accepted as '{new}'" in notices
    # ignored keys, batch, depth, the six base_config_override keys, the eight gen.* -> sample.* keys
    assert len(notices) == 9 + 1 + 1 + 6 + 8


@pytest.mark.parametrize("key", ["trainer.hard_skip_resume", "data.apply_chat_template"])
def test_reference_switches_we_do_not_support_are_errors(tmp_path, shard, key) -> None:
    path = tmp_path / "reference.yaml"
    path.write_text(fusedit_reference_yaml(shard))
    with pytest.raises(ConfigError, match=rf"{key}: true is not supported"):
        load_config(path, [f"{key}=true"])


def test_unmapped_base_config_override_key_is_an_error(tmp_path, shard) -> None:
    path = tmp_path / "reference.yaml"
    path.write_text(fusedit_reference_yaml(shard))
    with pytest.raises(ConfigError, match=r"model\.base_config_override\.vocab_size: .*not supported"):
        load_config(path, ["model.base_config_override.vocab_size=1000"])


# ------------------------------------------------------------------ (b) an old-style REPA-E YAML
OLD_REPAE = """
run:
  exp_name: old-run
  output_dir: {root}/exps
  seed: 3
  max_train_steps: 1234
  mixed_precision: "no"
optim:
  sit_lr: 2.0e-4
  max_grad_norm: 0.5
data:
  shards: ["{root}/shards/sa_{{000000..000000}}.tar"]
  batch_size: 64
  num_workers: 2
"""


def test_old_repae_yaml_loads_into_the_new_fields(tmp_path, shard, caplog) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(OLD_REPAE.format(root=tmp_path))
    with caplog.at_level(logging.WARNING, logger="common.config"):
        cfg = load_repae_config(path)
    t = cfg.trainer
    assert (t.run, t.seed, t.max_steps, t.gradient_clipping, t.mixed_precision) == ("old-run", 3, 1234, 0.5, "no")
    assert cfg.run_dir == tmp_path / "exps" / "old-run"  # output_dir / exp_name, as before
    assert cfg.optimizer.sit_lr == 2e-4 and cfg.optimizer.vae_lr == 1e-4
    assert cfg.data.global_batch_size == 64  # the global batch, as data.batch_size always was here
    assert cfg.data.data_path == [f"{tmp_path}/shards/sa_{{000000..000000}}.tar"]
    assert cfg.data.dataloader_num_workers == 2
    notices = _notices(caplog)
    assert "config: 'run.max_train_steps' is accepted as 'trainer.max_steps'" in notices
    assert "config: 'optim.max_grad_norm' is accepted as 'trainer.gradient_clipping'" in notices
    assert "config: 'optim.sit_lr' is accepted as 'optimizer.sit_lr'" in notices
    assert any(n.startswith("config: 'data.batch_size' is accepted as 'data.global_batch_size' (") for n in notices)
    assert any("global" in n for n in notices if "'data.batch_size'" in n)
    assert len(notices) == len(set(notices)) == 10  # one per key of the old YAML

    # The run name still moves the run directory, given in either spelling.
    assert load_repae_config(path, ["trainer.run=renamed"]).run_dir == tmp_path / "exps" / "renamed"
    assert load_repae_config(path, ["run.exp_name=renamed"]).run_dir == tmp_path / "exps" / "renamed"


def test_saved_repae_config_uses_the_new_names_and_old_runs_still_read(tmp_path, shard) -> None:
    from repae.checkpoint import run_config

    old = tmp_path / "old.yaml"
    old.write_text(OLD_REPAE.format(root=tmp_path))
    cfg = load_repae_config(old)
    new = tmp_path / "new" / "config.yaml"
    new.parent.mkdir()
    save_config(cfg, new)
    text = new.read_text()
    assert "trainer:" in text and "optimizer:" in text and "global_batch_size: 64" in text
    assert "\nrun:" not in text and "optim:" not in text and "shards:" not in text
    assert load_repae_config(new) == cfg

    # A run folder written before the rename reads back in the new vocabulary.
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.yaml").write_text(OLD_REPAE.format(root=tmp_path))
    read = run_config(run)
    assert read["trainer"]["max_steps"] == 1234 and read["trainer"]["checkpoint_dir"] == f"{tmp_path}/exps/old-run"
    assert read["data"]["global_batch_size"] == 64 and "run" not in read and "optim" not in read


def test_shipped_repae_configs_use_the_new_names() -> None:
    root = Path(__file__).resolve().parents[1] / "configs" / "repae"
    for path in sorted(root.glob("*.yaml")):
        text = path.read_text()
        for old in ("\nrun:", "\noptim:", "exp_name:", "max_train_steps:", "max_grad_norm:", "shards:", " batch_size:"):
            assert old not in text, (path.name, old)


# --------------------------------------------------------- (c) a reference train_repae.py command line
def test_reference_command_line_parses_into_the_config(tmp_path, shard, caplog) -> None:
    from repae.train import parse_args

    vae_ckpt = tmp_path / "sdvae-f8d4.pt"
    vae_ckpt.write_bytes(b"")
    argv = [
        "--exp-name",
        "sit-xl-repae",
        "--output-dir",
        str(tmp_path / "exps"),
        "--max-train-steps",
        "400000",
        "--batch-size=256",
        "--vae",
        "f8d4",
        "--vae-ckpt",
        str(vae_ckpt),
        "--enc-type",
        "dinov2-vit-b,mocov3-vit-b",
        "--proj-coeff",
        "0.5",
        "--vae-align-proj-coeff=1.5",
        "--encoder-depth",
        "8",
        "--bn-momentum",
        "0.1",
        "--no-compile",
        "--qk-norm",
        "--mixed-precision",
        "fp16",
        "--learning-rate",
        "2e-4",
        "--adam-beta2",
        "0.95",
        "--max-grad-norm",
        "0.5",
        "--prediction",
        "v",
        "--seed",
        "7",
        "--report-to",
        "wandb",
        f'data.data_path=["{shard}"]',
    ]
    with caplog.at_level(logging.WARNING, logger="common.config"):
        args = parse_args(argv)
        cfg = load_repae_config(args.config, args.overrides)
    assert args.config is None  # -c is optional: schema defaults + flags
    t = cfg.trainer
    assert (t.run, t.max_steps, t.compile, t.mixed_precision, t.gradient_clipping) == (
        "sit-xl-repae",
        400_000,
        False,
        "fp16",
        0.5,
    )
    assert (t.seed, t.report_to) == (7, ["wandb"])
    assert cfg.run_dir == tmp_path / "exps" / "sit-xl-repae"
    assert cfg.data.global_batch_size == 256 and cfg.data.data_path == [str(shard)]
    assert cfg.vae.pretrained_model_name_or_path == "f8d4" and cfg.vae.checkpoint == str(vae_ckpt)
    assert cfg.encoder.types == ["dinov2-vit-b", "mocov3-vit-b"]
    assert (cfg.loss.proj_coeff, cfg.loss.vae_align_proj_coeff) == (0.5, 1.5)
    assert (cfg.model.encoder_depth, cfg.model.bn_momentum, cfg.model.qk_norm) == (8, 0.1, True)
    assert cfg.optimizer.sit_lr == 2e-4 and cfg.optimizer.betas == [0.9, 0.95]
    notices = _notices(caplog)
    assert "config: '--max-train-steps 400000' is accepted as 'trainer.max_steps=400000'" in notices
    assert "config: '--no-compile' is accepted as 'trainer.compile=false'" in notices
    assert any(n.startswith("config: '--prediction v' is accepted and ignored") for n in notices)
    assert len([n for n in notices if "'--" in n]) == 20  # one line per flag


def test_reference_flags_also_work_with_a_yaml(tmp_path, shard) -> None:
    from repae.train import parse_args

    root = Path(__file__).resolve().parents[1]
    args = parse_args(
        ["-c", str(root / "configs/repae/toy.yaml"), "--exp-name", "again", f'data.data_path=["{shard}"]']
    )
    cfg = load_repae_config(args.config, args.overrides)
    assert cfg.trainer.run == "again" and cfg.run_dir == Path("output/repae/again")  # the YAML's dir pattern
    assert cfg.data.global_batch_size == 32  # from the YAML


@pytest.mark.parametrize(
    ("argv", "named", "instead"),
    [
        (["--data-dir", "data"], "--data-dir", "data.data_path"),
        (["--loss-cfg-path=configs/l1_lpips_kl_gan.yaml"], "--loss-cfg-path", "loss."),
        (["--epochs", "80"], "--epochs", "trainer.max_steps"),
        (["--resume-step", "50000"], "--resume-step", "trainer.resume_from"),
        (["--continue-train-exp-dir", "exps/x"], "--continue-train-exp-dir", "trainer.resume_from"),
        (["--prediction", "eps"], "--prediction", "'v'"),
        (["--vae-latents-name", "e2e-vavae"], "--vae-latents-name", "data.latent_cache"),
        (["--max-train-steps", "many"], "--max-train-steps", "integer"),
    ],
)
def test_unsupported_reference_flag_is_an_error_naming_it(argv, named, instead, capsys) -> None:
    from repae.flags import translate_reference_flags
    from repae.train import parse_args

    with pytest.raises(ConfigError, match=named) as err:
        translate_reference_flags(argv)
    assert instead in str(err.value)
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2 and named in capsys.readouterr().err


def test_flag_and_override_for_one_key_is_an_error(capsys) -> None:
    from repae.train import parse_args

    for override in ("trainer.max_steps=5", "run.max_train_steps=5"):
        with pytest.raises(SystemExit):
            parse_args(["--max-train-steps", "400000", override])
        err = capsys.readouterr().err
        assert "--max-train-steps" in err and override in err


def test_help_lists_the_reference_flags(capsys) -> None:
    from repae.train import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    for text in ("--max-train-steps", "trainer.max_steps", "--batch-size", "data.global_batch_size", "--data-dir"):
        assert text in out


# ------------------------------------------------------------------ (d) two spellings of one key
def test_both_spellings_in_one_yaml_are_an_error(tmp_path, shard) -> None:
    p = tmp_path / "both.yaml"
    p.write_text(fusedit_reference_yaml(shard, batch_size_per_gpu="16"))
    with pytest.raises(ConfigError, match=r"data\.batch_size_per_gpu: given twice.*'data\.batch_size'"):
        load_config(p)

    r = tmp_path / "both-repae.yaml"
    r.write_text(OLD_REPAE.format(root=tmp_path) + "trainer:\n  max_steps: 10\n")
    with pytest.raises(ConfigError, match=r"run\.max_train_steps") as err:
        load_repae_config(r)
    assert "trainer.max_steps" in str(err.value)


def test_both_spellings_in_the_overrides_are_an_error(tmp_path, shard) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(OLD_REPAE.format(root=tmp_path))
    with pytest.raises(ConfigError, match=r"'data\.shards'.*'data\.data_path'|'data\.data_path'.*'data\.shards'"):
        load_repae_config(path, [f'data.shards=["{shard}"]', f'data.data_path=["{shard}"]'])
    with pytest.raises(ConfigError, match=r"trainer\.checkpoint_dir: given twice"):
        load_repae_config(path, ["run.output_dir=a", "trainer.checkpoint_dir=b"])
    # One spelling in the YAML, the other as an override: the override wins, as any override does.
    assert load_repae_config(path, ["trainer.max_steps=7"]).trainer.max_steps == 7
    # The same spelling twice: the last one wins (no conflict).
    assert load_repae_config(path, ["data.batch_size=8", "data.batch_size=16"]).data.global_batch_size == 16


def test_alias_helpers() -> None:
    assert resolve_alias_key("run.max_train_steps", REPAE_ALIASES) == "trainer.max_steps"
    assert resolve_alias_key("run.seed", REPAE_ALIASES) == "trainer.seed"
    assert resolve_alias_key("optim.betas", REPAE_ALIASES) == "optimizer.betas"
    assert resolve_alias_key("loss.proj_coeff", REPAE_ALIASES) == "loss.proj_coeff"
    notices: list[str] = []
    tree = apply_aliases({"run": {"output_dir": "x", "exp_name": "n"}}, REPAE_ALIASES, notices=notices)
    assert tree == {"trainer": {"checkpoint_dir": "x/${trainer.run}", "run": "n"}} and len(notices) == 2


# ------------------------------------------------------------ (e) the same word means the same thing
def _fields(cls: type, prefix: str = "") -> dict[str, type]:
    out: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else None
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        value = factory() if factory is not None else None
        if dataclasses.is_dataclass(value):
            out.update(_fields(type(value), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = kind
    return out


def test_both_schemas_share_the_vocabulary() -> None:
    fusedit, repae = _fields(TrainConfig), _fields(RepaeConfig)
    shared = (
        "trainer.run",
        "trainer.checkpoint_dir",
        "trainer.max_steps",
        "trainer.gradient_clipping",
        "trainer.seed",
        "trainer.checkpointing_steps",
        "trainer.checkpoints_total_limit",
        "trainer.logging_steps",
        "trainer.sampling_steps",
        "trainer.resume_from",
        "trainer.mixed_precision",
        "trainer.compile",
        "trainer.report_to",
        "trainer.project",
        "optimizer.betas",
        "optimizer.weight_decay",
        "optimizer.eps",
        "data.data_path",
        "data.resolution",
        "data.dataloader_num_workers",
        "ema.decay",
    )
    for key in shared:
        assert key in fusedit and key in repae, key
    assert "data.batch_size_per_gpu" in fusedit and "data.global_batch_size" in repae
    for schema in (fusedit, repae):
        assert not any(k.split(".")[-1] == "batch_size" for k in schema)  # a batch always says its scope
        assert not any(k.split(".")[0] in ("run", "optim") for k in schema)
    assert TrainConfig().trainer.checkpoint_dir == "output/${trainer.run}"
    assert RepaeConfig().trainer.checkpoint_dir == "exps/${trainer.run}"


def test_the_shared_trainer_fields_are_declared_once() -> None:
    """Both ``trainer`` sections extend common.config.SharedTrainer; a stage that redeclares a
    shared field (another default) is one of the listed ones, each with its reason in the schema."""
    from common.config import SharedTrainer
    from fusedit.config import TrainerConfig
    from repae.config import TrainerSection

    shared = {f.name: f for f in dataclasses.fields(SharedTrainer)}
    assert len(shared) == 15

    def redeclared(section: type) -> set[str]:
        own = {f.name: f for f in dataclasses.fields(section)}
        assert shared.keys() <= own.keys()
        return {n for n in shared if section.__dataclass_fields__[n] is not SharedTrainer.__dataclass_fields__[n]}

    assert redeclared(TrainerConfig) == {"project"}
    assert redeclared(TrainerSection) == {
        "run",
        "project",
        "checkpoint_dir",
        "max_steps",
        "seed",
        "checkpoints_total_limit",
        "sampling_steps",
        "report_to",
    }
