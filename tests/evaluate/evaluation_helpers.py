"""Helpers of the evaluation tests: a small prepared 4 mm folder of phantom people and generated folders made
from its subjects (imported, not a conftest: a second conftest.py would shadow tests/conftest.py for
`from conftest import`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from conftest import head_phantom
from mriflow.config import get_grid
from mriflow.data.io import load_volume, save_volume, template_affine

GRID = get_grid("4mm")
SPLITS = {"train": 10, "val": 8, "test": 8}
FAST = {"bootstrap": 3, "diversity_pairs": 4, "progress": False, "backbone": "intensity"}


def person(seed):
    """A phantom subject at 4 mm: shared anatomy, an individual shift and smooth tissue variation."""
    image, labels = head_phantom(GRID.shape, seed=seed)
    rng = np.random.default_rng(seed)
    variation = gaussian_filter(rng.normal(0, 1, GRID.shape), 2.0) * 600
    image = np.clip(np.where(labels > 0, image + variation, image) / 1400.0, 0, 1)
    shift = tuple(rng.integers(-2, 3, size=3))
    image, brain = np.roll(image, shift, axis=(0, 1, 2)), np.roll(labels > 0, shift, axis=(0, 1, 2))
    image[image < 0.05] = 0  # prepared volumes have a zero background
    return image.astype(np.float32), brain.astype(np.uint8)


def write_evaluation_set(root: Path) -> Path:
    """A prepared 4 mm folder of phantom subjects (SPLITS of them), with ages and sexes in the manifest."""
    affine = template_affine(GRID)
    rows, seed = [], 0
    for split, count in SPLITS.items():
        for _ in range(count):
            image, mask = person(seed)
            name = f"sub{seed:02d}"
            save_volume(root / "images" / f"{name}.nii.gz", image, affine)
            save_volume(root / "masks" / f"{name}.nii.gz", mask, affine, dtype=np.uint8)
            rows.append({"subject": name, "image": f"images/{name}.nii.gz", "mask": f"masks/{name}.nii.gz", "labels": "",
                         "split": split, "age": 20 + 3 * seed, "sex": "FM"[seed % 2]})
            seed += 1
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "prepare.json").write_text(json.dumps({"preset": "4mm", "affine": affine.tolist()}))
    return root


def write_fakes(folder, prepared, subjects, transform=lambda v: v, sidecar=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, subject in enumerate(subjects):
        volume, affine = load_volume(prepared / "images" / f"{subject}.nii.gz")
        save_volume(folder / f"sample_{i:03d}.nii.gz", transform(volume), affine)
        if sidecar:
            (folder / f"sample_{i:03d}.json").write_text(json.dumps(sidecar(i, subject)))
    return folder


def scanner_copy(root: Path, subject: str = "sub03") -> tuple[Path, np.ndarray, np.ndarray]:
    """A phantom of write_evaluation_set stored as a scanner might: 1.5 mm voxels, right to left (LAS), a margin of 6
    empty voxels, other intensities, gzipped as root/raw/my_t1.nii.gz; (that file, the 4 mm volume it came from, its
    affine on the 4 mm template grid)."""
    import nibabel as nib
    from scipy import ndimage

    source = nib.load(str(write_evaluation_set(root / "real") / "images" / f"{subject}.nii.gz"))
    volume = np.asarray(source.dataobj, np.float32)
    data = np.pad(ndimage.zoom(volume, 4 / 1.5, order=1)[::-1], 6)
    affine = np.diag([-1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = source.affine[:3, 3] + np.array([(data.shape[0] - 13) * 1.5, -9.0, -9.0])
    raw = root / "raw" / "my_t1.nii.gz"
    raw.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data * 800, affine), str(raw))
    return raw, volume, source.affine
