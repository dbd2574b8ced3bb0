"""Bootstrap intervals and paired differences (sd_distill/evaluate/stats.py), against cases with known answers."""

import numpy as np
import pytest

from sd_distill.evaluate import stats
from sd_distill.evaluate.metrics.fid import feature_statistics, fid_to_reference, frechet_distance
from sd_distill.evaluate.metrics.inception_score import inception_score


def test_indices_are_deterministic_per_n_samples_seed_and_sets_resample_independently():
    a, b = stats.bootstrap_indices(50, 200, 7), stats.bootstrap_indices(50, 200, 7)
    assert a.shape == (200, 50) and np.array_equal(a, b) and a.min() >= 0 and a.max() < 50
    assert not np.array_equal(a, stats.bootstrap_indices(50, 200, 8))
    assert stats.set_seed(0, "hpsv2-anime") != stats.set_seed(0, "hpsv2-photo")
    assert stats.set_seed(3, "coco") == stats.set_seed(3, "coco")
    with pytest.raises(ValueError, match="n >= 1"):
        stats.bootstrap_indices(0, 10, 0)


def test_identical_models_give_a_zero_difference_within_noise():
    values = np.random.default_rng(0).normal(70, 10, 300)
    idx = stats.bootstrap_indices(300, 1000, 0)
    reps = stats.mean_replicates(values, idx)
    d = stats.paired_difference(values.mean(), values.mean(), reps, reps)
    assert d == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    assert stats.verdict(d["lo"], d["hi"], higher_is_better=True) == stats.WITHIN_NOISE
    # two independent draws of the same model: the interval contains 0
    other = np.random.default_rng(1).normal(70, 10, 300)
    d = stats.paired_difference(values.mean(), other.mean(), reps, stats.mean_replicates(other, idx))
    assert d["lo"] < 0 < d["hi"]


def test_a_constant_offset_gives_exactly_that_offset_and_a_verdict_by_direction():
    values = np.random.default_rng(0).normal(0, 5, 200)
    idx = stats.bootstrap_indices(200, 500, 3)
    a, b = stats.mean_replicates(values + 1.5, idx), stats.mean_replicates(values, idx)
    d = stats.paired_difference((values + 1.5).mean(), values.mean(), a, b)
    assert d["diff"] == pytest.approx(1.5) and d["lo"] == pytest.approx(1.5) and d["hi"] == pytest.approx(1.5)
    assert stats.verdict(d["lo"], d["hi"], higher_is_better=True) == stats.BETTER
    assert stats.verdict(d["lo"], d["hi"], higher_is_better=False) == stats.WORSE  # e.g. FID up by 1.5
    assert stats.verdict(-2.0, -0.1, higher_is_better=False) == stats.BETTER
    # the marginal intervals of a and b are wide (sd 5 / sqrt(200) each); only pairing removes the shared noise
    lo, hi = stats.percentile_interval(a)
    assert hi - lo > 1.0


def test_percentile_interval_of_a_mean_covers_about_95_percent_on_a_synthetic_normal():
    rng = np.random.default_rng(0)
    n, trials, covered = 60, 300, 0
    idx = stats.bootstrap_indices(n, 1000, 11)
    for _ in range(trials):
        x = rng.normal(3.0, 2.0, n)
        lo, hi = stats.percentile_interval(stats.mean_replicates(x, idx), 0.95)
        covered += lo <= 3.0 <= hi
    assert 0.91 <= covered / trials <= 0.98  # percentile intervals of a mean run slightly short at n = 60
    lo, hi = stats.percentile_interval(np.arange(1001.0), 0.9)
    assert (lo, hi) == pytest.approx((50.0, 950.0))
    with pytest.raises(ValueError, match="level"):
        stats.percentile_interval(np.arange(10.0), 1.0)


def test_bias_correction_centres_replicates_on_the_point_estimate():
    reps = np.array([10.0, 12.0, 14.0])
    assert np.allclose(stats.bias_corrected(3.0, reps), [1.0, 3.0, 5.0])


def test_fid_to_fixed_reference_equals_frechet_distance_and_bootstraps_by_features():
    rng = np.random.default_rng(0)
    ref, gen = rng.normal(size=(300, 16)), rng.normal(0.2, 1.1, size=(200, 16)) @ rng.normal(size=(16, 16)) * 0.5
    mu_r, s_r = feature_statistics(ref)
    fid = fid_to_reference(mu_r, s_r)
    assert fid(gen) == pytest.approx(frechet_distance(mu_r, s_r, *feature_statistics(gen)), rel=1e-9)
    idx = stats.bootstrap_indices(200, 50, 0)
    reps = stats.replicates(lambda row: fid(gen[row]), idx)
    assert reps[3] == pytest.approx(frechet_distance(mu_r, s_r, *feature_statistics(gen[idx[3]])), rel=1e-9)
    # a model with the same features has the same FID on every resample: the difference is exactly 0
    d = stats.paired_difference(fid(gen), fid(gen), reps, stats.replicates(lambda row: fid(gen.copy()[row]), idx))
    assert (d["lo"], d["hi"]) == (0.0, 0.0)


def test_inception_score_replicates_are_the_score_of_the_resampled_logits():
    logits = np.random.default_rng(0).normal(size=(40, 5)) * 3
    idx = stats.bootstrap_indices(40, 20, 1)
    reps = stats.replicates(lambda row: inception_score(logits[row], splits=4)[0], idx)
    assert reps[5] == pytest.approx(inception_score(logits, splits=4, permutation=idx[5])[0])
