"""Helpers of the app's tests: small real and generated folders for the Turing test (imported, not a conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import head_phantom, write_prepared
from mriflow.config import Grid
from mriflow.data.io import save_volume, template_affine

SHAPE = (16, 20, 16)
NIIVUE_STAND_IN = "window.niivue = {};"  # what the API tests serve in place of the NiiVue bundle


def write_study(root: Path, real_test: int = 6, fakes: int = 6, shape=SHAPE, haze: float = 0.0,
                fake_name: str = "fake", first_seed: int = 100) -> tuple[Path, Path]:
    """A prepared folder with `real_test` test subjects (and two training ones) and a folder of `fakes` generated
    volumes on the same grid, each sample_XXXXX.nii.gz with a label map beside it (which is not an item).
    `haze` > 0 gives the generated ones faint values up to it outside the head, as a decoder leaves them."""
    real = root / "real"
    if not (real / "manifest.csv").is_file():
        write_prepared(real, splits=("train", "train") + ("test",) * real_test, shape=shape)
    fake = root / fake_name
    fake.mkdir()
    affine = template_affine(Grid("test", 4.0, shape))
    rng = np.random.default_rng(first_seed)
    for i in range(fakes):
        image, labels = head_phantom(shape, seed=first_seed + i)
        image = np.clip(image / image.max() * 0.9, 0, 1)
        if haze:
            image = np.where(image > 0, image, rng.uniform(haze / 10, haze, shape)).astype(np.float32)
        save_volume(fake / f"sample_{i:05d}.nii.gz", image, affine)
        save_volume(fake / f"sample_{i:05d}_labels.nii.gz", labels.astype(np.uint8), affine, dtype=np.uint8)
    return real, fake


def poll(client, job_id: str, limit: float = 120.0) -> dict:
    """A generation or edit job's view once it is done or failed (AssertionError after `limit` seconds)."""
    import time

    start = time.time()
    while time.time() - start < limit:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "error"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {limit} s")

