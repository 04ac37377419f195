from __future__ import annotations

import numpy as np
import pytest

from mriflow.evaluate.bootstrap import MIN_SAMPLE_SIZE, bootstrap, default_sample_size
from mriflow.evaluate.metrics import set_metrics


def mean_gap(real, fake):
    return {"gap": float(fake.mean() - real.mean()), "rows": float(len(real) + len(fake))}


def features(n, seed, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, 6)) + shift


def test_bootstrap_shapes_and_summary():
    real, fake = features(40, 0), features(30, 1, shift=1.0)
    summary = bootstrap(real, fake, mean_gap, n=10, rounds=7, seed=3)
    assert summary["_settings"] == {"n": 10, "rounds": 7, "seed": 3, "replace": False}
    assert len(summary["gap"]["values"]) == 7
    assert summary["rows"]["values"] == [20.0] * 7  # n rows from each side every round
    assert summary["gap"]["mean"] == pytest.approx(np.mean(summary["gap"]["values"]))
    assert summary["gap"]["sd"] == pytest.approx(np.std(summary["gap"]["values"], ddof=1))
    assert summary["gap"]["sd"] > 0
    assert summary["gap"]["full"] == pytest.approx(fake.mean() - real.mean())


def test_bootstrap_is_seeded():
    real, fake = features(40, 0), features(30, 1)
    first = bootstrap(real, fake, mean_gap, n=10, rounds=5, seed=11)
    again = bootstrap(real, fake, mean_gap, n=10, rounds=5, seed=11)
    other = bootstrap(real, fake, mean_gap, n=10, rounds=5, seed=12)
    assert first["gap"]["values"] == again["gap"]["values"]
    assert first["gap"]["values"] != other["gap"]["values"]


def test_draws_without_replacement_never_repeat_a_row():
    real = np.arange(20, dtype=float)[:, None]

    def distinct(r, f):
        return {"distinct_real": len(np.unique(r)), "distinct_fake": len(np.unique(f))}

    summary = bootstrap(real, real.copy(), distinct, n=15, rounds=10, seed=0)
    assert set(summary["distinct_real"]["values"]) == {15.0}
    with_replacement = bootstrap(real, real.copy(), distinct, n=15, rounds=10, seed=0, replace=True)
    assert min(with_replacement["distinct_real"]["values"]) < 15


def test_default_sample_size_scales_with_the_data():
    assert default_sample_size(1000, 5000) == 200
    assert default_sample_size(100, 100) == 80
    assert default_sample_size(10, 50) == 8
    assert default_sample_size(MIN_SAMPLE_SIZE, 50) == MIN_SAMPLE_SIZE
    with pytest.raises(ValueError, match="too few volumes"):
        default_sample_size(3, 50)


def test_bootstrap_refuses_n_larger_than_a_set():
    with pytest.raises(ValueError, match="larger than the set"):
        bootstrap(features(10, 0), features(30, 1), mean_gap, n=20, rounds=3)


def test_bootstrap_of_set_metrics_separates_shifted_sets():
    real = features(60, 0)
    same = bootstrap(real, features(60, 1), set_metrics, rounds=5, seed=0)
    shifted = bootstrap(real, features(60, 2, shift=1.5), set_metrics, rounds=5, seed=0)
    assert same["_settings"]["n"] == 48
    assert shifted["fd"]["mean"] > same["fd"]["mean"] + 3 * same["fd"]["sd"]
    assert shifted["precision"]["mean"] < same["precision"]["mean"]
