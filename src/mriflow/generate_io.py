"""Writing generated volumes: NIfTI in template space with a JSON sidecar, and a montage of a batch.

    >>> write_sample("out/", 3, volume, template_affine(get_grid("4mm")),
    ...              {"covariates": {"age": 45}, "seed": 0, "solver": "heun", "steps": 16, "nfe": 32,
    ...               "guidance": 1.5, "model_id": "flow-4mm", "model_checksum": "sha256:..."})
    PosixPath('out/sample_00003.nii.gz')      # and out/sample_00003.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import mriflow
from mriflow.data.io import save_volume
from mriflow.utils.files import atomic_path
from mriflow.utils.text import verb

SIDECAR_KEYS = ("covariates", "seed", "solver", "steps", "nfe", "guidance", "model_id", "model_checksum")


def sample_name(index: int) -> str:
    return f"sample_{index:05d}"


def write_sample(
    out_dir: str | Path,
    index: int,
    volume: np.ndarray,
    affine: np.ndarray,
    sidecar: Mapping[str, Any],
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write out_dir/sample_<index>.nii.gz (float32, qform = sform = `affine`, code 4) and its .json
    (or <name>.nii.gz and <name>.json when `name` is given, e.g. a cohort row's id).

    `volume` is (D, H, W) in [0, 1]; decoders overshoot a little, so values are clipped to
    [0, 1]. The sidecar must hold SIDECAR_KEYS; "mriflow_version" is added. Existing
    files are refused unless overwrite=True. Returns the NIfTI path.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"sample {index}: expected a (D, H, W) volume, got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise ValueError(f"sample {index}: the volume holds NaN or infinite values; the generator diverged")
    missing = [key for key in SIDECAR_KEYS if key not in sidecar]
    if missing:
        raise ValueError(f"sample {index}: sidecar lacks {', '.join(missing)}; it must hold {', '.join(SIDECAR_KEYS)}")
    out_dir = Path(out_dir)
    name = name or sample_name(index)
    image_path = out_dir / f"{name}.nii.gz"
    sidecar_path = out_dir / f"{name}.json"
    if not overwrite:
        existing = [str(p) for p in (image_path, sidecar_path) if p.exists()]
        if existing:
            raise FileExistsError(_taken(existing))
    # The sidecar first: a run killed in between leaves a sidecar alone, never a volume without its record.
    # Without overwrite the names are taken by no-overwrite renames, which the check above cannot replace.
    try:
        record = {**sidecar, "image": image_path.name, "mriflow_version": mriflow.__version__}
        _write_json(sidecar_path, record, overwrite)
        try:
            save_volume(image_path, np.clip(volume, 0.0, 1.0), affine, dtype=np.float32, overwrite=overwrite)
        except OSError as error:  # e.g. a full disk: no sidecar is left without its volume
            if not isinstance(error, FileExistsError):
                sidecar_path.unlink(missing_ok=True)
            raise
    except FileExistsError as error:  # another run wrote this name after the check (same folder, same moment)
        raise FileExistsError(_taken([error.filename])) from None
    return image_path


def labels_name(name: str) -> str:
    """The label map's file name of sample `name` (sample_00003 -> sample_00003_labels.nii.gz)."""
    return f"{name}_labels.nii.gz"


def is_label_map(path: str | Path) -> bool:
    """Whether a file is a sample's label map (<name>_labels.nii.gz or .nii), not a generated volume."""
    return Path(path).name.endswith(("_labels.nii.gz", "_labels.nii"))


def write_labels(out_dir: str | Path, name: str, labels: np.ndarray, affine: np.ndarray, overwrite: bool = False) -> Path:
    """Write out_dir/<name>_labels.nii.gz: class indices (D, H, W) as uint8, on the grid and affine of the sample."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"{name}: expected (D, H, W) class indices in 0..255, got shape {labels.shape}")
    path = Path(out_dir) / labels_name(name)
    try:
        return save_volume(path, labels, affine, dtype=np.uint8, overwrite=overwrite)
    except FileExistsError:
        raise FileExistsError(_taken([str(path)])) from None


def _taken(paths: Sequence[str]) -> str:
    return (f"{', '.join(paths)} already {verb(len(paths), 'exists', 'exist')}, e.g. written by another run into the "
            "same folder; choose another output folder (existing samples are never overwritten)")


def _write_json(path: Path, record: Mapping[str, Any], overwrite: bool = True) -> None:
    with atomic_path(path, overwrite=overwrite) as temporary:
        temporary.write_text(json.dumps(record, indent=2, default=_plain))


def _plain(value: Any) -> Any:
    """numpy/torch scalars and arrays -> JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"sidecar value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def batch_montage(volumes: Sequence[np.ndarray] | np.ndarray, path: str | Path, titles: Sequence[str] | None = None) -> Path:
    """PNG with one row per volume (N, D, H, W; RAS) and its mid sagittal, coronal and axial slices."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    volumes = [np.asarray(v) for v in volumes]
    if not volumes or any(v.ndim != 3 for v in volumes):
        raise ValueError(f"{path}: batch_montage needs one or more (D, H, W) volumes")
    planes = ("sagittal", "coronal", "axial")
    figure = Figure(figsize=(7.5, 2.6 * len(volumes)))
    axes = figure.subplots(len(volumes), 3, squeeze=False)
    for row, volume in enumerate(volumes):
        x, y, z = (size // 2 for size in volume.shape)
        # RAS axes (x: left->right, y: posterior->anterior, z: inferior->superior); transpose
        # and origin="lower" put superior (or anterior, for axial) at the top.
        slices = (volume[x, :, :], volume[:, y, :], volume[:, :, z])
        for column, (plane, image) in enumerate(zip(planes, slices)):
            axis = axes[row, column]
            axis.imshow(image.T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(plane)
        if titles is not None:
            axes[row, 0].set_ylabel(titles[row])
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
