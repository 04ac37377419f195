import random

import numpy as np
import pytest
import torch

from mriflow.utils.seeding import (
    batch_generators,
    item_seed,
    per_sample_normal,
    sample_generators,
    sample_seed,
    seed_everything,
)


def test_sample_seeds_are_pinned():
    """Published runs name their streams by these numbers: a change would redraw every sample."""
    assert sample_seed(0, 0) == 2968811710
    assert sample_seed(3, 1) == 457190280
    assert sample_seed(3, 1, attempt=1) == 3420841517


def test_sample_seeds_are_distinct_streams():
    seeds = {sample_seed(s, i) for s in range(5) for i in range(5)}
    assert len(seeds) == 25  # (s, i) and (s + 1, i − 1) do not collide as seed + index would
    redraws = {sample_seed(2, 3, attempt) for attempt in range(4)}
    assert len(redraws) == 4 and sample_seed(2, 3, 0) == sample_seed(2, 3)


@pytest.mark.parametrize("seed,index,attempt", [(-1, 0, 0), (0, -1, 0), (0, 0, -1)])
def test_negative_seeds_are_refused(seed, index, attempt):
    with pytest.raises(ValueError, match="must be >= 0"):
        sample_seed(seed, index, attempt)


def test_sample_noise_does_not_depend_on_the_batch():
    whole = per_sample_normal(sample_generators(7, 0, 4), (2, 3))  # (4, 2, 3)
    part = per_sample_normal(sample_generators(7, 2, 2), (2, 3))
    by_seed = per_sample_normal(batch_generators(0, 0, 2, [sample_seed(7, 3), sample_seed(7, 1)]), (2, 3))
    assert whole.shape == (4, 2, 3)
    assert torch.equal(part, whole[2:])
    assert torch.equal(by_seed, whole[[3, 1]])
    assert not torch.equal(whole[0], whole[1])


def test_batch_generators_refuse_a_seed_count_other_than_the_batch():
    with pytest.raises(ValueError, match="3 sample seeds for a batch of 2"):
        batch_generators(0, 0, 2, [1, 2, 3])


def test_item_seeds_differ_by_epoch_and_item_and_fit_torch():
    seeds = {item_seed(5, epoch, index) for epoch in range(4) for index in range(100)}
    assert len(seeds) == 400
    assert item_seed(5, 2, 7) == 5020036
    assert 0 <= item_seed(2**62, 10**6, 10**6) < 2**63
    torch.manual_seed(item_seed(2**62, 10**6, 10**6))  # accepted


def test_seed_everything_repeats_python_numpy_and_torch():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(3)
    first = draw()
    seed_everything(3)
    assert draw() == first
    seed_everything(4)
    assert draw() != first
    seed_everything(2**40)  # numpy takes the seed modulo 2**32
