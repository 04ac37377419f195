from __future__ import annotations

import numpy as np
import pytest

from mriflow.data.split import assign_splits, parse_split, split_counts


def subjects(n):
    return [f"s{i:03d}" for i in range(n)]


def test_counts_follow_fractions_and_cover_every_subject():
    assert split_counts(150, (0.8, 0.1, 0.1)) == (120, 15, 15)
    assert sum(split_counts(7, (0.8, 0.1, 0.1))) == 7
    # With as many subjects as splits, no requested split is left empty.
    assert split_counts(3, (0.8, 0.1, 0.1)) == (1, 1, 1)
    assert split_counts(10, (1.0, 0.0, 0.0)) == (10, 0, 0)

    ids = subjects(37)
    assignment = assign_splits(ids, (0.7, 0.2, 0.1), seed=3)
    assert sorted(assignment) == sorted(ids)
    counts = [sum(v == name for v in assignment.values()) for name in ("train", "val", "test")]
    assert counts == list(split_counts(37, (0.7, 0.2, 0.1)))


def test_split_is_deterministic_and_independent_of_input_order():
    ids = subjects(60)
    ages = {s: float(20 + (i * 7) % 60) for i, s in enumerate(ids)}
    first = assign_splits(ids, seed=5, ages=ages)
    again = assign_splits(list(reversed(ids)), seed=5, ages=dict(reversed(list(ages.items()))))
    assert first == again
    other_seed = assign_splits(ids, seed=6, ages=ages)
    assert other_seed != first  # the seed matters
    unstratified = assign_splits(ids, seed=5)
    assert unstratified == assign_splits(list(reversed(ids)), seed=5)


def test_age_stratification_spreads_every_split_over_the_age_range():
    ids = subjects(100)
    rng = np.random.default_rng(0)
    ages = dict(zip(ids, rng.uniform(20, 80, size=100)))
    assignment = assign_splits(ids, (0.8, 0.1, 0.1), seed=0, ages=ages)
    ordered = sorted(ids, key=lambda s: ages[s])
    # Each decile of age holds exactly one validation and one test subject.
    for decile in range(10):
        chunk = [assignment[s] for s in ordered[decile * 10 : (decile + 1) * 10]]
        assert chunk.count("val") == 1 and chunk.count("test") == 1, (decile, chunk)
    for name in ("val", "test"):
        split_ages = [ages[s] for s in ids if assignment[s] == name]
        assert abs(np.mean(split_ages) - np.mean(list(ages.values()))) < 6.0


def test_subjects_without_age_are_still_assigned():
    ids = subjects(20)
    ages = {s: float(i) for i, s in enumerate(ids[:12])}
    ages[ids[12]] = float("nan")  # unknown
    assignment = assign_splits(ids, seed=1, ages=ages)
    assert set(assignment) == set(ids)
    assert [sum(v == n for v in assignment.values()) for n in ("train", "val", "test")] == list(split_counts(20, (0.8, 0.1, 0.1)))


def test_bad_fractions_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="--split"):
        parse_split("0.8,ten,0.1")
    with pytest.raises(ValueError, match="sum to 1"):
        parse_split("0.8,0.3,0.1")
    with pytest.raises(ValueError, match="sum to 1"):
        parse_split("0.9,0.1")
    assert parse_split("0.6, 0.2, 0.2") == (0.6, 0.2, 0.2)
