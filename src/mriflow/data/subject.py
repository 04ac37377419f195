"""One subject through the recipe, as a worker process runs it: read and check its files, run the
steps, write its volumes and then its record.

    >>> outcome = prepare_subject(SubjectTask("sub-01", "T1/sub-01.nii.gz", "labels/sub-01.nii.gz",
    ...                                       inputs, recipe_to_data(recipe), "prepared/"))
    >>> outcome.reason or outcome.record["outputs"]
    {'image': 'images/sub-01.nii.gz', 'mask': 'masks/sub-01.nii.gz', 'labels': 'labels/sub-01.nii.gz'}

Volumes are written atomically by ``save_volume`` and the record ``records/<subject>.json``
last, so a subject is done once its record exists (naming the sha256 of its inputs and the recipe).
A subject that cannot be prepared is an outcome with a reason, never an exception: one bad
subject must not stop the others.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from mriflow.config import get_grid
from mriflow.data.io import save_volume, template_affine
from mriflow.data.recipe import InputProblem, SubjectState, recipe_from_data
from mriflow.utils.files import sha256, write_text_atomic

AFFINE_TOLERANCE_MM = 1e-3  # a mask must share the image's voxel grid within this


@dataclass(frozen=True)
class SubjectTask:
    """One subject's work, as sent to a worker process (plain data: it is pickled)."""

    subject: str
    image: str
    mask: str | None
    inputs: dict[str, Any]  # {"image": {"path", "sha256"}, "mask": {...} | None}
    recipe: list[dict[str, Any]]
    out: str


@dataclass(frozen=True)
class SubjectOutcome:
    """What became of one subject: its record when prepared, else the reason it was skipped."""

    subject: str
    image: str
    reason: str = ""  # empty when prepared
    record: dict[str, Any] | None = None


def prepare_subject(task: SubjectTask) -> SubjectOutcome:
    """Run the recipe for one subject and write its volumes, then its record; never raises."""
    started = time.perf_counter()
    step_name = "load"
    try:
        state = load_subject(task.subject, Path(task.image), Path(task.mask) if task.mask else None)
        for step in recipe_from_data(task.recipe):
            step_name = step.name
            state = step(state)
        step_name = "write"
        record = _write_subject(state, task, time.perf_counter() - started)
    except InputProblem as problem:
        return SubjectOutcome(task.subject, task.image, str(problem))
    except Exception as error:  # one bad subject must not stop the others
        return SubjectOutcome(task.subject, task.image, f"{step_name} step failed: {type(error).__name__}: {error}")
    return SubjectOutcome(task.subject, task.image, "", record)


def load_subject(subject: str, image_path: Path, mask_path: Path | None) -> SubjectState:
    """Read and check one subject's image and mask/label map; InputProblem says what is wrong."""
    data, affine = _read_volume(image_path, "image")
    if np.ptp(data) == 0:
        raise InputProblem(f"image is empty: every voxel equals {float(data.flat[0]):g}")
    state = SubjectState(subject, nib.Nifti1Image(data, affine))
    if mask_path is not None:
        mask, mask_affine = _read_volume(mask_path, "mask")
        if mask.shape != data.shape:
            raise InputProblem(f"mask {mask_path.name} has shape {mask.shape} but the image has {data.shape}; they must share one voxel grid")
        difference = float(np.abs(mask_affine - affine).max())
        if difference > AFFINE_TOLERANCE_MM:
            raise InputProblem(f"mask {mask_path.name} has a different affine from the image (largest difference {difference:.4g}); "
                               "they must share one voxel grid")
        values = np.unique(mask)
        if not np.allclose(values, np.round(values)):
            # A probability map: the brain is where it is at least one half.
            state.mask, state.mask_kind = mask >= 0.5, "mask"
        elif len(values) > 2:
            state.labels, state.mask, state.mask_kind = np.round(mask).astype(np.int32), mask > 0, "labels"
        else:
            state.mask, state.mask_kind = mask > 0, "mask"
        if not state.mask.any():
            raise InputProblem(f"mask {mask_path.name} is empty (no voxel > 0)")
    return state


def _read_volume(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(str(path))
        dtype = image.get_data_dtype()
        if dtype.kind != "c":  # casting would drop the imaginary part without a word
            data = np.asarray(image.dataobj, dtype=np.float32)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputProblem(f"cannot read {what} {path.name}: {message} (corrupt, truncated or not NIfTI?)") from None
    if dtype.kind == "c":
        raise InputProblem(f"{what} {path.name} holds complex voxels ({dtype}); give a real-valued (magnitude) image")
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) is one 3D volume
        data = data[..., 0]
    if data.ndim == 4:
        raise InputProblem(f"{what} {path.name} is 4D with {data.shape[3]} volumes (shape {data.shape}); give one 3D volume per file")
    if data.ndim > 4:
        raise InputProblem(f"{what} {path.name} is {data.ndim}D (shape {data.shape}); a 3D volume is needed")
    extent = sum(size > 1 for size in data.shape)  # (48, 56, 1) is a 2D slice
    if extent < 3:
        kind = f"{extent}D" if extent else "a single voxel"
        raise InputProblem(f"{what} {path.name} is {kind} (shape {data.shape}); a 3D volume is needed")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InputProblem(f"{what} {path.name} has {bad} NaN/Inf voxels; fix or remove them")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputProblem(f"{what} {path.name} has no valid voxel-to-world affine")
    return data, affine


def _write_subject(state: SubjectState, task: SubjectTask, seconds: float) -> dict[str, Any]:
    out = Path(task.out)
    affine = template_affine(get_grid(_preset_of(task.recipe)))
    outputs = {"image": f"images/{task.subject}.nii.gz", "mask": f"masks/{task.subject}.nii.gz", "labels": ""}
    save_volume(out / outputs["image"], state.outputs["image"], affine, np.float32)
    save_volume(out / outputs["mask"], state.outputs["mask"], affine, np.uint8)
    stale_labels = out / "labels" / f"{task.subject}.nii.gz"
    if "labels" in state.outputs:
        outputs["labels"] = f"labels/{task.subject}.nii.gz"
        save_volume(out / outputs["labels"], state.outputs["labels"], affine, np.int16)
    elif stale_labels.exists():  # from an earlier run with other masks; would not match this record
        stale_labels.unlink()
    record = {
        "subject": task.subject,
        "inputs": task.inputs,
        "recipe": task.recipe,
        "outputs": outputs,
        # what a resume checks before it takes the subject as done: a file cut short or changed is prepared again
        "output_sha256": {key: sha256(out / rel) for key, rel in outputs.items() if rel},
        **state.record,
        "seconds": round(seconds, 3),
    }
    write_text_atomic(out / "records" / f"{task.subject}.json", json.dumps(record, indent=1))
    return record


def _preset_of(recipe: Sequence[dict[str, Any]]) -> str:
    return next(step["preset"] for step in recipe if step["step"] == "resample")
