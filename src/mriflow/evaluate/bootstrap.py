"""Bootstrap spread of set metrics, computed on cached feature matrices (never on volumes).

Each round draws `n` rows of the real and `n` rows of the generated features and
evaluates every metric on them; the summary is the mean ± standard deviation over
`rounds` rounds.

Sampling is *without* replacement by default (a subsampling, "m-out-of-n",
bootstrap): drawing with replacement duplicates vectors, and duplicates shrink the
k-nearest-neighbour radii of precision/recall/density/coverage to zero and bias the
unbiased KID/MMD estimators. Without replacement, n must stay below the set sizes
or every round draws the same sets, hence the default n = 80 % of the smallest set
(capped at 200). Set metrics such as FD depend on n, so compare numbers only at the
same n: evaluation uses one n for every column of its table.

    >>> summary = bootstrap(real_features, fake_features, set_metrics, n=50, rounds=20, seed=0)
    >>> summary["fd"]["mean"], summary["fd"]["sd"], summary["fd"]["values"]  # values: (rounds,)
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from tqdm import tqdm

from mriflow.utils.text import counted

DEFAULT_ROUNDS = 20
MAX_SAMPLE_SIZE = 200
SAMPLE_FRACTION = 0.8
# Precision/recall need more than k = 5 neighbours in each drawn set.
MIN_SAMPLE_SIZE = 7


def default_sample_size(*set_sizes: int, cap: int = MAX_SAMPLE_SIZE, fraction: float = SAMPLE_FRACTION) -> int:
    """n = min(cap, floor(fraction * smallest set)), but at least MIN_SAMPLE_SIZE when the sets allow it."""
    smallest = min(set_sizes)
    if smallest < MIN_SAMPLE_SIZE:
        raise ValueError(f"too few volumes for the set metrics: the smallest set has {smallest}, "
                         f"at least {MIN_SAMPLE_SIZE} are needed (precision/recall use k = 5 neighbours)")
    return int(min(cap, max(MIN_SAMPLE_SIZE, int(fraction * smallest))))


def draw_indices(size: int, n: int, rng: np.random.Generator, replace: bool = False) -> np.ndarray:
    if not replace and n > size:
        raise ValueError(f"n={n} is larger than the set it is drawn from ({counted(size, 'volume')}) without "
                         "replacement; pass a smaller --n")
    return np.sort(rng.choice(size, size=n, replace=replace))


def bootstrap(
    real: np.ndarray,
    fake: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], Mapping[str, float]],
    n: int | None = None,
    rounds: int | None = None,
    seed: int = 0,
    replace: bool = False,
    progress: bool = False,
    description: str = "bootstrap",
) -> dict[str, dict]:
    """Evaluate `statistic(real[i], fake[j])` on `rounds` random draws of n rows from each set.

    Returns {metric: {"mean", "sd", "values" (list, one per round), "full"}}, where
    "full" is the statistic on all rows (no resampling), and the draw settings under
    the key "_settings": {"n", "rounds", "seed", "replace"}. The same seed gives the
    same draws.
    """
    real, fake = np.asarray(real), np.asarray(fake)
    rounds = DEFAULT_ROUNDS if rounds is None else int(rounds)
    if rounds < 2:
        raise ValueError(f"rounds={rounds}: the bootstrap needs at least 2 rounds for a standard deviation")
    n = default_sample_size(len(real), len(fake)) if n is None else int(n)
    if n < 2:
        raise ValueError(f"n={n}: draw at least 2 vectors per set")
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in tqdm(range(rounds), desc=description, disable=not progress, leave=False):
        result = statistic(real[draw_indices(len(real), n, rng, replace)], fake[draw_indices(len(fake), n, rng, replace)])
        for name, value in result.items():
            values.setdefault(name, []).append(float(value))
    full = statistic(real, fake)
    summary: dict[str, dict] = {
        name: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)), "values": v, "full": float(full[name])}
        for name, v in values.items()
    }
    summary["_settings"] = {"n": n, "rounds": rounds, "seed": seed, "replace": replace}
    return summary
