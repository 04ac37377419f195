from __future__ import annotations

import numpy as np
import pytest

from conftest import head_phantom
from mriflow.evaluate.diversity import pairwise_ms_ssim, sample_pairs
from mriflow.evaluate.metrics import ms_ssim_settings


def test_pairs_are_distinct_ordered_and_seeded():
    pairs = sample_pairs(12, max_pairs=20, seed=3)
    assert pairs.shape == (20, 2)
    assert (pairs[:, 0] < pairs[:, 1]).all() and pairs.max() < 12
    assert len({tuple(p) for p in pairs.tolist()}) == 20
    np.testing.assert_array_equal(pairs, sample_pairs(12, max_pairs=20, seed=3))
    assert not np.array_equal(pairs, sample_pairs(12, max_pairs=20, seed=4))
    assert sample_pairs(4, max_pairs=50).shape == (6, 2)  # all pairs when fewer exist
    many = sample_pairs(1000, max_pairs=30, seed=0)  # the large-set path
    assert len({tuple(p) for p in many.tolist()}) == 30 and (many[:, 0] < many[:, 1]).all()


class CountingVolumes:
    """A lazy sequence of phantom volumes that records which items were read."""

    def __init__(self, volumes):
        self.volumes, self.read = volumes, set()

    def __len__(self):
        return len(self.volumes)

    def __getitem__(self, index):
        self.read.add(index)
        return self.volumes[index]


def phantom_set(count, jitter, shape=(36, 40, 36)):
    rng = np.random.default_rng(0)
    base, _ = head_phantom(shape, seed=0)
    base = base / base.max()
    volumes = []
    for _ in range(count):
        shifted = np.roll(base, tuple(rng.integers(-jitter, jitter + 1, size=3)), axis=(0, 1, 2)) if jitter else base
        volumes.append(np.clip(shifted + rng.normal(0, 0.01, shape), 0, 1).astype(np.float32))
    return volumes


def test_identical_volumes_have_ms_ssim_one():
    volume = phantom_set(1, 0)[0]
    result = pairwise_ms_ssim([volume, volume.copy(), volume.copy()], max_pairs=3)
    assert result["values"] == pytest.approx([1.0] * 3, abs=1e-6)
    assert result["settings"] == ms_ssim_settings(volume.shape)


def test_a_diverse_set_scores_lower_and_only_paired_volumes_are_read():
    near_copies = pairwise_ms_ssim(phantom_set(6, 0), max_pairs=4, seed=0)
    lazy = CountingVolumes(phantom_set(10, 4))
    diverse = pairwise_ms_ssim(lazy, max_pairs=3, seed=0)
    assert diverse["mean"] < near_copies["mean"]
    assert len(diverse["values"]) == 3 and len(diverse["pairs"]) == 3
    assert lazy.read == {i for pair in diverse["pairs"] for i in pair}
