"""Diversity of a set of volumes: mean MS-SSIM over a fixed random set of distinct pairs.

Lower means more diverse. A generator that collapses to a few modes scores higher
than the real data; one that adds noise or texture can score lower, so read it next
to the real set's value, never alone.

The window and number of scales are `metrics.ms_ssim_settings`' for the volume size (the
one rule every MS-SSIM in mriflow uses); the result carries them so a report can print them.

    >>> result = pairwise_ms_ssim(volumes, max_pairs=50, seed=0)
    >>> result["mean"], result["sd"], result["pairs"], result["settings"]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from mriflow.evaluate.metrics import ms_ssim, ms_ssim_settings

DEFAULT_MAX_PAIRS = 50
PAIRS_PER_BATCH = 4


def sample_pairs(count: int, max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0) -> np.ndarray:
    """(P, 2) distinct unordered pairs (i < j) of `count` items, P = min(max_pairs, count (count - 1) / 2),
    drawn uniformly without replacement with a fixed seed."""
    if count < 2:
        raise ValueError(f"need at least 2 volumes to form pairs, got {count}")
    total = count * (count - 1) // 2
    wanted = min(max_pairs, total)
    rng = np.random.default_rng(seed)
    if total <= 200_000:
        first, second = np.triu_indices(count, k=1)
        chosen = np.sort(rng.choice(total, size=wanted, replace=False))
        return np.stack([first[chosen], second[chosen]], axis=1).astype(np.int64)
    # Many volumes: enumerating every pair would be large; draw until enough distinct pairs.
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < wanted:
        i, j = rng.choice(count, size=2, replace=False).tolist()
        pairs.add((min(i, j), max(i, j)))
    return np.asarray(sorted(pairs), dtype=np.int64)


def pairwise_ms_ssim(
    volumes: Sequence[np.ndarray],
    max_pairs: int = DEFAULT_MAX_PAIRS,
    seed: int = 0,
    settings: dict | None = None,
    progress: bool = False,
    description: str = "MS-SSIM pairs",
) -> dict:
    """Mean MS-SSIM over random distinct pairs of `volumes` (each (D, H, W) or (1, D, H, W), in [0, 1]).

    `volumes` may be lazy (any sequence whose items load on access); only the paired
    volumes are read. Returns {"mean", "sd", "values", "pairs" (list of [i, j]), "settings"}.
    """
    pairs = sample_pairs(len(volumes), max_pairs, seed)
    first_volume = np.asarray(volumes[int(pairs[0, 0])], np.float32).squeeze()
    settings = settings or ms_ssim_settings(first_volume.shape)
    values: list[float] = []
    batches = [pairs[i : i + PAIRS_PER_BATCH] for i in range(0, len(pairs), PAIRS_PER_BATCH)]
    for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
        a = torch.from_numpy(np.stack([np.asarray(volumes[int(i)], np.float32).reshape(first_volume.shape) for i in batch[:, 0]]))
        b = torch.from_numpy(np.stack([np.asarray(volumes[int(j)], np.float32).reshape(first_volume.shape) for j in batch[:, 1]]))
        values.extend(ms_ssim(a[:, None], b[:, None], window=settings["window"], sigma=settings["sigma"],
                              weights=settings["weights"]).tolist())
    return {
        "mean": float(np.mean(values)),
        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "values": values,
        "pairs": pairs.tolist(),
        "settings": settings,
    }
