"""Every seed mriflow derives, in one place: per-sample noise streams, per-item augmentation seeds,
and the seeding of a training process.

Sample i of a generation run with seed s draws from its own stream `sample_seed(s, i)`, so it is
the same whatever the batch size or the number of processes; its noise is drawn on the CPU so it
is the same on every device. Item (epoch, i) of a training set is made with torch's generator
seeded by `item_seed(seed, epoch, i)`, so its augmentation is the same with or without
data-loading workers or a resume.

    >>> generators = sample_generators(seed=0, first_index=8, batch_size=4)   # samples 8 … 11
    >>> x_init = per_sample_normal(generators, (4, 10, 12, 10))              # (4, C, D, H, W)
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch


def sample_seed(seed: int, index: int, attempt: int = 0) -> int:
    """Seed of sample `index` in a run with base seed `seed`; numpy's SeedSequence keeps
    the streams of (s, i) and (s + 1, i − 1) unrelated, unlike seed + index. Attempt a > 0
    (a redraw, e.g. by the privacy filter) is another unrelated stream of the same sample."""
    if seed < 0 or index < 0 or attempt < 0:
        raise ValueError(f"seed, sample index and attempt must be >= 0; got seed={seed}, index={index}, attempt={attempt}")
    entropy = [seed, index] if attempt == 0 else [seed, index, attempt]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def sample_generators(seed: int, first_index: int, batch_size: int) -> list[torch.Generator]:
    """One CPU generator per sample, for samples first_index … first_index + batch_size − 1."""
    return seeded_generators([sample_seed(seed, first_index + i) for i in range(batch_size)])


def seeded_generators(sample_seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample from its own seed (see `sample_seed`)."""
    return [torch.Generator().manual_seed(int(s)) for s in sample_seeds]


def batch_generators(
    seed: int, first_index: int, batch_size: int, sample_seeds: Sequence[int] | None = None
) -> list[torch.Generator]:
    """The generators of a batch: from `sample_seeds` when given, else samples first_index … of `seed`."""
    if sample_seeds is None:
        return sample_generators(seed, first_index, batch_size)
    if len(sample_seeds) != batch_size:
        raise ValueError(f"got {len(sample_seeds)} sample seeds for a batch of {batch_size}")
    return seeded_generators(sample_seeds)


def per_sample_normal(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """(len(generators), *shape) standard normal on the CPU, row i from generator i."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of torch's generator while item `index` of epoch `epoch` of a training set is made."""
    return (seed * 1_000_003 + epoch * 10_007 + index) % 2**63


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (a training process, before it builds networks)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
