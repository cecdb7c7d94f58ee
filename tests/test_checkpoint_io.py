"""Checkpoint publishing and EMA: a kill never leaves `latest` pointing at a broken tag."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common import checkpoint as ckpt
from common.config import ConfigError
from fusedit.train.ema import EMA


def _fake_save(run: Path, step: int) -> None:
    part = ckpt.partial_dir(run, step)
    part.mkdir(parents=True)
    (part / "trainer_state.json").write_text(f'{{"step": {step}}}')


def test_publish_then_latest(tmp_path: Path) -> None:
    _fake_save(tmp_path, 10)
    ckpt.publish(tmp_path, 10)
    assert ckpt.read_latest(tmp_path) == 10
    assert not ckpt.partial_dir(tmp_path, 10).exists()


def test_killed_save_keeps_previous_latest(tmp_path: Path) -> None:
    _fake_save(tmp_path, 10)
    ckpt.publish(tmp_path, 10)
    _fake_save(tmp_path, 20)  # killed before publish: only the partial folder exists
    assert ckpt.read_latest(tmp_path) == 10
    assert ckpt.resolve_resume(tmp_path, "latest") == 10
    ckpt.clean_partials(tmp_path)
    assert not ckpt.partial_dir(tmp_path, 20).exists()


def test_latest_pointing_at_missing_tag_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "latest").write_text("30\n")
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        ckpt.read_latest(tmp_path)


def test_republish_same_step_and_prune(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _fake_save(tmp_path, step)
        ckpt.publish(tmp_path, step)
    _fake_save(tmp_path, 30)
    ckpt.publish(tmp_path, 30)
    assert ckpt.prune(tmp_path, keep=2) == [10]
    assert ckpt.list_steps(tmp_path) == [20, 30]
    assert ckpt.resolve_resume(tmp_path, "20") == 20
    with pytest.raises(ConfigError, match="trainer.resume_from=10: no checkpoint folder"):
        ckpt.resolve_resume(tmp_path, "10")


def test_prune_killed_mid_delete_leaves_no_half_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill while a pruned folder is deleted must not leave a "<step>/" that list_steps counts."""
    for step in (10, 20, 30):
        _fake_save(tmp_path, step)
        ckpt.publish(tmp_path, step)

    def killed(path, ignore_errors=False):  # the delete dies half-way: one file gone, then the kill
        if not Path(path).exists():
            return
        victim = next(p for p in Path(path).rglob("*") if p.is_file())
        victim.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(tmp_path, keep=2)
    monkeypatch.undo()
    assert ckpt.list_steps(tmp_path) == [20, 30] and ckpt.read_latest(tmp_path) == 30
    ckpt.clean_partials(tmp_path)  # what the next save does first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_weights_folder_roundtrip_is_safetensors(tmp_path: Path) -> None:
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5.0)}
    ckpt.save_weights_folder({"_class_name": "X"}, state, tmp_path / "w")
    back = ckpt.load_weights(tmp_path / "w")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("chunk_numel", [1 << 26, 5])
def test_ema_fused_update_matches_formula(chunk_numel: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ema = EMA(model, decay=0.9, chunk_numel=chunk_numel)
    assert len(ema.groups) == (1 if chunk_numel > 100 else 4)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p.detach()
        torch.testing.assert_close(ema.state_dict()[name], expected)
    target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ema.copy_to(target)
    for name, p in target.named_parameters():
        torch.testing.assert_close(p.detach(), ema.state_dict()[name])
