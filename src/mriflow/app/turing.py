"""The items of a visual Turing test: real volumes (a split of a prepared dataset) and generated ones.

Both classes are shown identically: each item is served under an opaque id (keyed by a secret of the study that
only the answer database holds), re-encoded by `encoding` (background
exactly 0, one quantisation, one header, one compression, one length), so neither the URL, the file name, the
header, the compression nor the size tells a rater which class it is, and the viewer shows both with the same
fixed window [0, 1]. The study draws the same number of volumes from each class (chance is then 50 %); the draw is
seeded, so a restart brings back the same items. Its fingerprint (SHA-256 over every item's id, class and file
content) is what the answer database records, so that answers of two studies are never mixed.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mriflow.app.encoding import encode_items
from mriflow.app.paths import inside
from mriflow.app.store import Item
from mriflow.data.dataset import read_manifest
from mriflow.data.io import is_nifti
from mriflow.utils.files import sha256

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
    fingerprint: str = ""  # SHA-256 over the items' ids, classes and file contents
    description: dict[str, Any] = field(default_factory=dict)  # what the organizer asked for, for messages
    _served: dict[str, bytes] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def encode(self) -> None:
        """Encode every item once (`encoding.encode_items`): the padding needs them all, and a rater then waits
        the same for every item."""
        with self._lock:
            if self._served is None:
                self._served = encode_items(self.paths, self.affine, self.shape)

    def volume_bytes(self, item_id: str) -> bytes:
        self.encode()
        return self._served[item_id]


def fingerprint(items: list[Item], paths: dict[str, Path]) -> str:
    """SHA-256 over (id, class, SHA-256 of the file) of every item, in id order: the same items with the same
    contents give the same study, a regenerated --fake folder under the same names another."""
    lines = sorted(f"{item.id} {item.truth} {sha256(paths[item.id])}" for item in items)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    try:
        image = nib.load(str(path))
    except Exception as error:
        raise ValueError(f"{path}: cannot be read as NIfTI ({str(error).splitlines()[0] if str(error) else error})") from None
    return tuple(int(n) for n in image.shape), image.affine


def item_id(truth: str, path: Path, secret: str | None) -> str:
    """An item's opaque id: an HMAC of its class and file under the study's secret (kept in the answer database,
    which the app never serves), so that knowing the folders' layout does not let a rater work out which id is
    real; without a secret (a database begun before secrets were kept) the plain SHA-256 those used."""
    message = f"{truth}:{path.resolve()}".encode()
    if secret is None:
        return hashlib.sha256(message).hexdigest()[:16]
    return hmac.new(bytes.fromhex(secret), message, hashlib.sha256).hexdigest()[:16]


def new_secret() -> str:
    return secrets.token_hex(32)


def build_study(real: str | Path, fake: str | Path, split: str = "test", per_class: int | None = None,
                seed: int = 0, secret: str | None = None) -> Study:
    """Draw the same number of real and generated volumes (`per_class`, default the smaller class capped at
    DEFAULT_PER_CLASS); refuse folders that hold none or whose grids differ. `secret`: the study's key for the
    items' ids (`item_id`)."""
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
            identifier = item_id(truth, path, secret)
            items.append(Item(identifier, truth, str(path)))
            paths[identifier] = path
    description = {"real": str(real), "split": split, "fake": str(fake), "per_class": n}
    return Study(items, paths, np.asarray(affine, dtype=np.float64), tuple(shape[:3]),
                 {k: len(v) for k, v in chosen.items()}, fingerprint(items, paths), description)
