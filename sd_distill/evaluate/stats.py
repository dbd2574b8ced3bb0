"""Bootstrap intervals over prompts, and paired differences between models (Efron & Tibshirani 1993, ch. 13).

Every model is sampled on the same prompts with the same seed per prompt, so a prompt is the unit of
resampling and two models can be compared prompt by prompt. The procedure, for a prompt set of n prompts:

1. Draw B resamples of the prompt indices, each n indices with replacement (``bootstrap_indices``). The
   draw depends only on (n, B, seed): every model of a run resamples the *same* index rows, so a model
   stage can compute its replicates alone and the report pairs them later.
2. Recompute the metric on each resample: the mean of a per-prompt value (CLIP score, HPSv2, attribute
   accuracy, pixel RMSE: ``mean_replicates``), or the set-level metric on the resampled images' features
   (FID against the fixed reference statistics, IS with its splits: ``replicates``). These are theta*_b.
3. The 95% interval is the percentile interval [q_2.5, q_97.5] of theta*_b (``percentile_interval``).
   For a statistic that resampling biases (FID: duplicated images shrink the feature covariance, which
   moves every replicate) the replicates are first centred on the point estimate,
   theta*_b - mean(theta*) + theta (``bias_corrected``), so the interval has the replicates' spread
   around the number the table reports.
4. The paired difference of model a to model b is theta_a - theta_b with the interval of the
   per-resample differences theta*_a,b - theta*_b,b (``paired_difference``): resampling the same
   prompts for both keeps the prompt-to-prompt variation that both share out of the interval, and the
   bias step 3 corrects cancels in the difference.
5. The verdict (``verdict``) reads only the interval: entirely on the good side of 0 is "better",
   entirely on the bad side "worse", containing 0 "within noise" -- never the point estimate.
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np

BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"
# Fewer prompts than this get no interval: a resample of a handful of prompts repeats the same few values, and
# its percentiles would pass for a precision the set does not have.
MIN_PROMPTS = 10


def set_seed(seed: int, set_name: str) -> int:
    """The resampling seed of one prompt set: ``seed`` plus a stable hash of its name (each style resamples on its
    own)."""
    return int(seed) + zlib.crc32(set_name.encode()) % 1_000_003


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """[samples, n] prompt indices drawn with replacement; the same (n, samples, seed) always gives the same rows."""
    if n < 1 or samples < 1:
        raise ValueError(f"bootstrap needs n >= 1 prompts and samples >= 1 resamples, got n={n}, samples={samples}")
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def mean_replicates(values, indices: np.ndarray) -> np.ndarray:
    """Step 2 for a per-prompt metric: the mean of ``values`` [n] over each resample's indices, float64 [B]."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or (indices.size and indices.max() >= len(v)):
        raise ValueError(f"per-prompt values must be [n] with n > every index, got shape {v.shape}")
    return v[indices].mean(axis=1)


def replicates(statistic: Callable[[np.ndarray], float], indices: np.ndarray) -> np.ndarray:
    """Step 2 for a set-level metric: ``statistic(index row)`` for every resample, float64 [B]."""
    return np.array([float(statistic(row)) for row in indices], dtype=np.float64)


def bias_corrected(point: float, reps: np.ndarray) -> np.ndarray:
    """Step 3's centring: the replicates moved so that their mean is the point estimate."""
    reps = np.asarray(reps, dtype=np.float64)
    return reps - reps.mean() + float(point)


def percentile_interval(reps, level: float = 0.95) -> tuple[float, float]:
    """Step 3: the (lo, hi) percentile interval holding ``level`` of the replicates."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    reps = np.asarray(reps, dtype=np.float64)
    if reps.ndim != 1 or len(reps) == 0 or not np.isfinite(reps).all():
        raise ValueError(f"bootstrap replicates must be a non-empty finite [B] array, got shape {reps.shape}")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_difference(point_a: float, point_b: float, reps_a, reps_b, level: float = 0.95) -> dict:
    """Step 4: {diff, lo, hi} of metric(a) - metric(b), from replicates on the same resampled prompts."""
    reps_a, reps_b = np.asarray(reps_a, dtype=np.float64), np.asarray(reps_b, dtype=np.float64)
    if reps_a.shape != reps_b.shape:
        raise ValueError(f"paired replicates must come from the same resamples: shapes {reps_a.shape} vs "
                         f"{reps_b.shape}")
    lo, hi = percentile_interval(reps_a - reps_b, level)
    return {"diff": float(point_a) - float(point_b), "lo": lo, "hi": hi}


def verdict(lo: float, hi: float, higher_is_better: bool) -> str:
    """Step 5: "better" / "worse" / "within noise" for an interval of a - b (a is better when it moves the good way)."""
    if lo > 0.0:
        return BETTER if higher_is_better else WORSE
    if hi < 0.0:
        return WORSE if higher_is_better else BETTER
    return WITHIN_NOISE
