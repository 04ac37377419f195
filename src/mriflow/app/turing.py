"""The items of a visual Turing test: real volumes (a split of a prepared dataset) and generated ones.

Both classes are shown identically: each item is served under an opaque id, re-encoded as a fresh
float32 NIfTI with the study's one affine and an empty description (gzip without a time stamp), so
neither the URL, the file name, the header nor the compression tells a rater which class it is, and
the viewer shows both with the same fixed window [0, 1]. The study draws the same number of volumes
from each class (chance is then 50 %); the draw is seeded, so a restart brings back the same items.
"""

from __future__ import annotations

import gzip
import hashlib
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from mriflow.app.paths import inside
from mriflow.app.store import Item
from mriflow.data.dataset import read_manifest
from mriflow.data.io import is_nifti, load_volume

AFFINE_TOLERANCE = 1e-3  # mm
DEFAULT_PER_CLASS = 25


def generated_volumes(folder: Path) -> list[Path]:
    """The sample volumes of a `mriflow generate` folder (sample_*.nii.gz, label maps left out)."""
    return sorted(p for p in folder.glob("sample_*.nii*") if is_nifti(p) and "_labels" not in p.name)


def real_volumes(data: Path, split: str) -> list[Path]:
    """The image of every subject of `split` in a prepared dataset (manifest.csv + images/)."""
    table = read_manifest(data)
    rows = table[table["split"].astype(str) == split]
    if rows.empty:
        splits = sorted(table["split"].astype(str).unique())
        raise ValueError(f"{data}: no subjects in split {split!r} (splits: {', '.join(splits)}); choose one with --split")
    return [inside(data, str(image)) for image in rows["image"]]


@dataclass
class Study:
    items: list[Item]
    paths: dict[str, Path]  # item id -> volume file (the organizer's side only)
    affine: np.ndarray
    shape: tuple[int, int, int]
    counts: dict[str, int] = field(default_factory=dict)

    def volume_bytes(self, item_id: str) -> bytes:
        return _encoded(self.paths[item_id], self.affine.tobytes(), self.shape)


@lru_cache(maxsize=256)
def _encoded(path: Path, affine_bytes: bytes, shape: tuple[int, int, int]) -> bytes:
    data, _ = load_volume(path)
    if data.shape != shape:
        raise ValueError(f"{path}: shape {data.shape} differs from the study's {shape}")
    affine = np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4)
    image = nib.Nifti1Image(np.clip(np.nan_to_num(data), 0.0, 1.0).astype(np.float32), affine)
    image.header.set_qform(affine, code=4)
    image.header.set_sform(affine, code=4)
    image.header["descrip"] = b""
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), mtime=0)


def _header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    try:
        image = nib.load(str(path))
    except Exception as error:
        raise ValueError(f"{path}: cannot be read as NIfTI ({str(error).splitlines()[0] if str(error) else error})") from None
    return tuple(int(n) for n in image.shape), image.affine


def build_study(real: str | Path, fake: str | Path, split: str = "test", per_class: int | None = None,
                seed: int = 0) -> Study:
    """Draw the same number of real and generated volumes (`per_class`, default the smaller class capped at
    DEFAULT_PER_CLASS); refuse folders that hold none or whose grids differ."""
    real, fake = Path(real), Path(fake)
    if not real.is_dir():
        raise FileNotFoundError(f"--real {real}: no such folder (a prepared dataset: manifest.csv + images/)")
    if not fake.is_dir():
        raise FileNotFoundError(f"--fake {fake}: no such folder (generated volumes: sample_*.nii.gz)")
    reals, fakes = real_volumes(real, split), generated_volumes(fake)
    if not fakes:
        raise ValueError(f"--fake {fake}: no sample_*.nii.gz volumes; generate some with `mriflow generate --out {fake}`")
    available = min(len(reals), len(fakes))
    n = min(available, DEFAULT_PER_CLASS) if per_class is None else per_class
    if n < 1 or n > available:
        raise ValueError(f"--per-class {n}: between 1 and {available} (real {split}: {len(reals)}, generated: {len(fakes)})")
    rng = random.Random(seed)
    chosen = {"real": sorted(rng.sample(reals, n)), "synthetic": sorted(rng.sample(fakes, n))}
    shape, affine = _header(chosen["real"][0])
    items, paths = [], {}
    for truth, volumes in chosen.items():
        for path in volumes:
            own_shape, own_affine = _header(path)
            if own_shape != shape or not np.allclose(own_affine, affine, atol=AFFINE_TOLERANCE):
                raise ValueError(f"{path}: grid {own_shape} differs from the real {split} data's {shape} (or its affine "
                                 "does); compare volumes on one grid: generate with a model of the data's preset")
            item_id = hashlib.sha256(f"{truth}:{path.resolve()}".encode()).hexdigest()[:16]
            items.append(Item(item_id, truth, str(path)))
            paths[item_id] = path
    return Study(items, paths, np.asarray(affine, dtype=np.float64), tuple(shape[:3]), {k: len(v) for k, v in chosen.items()})
