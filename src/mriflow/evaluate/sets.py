"""The sets an evaluation compares, found and checked before anything is measured.

From a prepared folder: the evaluation split (default "test"), a second real split for the
Real vs Real yardstick (default "val"), the training split and every held-out subject (for the
privacy audit); from the generated folder: every NIfTI volume, which must share the real data's
grid (shape and affine), and the covariates each was drawn for (its JSON sidecar).

    >>> sets = load_sets("prepared/", "samples/", "report/")
    >>> len(sets.real), len(sets.other), len(sets.generated), sets.shape
    (15, 15, 32, (40, 48, 40))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from mriflow.data.dataset import read_manifest, read_preparation
from mriflow.data.io import is_nifti, load_volume, strip_nifti_suffix
from mriflow.generate_io import is_label_map
from mriflow.utils.files import read_json

AFFINE_TOLERANCE = 1e-3
RANGE_TOLERANCE = 1e-3  # generated intensities this far outside [0, 1] are reported, then clipped
BATCH_SIZE = 8  # volumes per pass of a network (backbone, anatomy predictor, autoencoder)


@dataclass
class EvaluationSets:
    """The volumes of one evaluation: real splits from the manifest, generated files with their sidecars."""

    real_dir: Path
    fake_dir: Path
    split: str  # the evaluation split
    other_split: str  # the Real vs Real yardstick
    real_rows: pd.DataFrame  # manifest rows of `split`
    other_rows: pd.DataFrame
    train_rows: pd.DataFrame
    heldout_rows: pd.DataFrame  # every subject outside the training split
    generated: list[Path]
    sidecars: list[dict]  # covariates each generated volume was drawn for ({} without a sidecar)
    shape: tuple[int, ...]  # (D, H, W) of every volume
    affine: np.ndarray  # (4, 4) of every volume

    def _paths(self, rows: pd.DataFrame) -> list[Path]:
        return [self.real_dir / p for p in rows["image"]]

    @property
    def real(self) -> list[Path]:
        return self._paths(self.real_rows)

    @property
    def other(self) -> list[Path]:
        return self._paths(self.other_rows)

    @property
    def train(self) -> list[Path]:
        return self._paths(self.train_rows)

    @property
    def heldout(self) -> list[Path]:
        return self._paths(self.heldout_rows)

    @property
    def generated_names(self) -> list[str]:
        return [strip_nifti_suffix(p.name) for p in self.generated]

    @property
    def audit_possible(self) -> bool:
        """A privacy audit needs training subjects and held-out ones to compare the generated volumes with."""
        return len(self.train_rows) > 0 and len(self.heldout_rows) > 0


def load_sets(real_dir: str | Path, fake_dir: str | Path, out: str | Path, split: str = "test",
              other_split: str | None = None) -> EvaluationSets:
    """Read the manifest and list the generated volumes; ValueError naming the argument when a split is
    missing, `out` is an input folder, or a generated volume is not on the real data's grid."""
    real_dir, fake_dir, out = Path(real_dir), Path(fake_dir), Path(out)
    for given, argument in ((real_dir, "--real"), (fake_dir, "--fake")):
        if out.resolve() == given.resolve():
            raise ValueError(f"--out {out} is the {argument} folder; choose a new folder, inputs are never written to")
    manifest = read_manifest(real_dir)
    splits = sorted(manifest["split"].dropna().unique())
    other_split = _resolve_other_split(splits, split, other_split)
    real_rows = _split_rows(manifest, split, real_dir, "--split")
    other_rows = _split_rows(manifest, other_split, real_dir, "other_split")
    train_rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    heldout_rows = manifest[manifest["split"] != "train"].reset_index(drop=True)
    shape, affine = reference_geometry(real_dir, manifest)
    generated = list_volumes(fake_dir)
    for path in generated:
        check_geometry(path, shape, affine)
    return EvaluationSets(real_dir, fake_dir, split, other_split, real_rows, other_rows, train_rows, heldout_rows,
                          generated, [read_sidecar(p) for p in generated], shape, affine)


class VolumeFiles(Sequence):
    """A lazy sequence of (D, H, W) float32 volumes in [0, 1], read from disk on access."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        return read_clipped(self.paths[index])[0]


def read_clipped(path: Path) -> tuple[np.ndarray, bool]:
    """(volume clipped to [0, 1], whether it had to be clipped)."""
    data, _ = load_volume(path)
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: volume contains NaN or infinite values; regenerate it")
    outside = bool(data.min() < -RANGE_TOLERANCE or data.max() > 1 + RANGE_TOLERANCE)
    return np.clip(data, 0.0, 1.0), outside


def reference_geometry(real_dir: Path, manifest: pd.DataFrame) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine every volume must have: prepare.json's affine and the first image's shape."""
    first = nib.load(str(real_dir / manifest["image"].iloc[0]))
    recorded = read_preparation(real_dir).get("affine")  # a damaged prepare.json is named, not a JSON position
    affine = first.affine if recorded is None else recorded
    return tuple(int(s) for s in first.shape), np.asarray(affine, np.float64)


def check_geometry(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> None:
    """Refuse a volume whose shape or affine (tolerance 1e-3) differs from the real data's."""
    header = nib.load(str(path))
    actual_shape, actual_affine = tuple(int(s) for s in header.shape), np.asarray(header.affine, np.float64)
    shape_ok = actual_shape == tuple(shape)
    affine_ok = np.allclose(actual_affine, affine, atol=AFFINE_TOLERANCE, rtol=0)
    if not (shape_ok and affine_ok):
        wrong = " and ".join(w for w, ok in (("shape", shape_ok), ("affine", affine_ok)) if not ok)
        raise ValueError(
            f"{path}: {wrong} do not match the real data. This file has shape {actual_shape} and affine "
            f"{np.round(actual_affine, 4).tolist()}; expected shape {tuple(shape)} and affine "
            f"{np.round(affine, 4).tolist()} (tolerance {AFFINE_TOLERANCE}). Generate with the same preset grid "
            f"as the prepared data, or let evaluate prepare another generator's volumes onto it (--prepare-fake brain, "
            f"or head for volumes with a skull).")


def list_volumes(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--fake {folder}: not a folder")
    paths = sorted(p for p in folder.iterdir()
                   if p.is_file() and is_nifti(p) and not p.name.startswith(".") and not is_label_map(p))
    if not paths:
        raise ValueError(f"--fake {folder}: no NIfTI volumes (*.nii.gz, *.nii) in this folder")
    return paths


def sidecar_record(path: Path) -> dict:
    """The JSON sidecar of a generated volume (x.nii.gz -> x.json) as written, {} where there is none."""
    sidecar = path.with_name(strip_nifti_suffix(path.name) + ".json")
    if not sidecar.is_file():
        return {}
    data = read_json(sidecar, advice="restore it, or delete it (its volume is then measured without the covariates it was drawn for)")
    return data if isinstance(data, dict) else {}


def read_sidecar(path: Path) -> dict:
    """Covariates of a generated volume from its JSON sidecar (x.nii.gz -> x.json):
    the "covariates" object if present, else the top-level scalar entries."""
    data = sidecar_record(path)
    values = data.get("covariates", data)
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _resolve_other_split(splits: list[str], split: str, other_split: str | None) -> str:
    if other_split is not None:
        return other_split
    for candidate in ("val", "train", "test"):
        if candidate in splits and candidate != split:
            return candidate
    raise ValueError(f"no second real split to compare with: the prepared data has only {splits}; pass other_split")


def _split_rows(manifest: pd.DataFrame, split: str, real_dir: Path, argument: str) -> pd.DataFrame:
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        available = sorted(manifest["split"].dropna().unique())
        raise ValueError(f"{argument} {split!r}: no subjects in {real_dir}/manifest.csv; "
                         f"available splits: {', '.join(available)}")
    return rows.reset_index(drop=True)
