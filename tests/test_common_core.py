"""The shared core: import layering, the one seeding primitive, atomic writes, the checkpoint
writer both trainers use, stop-on-signal, and config checks that moved before start-up."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import CheckpointWriter, read_latest
from common.config import ConfigError
from common.files import write_json_atomic, write_with
from common.images import psnr
from common.randomness import MASK32, derive_seed, index_seed, noise_seed, sample_seed, step_seed
from common.signals import StopSignal

ROOT = Path(__file__).resolve().parents[1]


def _layers():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts" / "check_layers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Layering
# --------------------------------------------------------------------------------------------
def test_the_tree_keeps_its_layers() -> None:
    problems, arrows = _layers().check(ROOT)
    assert problems == []
    assert ("repae", "fusedit") not in arrows and ("fusedit", "repae") not in arrows
    assert not any(src == "common" for src, _ in arrows)
    assert ("repae", "common") in arrows and ("fusedit", "toyworld") in arrows


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_every_kind_of_violation(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "common/__init__.py": "",
            "common/a.py": "from fusedit.x import y\n",  # infrastructure importing a stage
            "fusedit/__init__.py": "",
            "fusedit/x.py": "y = 1\n\ndef f():\n    from repae.z import w  # a lazy import still counts\n",
            "repae/__init__.py": "",
            "repae/z.py": "from common.b import _hidden\nw = 2\n",
            "common/b.py": "from common import c\n_hidden = 0\n",
            "common/c.py": "from common.b import _hidden\n",  # b <-> c
        },
    )
    problems, _ = _layers().check(tmp_path)
    text = "\n".join(problems)
    assert "common/a.py:1: common may not import fusedit" in text
    assert "fusedit/x.py:4: fusedit may not import repae" in text
    assert "repae/z.py:1: private name(s) _hidden imported across packages" in text
    assert "import cycle: common.b -> common.c" in text
    assert "common/c.py" not in text.replace("import cycle", "")  # a private name inside one package is fine


# --------------------------------------------------------------------------------------------
# One seeding primitive
# --------------------------------------------------------------------------------------------
def test_cpu_generators_keep_32_bits_of_a_seed_which_is_why_every_seed_has_32() -> None:
    same = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (7, 7 + 2**32)]
    assert torch.equal(*same), "if torch starts using all 64 bits, the 32-bit rule can be relaxed"
    seeds = [sample_seed(1, 2, 3), step_seed(1, 0, 2, 3), noise_seed(1, 2, 3), index_seed(1, 3)]
    assert all(0 <= s <= MASK32 for s in seeds) and len(set(seeds)) == 4  # streams are separate


def test_seeds_are_distinct_within_a_stream_and_depend_only_on_their_key() -> None:
    seeds = [derive_seed(42, (1, 500_000), i) for i in range(200_000)]
    assert len(set(seeds)) == len(seeds)  # a bijection in the index
    assert derive_seed(42, (1, 7), 5) == derive_seed(42, (1, 7), 5)
    assert derive_seed(42, (1, 7), 5) != derive_seed(42, (1, 8), 5) != derive_seed(43, (1, 7), 5)


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    write_json_atomic(target, {"a": 1})

    def crash(tmp: Path) -> None:
        tmp.write_text('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_with(target, crash)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_write_with_keeps_a_suffix_a_library_insists_on(tmp_path: Path) -> None:
    import numpy as np

    out = write_with(tmp_path / "stats.npz", lambda tmp: np.savez(tmp, mu=np.zeros(2)), suffix=".npz")
    with np.load(out) as f:
        assert f["mu"].shape == (2,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]


# --------------------------------------------------------------------------------------------
# The checkpoint writer
# --------------------------------------------------------------------------------------------
def _save(writer: CheckpointWriter, step: int, fail: bool = False) -> None:
    def write_main(partial: Path) -> None:
        (partial / "weights.bin").write_bytes(bytes([step % 256]) * 8)
        if fail:
            raise RuntimeError("killed mid-save")

    writer.save(step, {"step": step, "world_size": 1}, {"position": step * 10}, write_main)


def test_checkpoint_writer_publishes_prunes_and_resumes(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path / "run", rank=0, is_main=True, keep=2)
    for step in (10, 20, 30):
        _save(writer, step)
    assert read_latest(writer.run_dir) == 30
    assert sorted(p.name for p in writer.run_dir.iterdir()) == ["20", "30", "latest"]
    assert writer.resume_step("latest") == 30 and writer.resume_step(None) is None
    assert writer.trainer_state(30) == {"step": 30, "world_size": 1}
    assert writer.data_state(30) == {"position": 300} and writer.data_states(30) == [{"position": 300}]
    assert writer.data_state(30, rank=1) is None  # one process wrote this checkpoint


def test_a_crash_during_a_save_never_touches_the_last_good_checkpoint(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path / "run", rank=0, is_main=True, keep=None)
    _save(writer, 10)
    with pytest.raises(RuntimeError, match="killed"):
        _save(writer, 20, fail=True)
    assert read_latest(writer.run_dir) == 10 and not (writer.run_dir / "20").exists()
    _save(writer, 20)  # the next save clears the leftover partial folder
    assert read_latest(writer.run_dir) == 20
    assert not list(writer.run_dir.glob(".*.partial"))


# --------------------------------------------------------------------------------------------
# Stop on a signal
# --------------------------------------------------------------------------------------------
def test_stop_signal_records_the_signal_and_agrees_on_it() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    try:
        stop = StopSignal()
        assert not stop.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1 and stop.agreed(torch.device("cpu"))
    finally:
        signal.signal(signal.SIGUSR1, before)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --------------------------------------------------------------------------------------------
# Images and config checks
# --------------------------------------------------------------------------------------------
def test_psnr_is_float64_inf_when_exact_and_clamps_the_reconstruction() -> None:
    x = torch.zeros(2, 3, 4, 4)
    y = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 3.0)])  # overshoot is clamped to 1
    values = psnr(x, y)
    assert values.dtype == torch.float64 and torch.isinf(values[0])
    assert values[1].item() == pytest.approx(10 * torch.log10(torch.tensor(4.0)).item())


def test_m_rope_head_dim_is_checked_with_the_config(tmp_path: Path) -> None:
    from fusedit.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {base: some/text-encoder, pos_embed: m-rope, head_dim: 18}\n"
        "vae: {pretrained_model_name_or_path: some/vae}\n"
        'data: {data_path: ["shards/train-{000..003}.tar"]}\n'
    )
    with pytest.raises(ConfigError, match=r"model\.head_dim: m-rope needs a multiple of 4, got 18"):
        load_config(cfg)
