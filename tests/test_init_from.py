"""The 512 px continuation stage: positions on a larger token grid, ``trainer.init_from``, its configs.

Fast unit tests first (position tables, config validation, the parent checks), then one toy
analogue of the 256 px -> 512 px schedule (32 px -> 64 px) through the real trainer, in process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common import checkpoint as ckpt
from common.config import ConfigError
from fusedit.config import check_geometry, load_config
from fusedit.models.dit import DiT
from fusedit.models.layers import PatchEmbed, rope_tables, sincos_2d_table
from fusedit.train.init_from import check_architecture, load_parent_weights, resolve_parent
from tests.test_dit import TINY  # the same tiny DiT as the model tests

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "e2e-vae"
TOY = CONFIGS / "toy.yaml"
VAES = ["fluxvae", "e2efluxvae", "sd3.5vae", "e2esd3.5vae", "qwenimagevae", "e2eqwenimagevae"]


# ------------------------------------------------------------------------- positions, larger grids
def test_ape_512_is_the_centred_crop_of_the_same_table():
    """3B geometry (64 x 64 table, base 16): 256 px crops 16 x 16 at 24, 512 px 32 x 32 at 16,
    token (r, c) sits at ((top + r) / 4, (left + c) / 4), and the 256 px grid is the centre of the 512 px one."""
    embed = PatchEmbed(4, 32, 2, ape_max_size=64, ape_base_size=32 // 2)
    table = sincos_2d_table(32, 64, 16)
    crop16, crop32 = embed.cropped_pos_embed(16, 16)[0], embed.cropped_pos_embed(32, 32)[0]
    for crop, side, top in ((crop16, 16, 24), (crop32, 32, 16)):
        rows = torch.arange(side).repeat_interleave(side) + top
        cols = torch.arange(side).repeat(side) + top
        torch.testing.assert_close(crop, table[rows * 64 + cols])
    centre = crop32.reshape(32, 32, -1)[8:24, 8:24].reshape(256, -1)
    torch.testing.assert_close(centre, crop16)  # the positions 256 px training saw, unchanged
    # coordinates: (top + r) / 4 along rows, first half of the channels encodes the column
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    grid = get_2d_sincos_pos_embed(32, 64, base_size=16, output_type="pt").float()
    torch.testing.assert_close(table, grid)


def test_ape_512_matches_the_reference_formulation():
    """Our DiT's patch embedding at 32 x 32 tokens == the reference's (fusedit.reference), same weights."""
    from fusedit.reference.reference_dit import RefPatchEmbed

    cfg = {"dit_hidden_size": 64, "patch_size": 2, "in_channels": 4, "pos_embed_max_size": 64}
    ref = RefPatchEmbed({**cfg, "pos_embed": "ape", "sample_size": 32})
    ours = PatchEmbed(4, 64, 2, ape_max_size=64, ape_base_size=16)
    ours.proj.load_state_dict(ref.proj.state_dict())
    torch.testing.assert_close(ours.pos_embed, ref.pos_embed)
    latent = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))  # 512 px / VAE x8
    torch.testing.assert_close(ours(latent), ref(latent))
    torch.testing.assert_close(ours(latent[..., 16:48, 16:48]), ref(latent[..., 16:48, 16:48]))  # 256 px


def test_rope_2d_positions_do_not_depend_on_the_grid_size():
    """2d-rope / m-rope: token (r, c) gets the same rotation on a 4x4 and an 8x8 grid (integer ids, no table).

    1d-rope numbers the flattened grid, so the same token moves when the width changes (documented)."""
    for kind in ("2d-rope", "m-rope"):
        small, big = rope_tables(kind, 4, 4, 16, 10000.0, "cpu"), rope_tables(kind, 8, 8, 16, 10000.0, "cpu")
        rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
        for s, b in zip(small, big):
            torch.testing.assert_close(s, b[rows * 8 + cols])
    cos4, _ = rope_tables("1d-rope", 4, 4, 16, 10000.0, "cpu")
    cos8, _ = rope_tables("1d-rope", 8, 8, 16, 10000.0, "cpu")
    assert not torch.equal(cos4[4], cos8[8])  # token (1, 0): position 4 vs 8


@pytest.mark.parametrize("pos_embed", ["ape", "1d-rope", "2d-rope", "m-rope"])
def test_weights_of_a_small_grid_load_and_sample_at_a_larger_one(pos_embed):
    """A DiT trained at 4x4 tokens loads strictly into one used at 8x8 (and 2x2): no position table is a
    parameter, RoPE tables are not in the state dict at all, and every grid up to the APE table's side runs."""
    torch.manual_seed(0)
    small = DiT(**TINY, pos_embed=pos_embed)
    assert not [n for n, _ in small.named_parameters() if "pos_embed" in n or "rope" in n or "rotary" in n]
    buffers = set(small.state_dict()) - {n for n, _ in small.named_parameters()}
    assert buffers == ({"patch_embed.pos_embed"} if pos_embed == "ape" else set())
    big = DiT(**TINY, pos_embed=pos_embed)
    big.load_state_dict(small.state_dict(), strict=True)
    text = torch.randn(1, 3, TINY["text_hidden_size"])
    for side in (4, 8, 16):  # latent sides: 2x2, 4x4 (training), 8x8 tokens
        out = big(torch.randn(1, 4, side, side), torch.tensor([500.0]), text)
        assert out.shape == (1, 4, side, side) and torch.isfinite(out).all()
    if pos_embed == "ape":
        with pytest.raises(ValueError, match="pos_embed_max_size"):
            big(torch.randn(1, 4, 18, 18), torch.tensor([500.0]), text)


MINIMAL = """
model: {base: some/text-encoder, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
        num_key_value_heads: 1, head_dim: 16, intermediate_size: 48, pos_embed_max_size: 8, sample_size: 8}
vae: {pretrained_model_name_or_path: some/vae}
data: {data_path: ["shards/train-{000..003}.tar"], resolution: 32}
sample: {height: 32, width: 32}
"""


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(MINIMAL)
    return p


def test_geometry_refuses_a_grid_larger_than_the_ape_table(minimal: Path):
    cfg = load_config(minimal, ["data.resolution=64", "sample.height=64", "sample.width=64"])
    check_geometry(cfg, 4)  # 64 px / 4 / patch 2 = 8 tokens = pos_embed_max_size
    with pytest.raises(ConfigError, match=r"data\.resolution: 128 px .* model\.pos_embed_max_size=8"):
        check_geometry(load_config(minimal, ["data.resolution=128"]), 4)
    with pytest.raises(ConfigError, match=r"sample\.height"):
        check_geometry(load_config(minimal, ["sample.height=128"]), 4)
    check_geometry(load_config(minimal, ["data.resolution=128", "model.pos_embed=2d-rope"]), 4)


# ------------------------------------------------------------------------------ init_from: config
def test_init_from_config_validation(minimal: Path):
    assert load_config(minimal).trainer.init_from is None
    cfg = load_config(minimal, ["trainer.init_from.checkpoint=output/a", "trainer.init_from.tag=500000"])
    assert (cfg.trainer.init_from.tag, cfg.trainer.init_from.weights) == ("500000", "ema")
    for override, field in (
        ("trainer.init_from.tag=last", r"trainer\.init_from\.tag"),
        ("trainer.init_from.weights=fp32", r"trainer\.init_from\.weights"),
        ("trainer.init_from.checkpoint=''", r"trainer\.init_from\.checkpoint"),
    ):
        with pytest.raises(ConfigError, match=field):
            load_config(minimal, ["trainer.init_from.checkpoint=output/a", override])
    with pytest.raises(ConfigError, match=r"trainer\.init_from\.checkpoint: required"):
        load_config(minimal, ["trainer.init_from.tag=5"])
    with pytest.raises(ConfigError, match=r"trainer\.init_from\.weightz"):
        load_config(minimal, ["trainer.init_from.checkpoint=a", "trainer.init_from.weightz=ema"])


def _parent(run: Path, step: int = 10, **kw) -> dict[str, torch.Tensor]:
    """A parent run folder holding one checkpoint's ema/ and model/ folders (random weights)."""
    torch.manual_seed(step)
    dit = DiT(**{**TINY, "text_hidden_size": 32, **kw})
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.1)
    state = dit.state_dict()
    config = json.loads(dit.to_json_string())
    for kind in ("ema", "model"):
        ckpt.save_weights_folder(config, state, ckpt.step_dir(run, step) / kind)
    (run / "latest").write_text(f"{step}\n")
    return state


def _child(minimal: Path, tmp_path: Path, *extra: str):
    overrides = [f"trainer.checkpoint_dir={tmp_path / 'child'}", f"trainer.init_from.checkpoint={tmp_path / 'parent'}"]
    return load_config(minimal, [*overrides, *extra])


def test_resolve_parent_checks_folder_tag_and_architecture(minimal: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"trainer\.init_from\.checkpoint: no run directory"):
        resolve_parent(_child(minimal, tmp_path))
    _parent(tmp_path / "parent", step=10)
    parent = resolve_parent(_child(minimal, tmp_path, "trainer.init_from.tag=latest", "data.resolution=64"))
    assert parent.step == 10 and parent.folder == tmp_path / "parent" / "10" / "ema"
    assert resolve_parent(_child(minimal, tmp_path, "trainer.init_from.weights=raw")).folder.name == "model"
    with pytest.raises(ConfigError, match=r"trainer\.init_from\.tag: 20: no checkpoint folder .*\[10\]"):
        resolve_parent(_child(minimal, tmp_path, "trainer.init_from.tag=20"))
    with pytest.raises(ConfigError, match=r"model\.hidden_size: 64, but the parent .* has 32"):
        resolve_parent(_child(minimal, tmp_path, "model.hidden_size=64"))
    with pytest.raises(ConfigError, match=r"model\.num_hidden_layers: 3"):
        resolve_parent(_child(minimal, tmp_path, "model.num_hidden_layers=3"))
    # under the APE, the table's base and side fix the positions the parent learned
    with pytest.raises(ConfigError, match=r"model\.sample_size: 16, .* has 8 \(under pos_embed=ape"):
        resolve_parent(_child(minimal, tmp_path, "model.sample_size=16"))
    with pytest.raises(ConfigError, match=r"model\.pos_embed_max_size"):
        resolve_parent(_child(minimal, tmp_path, "model.pos_embed_max_size=16"))
    (tmp_path / "parent" / "10" / "model" / ckpt.WEIGHTS_NAME).unlink()
    with pytest.raises(ConfigError, match=r"trainer\.init_from\.weights: 'raw': .* is missing"):
        resolve_parent(_child(minimal, tmp_path, "trainer.init_from.weights=raw"))


def test_a_damaged_parent_is_refused_naming_the_file(minimal: Path, tmp_path: Path):
    from common.manifest import write_manifest

    _parent(tmp_path / "parent", step=10)
    write_manifest(tmp_path / "parent" / "10")
    assert resolve_parent(_child(minimal, tmp_path)).step == 10
    weights = tmp_path / "parent" / "10" / "ema" / ckpt.WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit-pattern in the last tensor: same size, different hash
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"trainer\.init_from\.checkpoint: .*damaged: ema/diffusion_pytorch_model"):
        resolve_parent(_child(minimal, tmp_path))


def test_rope_parent_may_change_sample_size(minimal: Path, tmp_path: Path):
    _parent(tmp_path / "parent", pos_embed="2d-rope")
    cfg = _child(minimal, tmp_path, "model.pos_embed=2d-rope", "model.sample_size=16", "model.pos_embed_max_size=4")
    assert resolve_parent(cfg).step == 10
    with pytest.raises(ConfigError, match=r"model\.pos_embed: 'ape', but the parent .* has '2d-rope'"):
        resolve_parent(_child(minimal, tmp_path))


def test_a_run_with_checkpoints_resumes_instead(minimal: Path, tmp_path: Path):
    _parent(tmp_path / "parent")
    _parent(tmp_path / "child", step=3)  # the continuation already wrote a checkpoint: resume_from wins
    assert resolve_parent(_child(minimal, tmp_path)) is None
    assert resolve_parent(_child(minimal, tmp_path, "trainer.resume_from=null")).step == 10
    with pytest.raises(ConfigError, match="use trainer.resume_from"):
        resolve_parent(
            load_config(
                minimal,
                [
                    f"trainer.checkpoint_dir={tmp_path / 'parent'}",
                    f"trainer.init_from.checkpoint={tmp_path / 'parent'}",
                    "trainer.resume_from=null",
                ],
            )
        )


def test_load_parent_weights_copies_parameters_and_keeps_the_models_table(minimal: Path, tmp_path: Path):
    state = _parent(tmp_path / "parent")
    state["patch_embed.pos_embed"].add_(1.0)  # a parent table that differs is not loaded
    ckpt.save_weights_folder(
        {**json.loads((tmp_path / "parent/10/ema/config.json").read_text())}, state, tmp_path / "parent" / "10" / "ema"
    )
    parent = resolve_parent(_child(minimal, tmp_path))
    dit = DiT(**{**TINY, "text_hidden_size": 32})
    own_table = dit.patch_embed.pos_embed.clone()
    weights = load_parent_weights(parent, dit, json.loads(dit.to_json_string()))
    assert set(weights) == {n for n, _ in dit.named_parameters()}
    for name, p in dit.named_parameters():
        assert torch.equal(p, state[name]) and torch.equal(weights[name], state[name])
    assert torch.equal(dit.patch_embed.pos_embed, own_table)
    with pytest.raises(ConfigError, match=r"model\.in_channels \(as built from the VAE / text encoder\): 8"):
        load_parent_weights(parent, dit, {**json.loads(dit.to_json_string()), "in_channels": 8})


def test_check_architecture_ignores_initialisation_only_fields():
    base = {**TINY, "pos_embed": "ape", "initializer_range": 0.02}
    check_architecture({**base, "initializer_range": 0.05}, base, Path("p"))
    with pytest.raises(ConfigError, match=r"model\.patch_size"):
        check_architecture({**base, "patch_size": 1}, base, Path("p"))


# ------------------------------------------------------------------------------ the six 512 px configs
@pytest.mark.parametrize("vae", VAES)
def test_512_configs_continue_their_256_px_run(vae: str):
    parent_name = f"sa-w2048-3b-res256-{vae}-fulldataset-500k"
    parent, child = (load_config(CONFIGS / f"{n}.yaml") for n in (parent_name, f"sa-w2048-3b-res512-{vae}-200k"))
    assert child.trainer.run == f"sa-w2048-3b-res512-{vae}-200k" == Path(child.trainer.checkpoint_dir).name
    i = child.trainer.init_from
    assert (i.checkpoint, i.tag, i.weights) == (parent.trainer.checkpoint_dir, "500000", "ema")
    assert (child.data.resolution, child.sample.height, child.sample.width, child.trainer.max_steps) == (
        512,
        512,
        512,
        200_000,
    )
    assert child.data.batch_size_per_gpu * child.trainer.gradient_accumulation_steps * 32 == 448
    assert child.data.global_batch_size == 448 and parent.data.global_batch_size == 1024  # kept on any allocation
    assert child.model == parent.model and child.vae == parent.vae  # same DiT (and APE table), same VAE
    a, b = parent.to_dict(), child.to_dict()
    changed = {f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s][k]}
    assert changed == {
        "trainer.run",
        "trainer.checkpoint_dir",
        "trainer.max_steps",
        "trainer.init_from",
        "lr_scheduler.name",
        "lr_scheduler.num_warmup_steps",
        "data.batch_size_per_gpu",
        "data.global_batch_size",
        "data.resolution",
        "sample.height",
        "sample.width",
    }


def test_512_config_plans_without_the_parent(tmp_path: Path):
    from fusedit.tools.plan import build_plan, render

    cfg = load_config(CONFIGS / "sa-w2048-3b-res512-fluxvae-200k.yaml", [f"trainer.checkpoint_dir={tmp_path}"])
    plan = build_plan(cfg, world_size=32)
    assert (plan.tokens.image_tokens, plan.micro_batch, plan.tokens.latent_size) == (1024, 14, 64)
    assert plan.init_from["tag"] == "500000" and "Starts from: output/sa-w2048-3b-res256-fluxvae" in render(plan)
    peak = plan.memory[2].peak(False) / 2**30
    assert 60 < peak < 80, peak  # ~74 GiB: fits 80 GB GPUs only just (see the config's comment)
    assert plan.memory[2].peak(True) / 2**30 < 20


# ------------------------------------------------------------------- the toy analogue: 32 px -> 64 px
@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch):
    """One-process 'launch' environment for Trainer objects in this process; the group goes afterwards."""
    from common.distributed import _free_port, cleanup

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    yield
    cleanup()


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_toy_continuation_starts_from_the_parent_and_beats_scratch(quick_world: Path, tmp_path: Path, in_process):
    """32 px parent -> 64 px (a) init_from the parent, (b) from scratch; same seed and data.

    The table is 8 x 8 tokens with base 4 in all three runs (as the 3B's 64 x 64 with base 16): 32 px
    trains on its centred 4 x 4 crop, 64 px on all of it.
    """
    from fusedit.train.trainer import Trainer
    from tests.conftest import tiny_train_overrides

    def config(run: Path, **extra):
        common = {"model.pos_embed_max_size": 8, "trainer.checkpoints_total_limit": 1, "optimizer.lr": 3e-3}
        return load_config(TOY, tiny_train_overrides(quick_world, run, **common, **extra))

    parent_run = tmp_path / "parent"
    Trainer(config(parent_run, **{"trainer.max_steps": 30, "trainer.checkpointing_steps": 30})).train()
    parent = ckpt.load_weights(parent_run / "30" / "ema")

    at_64 = {
        "data.resolution": 64,
        "sample.height": 64,
        "sample.width": 64,
        "trainer.max_steps": 4,
        "trainer.checkpointing_steps": 4,
    }
    child_run, scratch_run = tmp_path / "child", tmp_path / "scratch"
    child = Trainer(config(child_run, **at_64, **{"trainer.init_from.checkpoint": str(parent_run)}))
    # step 0: the DiT, its EMA and ZeRO's fp32 masters hold the parent's EMA weights exactly
    ema = child.ema.full_state_dict()
    for name, p in child.engine.module.named_parameters():
        assert torch.equal(p.detach(), parent[name]) and torch.equal(ema[name], parent[name]), name
    masters = torch.cat([m.detach() for m in child.engine.optimizer.single_partition_of_fp32_groups])
    assert torch.equal(masters, torch.cat([s for s in child.ema.shadow]))
    assert child.step == 0 and child.parent_record["tag"] == 30
    child.train()
    Trainer(config(scratch_run, **at_64)).train()

    record = json.loads((child_run / "4" / "trainer_state.json").read_text())["init_from"]
    assert record["checkpoint"] == str(parent_run.resolve()) and (record["tag"], record["weights"]) == (30, "ema")
    assert json.loads((child_run / "init_from.json").read_text()) == record
    assert load_config(child_run / "config.yaml").trainer.init_from.checkpoint == str(parent_run)  # reloads
    first_child, first_scratch = _losses(child_run), _losses(scratch_run)
    print(f"toy 64 px losses: continued {first_child}, scratch {first_scratch}; parent {_losses(parent_run)[-4:]}")
    assert len(first_child) == len(first_scratch) == 4 and all(map(math.isfinite, first_child + first_scratch))
    assert sum(first_child) / 4 < 0.9 * sum(first_scratch) / 4
