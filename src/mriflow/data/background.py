"""Background exactly 0 outside the brain, in generated volumes as in prepared ones.

A prepared volume is the skull-stripped scan times its brain mask, so every voxel outside the brain is exactly 0.
A generator's output is not: a decoder or a sampler leaves faint values there (the 2 mm autoencoder model put 28 %
of a volume's voxels in (0, 0.02)), which shows in the background, in a file's compressed size (a Turing test's
rater could tell the classes apart by it) and in any statistic taken over the whole grid. `zero_background` finds
the brain of a volume the way one would by eye and sets everything else to 0:

    brain = the largest 26-connected component of {voxel > 0.02}, its holes filled

On the prepared IXI scans at 2 mm this mask agrees with the preparation's own (Dice 0.996 over 10 subjects) and
what it removes inside their masks is 4e-5 of the brain's intensity: dark voxels at the very edge.

    >>> volume = zero_background(volume)            # (D, H, W) in [0, 1]
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BACKGROUND_THRESHOLD = 0.02
BACKGROUND_RULE = ("outside the brain set to exactly 0; brain = the largest 26-connected component of voxels above "
                   f"{BACKGROUND_THRESHOLD}, holes filled (mriflow.data.background)")


def brain_mask(volume: np.ndarray, threshold: float = BACKGROUND_THRESHOLD) -> np.ndarray:
    """The brain of one volume (D, H, W) as a boolean mask: the largest 26-connected component above `threshold`,
    holes filled; all False when no voxel is above it."""
    above = np.asarray(volume) > threshold
    components, count = ndimage.label(above, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return above
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(components == sizes.argmax())


def zero_background(volumes: np.ndarray, threshold: float = BACKGROUND_THRESHOLD) -> np.ndarray:
    """Volumes (D, H, W) or (B, D, H, W) with every voxel outside `brain_mask` set to 0 (a new array)."""
    volumes = np.asarray(volumes)
    if volumes.ndim == 3:
        return np.where(brain_mask(volumes, threshold), volumes, 0).astype(volumes.dtype)
    return np.stack([zero_background(volume, threshold) for volume in volumes])
