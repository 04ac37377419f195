"""Background exactly 0 outside the brain (mriflow.data.background)."""

from __future__ import annotations

import numpy as np

from mriflow.data.background import BACKGROUND_THRESHOLD, brain_mask, zero_background
from conftest import head_phantom


def test_a_faint_background_and_a_detached_speck_are_set_to_zero_and_the_brain_is_kept():
    image, labels = head_phantom((40, 48, 40))
    brain = image / image.max() * (labels > 0)
    rng = np.random.default_rng(0)
    generated = brain + np.where(labels > 0, 0, rng.uniform(0, BACKGROUND_THRESHOLD, brain.shape))  # a decoder's haze
    generated[2:4, 2:4, 2:4] = 0.5  # a bright speck detached from the brain
    cleaned = zero_background(generated.astype(np.float32))
    assert (cleaned[labels == 0] == 0).all()
    inside = labels > 0
    kept = np.isclose(cleaned[inside], generated[inside].astype(np.float32))
    assert kept.mean() > 0.99  # only dark voxels at the brain's edge may go


def test_holes_in_the_brain_are_kept_and_an_empty_volume_stays_empty():
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5:15, 5:15, 5:15] = 0.6
    volume[9:11, 9:11, 9:11] = 0.0  # dark inside (a ventricle's CSF)
    assert brain_mask(volume)[10, 10, 10]
    assert np.array_equal(zero_background(volume), volume)
    assert not brain_mask(np.zeros((4, 4, 4))).any()
    batch = zero_background(np.stack([volume, volume + 0.01]))
    assert batch.shape == (2, 20, 20, 20) and (batch[1][volume == 0.0] == 0).sum() > 0
