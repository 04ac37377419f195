"""Deterministic subject-level train/val/test split, stratified by age when ages are known.

The split depends only on the set of subject ids, their ages, the fractions and
the seed (not on the order subjects are given in), so re-running `prepare`
reproduces it.

Stratification: subjects with an age are sorted by (age, id) and cut into bins
of consecutive ages; each bin is shuffled with the seeded RNG, and subjects are
dealt out in bin order to whichever split is furthest below its share so far.
Every age range therefore contributes to every split in proportion. Subjects
without an age are shuffled and dealt out after them with the same counters.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def parse_split(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1), checked by :func:`check_fractions`."""
    try:
        fractions = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--split {text!r}: give three numbers train,val,test such as 0.8,0.1,0.1") from None
    return check_fractions(fractions)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions {fractions} must be three non-negative numbers (train, val, test) that sum to 1")
    return fractions  # type: ignore[return-value]


def split_counts(total: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Subjects per split: largest-remainder rounding of ``total * fraction``.

    When there are at least as many subjects as non-empty fractions, every split
    with a non-zero fraction gets at least one subject (taken from the largest).
    """
    fractions = check_fractions(fractions)
    exact = [total * f for f in fractions]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    wanted = [k for k in range(3) if fractions[k] > 0]
    if total >= len(wanted):
        for k in wanted:
            if counts[k] == 0:
                counts[max(range(3), key=lambda j: counts[j])] -= 1
                counts[k] += 1
    return tuple(counts)  # type: ignore[return-value]


def assign_splits(
    subjects: Sequence[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    ages: Mapping[str, float] | None = None,
    bin_size: int | None = None,
) -> dict[str, str]:
    """Map each subject id to "train", "val" or "test".

    `ages` (subject -> age; absent or NaN = unknown) turns on stratification;
    `bin_size` defaults to ``ceil(1 / smallest non-zero fraction)`` so each age bin
    can hold one subject of the smallest split.
    """
    ids = sorted(set(subjects))
    if len(ids) != len(subjects):
        raise ValueError("assign_splits: subject ids must be unique")
    counts = split_counts(len(ids), fractions)
    rng = np.random.default_rng(seed)
    ages = {s: float(a) for s, a in (ages or {}).items() if s in set(ids) and a is not None and math.isfinite(float(a))}
    if bin_size is None:
        bin_size = math.ceil(1.0 / min(f for f in fractions if f > 0))

    aged = sorted(ages, key=lambda s: (ages[s], s))
    order: list[str] = []
    for start in range(0, len(aged), bin_size):
        chunk = aged[start : start + bin_size]
        order += [chunk[i] for i in rng.permutation(len(chunk))]
    unaged = [s for s in ids if s not in ages]
    order += [unaged[i] for i in rng.permutation(len(unaged))]

    assigned: dict[str, str] = {}
    taken = [0, 0, 0]
    for position, subject in enumerate(order, start=1):
        # Deal to the split furthest below its share of the first `position` subjects.
        open_splits = [k for k in range(3) if taken[k] < counts[k]]
        k = max(open_splits, key=lambda j: (counts[j] * position / len(ids) - taken[j], -j))
        taken[k] += 1
        assigned[subject] = SPLITS[k]
    return {s: assigned[s] for s in ids}
