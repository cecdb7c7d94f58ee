"""Verified checkpoints: manifests, resume fallback, loaders' checks, a failed save, the verify CLI.

Every test drives :class:`common.checkpoint.CheckpointWriter` (or the loaders) directly, with a
fake ``write_main`` in one process; no training run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import checkpoint as ckpt
from common.config import ConfigError
from common.manifest import MANIFEST, ManifestBuilder, add_to_manifest, read_manifest, write_manifest
from common.verify import main as verify_main
from fusedit.train import engine_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EMA = "ema/" + ckpt.WEIGHTS_NAME


def _writer(run: Path, **kw) -> ckpt.CheckpointWriter:
    return ckpt.CheckpointWriter(run, rank=0, is_main=True, keep=kw.pop("keep", None), barrier=lambda: None, **kw)


def _save(writer: ckpt.CheckpointWriter, step: int) -> Path:
    """A tag like the text-to-image trainer's: weights folders (one handed over early), records."""

    def write_main(partial: Path) -> None:
        g = torch.Generator().manual_seed(step)
        state = {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}
        ckpt.save_weights_folder({"_class_name": "DiT"}, state, partial / "ema", writer.manifest_builder)
        ckpt.save_weights_folder({"_class_name": "DiT"}, state, partial / "model", writer.manifest_builder)
        (partial / "deepspeed").mkdir()
        (partial / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * step)
        writer.hash_soon(partial / "deepspeed")
        (partial / "vae.json").write_text('{"name": "toy"}\n')

    return writer.save(step, {"step": step, "world_size": 1}, {"position": step}, write_main)


def _damage(folder: Path, how: str) -> None:
    target = folder / EMA
    if how == "flipped byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:-7])
    else:
        target.unlink()


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.mark.parametrize("workers", [1, 4])  # 4: files handed over are hashed while the rest is written
def test_every_tag_gets_a_manifest_of_all_its_files(tmp_path: Path, workers: int) -> None:
    folder = _save(_writer(tmp_path / "run", hash_workers=workers), 10)
    manifest = read_manifest(folder)
    listed = manifest["files"]
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(listed) == [p for p in on_disk if p != MANIFEST]
    assert {EMA, "model/config.json", "vae.json", "trainer_state.json", "data_state_rank0.json"} <= set(listed)
    for rel, entry in listed.items():
        data = (folder / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["total_bytes"] == sum(e["size"] for e in listed.values())
    result = ckpt.verify_tag(folder)
    assert result.ok and result.has_manifest and result.files == len(listed)


def test_a_file_changed_after_it_was_handed_over_is_hashed_again(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"first")
    with ManifestBuilder(tmp_path, workers=2, overlap=True) as builder:
        builder.add(tmp_path / "a.bin")
        builder._jobs["a.bin"].result()
        (tmp_path / "a.bin").write_bytes(b"second, longer")
        manifest = builder.finish()
    assert manifest["files"]["a.bin"]["sha256"] == hashlib.sha256(b"second, longer").hexdigest()


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "missing"])
def test_resume_skips_a_damaged_tag_and_falls_back_to_the_newest_that_verifies(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    writer = _writer(tmp_path / "run")
    for step in (10, 20, 30):
        _save(writer, step)
    _damage(writer.folder(30), how)
    expected = {"flipped byte": "SHA-256 differs", "truncated": "bytes, the manifest says", "missing": "missing"}[how]
    problems = ckpt.verify_tag(writer.folder(30)).problems
    assert problems == [f"{EMA}: {problems[0].split(': ', 1)[1]}"] and expected in problems[0]
    with caplog.at_level(logging.WARNING, logger="common.checkpoint"):
        assert writer.resume_step("latest") == 20
    assert f"{writer.folder(30)} is damaged, skipped: {EMA}" in _warnings(caplog)
    # an explicit step that fails: one clear line naming the file (train.py prints "error: ..." and exits 2)
    with pytest.raises(ConfigError, match=rf"trainer.resume_from=30: checkpoint .* is damaged: {EMA}") as err:
        writer.resume_step("30")
    assert "\n" not in str(err.value)
    assert writer.resume_step("20") == 20


def test_latest_naming_a_missing_tag_falls_back_with_a_warning(tmp_path: Path, caplog) -> None:
    writer = _writer(tmp_path / "run")
    for step in (10, 20):
        _save(writer, step)
    (writer.run_dir / "latest").write_text("30\n")
    with caplog.at_level(logging.WARNING, logger="common.checkpoint"):
        assert ckpt.resolve_resume(writer.run_dir, "latest") == 20
    assert "names tag '30', which is not a checkpoint folder" in _warnings(caplog)
    (writer.run_dir / "latest").write_text("15\n")  # only older tags are candidates
    assert ckpt.resolve_resume(writer.run_dir, "latest") == 10
    (writer.run_dir / "latest").write_text("5\n")
    with pytest.raises(ConfigError, match="no checkpoint in .* verifies .*missing tag '5'"):
        ckpt.resolve_resume(writer.run_dir, "latest")
    with pytest.raises(ConfigError, match="trainer.resume_from=40: no checkpoint folder"):
        ckpt.resolve_resume(writer.run_dir, "40")


def test_tags_written_before_manifests_are_accepted_with_a_warning(tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    legacy = _writer(run, manifest=False)
    for step in (10, 20):
        _save(legacy, step)
    assert not (run / "20" / MANIFEST).exists()
    with caplog.at_level(logging.WARNING, logger="common.checkpoint"):
        assert ckpt.resolve_resume(run, "latest") == 20
    assert "has no manifest.json (written before manifests)" in _warnings(caplog)
    result = ckpt.verify_tag(run / "20")
    assert result.ok and not result.has_manifest
    # from the first tag with a manifest on, a later tag without one has lost it
    _save(_writer(run), 30)
    _save(_writer(run), 40)
    (run / "40" / MANIFEST).unlink()
    assert ckpt.verify_tag(run / "40").problems == [f"{MANIFEST}: missing (older tags of this run have one)"]
    assert ckpt.resolve_resume(run, "latest") == 30
    assert ckpt.resolve_resume(run, "latest", verify=False) == 40  # existence only: no hashing


def test_loaders_check_only_the_files_they_read(tmp_path: Path) -> None:
    from fusedit.pipeline import DiTPipeline

    writer = _writer(tmp_path / "run")
    folder = _save(writer, 10)
    _damage(folder, "flipped byte")
    ckpt.verify_files(folder, ["model", "vae.json"])  # the damage is in ema/: these pass
    with pytest.raises(ckpt.CheckpointDamaged, match=rf"{folder} is damaged: {EMA}: SHA-256 differs"):
        DiTPipeline.from_checkpoint(writer.run_dir, "latest", use_ema=True)
    with pytest.raises(ckpt.CheckpointDamaged, match=r"weights.bin: not listed in manifest.json"):
        ckpt.verify_files(folder, ["weights.bin"])


def test_repae_loaders_check_the_sit_and_vae_files(tmp_path: Path) -> None:
    from repae import checkpoint as rckpt

    folder = tmp_path / "run" / "5"
    folder.mkdir(parents=True)
    rckpt.save_tensors({"w": torch.ones(8)}, folder / "ema.safetensors")
    (folder / rckpt.SIT_CONFIG).write_text('{"z_dims": []}')
    (folder / rckpt.VAE_SOURCE).write_text('{"folder": "vae"}')
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text("{}")
    write_manifest(folder)
    (folder / "ema.safetensors").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointDamaged, match="ema.safetensors: 1 bytes"):
        rckpt.load_sit(folder)
    (folder / "vae" / "config.json").write_text('{"a": 1}')
    with pytest.raises(ckpt.CheckpointDamaged, match="vae/config.json"):
        rckpt.load_vae_from_checkpoint(folder)


def test_a_full_disk_mid_save_leaves_the_previous_tag_intact(tmp_path: Path, monkeypatch) -> None:
    writer = _writer(tmp_path / "run")
    _save(writer, 10)
    real_save_file = ckpt.save_file

    def full_disk(tensors, path, metadata=None):  # the second weights file runs out of space half-way
        if "/model/" in str(path):
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(ckpt.CheckpointSaveError) as err:
        _save(writer, 20)
    message = str(err.value)
    assert "checkpoint save failed at step 20 while writing: ENOSPC: No space left on device" in message
    assert "(disk full or over quota)" in message and "nothing was published" in message
    assert f"latest names step 10 ({writer.folder(10)})" in message and "\n" not in message
    assert isinstance(err.value.__cause__, OSError)
    assert ckpt.read_latest(writer.run_dir) == 10 and ckpt.verify_tag(writer.folder(10)).ok
    assert sorted(p.name for p in writer.run_dir.iterdir()) == ["10", "latest"]  # the partial folder is gone
    monkeypatch.undo()
    assert writer.save(20, {"step": 20}, {}, lambda p: None) == writer.folder(20)  # the next save works


def test_safetensors_io_errors_and_other_ranks_failures_are_named(tmp_path: Path) -> None:
    class SafetensorError(Exception):  # what safetensors raises for an I/O error (not an OSError)
        pass

    def write_main(partial: Path) -> None:
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    writer = _writer(tmp_path / "run")
    with pytest.raises(ckpt.CheckpointSaveError, match=r"step 7 while writing: ENOSPC: SafetensorError: .*disk full"):
        writer.save(7, {}, {}, write_main)
    # rank 0 wrote fine, rank 1 ran out of space: every rank raises, naming rank 1 and its reason
    reports = iter([[None, None], [None, "ENOSPC: No space left on device (disk full or over quota)"]])
    writer = _writer(tmp_path / "run", gather=lambda report: next(reports))
    with pytest.raises(ckpt.CheckpointSaveError, match="step 8 while writing on rank 1: ENOSPC"):
        _save(writer, 8)
    assert not list(writer.run_dir.iterdir())


def test_the_universal_form_added_later_joins_the_manifest(tmp_path: Path) -> None:
    folder = _save(_writer(tmp_path / "run"), 10)
    (folder / engine_checkpoint.UNIVERSAL_TAG / "zero").mkdir(parents=True)
    (folder / engine_checkpoint.UNIVERSAL_TAG / "zero" / "fp32.pt").write_bytes(b"state")
    add_to_manifest(folder, engine_checkpoint.UNIVERSAL_TAG)
    assert f"{engine_checkpoint.UNIVERSAL_TAG}/zero/fp32.pt" in read_manifest(folder)["files"]
    assert ckpt.verify_tag(folder).ok
    engine_checkpoint.write_engine_latest(folder)
    assert (folder / "latest").read_text() == "deepspeed"  # what zero_to_fp32.py reads by default


def test_verify_cli_reports_each_tag_and_exits_by_outcome(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    _save(_writer(run, manifest=False), 5)
    for step in (10, 20):
        _save(_writer(run), step)
    assert verify_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "5: no manifest (written before manifests)" in out and "10: OK (8 files," in out
    assert out.strip().endswith("3 tags checked: all intact")
    assert verify_main([str(run), "--tag", "latest"]) == 0 and "20: OK" in capsys.readouterr().out
    assert verify_main([str(run / "10")]) == 0 and "1 tag checked" in capsys.readouterr().out
    for args, expected in (
        ([str(tmp_path / "nope")], "no such folder"),
        ([str(run), "--tag", "99"], "--tag 99: no checkpoint folder"),
        ([str(tmp_path)], "no checkpoint tags"),
    ):
        assert verify_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as done:
        verify_main(["--help"])
    assert done.value.code == 0 and "Exit status: 0 when every tag is intact" in capsys.readouterr().out

    _damage(run / "20", "truncated")
    (run / "10" / "vae.json").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "common.verify", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert "10: DAMAGED" in lines and "  vae.json: missing" in lines and "20: DAMAGED" in lines
    assert any(line.startswith(f"  {EMA}: ") and "truncated" in line for line in lines)
    assert lines[-1] == "3 tags checked: 2 damaged"
    (run / "latest").write_text("30\n")
    assert verify_main([str(run), "--tag", "5"]) == 0
    assert verify_main([str(run)]) == 1 and "latest: DAMAGED: names '30'" in capsys.readouterr().out


def test_safetensors_are_hashed_from_memory_exactly_as_on_disk(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from common.manifest import safetensors_sha256, sha256_file

    state = {
        "z.bf16": torch.randn(3, 5).to(torch.bfloat16),
        "a.fp32": torch.randn(7),
        "scalar": torch.tensor(2.5),
        "ids": torch.arange(11),
        "empty": torch.zeros(0, 4),
        "h": torch.randn(2, 3).half(),
    }
    save_file(state, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    assert safetensors_sha256(tmp_path / "w.safetensors", state) == sha256_file(tmp_path / "w.safetensors")
    other = {**state, "a.fp32": torch.randn(7)}  # the digest is of the bytes meant to be written (memory)
    assert safetensors_sha256(tmp_path / "w.safetensors", other) != sha256_file(tmp_path / "w.safetensors")
    assert safetensors_sha256(tmp_path / "w.safetensors", {}) == sha256_file(tmp_path / "w.safetensors")  # fallback


def test_resume_verdict_is_shared_by_the_writer(tmp_path: Path) -> None:
    """CheckpointWriter.resume_step: the same answers without a process group (rank 0 decides)."""
    writer = _writer(tmp_path / "run")
    assert writer.resume_step("latest") is None  # a new run
    _save(writer, 10)
    assert writer.resume_step("latest") == 10 and writer.resume_step(None) is None
    json.loads((writer.folder(10) / MANIFEST).read_text())  # valid JSON
    (writer.folder(10) / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match="manifest.json: unreadable"):
        writer.resume_step("10")
