"""Intervals for scores measured on a fixed prompt set with several samples per prompt.

The demo's held-out prompts are the *whole* held-out population of the toy world (every held-out
triple on every background), so what varies between two runs of the same checkpoint is the
sampling noise. The interval therefore resamples samples *within* each prompt (a stratified
bootstrap): it says how far the score could move with other sampling seeds. It does not cover the
training seed; a study over training seeds does that (``evaluation.study``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stratified_bootstrap_ci(
    correct: np.ndarray, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Mean of a (prompts, samples) 0/1 matrix with a percentile bootstrap interval.

    Each resample draws, for every prompt, as many samples as it has, with replacement, from that
    prompt's own samples. Seeded, so the same scores always give the same interval.
    """
    values = np.asarray(correct, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected a non-empty (prompts, samples) matrix, got shape {values.shape}")
    prompts, samples = values.shape
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, samples, size=(resamples, prompts, samples))
    means = values[np.arange(prompts)[None, :, None], picks].mean(axis=(1, 2))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "level": level}


def summarize_correct(correct: dict[str, np.ndarray], **kwargs: Any) -> dict[str, dict[str, float]]:
    """:func:`stratified_bootstrap_ci` of every entry (attribute name -> (prompts, samples) matrix)."""
    return {name: stratified_bootstrap_ci(matrix, **kwargs) for name, matrix in correct.items()}
