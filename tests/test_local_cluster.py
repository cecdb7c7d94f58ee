"""scripts/slurm/local_cluster.py without starting anything: its config and its refusals.

The cluster itself runs in tests/test_slurm.py; these checks also run where SLURM is absent.
"""

from __future__ import annotations

import pytest

from tests.test_slurm import local_cluster


def test_missing_binaries_or_root_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_cluster.shutil, "which", lambda name: None if name == "slurmd" else f"/usr/bin/{name}")
    assert local_cluster.missing() == "SLURM not installed (missing slurmd): run `make slurm` as root"
    monkeypatch.setattr(local_cluster.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(local_cluster.os, "geteuid", lambda: 1000)
    assert "needs root" in local_cluster.missing()
    with pytest.raises(local_cluster.ClusterError, match="needs root"):
        local_cluster.up("/nonexistent/never-created")


def test_config_keeps_everything_in_the_folder(tmp_path) -> None:  # noqa: ANN001
    text = local_cluster.config_text(tmp_path, ("n1", "n2"), cpus=1, mem_mb=9000, port=16817)
    lines = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith(("NodeName", "Partition")))
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile", "SlurmctldLogFile"):
        assert lines[key].startswith(str(tmp_path)), key
    assert lines["SlurmctldPort"] == "16817" and lines["KillWait"] == "10"
    assert "NodeName=n[1-2] " in text and "Port=16818-16819" in text and "CPUs=1 RealMemory=9000" in text
    assert "PartitionName=debug Nodes=n[1-2] Default=YES" in text
