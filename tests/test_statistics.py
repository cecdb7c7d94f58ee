"""Statistics of the paired study: interval coverage, differences and verdicts, curves, the summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluation import paired_stats as st
from evaluation.paired_stats import (
    area_under_curve,
    hierarchical_bootstrap,
    paired_difference,
    per_seed_difference,
    per_seed_interval,
    steps_to_threshold,
    summarize_study,
    verdict,
)


def simulate(
    rng: np.random.Generator,
    *,
    seeds: int = 3,
    prompts: int = 24,
    samples: int = 4,
    base: float = 0.6,
    seed_sd: float = 0.03,
    prompt_half_width: float = 0.25,
    prompt_effects: np.ndarray | None = None,
    seed_effects: np.ndarray | None = None,
) -> np.ndarray:
    """A 0/1 score cube: P(correct) = base + seed effect + prompt effect, Bernoulli per sample.

    Prompt effects are uniform and seed effects normal, both centred, so the population mean is
    ``base`` (the effects are small enough that clipping to [0, 1] never bites).
    """
    if prompt_effects is None:
        prompt_effects = rng.uniform(-prompt_half_width, prompt_half_width, prompts)
    if seed_effects is None:
        seed_effects = rng.normal(0.0, seed_sd, seeds)
    p = np.clip(base + seed_effects[:, None] + prompt_effects[None, :], 0.0, 1.0)
    return (rng.random((len(seed_effects), len(prompt_effects), samples)) < p[:, :, None]).astype(float)


def covers(result: dict, value: float) -> bool:
    return result["low"] <= value <= result["high"]


# --------------------------------------------------------------------------------------------
# Student t quantile
# --------------------------------------------------------------------------------------------
def test_t_quantile_matches_tables() -> None:
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 10: 2.2281, 30: 2.0423, 120: 1.9799}
    for df, expected in table.items():
        assert st.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert st.t_quantile(0.975, math.inf) == pytest.approx(1.95996, abs=1e-5)
    # fractional df (Welch) lies between its integer neighbours
    assert st.t_quantile(0.975, 2) > st.t_quantile(0.975, 2.5) > st.t_quantile(0.975, 3)


def test_t_quantile_matches_scipy_for_fractional_df() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1.0, 1.3, 2.7, 5.5, 17.2, 400.0):
        for p in (0.9, 0.975, 0.995):
            assert st.t_quantile(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=1e-7)


# --------------------------------------------------------------------------------------------
# hierarchical_bootstrap
# --------------------------------------------------------------------------------------------
def test_hierarchical_bootstrap_keys_mean_and_determinism() -> None:
    cube = simulate(np.random.default_rng(0))
    r = hierarchical_bootstrap(cube, resamples=500, seed=3)
    assert set(r) == {"mean", "low", "high", "level", "seeds", "prompts", "samples", "method"}
    assert r["mean"] == pytest.approx(cube.mean())
    assert r["low"] < r["mean"] < r["high"]
    assert (r["seeds"], r["prompts"], r["samples"], r["level"]) == (3, 24, 4, 0.95)
    assert r["method"] == "bootstrap(seeds,prompts) ∪ t(seeds)"
    assert hierarchical_bootstrap(cube, resamples=500, seed=3) == r
    # the bootstrap seed matters where the bootstrap sets the bounds (one seed: prompts only)
    one = cube[:1]
    assert hierarchical_bootstrap(one, resamples=500, seed=3) == hierarchical_bootstrap(one, resamples=500, seed=3)
    assert hierarchical_bootstrap(one, resamples=500, seed=3) != hierarchical_bootstrap(one, resamples=500, seed=4)


def test_hierarchical_bootstrap_interval_contains_the_t_interval() -> None:
    cube = simulate(np.random.default_rng(1), seed_sd=0.1, prompt_half_width=0.02, samples=16)
    r = hierarchical_bootstrap(cube, resamples=300, seed=0)
    seed_means = cube.mean(axis=(1, 2))
    half = st.t_quantile(0.975, 2) * seed_means.std(ddof=1) / math.sqrt(3)
    assert r["low"] <= seed_means.mean() - half + 1e-12
    assert r["high"] >= seed_means.mean() + half - 1e-12


def test_hierarchical_bootstrap_coverage_three_seeds() -> None:
    """~95% nominal must cover the population mean in >= 90% of 200 simulated K=3 studies."""
    rng = np.random.default_rng(2024)
    hits = sum(covers(hierarchical_bootstrap(simulate(rng), resamples=300, seed=i), 0.6) for i in range(200))
    assert hits / 200 >= 0.90


def test_hierarchical_bootstrap_coverage_when_seed_variance_dominates() -> None:
    """Where the percentile bootstrap over 3 seeds alone covers only ~75%, the union with t still covers."""
    rng = np.random.default_rng(7)
    hits = 0
    for i in range(200):
        cube = simulate(rng, base=0.5, seed_sd=0.1, prompts=48, samples=16, prompt_half_width=0.02)
        hits += covers(hierarchical_bootstrap(cube, resamples=300, seed=i), 0.5)
    assert hits / 200 >= 0.90


def test_hierarchical_bootstrap_one_seed() -> None:
    cube = simulate(np.random.default_rng(3), seeds=1)
    r = hierarchical_bootstrap(cube, resamples=300)
    assert r["seeds"] == 1
    assert r["method"] == "bootstrap(prompts); one seed: training-seed variance not covered"
    assert r["low"] < r["mean"] < r["high"]


def test_hierarchical_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        hierarchical_bootstrap(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        hierarchical_bootstrap(np.full((2, 3, 1), np.nan))
    with pytest.raises(ValueError, match="level"):
        hierarchical_bootstrap(np.zeros((2, 3, 1)), level=95)


# --------------------------------------------------------------------------------------------
# paired_difference and verdict
# --------------------------------------------------------------------------------------------
def test_real_difference_is_detected() -> None:
    """B better by 0.15 with K=3 paired seeds (shared seed effect), 100 prompts x 8 samples.

    With K=3 the seed-level t interval has t_{0.975,2} = 4.30, so sampling noise must be small: at
    24 prompts x 4 samples the same difference is found in only ~40-45% of studies.
    """
    rng = np.random.default_rng(11)
    detected = 0
    for i in range(20):
        prompts = rng.uniform(-0.25, 0.25, 100)
        shared = rng.normal(0.0, 0.03, 3)
        a = simulate(rng, prompt_effects=prompts, seed_effects=shared, samples=8, base=0.55)
        b = simulate(rng, prompt_effects=prompts, seed_effects=shared, samples=8, base=0.70)
        d = paired_difference(a, b, resamples=300, seed=i)
        assert set(d) == {"mean", "low", "high", "level", "paired_seeds", "method"}
        assert d["paired_seeds"] is True
        assert d["mean"] == pytest.approx(b.mean() - a.mean())
        line = verdict(d, higher_is_better=True)
        detected += line.startswith("E2E ahead (")
    assert detected >= 19


def test_null_difference_false_positive_rate() -> None:
    rng = np.random.default_rng(12)
    false_positives = 0
    for i in range(100):
        prompts = rng.uniform(-0.25, 0.25, 24)
        a, b = simulate(rng, prompt_effects=prompts), simulate(rng, prompt_effects=prompts)
        line = verdict(paired_difference(a, b, resamples=300, seed=i), higher_is_better=True)
        false_positives += not line.startswith("no detectable difference at this power")
    assert false_positives <= 10


def test_verdict_strings_and_lower_is_better() -> None:
    better = {"mean": 0.12, "low": 0.05, "high": 0.2, "level": 0.95}
    assert verdict(better, higher_is_better=True) == "E2E ahead (+0.120, 95% CI [+0.050, +0.200])"
    assert verdict(better, higher_is_better=False) == "E2E behind (+0.120, 95% CI [+0.050, +0.200])"
    lower_fd = {"mean": -3.0, "low": -5.0, "high": -1.0, "level": 0.95}
    assert verdict(lower_fd, higher_is_better=False, names=("orig", "tuned")).startswith("tuned ahead (-3.000")
    assert verdict(lower_fd, higher_is_better=True).startswith("E2E behind (-3.000")
    null = {"mean": 0.01, "low": -0.02, "high": 0.04, "level": 0.95}
    assert verdict(null, higher_is_better=True) == "no detectable difference at this power (95% CI [-0.020, +0.040])"
    assert verdict(null, higher_is_better=False).startswith("no detectable difference")
    # an interval touching 0 does not exclude it
    assert verdict({"mean": 0.1, "low": 0.0, "high": 0.2}, higher_is_better=True).startswith("no detectable")


def test_verdict_with_no_interval_is_never_a_win() -> None:
    d = per_seed_difference(np.array([20.0]), np.array([15.0]))
    assert d["method"] == "one seed: no interval" and d["low"] == d["high"] == d["mean"] == -5.0
    assert verdict(d, higher_is_better=False).startswith("no detectable difference")


def test_pairing_narrows_the_interval_under_a_shared_seed_effect() -> None:
    rng = np.random.default_rng(13)
    prompts = rng.uniform(-0.1, 0.1, 32)
    shared = np.array([-0.15, 0.0, 0.15, 0.05])  # strong seed effect, the same for both arms
    a = simulate(rng, prompt_effects=prompts, seed_effects=shared, samples=8, base=0.5)
    b = simulate(rng, prompt_effects=prompts, seed_effects=shared, samples=8, base=0.55)
    kw = {"level": 0.95, "resamples": 500, "seed": 0}
    paired = st._difference(a, b, paired=None, **kw)
    unpaired = st._difference(a, b, paired=False, **kw)
    assert paired["paired_seeds"] is True and unpaired["paired_seeds"] is False
    assert paired["mean"] == pytest.approx(unpaired["mean"])
    assert (paired["high"] - paired["low"]) < 0.5 * (unpaired["high"] - unpaired["low"])
    assert "Welch" in unpaired["method"]


def test_unequal_seed_counts_are_unpaired() -> None:
    rng = np.random.default_rng(14)
    prompts = rng.uniform(-0.2, 0.2, 16)
    a, b = simulate(rng, seeds=3, prompt_effects=prompts), simulate(rng, seeds=2, prompt_effects=prompts)
    d = paired_difference(a, b, resamples=300)
    assert d["paired_seeds"] is False and "Welch" in d["method"]
    assert d["mean"] == pytest.approx(b.mean() - a.mean())
    assert d["low"] < d["mean"] < d["high"]
    # one arm with a single seed borrows the other's seed variance
    d1 = paired_difference(a, b[:1], resamples=300)
    assert d1["paired_seeds"] is False and "pooled t" in d1["method"]


def test_paired_difference_one_seed_each() -> None:
    rng = np.random.default_rng(15)
    prompts = rng.uniform(-0.2, 0.2, 16)
    d = paired_difference(
        simulate(rng, seeds=1, prompt_effects=prompts), simulate(rng, seeds=1, prompt_effects=prompts)
    )
    assert d["paired_seeds"] is True
    assert d["method"] == "bootstrap(prompts); one seed: training-seed variance not covered"
    assert d["low"] < d["high"]


def test_mismatched_prompts_raise_naming_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3, 24, 4\).*\(3, 20, 4\)"):
        paired_difference(np.zeros((3, 24, 4)), np.zeros((3, 20, 4)))


# --------------------------------------------------------------------------------------------
# per-seed metrics
# --------------------------------------------------------------------------------------------
def test_per_seed_interval_and_difference() -> None:
    v = np.array([10.0, 12.0, 14.0])
    r = per_seed_interval(v)
    assert set(r) == {"mean", "low", "high", "level", "seeds", "method"}
    half = 4.302653 * 2.0 / math.sqrt(3)
    assert (r["mean"], r["seeds"]) == (12.0, 3)
    assert r["low"] == pytest.approx(12.0 - half, abs=1e-5) and r["high"] == pytest.approx(12.0 + half, abs=1e-5)
    one = per_seed_interval(np.array([7.5]))
    assert one["low"] == one["high"] == one["mean"] == 7.5 and one["method"] == "one seed: no interval"

    # paired: a constant per-seed shift has a zero-width interval although the seeds vary a lot
    d = per_seed_difference(np.array([10.0, 20.0, 30.0]), np.array([8.0, 18.0, 28.0]))
    assert d["paired_seeds"] is True and d["mean"] == pytest.approx(-2.0)
    assert d["low"] == pytest.approx(-2.0) and d["high"] == pytest.approx(-2.0)
    assert verdict(d, higher_is_better=False).startswith("E2E ahead")
    w = per_seed_difference(np.array([10.0, 20.0, 30.0]), np.array([8.0, 28.0]))
    assert w["paired_seeds"] is False and w["method"] == "Welch t(seeds)"
    assert w["mean"] == pytest.approx(-2.0) and w["low"] < w["mean"] < w["high"]


# --------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------
def test_area_under_curve_hand_computed() -> None:
    # trapezoids: (0+1)/2*10 + (1+1)/2*30 = 35 over a span of 40
    assert float(area_under_curve([0, 10, 40], np.array([0.0, 1.0, 1.0]))) == pytest.approx(35 / 40)
    per_seed = area_under_curve([100, 200], np.array([[0.2, 0.4], [0.0, 1.0]]))
    assert per_seed.shape == (2,) and per_seed == pytest.approx([0.3, 0.5])
    assert float(area_under_curve([500], np.array([0.7]))) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="shape"):
        area_under_curve([0, 1], np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="increasing"):
        area_under_curve([2, 1], np.array([1.0, 2.0]))


def test_steps_to_threshold_hand_computed() -> None:
    steps = [100, 200, 300, 400]
    curve = np.array([0.1, 0.5, 0.8, 0.9])
    assert steps_to_threshold(steps, curve, 0.8) == 300.0
    assert steps_to_threshold(steps, curve, 0.05) == 100.0
    assert steps_to_threshold(steps, curve, 0.95) == math.inf
    fd = np.array([50.0, 30.0, 20.0, 25.0])
    assert steps_to_threshold(steps, fd, 22.0, higher_is_better=False) == 300.0
    assert steps_to_threshold(steps, fd, 10.0, higher_is_better=False) == math.inf
    assert steps_to_threshold([7], np.array([1.0]), 1.0) == 7.0


# --------------------------------------------------------------------------------------------
# summarize_study
# --------------------------------------------------------------------------------------------
def _study_table() -> dict:
    rng = np.random.default_rng(21)
    prompts = rng.uniform(-0.2, 0.2, 12)
    steps_a, steps_b = [300, 100, 200], [100, 200, 300, 400]  # unsorted, and a step only B has
    acc = {
        "original": {s: simulate(rng, prompt_effects=prompts, base=0.3 + s / 1000) for s in steps_a},
        "e2e": {s: simulate(rng, prompt_effects=prompts, base=0.6 + s / 1000) for s in steps_b},
    }
    fd = {
        "original": {s: 100.0 - s / 10 + rng.normal(0, 1, 3) for s in steps_a},
        "e2e": {s: 100.0 - s / 10 + rng.normal(0, 1, 3) for s in steps_b},
    }
    return {"accuracy": acc, "fd": fd}


def test_summarize_study_structure() -> None:
    out = summarize_study(
        _study_table(), arms=("original", "e2e"), higher_is_better={"accuracy": True, "fd": False}, resamples=200
    )
    json.dumps(out, allow_nan=False)  # strict JSON: no inf/NaN left
    assert out["arms"] == ["original", "e2e"] and out["level"] == 0.95
    assert set(out["metrics"]) == {"accuracy", "fd"}
    for name, m in out["metrics"].items():
        assert m["higher_is_better"] is (name == "accuracy")
        assert [c["step"] for c in m["curves"]["original"]] == [100, 200, 300]
        assert [c["step"] for c in m["curves"]["e2e"]] == [100, 200, 300, 400]
        assert all(c["seeds"] == 3 and c["low"] <= c["mean"] <= c["high"] for c in m["curves"]["e2e"])
        assert [d["step"] for d in m["differences"]] == [100, 200, 300]  # only common steps, sorted
        assert all(isinstance(d["verdict"], str) and d["verdict"] for d in m["differences"])
        assert m["final"]["step"] == 300
        assert set(m["final"]["difference"]) >= {"mean", "low", "high", "level", "paired_seeds", "method"}
        assert isinstance(m["final"]["verdict"], str)
        auc = m["auc"]
        assert auc["steps"] == [100, 200, 300]
        assert set(auc) >= {"original", "e2e", "difference", "verdict"}
        assert auc["difference"]["mean"] == pytest.approx(auc["e2e"]["mean"] - auc["original"]["mean"])
        stt = m["steps_to_threshold"]
        assert stt["fraction"] == 0.9
        assert set(stt["reached"]) == {"original", "e2e"}
        for arm in ("original", "e2e"):
            assert len(stt[arm]["per_seed"]) == 3
            assert stt["reached"][arm] == sum(x is not None for x in stt[arm]["per_seed"])

    acc = out["metrics"]["accuracy"]
    assert acc["final"]["verdict"].startswith("e2e ahead")  # B is 0.3 better at every step
    assert acc["curves"]["original"][0]["method"] == "bootstrap(seeds,prompts) ∪ t(seeds)"
    fd = out["metrics"]["fd"]
    assert fd["curves"]["original"][0]["method"] == "t(seeds)"
    assert fd["final"]["verdict"].startswith("no detectable difference")  # same process in both arms

    # AUC of a per-seed metric is the mean of the per-seed trapezoids
    table = _study_table()
    fd_a = np.stack([table["fd"]["original"][s] for s in (100, 200, 300)], axis=-1)
    assert fd["auc"]["original"]["mean"] == pytest.approx(float(area_under_curve([100, 200, 300], fd_a).mean()))
    # lower is better: threshold is the better final mean / 0.9, reached at the last step at the latest
    best = min(fd_a[:, -1].mean(), np.stack([table["fd"]["e2e"][s] for s in (100, 200, 300)], -1)[:, -1].mean())
    assert fd["steps_to_threshold"]["threshold"] == pytest.approx(best / 0.9)
    # accuracy threshold = 0.9 x the better final mean; the worse arm may never reach it
    assert acc["steps_to_threshold"]["threshold"] == pytest.approx(0.9 * acc["curves"]["e2e"][2]["mean"])

    again = summarize_study(
        _study_table(), arms=("original", "e2e"), higher_is_better={"accuracy": True, "fd": False}, resamples=200
    )
    assert again == out


def test_summarize_study_not_reached_is_none_and_one_seed() -> None:
    steps = [10, 20]
    table = {
        "acc": {
            "A": {s: np.full((1, 4, 2), 0.1 * i) for i, s in enumerate(steps, 1)},  # 0.1, 0.2
            "B": {s: np.full((1, 4, 2), 0.5 * i) for i, s in enumerate(steps, 1)},  # 0.5, 1.0
        }
    }
    out = summarize_study(table, arms=("A", "B"), higher_is_better={"acc": True}, resamples=50)
    json.dumps(out, allow_nan=False)
    m = out["metrics"]["acc"]
    assert m["curves"]["A"][0]["method"].startswith("bootstrap(prompts); one seed")
    stt = m["steps_to_threshold"]
    assert stt["threshold"] == pytest.approx(0.9)
    assert stt["A"] == {"mean": None, "per_seed": [None]} and stt["reached"]["A"] == 0
    assert stt["B"] == {"mean": 20.0, "per_seed": [20.0]} and stt["reached"]["B"] == 1


def test_summarize_study_rejects_bad_tables() -> None:
    cube = np.zeros((2, 3, 1))
    with pytest.raises(ValueError, match="higher_is_better"):
        summarize_study({"acc": {"A": {1: cube}, "B": {1: cube}}}, arms=("A", "B"), higher_is_better={})
    with pytest.raises(ValueError, match="share no step"):
        summarize_study({"acc": {"A": {1: cube}, "B": {2: cube}}}, arms=("A", "B"), higher_is_better={"acc": True})
    with pytest.raises(ValueError, match="ndims"):
        summarize_study(
            {"acc": {"A": {1: cube}, "B": {1: np.zeros(2)}}}, arms=("A", "B"), higher_is_better={"acc": True}
        )
    with pytest.raises(ValueError, match=r"\(2, 3, 1\).*\(2, 4, 1\)"):
        summarize_study(
            {"acc": {"A": {1: cube}, "B": {1: np.zeros((2, 4, 1))}}}, arms=("A", "B"), higher_is_better={"acc": True}
        )


def test_summarize_study_string_steps_and_a_seed_behind() -> None:
    """Steps read back from JSON are strings; a seed missing at the last step is left out of AUC only."""
    a = {"100": np.array([1.0, 2.0, 3.0]), "200": np.array([2.0, 3.0, 4.0]), "300": np.array([3.0, 4.0])}
    b = {"100": np.array([2.0, 3.0, 4.0]), "200": np.array([3.0, 4.0, 5.0]), "300": np.array([4.0, 5.0, 6.0])}
    out = summarize_study({"score": {"A": a, "B": b}}, arms=("A", "B"), higher_is_better={"score": True})
    m = out["metrics"]["score"]
    assert [d["step"] for d in m["differences"]] == [100, 200, 300]
    assert m["differences"][-1]["method"] == "Welch t(seeds)"  # 2 vs 3 seeds at step 300
    assert m["auc"]["steps"] == [100, 200]
    assert m["auc"]["A"]["mean"] == pytest.approx(2.5) and m["auc"]["B"]["mean"] == pytest.approx(3.5)
    assert m["auc"]["difference"]["low"] == pytest.approx(1.0)  # constant paired shift: zero width
    assert m["auc"]["verdict"].startswith("B ahead (+1.000")
