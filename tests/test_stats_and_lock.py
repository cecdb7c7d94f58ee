"""Demo intervals (common.stats) and the lock checker (scripts/check_lock.py)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from common.stats import stratified_bootstrap_ci
from tests.conftest import ROOT


def test_interval_brackets_the_mean_and_shrinks_with_samples() -> None:
    rng = np.random.default_rng(0)
    few = (rng.random((72, 2)) < 0.8).astype(float)
    many = (rng.random((72, 32)) < 0.8).astype(float)
    a, b = stratified_bootstrap_ci(few), stratified_bootstrap_ci(many)
    assert a["low"] <= a["mean"] <= a["high"] and b["low"] <= b["mean"] <= b["high"]
    assert (b["high"] - b["low"]) < 0.6 * (a["high"] - a["low"])
    assert abs(b["mean"] - 0.8) < 0.03
    assert stratified_bootstrap_ci(few) == a, "seeded: same scores, same interval"


def test_interval_of_a_constant_score_has_no_width() -> None:
    ones = stratified_bootstrap_ci(np.ones((10, 4)))
    assert ones == {"mean": 1.0, "low": 1.0, "high": 1.0, "level": 0.95}
    # a prompt that is always wrong and one always right: resampling within prompts cannot move it
    split = stratified_bootstrap_ci(np.array([[0.0] * 4, [1.0] * 4]))
    assert split["low"] == split["high"] == 0.5
    with pytest.raises(ValueError, match="prompts, samples"):
        stratified_bootstrap_ci(np.ones(5))


def _check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lock_checker_names_every_difference(tmp_path: Path) -> None:
    lock = _check_lock()
    path = tmp_path / "lock.txt"
    path.write_text("# header\nTorch==2.14.1\nfoo_bar==1.0  # why\nmissing-pkg==2\n")
    pins = lock.read_lock(path)
    assert pins == {"torch": "2.14.1", "foo-bar": "1.0", "missing-pkg": "2"}
    lines = lock.differences(pins, {"torch": "2.14.1", "foo-bar": "1.1", "extra": "3"})
    assert lines == [
        "extra: installed 3, not in the lock",
        "foo-bar: locked 1.0, installed 1.1",
        "missing-pkg: locked 2, not installed",
    ]
    path.write_text("torch>=2\n")
    with pytest.raises(SystemExit, match="expected 'name==version'"):
        lock.read_lock(path)


@pytest.mark.skipif(bool(os.environ.get("TEST_LATEST")), reason="make test-latest runs off the lock on purpose")
def test_this_environment_matches_the_committed_lock() -> None:
    """`make test` installs from requirements.lock; the suite runs in exactly that environment.

    setuptools is imported first, as torch/DeepSpeed do in other tests: its ``_vendor`` copies
    on ``sys.path`` must not count as installed packages (they made this test order-dependent).
    """
    import setuptools  # noqa: F401

    lock = _check_lock()
    assert lock.main([str(ROOT / "requirements.lock")]) == 0
    pins = lock.read_lock(ROOT / "requirements.lock")
    for name in ("torch", "transformers", "diffusers", "deepspeed"):
        assert name in pins
