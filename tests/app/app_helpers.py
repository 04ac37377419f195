"""Helpers of the app's tests: small real and generated folders for the Turing test (imported, not a conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import head_phantom, write_prepared
from mriflow.config import Grid
from mriflow.data.io import save_volume, template_affine

SHAPE = (16, 20, 16)


def write_study(root: Path, real_test: int = 6, fakes: int = 6, shape=SHAPE) -> tuple[Path, Path]:
    """A prepared folder with `real_test` test subjects (and two training ones) and a folder of `fakes` generated
    volumes on the same grid, each sample_XXXXX.nii.gz with a label map beside it (which is not an item)."""
    real = write_prepared(root / "real", splits=("train", "train") + ("test",) * real_test, shape=shape)
    fake = root / "fake"
    fake.mkdir()
    affine = template_affine(Grid("test", 4.0, shape))
    for i in range(fakes):
        image, labels = head_phantom(shape, seed=100 + i)
        save_volume(fake / f"sample_{i:05d}.nii.gz", np.clip(image / image.max() * 0.9, 0, 1), affine)
        save_volume(fake / f"sample_{i:05d}_labels.nii.gz", labels.astype(np.uint8), affine, dtype=np.uint8)
    return real, fake
