"""Statistics of a paired training study: is the DiT trained on the E2E-tuned VAE really better?

(Not named ``statistics``: ``evaluation/*.py`` scripts run as files put this folder first on
``sys.path``, where a ``statistics.py`` would shadow the standard library's for every import.)

The study trains arm A (original VAE) and arm B (its end-to-end tuned twin) with several training
seeds each and scores every checkpoint on the same prompts with the same sampling seeds. Three
sources of noise stand between a measured difference and the truth, and the intervals here try to
account for each of them:

* **training seeds** — a second run of the same recipe lands somewhere else. With the handful of
  seeds a study can afford (K = 2..5) this is the source that is easiest to under-state;
* **prompts** — the prompt list is one draw from the prompts we care about; some prompts are easy,
  some hard, and every seed and both arms see the same list, so prompt effects are *shared*;
* **samples** — sampling seeds x caption templates within a prompt. They are nested in the prompt,
  so they are averaged per prompt and not resampled separately (resampling prompts already carries
  their noise along).

Score cubes
    ``cube[seed, prompt, sample]`` for one arm, one metric, one checkpoint (0/1 for accuracies).

Hierarchical bootstrap
    One resample draws K seeds with replacement and then P prompts with replacement — one prompt
    draw shared by all seeds (and, for a difference, by both arms), because the prompts are shared:
    resampling them independently per seed would pretend the seeds saw different prompts and
    overstate the prompt noise of a mean, while understating the benefit of pairing in a difference.

Why the union with a Student-t interval
    A percentile bootstrap over K seeds only knows the K observed seeds: with K = 3 there are only 10
    distinct seed multisets, the bootstrap variance of a mean is (K-1)/K of the plug-in variance,
    and its tails are coarse, so it under-covers badly when the seed variance matters. The
    Student-t interval over the K per-seed means (mean ± t_{1-α/2, K-1} · sd / √K) is the textbook
    small-sample answer for that level, but it knows nothing about prompt noise (every seed
    mean is over the same prompts). So for K >= 2 the reported interval is the **union** of the two
    (the lower of the lows, the higher of the highs): whichever source dominates, the interval is
    at least as wide as the honest interval for that source. It is conservative when one source
    dominates and can still be slightly short when both are of similar size (the combined standard
    error can be up to √2 times the larger one); the coverage test in ``tests/test_statistics.py``
    checks ~95% nominal gives >= 90% in a K = 3 simulation. With K == 1 only prompts are
    resampled, and the ``method`` string says that training-seed variance is not covered.
    The price is power: with K = 3, t_{0.975,2} = 4.30, so a per-seed mean must be precise (many
    prompts x samples) for a moderate difference to show; in simulation a +0.15 accuracy gain is
    found in ~40% of K = 3 studies of 24 prompts x 4 samples but in all of them at 100 x 8 when
    the seeds are paired. "No detectable difference" means exactly that, not "no difference".

Differences (B − A)
    Seeds are paired by index (seed k of A and seed k of B share the training seed) when both arms
    have the same number of seeds: the seed-level t interval is then over per-seed differences,
    which removes a shared seed effect. With unequal counts the arms are unpaired: each arm's seeds
    are resampled independently and the t interval is Welch's (or a pooled-variance t when one arm
    has a single seed, borrowing the other arm's seed variance). Prompts are always paired.

Per-seed metrics
    A metric computed once per seed and checkpoint (a Fréchet distance over all samples) has no
    prompt dimension to resample, so it gets a t interval over seeds only.

The Student-t quantile is computed here (bisection on the t CDF through the regularized
incomplete beta function, any real df, so Welch's fractional df are exact too): the module needs
numpy only and gives the same numbers with or without scipy. Every bootstrap uses
``numpy.random.default_rng(seed)``: the same input always gives the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from statistics import NormalDist
from typing import Any

import numpy as np

METHOD_BOOT_T = "bootstrap(seeds,prompts) ∪ t(seeds)"
METHOD_ONE_SEED = "bootstrap(prompts); one seed: training-seed variance not covered"
METHOD_NO_INTERVAL = "one seed: no interval"


# --------------------------------------------------------------------------------------------
# Student t quantile (stdlib only)
# --------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 20000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_abs_cdf(t: float, df: float) -> float:
    """P(|T| < t) for Student's t with ``df`` degrees of freedom (any real df > 0)."""
    return 1.0 - _betainc(0.5 * df, 0.5, df / (df + t * t))


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t, also for Welch's fractional df.

    Exact to ~1e-12 (bisection on the incomplete-beta CDF), so intervals do not depend on whether
    scipy happens to be installed; cached, since a study asks for the same few quantiles often.
    """
    if not 0.5 < p < 1.0:
        raise ValueError(f"t_quantile needs 0.5 < p < 1, got {p}")
    if math.isnan(df) or df <= 0:
        raise ValueError(f"t_quantile needs df > 0, got {df}")
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    target = 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while _t_abs_cdf(hi, df) < target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_abs_cdf(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------
# Validation and small helpers
# --------------------------------------------------------------------------------------------
def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return level


def _check_resamples(resamples: int) -> int:
    if int(resamples) != resamples or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples}")
    return int(resamples)


def _as_cube(cube: Any, name: str) -> np.ndarray:
    """A finite, non-empty float array of shape (seeds, prompts, samples), or a ValueError saying why."""
    arr = np.asarray(cube, dtype=float)
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape (seeds, prompts, samples), got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name} is empty: shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} (shape {arr.shape}) has NaN or infinite scores")
    return arr


def _as_per_seed(values: Any, name: str) -> np.ndarray:
    """A finite, non-empty float vector of one value per seed, or a ValueError saying why."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty vector (seeds,), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} (shape {arr.shape}) has NaN or infinite values")
    return arr


def _counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """How often each of n units is drawn in each resample, shape (resamples, n).

    Multinomial counts are the same distribution as drawing n indices with replacement, and turn a
    resampled mean into a matrix product instead of fancy indexing of a (resamples, K, P) array.
    """
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)


def _resampled_means(m: np.ndarray, seed_counts: np.ndarray, prompt_counts: np.ndarray) -> np.ndarray:
    """Mean of m[seeds, prompts] for every resample, given the draw counts of seeds and prompts."""
    k, p = m.shape
    return ((seed_counts @ m) * prompt_counts).sum(axis=1) / (k * p)


def _percentile(stats: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _t_one_sample(values: np.ndarray, level: float) -> tuple[float, float, float]:
    """(mean, low, high) of mean ± t · sd/√K over K >= 2 values."""
    k = values.size
    mean = float(values.mean())
    half = t_quantile(0.5 + level / 2.0, k - 1) * float(values.std(ddof=1)) / math.sqrt(k)
    return mean, mean - half, mean + half


def _t_two_sample(va: np.ndarray, vb: np.ndarray, level: float) -> tuple[float, float, float, str]:
    """(mean, low, high, name) of vb.mean() - va.mean() for unpaired arms, at least one with >= 2 values.

    Welch when both arms can estimate their own variance; when one arm has a single seed, the other
    arm's seed variance stands in for both (pooled t), which is the only way to get any interval.
    """
    ka, kb = va.size, vb.size
    diff = float(vb.mean() - va.mean())
    q = 0.5 + level / 2.0
    if ka >= 2 and kb >= 2:
        ra, rb = float(va.var(ddof=1)) / ka, float(vb.var(ddof=1)) / kb
        se = math.sqrt(ra + rb)
        if se == 0.0:
            return diff, diff, diff, "Welch t(seeds)"
        df = (ra + rb) ** 2 / (ra**2 / (ka - 1) + rb**2 / (kb - 1))
        half = t_quantile(q, df) * se
        return diff, diff - half, diff + half, "Welch t(seeds)"
    many = vb if kb >= 2 else va
    s2 = float(many.var(ddof=1))
    se = math.sqrt(s2 * (1.0 / ka + 1.0 / kb))
    half = t_quantile(q, many.size - 1) * se
    return diff, diff - half, diff + half, "pooled t(seeds)"


def _check_same_prompts(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"cube_a has shape {a.shape} and cube_b has shape {b.shape}: both arms must be scored on the "
            f"same prompts (axis 1), got {a.shape[1]} and {b.shape[1]}"
        )


# --------------------------------------------------------------------------------------------
# Score cubes
# --------------------------------------------------------------------------------------------
def _one_sample_interval(
    m: np.ndarray, rng: np.random.Generator, level: float, resamples: int
) -> tuple[float, float, bool]:
    """(low, high, one_seed) for the mean of per-(seed, prompt) values ``m``: (seeds, prompts).

    One seed: a bootstrap over prompts. Several: the two-stage bootstrap (seeds, then prompts)
    widened to the Student-t interval over per-seed means when that is wider — a percentile
    bootstrap over three seeds under-covers.
    """
    k, p = m.shape
    if k == 1:
        low, high = _percentile(_counts(rng, p, resamples) @ m[0] / p, level)
        return low, high, True
    seed_counts = _counts(rng, k, resamples)
    prompt_counts = _counts(rng, p, resamples)
    b_low, b_high = _percentile(_resampled_means(m, seed_counts, prompt_counts), level)
    _, t_low, t_high = _t_one_sample(m.mean(axis=1), level)
    return min(b_low, t_low), max(b_high, t_high), False


def hierarchical_bootstrap(cube: np.ndarray, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of a score cube (seeds, prompts, samples) with an interval covering seed and prompt noise.

    Samples are averaged within each prompt (they are nested in it); a resample draws seeds, then one
    shared prompt draw. For K >= 2 the interval is the union of that percentile bootstrap and a t
    interval over per-seed means, because the bootstrap alone under-covers with few seeds (see the
    module docstring). K == 1 resamples prompts only and says so in ``method``.

    Returns ``{"mean", "low", "high", "level", "seeds", "prompts", "samples", "method"}``.
    """
    arr = _as_cube(cube, "cube")
    level, resamples = _check_level(level), _check_resamples(resamples)
    k, p, s = arr.shape
    m = arr.mean(axis=2)
    mean = float(m.mean())
    low, high, one_seed = _one_sample_interval(m, np.random.default_rng(seed), level, resamples)
    method = METHOD_ONE_SEED if one_seed else METHOD_BOOT_T
    return {
        "mean": mean,
        "low": low,
        "high": high,
        "level": level,
        "seeds": k,
        "prompts": p,
        "samples": s,
        "method": method,
    }


def _difference(
    cube_a: np.ndarray,
    cube_b: np.ndarray,
    *,
    paired: bool | None,
    level: float,
    resamples: int,
    seed: int,
) -> dict:
    """B − A of two score cubes; ``paired=None`` pairs seeds exactly when the seed counts match.

    Forcing ``paired=False`` on equal seed counts exists for tests (what pairing buys).
    """
    a, b = _as_cube(cube_a, "cube_a"), _as_cube(cube_b, "cube_b")
    _check_same_prompts(a, b)
    level, resamples = _check_level(level), _check_resamples(resamples)
    ka, kb, p = a.shape[0], b.shape[0], a.shape[1]
    if paired is None:
        paired = ka == kb
    elif paired and ka != kb:
        raise ValueError(f"cannot pair seeds: cube_a has shape {a.shape} and cube_b has shape {b.shape}")
    # samples are averaged per prompt, so arms may even differ in samples per prompt
    ma, mb = a.mean(axis=2), b.mean(axis=2)
    rng = np.random.default_rng(seed)
    if paired:
        d = mb - ma
        mean = float(d.mean())
        low, high, one_seed = _one_sample_interval(d, rng, level, resamples)
        method = METHOD_ONE_SEED if one_seed else "bootstrap(paired seeds,prompts) ∪ paired t(seeds)"
    else:
        counts_a = _counts(rng, ka, resamples)
        counts_b = _counts(rng, kb, resamples)
        prompt_counts = _counts(rng, p, resamples)
        stats = _resampled_means(mb, counts_b, prompt_counts) - _resampled_means(ma, counts_a, prompt_counts)
        b_low, b_high = _percentile(stats, level)
        mean, t_low, t_high, t_name = _t_two_sample(ma.mean(axis=1), mb.mean(axis=1), level)
        low, high = min(b_low, t_low), max(b_high, t_high)
        method = f"bootstrap(seeds per arm,prompts) ∪ {t_name}"
    return {"mean": mean, "low": low, "high": high, "level": level, "paired_seeds": bool(paired), "method": method}


def paired_difference(
    cube_a: np.ndarray, cube_b: np.ndarray, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict:
    """B minus A for two score cubes of the same prompts, with an interval.

    Seeds are paired by index when both arms have the same number of seeds (same training seed →
    shared seed effect cancels), else each arm's seeds are resampled independently; prompts are
    always resampled jointly. The interval is the union of that bootstrap and a seed-level t
    interval (paired t, or Welch/pooled when unpaired); one seed per arm: prompt-only bootstrap.
    Different prompt counts raise a ValueError naming both shapes.

    Returns ``{"mean", "low", "high", "level", "paired_seeds", "method"}``.
    """
    return _difference(cube_a, cube_b, paired=None, level=level, resamples=resamples, seed=seed)


# --------------------------------------------------------------------------------------------
# Per-seed metrics
# --------------------------------------------------------------------------------------------
def per_seed_interval(values: np.ndarray, *, level: float = 0.95) -> dict:
    """Mean of a per-seed metric (one value per training seed) with a Student-t interval.

    There is nothing below the seed to resample, and with few seeds the t interval is the honest
    one. One seed: ``low == high == mean`` and ``method`` says there is no interval.

    Returns ``{"mean", "low", "high", "level", "seeds", "method"}``.
    """
    v = _as_per_seed(values, "values")
    level = _check_level(level)
    if v.size == 1:
        mean = float(v[0])
        return {"mean": mean, "low": mean, "high": mean, "level": level, "seeds": 1, "method": METHOD_NO_INTERVAL}
    mean, low, high = _t_one_sample(v, level)
    return {"mean": mean, "low": low, "high": high, "level": level, "seeds": int(v.size), "method": "t(seeds)"}


def per_seed_difference(values_a: np.ndarray, values_b: np.ndarray, *, level: float = 0.95) -> dict:
    """B minus A of a per-seed metric: paired t over per-seed differences when the seed counts match.

    Unequal counts: Welch (pooled t when one arm has a single seed). One seed in both arms:
    ``low == high == mean`` and ``method`` says there is no interval.

    Returns ``{"mean", "low", "high", "level", "paired_seeds", "method"}``.
    """
    va, vb = _as_per_seed(values_a, "values_a"), _as_per_seed(values_b, "values_b")
    level = _check_level(level)
    if va.size == vb.size:
        d = vb - va
        if d.size == 1:
            mean = float(d[0])
            return {
                "mean": mean,
                "low": mean,
                "high": mean,
                "level": level,
                "paired_seeds": True,
                "method": METHOD_NO_INTERVAL,
            }
        mean, low, high = _t_one_sample(d, level)
        return {
            "mean": mean,
            "low": low,
            "high": high,
            "level": level,
            "paired_seeds": True,
            "method": "paired t(seeds)",
        }
    mean, low, high, name = _t_two_sample(va, vb, level)
    return {"mean": mean, "low": low, "high": high, "level": level, "paired_seeds": False, "method": name}


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------
def verdict(diff: dict, *, higher_is_better: bool, names: tuple[str, str] = ("original", "E2E")) -> str:
    """One line for a B − A difference: B ahead, B behind, or no detectable difference.

    Only an interval that excludes 0 counts; for lower-is-better metrics (Fréchet distance) a
    negative difference means B is ahead. ``names`` are (A, B); the line names B, the arm whose
    change is being judged. A difference with no interval (one seed per arm, per-seed metric) is
    never called a win: it reads "no detectable difference" and says why.
    """
    mean, low, high = float(diff["mean"]), float(diff["low"]), float(diff["high"])
    pct = f"{100.0 * float(diff.get('level', 0.95)):g}% CI"
    ci = f"{pct} [{low:+.3f}, {high:+.3f}]"
    if diff.get("method") == METHOD_NO_INTERVAL:
        return f"no detectable difference at this power (one seed per arm, no interval; difference {mean:+.3f})"
    ahead = low > 0 if higher_is_better else high < 0
    behind = high < 0 if higher_is_better else low > 0
    if ahead:
        return f"{names[1]} ahead ({mean:+.3f}, {ci})"
    if behind:
        return f"{names[1]} behind ({mean:+.3f}, {ci})"
    return f"no detectable difference at this power ({ci})"


# --------------------------------------------------------------------------------------------
# Curves over training
# --------------------------------------------------------------------------------------------
def _check_steps(steps: Sequence[int]) -> np.ndarray:
    s = np.asarray(steps, dtype=float)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"steps must be a non-empty sequence, got {steps!r}")
    if s.size > 1 and not np.all(np.diff(s) > 0):
        raise ValueError(f"steps must be strictly increasing, got {list(steps)}")
    return s


def area_under_curve(steps: Sequence[int], values: np.ndarray) -> np.ndarray:
    """Mean score over training: trapezoid area of values over steps divided by the step span.

    One number per curve that rewards learning *faster*, not just ending higher, and that stays on
    the metric's own scale (an accuracy AUC is an accuracy). ``values`` has shape (..., len(steps));
    a single step gives that value. Unevenly spaced checkpoints are weighted by the steps they span.
    """
    s = _check_steps(steps)
    v = np.asarray(values, dtype=float)
    if v.ndim == 0 or v.shape[-1] != s.size:
        raise ValueError(f"values must have shape (..., {s.size}) for {s.size} steps, got shape {v.shape}")
    if s.size == 1:
        return np.asarray(v[..., 0])
    area = ((v[..., 1:] + v[..., :-1]) * 0.5 * np.diff(s)).sum(axis=-1)
    return np.asarray(area / (s[-1] - s[0]))


def steps_to_threshold(
    steps: Sequence[int], curve: np.ndarray, threshold: float, *, higher_is_better: bool = True
) -> float:
    """The first step whose value reaches ``threshold`` (>=, or <= for lower-is-better), else ``math.inf``.

    Reported per seed, so "B gets there sooner" can be judged against the spread between seeds. A
    NaN value never counts as reaching the threshold.
    """
    s = _check_steps(steps)
    c = np.asarray(curve, dtype=float)
    if c.shape != s.shape:
        raise ValueError(f"curve must have shape ({s.size},) for {s.size} steps, got shape {c.shape}")
    with np.errstate(invalid="ignore"):
        hit = c >= threshold if higher_is_better else c <= threshold
    idx = np.flatnonzero(hit)
    return float(s[idx[0]]) if idx.size else math.inf


# --------------------------------------------------------------------------------------------
# The whole study
# --------------------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, tuples to lists, inf/NaN to None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_plain(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _series(by_step: Mapping[Any, Any], metric: str, arm: str) -> dict[int, np.ndarray]:
    """step -> array for one metric and arm; steps may be ints or their strings (from JSON)."""
    out: dict[int, np.ndarray] = {}
    for key, values in by_step.items():
        try:
            step = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{metric}/{arm}: step {key!r} is not an integer") from None
        if step in out:
            raise ValueError(f"{metric}/{arm}: step {step} appears twice")
        out[step] = np.asarray(values, dtype=float)
    return out


def _summarize_metric(
    metric: str,
    series: dict[str, dict[int, np.ndarray]],
    *,
    arms: tuple[str, str],
    hib: bool,
    threshold_fraction: float,
    level: float,
    resamples: int,
    seed: int,
) -> dict:
    """The ``metrics[metric]`` entry of :func:`summarize_study` (see there)."""
    a_name, b_name = arms
    ndims = {v.ndim for arm in arms for v in series[arm].values()}
    if not ndims or not (ndims <= {1} or ndims <= {3}):
        raise ValueError(
            f"metric {metric!r}: values must all be cubes (seeds, prompts, samples) or all per-seed "
            f"vectors (seeds,), got ndims {sorted(ndims)}"
        )
    is_cube = ndims == {3}

    def interval(values: np.ndarray) -> dict:
        if is_cube:
            return hierarchical_bootstrap(values, level=level, resamples=resamples, seed=seed)
        return per_seed_interval(values, level=level)

    def difference(va: np.ndarray, vb: np.ndarray) -> dict:
        if is_cube:
            return paired_difference(va, vb, level=level, resamples=resamples, seed=seed)
        return per_seed_difference(va, vb, level=level)

    def judge(diff: dict) -> str:
        return verdict(diff, higher_is_better=hib, names=arms)

    def brief(d: dict, *keys: str) -> dict:
        return {k: d[k] for k in ("mean", "low", "high", *keys)}

    curves = {
        arm: [{"step": step, **brief(interval(series[arm][step]), "seeds", "method")} for step in sorted(series[arm])]
        for arm in arms
    }

    common = sorted(set(series[a_name]) & set(series[b_name]))
    if not common:
        raise ValueError(
            f"metric {metric!r}: arms share no step ({a_name}: {sorted(series[a_name])}, "
            f"{b_name}: {sorted(series[b_name])})"
        )
    diff_at = {step: difference(series[a_name][step], series[b_name][step]) for step in common}
    differences = [{"step": s, **brief(d), "verdict": judge(d), "method": d["method"]} for s, d in diff_at.items()]
    last = common[-1]
    final = {"step": last, "difference": diff_at[last], "verdict": judge(diff_at[last])}

    # Per-seed curves, over the common steps at which every arm has all its seeds.
    full_k = {arm: max(series[arm][s].shape[0] for s in common) for arm in arms}
    seed_steps = [s for s in common if all(series[arm][s].shape[0] == full_k[arm] for arm in arms)]
    out: dict[str, Any] = {
        "higher_is_better": hib,
        "curves": curves,
        "differences": differences,
        "final": final,
        "auc": None,
        "steps_to_threshold": None,
    }
    if not seed_steps:
        return out
    seed_curves = {  # arm -> (seeds, steps)
        arm: np.stack([series[arm][s].mean(axis=(1, 2)) if is_cube else series[arm][s] for s in seed_steps], axis=-1)
        for arm in arms
    }
    aucs = {arm: area_under_curve(seed_steps, seed_curves[arm]) for arm in arms}
    auc_diff = per_seed_difference(aucs[a_name], aucs[b_name], level=level)
    auc: dict[str, Any] = {"steps": seed_steps}
    for arm in arms:
        auc[arm] = brief(per_seed_interval(aucs[arm], level=level))
    auc["difference"] = brief(auc_diff, "method")
    auc["verdict"] = judge(auc_diff)
    out["auc"] = auc

    final_means = [float(seed_curves[arm][:, -1].mean()) for arm in arms]
    threshold = threshold_fraction * max(final_means) if hib else min(final_means) / threshold_fraction
    stt: dict[str, Any] = {"threshold": threshold, "fraction": threshold_fraction, "reached": {}}
    for arm in arms:
        per_seed = [steps_to_threshold(seed_steps, c, threshold, higher_is_better=hib) for c in seed_curves[arm]]
        reached = [x for x in per_seed if math.isfinite(x)]
        stt[arm] = {
            "mean": float(np.mean(reached)) if reached else None,
            "per_seed": [x if math.isfinite(x) else None for x in per_seed],
        }
        stt["reached"][arm] = len(reached)
    out["steps_to_threshold"] = stt
    return out


def summarize_study(
    table: dict,
    *,
    arms: tuple[str, str],
    higher_is_better: dict[str, bool],
    threshold_fraction: float = 0.9,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """All the numbers the study tool and report show, from ``table[metric][arm][step]``.

    Each value is a score cube (seeds, prompts, samples) or a per-seed vector (seeds,), told apart
    by ndim (all values of one metric must agree). Curves cover each arm's own steps; differences,
    the final comparison, AUC and steps-to-threshold only the steps both arms have, so both are
    judged over the same stretch of training. AUC and steps-to-threshold follow each training seed
    along its curve, so they use the common steps at which each arm has all its seeds (a seed still
    behind the others would otherwise shift the seed indices); ``auc["steps"]`` lists them, and both
    are None when there is no such step. The threshold is ``threshold_fraction`` x the better arm's
    mean at the last of those steps (lower-is-better: the better mean / ``threshold_fraction``).
    Every interval uses the same ``seed``, so the summary is reproducible. The result is strict
    JSON (``math.inf`` and NaN written as None).
    """
    a_name, b_name = arms
    if a_name == b_name:
        raise ValueError(f"arms must be two different names, got {arms!r}")
    level, resamples = _check_level(level), _check_resamples(resamples)
    if not 0.0 < threshold_fraction <= 1.0:
        raise ValueError(f"threshold_fraction must be in (0, 1], got {threshold_fraction}")
    metrics_out: dict[str, Any] = {}
    for metric, by_arm in table.items():
        if metric not in higher_is_better:
            raise ValueError(f"higher_is_better has no entry for metric {metric!r}")
        missing = [arm for arm in arms if arm not in by_arm]
        if missing:
            raise ValueError(f"metric {metric!r} has no values for arm(s) {missing}")
        metrics_out[metric] = _summarize_metric(
            metric,
            {arm: _series(by_arm[arm], metric, arm) for arm in arms},
            arms=(a_name, b_name),
            hib=bool(higher_is_better[metric]),
            threshold_fraction=threshold_fraction,
            level=level,
            resamples=resamples,
            seed=seed,
        )
    return _plain(
        {"arms": [a_name, b_name], "level": level, "resamples": resamples, "seed": seed, "metrics": metrics_out}
    )
