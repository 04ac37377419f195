"""`mriflow prepare`: real T1 scans -> a prepared dataset in MNI152 template space.

The recipe is a declared chain of small steps, each a dataclass whose fields are
its parameters; the chain is recorded as data in ``prepare.json`` and in every
subject's record, and rebuilt from that data in the worker processes:

    reorient (RAS) -> brain_mask (given mask / label map, deepbet, or a head mask)
      -> bias_field (N4, optional) -> register (rigid then affine to MNI152, optional)
      -> resample (once, native image straight into the preset grid) -> normalize ([0, 1])

    >>> result = run_prepare("scans/", "prepared/", masks="labels/", covariates=["demographics.csv"])
    >>> print(result.summary())
    prepared 148 subjects (0 already done), skipped 2 (see prepared/prepare_report.csv)

Geometry: nibabel affines map voxels to RAS millimetres, SimpleITK images live in
LPS millimetres; :func:`to_sitk` flips x and y (``diag(-1, -1, 1)``) and is the
only place where the two meet. A registration transform maps a template (fixed)
point to the subject (moving) point, ITK's convention, so resampling the native
image through it onto the preset grid is one interpolation.

Outputs are written atomically (volumes by ``save_volume``, JSON/CSV by rename);
a subject is done once its record ``records/<subject>.json`` exists, naming the
sha256 of its inputs and the recipe; a re-run skips such subjects unless forced.
A run holds ``OUT/.prepare.lock`` (so does each of its workers, which end with it):
a second run into the same folder is refused while any of them lives.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm.auto import tqdm

from mriflow.config import Grid, get_grid
from mriflow.data.inputs import (
    Covariates,
    Scan,
    Skip,
    find_scans,
    match_masks,
    parse_covariate_columns,
    read_covariates,
)
from mriflow.data.io import save_volume, template_affine
from mriflow.data.split import SPLITS, assign_splits, check_fractions
from mriflow.utils.files import FileLock, remove_stale_temporaries, sha256, write_text_atomic

SKULL_STRIP_CHOICES = ("auto", "mask", "deepbet", "none")
# The manifest's own columns (as mriflow.data.dataset.MANIFEST_COLUMNS; not imported, which would pull torch into every worker).
MANIFEST_COLUMNS = ("subject", "image", "mask", "labels", "split")
AFFINE_TOLERANCE_MM = 1e-3  # a mask must share the image's voxel grid within this
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
# The options that decide what a prepared dataset holds, as prepare.json's "parameters" and the command
# line name them; re-running into a prepared --out with other values is refused unless forced.
DATASET_OPTIONS = {"images": "IMAGES", "masks": "--masks", "covariates": "--covariates",
                   "covariate_columns": "--covariate-columns", "preset": "--preset", "skull_strip_used": "--skull-strip",
                   "n4": "--n4", "register": "registration (--no-register)", "split": "--split", "seed": "--seed"}
VERSION_PACKAGES = ("mriflow", "torch", "nibabel", "SimpleITK", "nilearn", "numpy", "scipy", "pandas")
OUTPUT_FOLDERS = ("images", "masks", "labels", "records")  # beside manifest.csv, prepare.json, prepare_report.csv
LOCK_FILE = ".prepare.lock"
LOCK_WAIT_SECONDS = 5.0  # a run waits this long for the workers of a killed one to end before it is refused
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class PrepareError(RuntimeError):
    """`prepare` could not run or prepared no subject; the message says which input and what to do."""


class InputProblem(Exception):
    """A subject's files cannot be used; the message is the reason written to prepare_report.csv."""


# ---------------------------------------------------------------------------------------------
# Geometry: nibabel (RAS) <-> SimpleITK (LPS)


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """An (X, Y, Z) array with a RAS voxel-to-world affine -> a SimpleITK image in LPS space.

    SimpleITK indexes arrays (Z, Y, X); its physical point is ``origin + direction @ (spacing * index)``
    in LPS, so the RAS affine is left-multiplied by ``diag(-1, -1, 1, 1)`` and split into those parts.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    _set_geometry(image, affine)
    return image


def from_sitk(image: sitk.Image) -> np.ndarray:
    """A SimpleITK image -> its (X, Y, Z) array."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _set_geometry(image: sitk.Image, affine: np.ndarray) -> None:
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())


def grid_reference(grid: Grid) -> sitk.Image:
    """An empty SimpleITK image on the preset grid (template_affine), the target of every resampling."""
    reference = sitk.Image([int(n) for n in grid.shape], sitk.sitkUInt8)
    _set_geometry(reference, template_affine(grid))
    return reference


def transform_to_ras_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 RAS matrix of an affine-like SimpleITK transform (template point -> subject point)."""
    transform = _single(transform)
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + center - matrix @ center  # ITK: T(x) = M (x - c) + c + t
    return RAS_TO_LPS @ lps @ RAS_TO_LPS


def _single(transform: sitk.Transform) -> sitk.Transform:
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() != 1:
            raise ValueError("expected a single transform inside the composite")
        return composite.GetNthTransform(0).Downcast()
    return transform.Downcast()


# ---------------------------------------------------------------------------------------------
# The MNI152 template (shipped inside nilearn; nothing is downloaded)


@functools.lru_cache(maxsize=None)
def mni_template() -> tuple[sitk.Image, sitk.Image]:
    """(MNI152 T1 template float32, its brain mask uint8) at 2 mm, as SimpleITK images (LPS)."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    template = load_mni152_template(resolution=2)
    mask = load_mni152_brain_mask(resolution=2)
    return (
        to_sitk(np.asarray(template.get_fdata(), dtype=np.float32), template.affine),
        to_sitk((np.asarray(mask.get_fdata()) > 0).astype(np.uint8), mask.affine),
    )


@functools.lru_cache(maxsize=None)
def template_brain_mask(preset: str) -> np.ndarray:
    """The MNI152 brain mask on a preset grid, (X, Y, Z) bool; nearest-neighbour resampled."""
    _, mask = mni_template()
    resampled = sitk.Resample(mask, grid_reference(get_grid(preset)), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return from_sitk(resampled) > 0


# ---------------------------------------------------------------------------------------------
# Pure pieces of the recipe


def normalize_intensity(image: np.ndarray, mask: np.ndarray, percentiles: Sequence[float] = (0.5, 99.5)) -> tuple[np.ndarray, tuple[float, float]]:
    """Clip to the brain's percentiles and scale to [0, 1]; 0 outside the mask.

    ``x' = clip((x - p_low) / (p_high - p_low), 0, 1)`` inside the mask, where
    ``p_low, p_high`` are the given percentiles of the in-mask values. Returns
    (normalised float32 array, (p_low, p_high)).
    """
    brain = np.asarray(mask) > 0
    if not brain.any():
        raise InputProblem("brain mask is empty on the template grid (is the scan far from the template, or the mask wrong?)")
    low, high = (float(v) for v in np.percentile(image[brain], percentiles))
    if not high > low:
        raise InputProblem(f"brain intensities are constant ({low:g}) on the template grid; cannot scale to [0, 1]")
    normalised = np.zeros(image.shape, np.float32)
    normalised[brain] = np.clip((image[brain] - low) / (high - low), 0.0, 1.0)
    return normalised, (low, high)


def register_affine(
    fixed: sitk.Image, moving: sitk.Image, settings: "Register", fixed_mask: sitk.Image | None = None
) -> tuple[sitk.AffineTransform, dict[str, Any]]:
    """Affine (12 dof) registration, rigid first: returns (fixed point -> moving point transform, quality).

    Each stage maximises Mattes mutual information between the images on
    randomly sampled fixed points (seeded; at least `minimum_samples` per level;
    inside the dilated `fixed_mask` when given), by regular-step gradient descent
    over a shrink/smoothing pyramid. The rigid stage starts from the images'
    centres of mass (moments) or of their boxes (geometry).
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    sampling_mask = None
    if fixed_mask is not None and settings.sampling_mask_dilation_voxels >= 0:
        sampling_mask = sitk.Cast(fixed_mask > 0, sitk.sitkUInt8)
        if settings.sampling_mask_dilation_voxels > 0:
            sampling_mask = sitk.BinaryDilate(sampling_mask, [settings.sampling_mask_dilation_voxels] * 3)
    region_voxels = float(sitk.GetArrayViewFromImage(sampling_mask).sum()) if sampling_mask is not None else float(np.prod(fixed.GetSize()))
    centring = {"moments": sitk.CenteredTransformInitializerFilter.MOMENTS,
                "geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY}[settings.initialisation]
    transform: sitk.Transform = sitk.CenteredTransformInitializer(fixed, moving, sitk.VersorRigid3DTransform(), centring)
    quality: dict[str, Any] = {"stages": []}
    for stage in settings.stages:
        if stage["transform"] == "affine":
            transform = _as_affine(transform)
        elif stage["transform"] != "rigid":
            raise ValueError(f"registration stage transform must be 'rigid' or 'affine', got {stage['transform']!r}")
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(settings.histogram_bins)
        method.SetMetricSamplingStrategy(method.RANDOM)
        # At least `minimum_samples` points per level (all of a small level): too few make the
        # metric gradient noisy and the regular-step optimizer stops early.
        percentages = [min(1.0, max(settings.sampling_percentage, settings.minimum_samples * shrink**3 / region_voxels))
                       for shrink in stage["shrink_factors"]]
        method.SetMetricSamplingPercentagePerLevel(percentages, settings.sampling_seed)
        if sampling_mask is not None:
            method.SetMetricFixedMask(sampling_mask)
        method.SetInterpolator(sitk.sitkLinear)
        # Image gradients at the sampled points only: filtering whole images per level cost more than the optimisation.
        method.SetMetricUseFixedImageGradientFilter(False)
        method.SetMetricUseMovingImageGradientFilter(False)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=stage["learning_rate"], minStep=settings.minimum_step, numberOfIterations=stage["iterations"],
            relaxationFactor=settings.relaxation, gradientMagnitudeTolerance=1e-6,
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(list(stage["shrink_factors"]))
        method.SetSmoothingSigmasPerLevel(list(stage["smoothing_voxels"]))
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        method.SetInitialTransform(transform, inPlace=False)
        iterations: list[int] = []
        method.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: iterations.append(0))
        method.AddCommand(sitk.sitkIterationEvent, lambda: iterations.__setitem__(-1, iterations[-1] + 1))
        transform = method.Execute(fixed, moving)
        quality["stages"].append({"transform": stage["transform"], "metric": float(method.GetMetricValue()), "iterations": iterations})
    # Mattes MI as ITK reports it (negated: lower is better), at the finest level of the last stage.
    quality["metric"] = quality["stages"][-1]["metric"] if quality["stages"] else math.nan
    return _as_affine(transform), quality


def _as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """The same map as a 12-parameter affine transform (rigid stages hand over to the affine stage this way)."""
    single = _single(transform)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(single.GetMatrix())
    affine.SetTranslation(single.GetTranslation())
    affine.SetCenter(single.GetCenter())
    return affine


def correct_bias_field(image: sitk.Image, mask: sitk.Image, settings: "BiasField") -> sitk.Image:
    """N4 bias-field correction fitted inside `mask` on an image shrunk by `shrink_factor`.

    The log bias field is evaluated at full resolution and divided out:
    ``corrected = image / exp(log_bias)``.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    fit_mask = sitk.Cast((mask > 0) * (image > 0), sitk.sitkUInt8)  # N4 takes the log, so positive voxels only
    shrink = [settings.shrink_factor] * 3
    small, small_mask = sitk.Shrink(image, shrink), sitk.Shrink(fit_mask, shrink)
    if sitk.GetArrayViewFromImage(small_mask).sum() < 64:
        raise InputProblem("brain mask too small for N4 bias-field correction; run with --no-n4")
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(settings.iterations))
    corrector.SetConvergenceThreshold(settings.convergence_threshold)
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    return image / sitk.Exp(log_bias)


# ---------------------------------------------------------------------------------------------
# The recipe: a declared chain of steps over one subject's state


@dataclass
class SubjectState:
    """What flows through the recipe for one subject (native grid until `resample`)."""

    subject: str
    image: nib.Nifti1Image  # float32, native voxel grid
    mask: np.ndarray | None = None  # (X, Y, Z) bool, same grid as image
    labels: np.ndarray | None = None  # (X, Y, Z) int, same grid as image
    mask_kind: str = ""  # "mask" | "labels" | "deepbet" | "head"
    transform: sitk.Transform | None = None  # template (LPS) -> subject (LPS)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # on the preset grid
    record: dict[str, Any] = field(default_factory=dict)  # what the steps measured


@dataclass
class Reorient:
    """Reorder voxel axes to RAS (nibabel ``as_closest_canonical``); world coordinates are unchanged."""

    name: ClassVar[str] = "reorient"
    orientation: str = "RAS"

    def __call__(self, state: SubjectState) -> SubjectState:
        ornt = nib.io_orientation(state.image.affine)
        state.image = nib.as_closest_canonical(state.image)
        # The mask shares the image's grid (checked on loading), so the same axis reordering applies.
        if state.mask is not None:
            state.mask = nib.apply_orientation(state.mask, ornt).astype(bool)
        if state.labels is not None:
            state.labels = nib.apply_orientation(state.labels, ornt)
        state.record["orientation_in"] = "".join(nib.orientations.ornt2axcodes(ornt))
        return state


@dataclass
class BrainMask:
    """Brain extraction: a given mask or label map (label > 0), the deepbet model, or none (head mask only)."""

    name: ClassVar[str] = "brain_mask"
    source: str = "mask"  # "mask" | "deepbet" | "none"
    deepbet_threshold: float = 0.5

    def __call__(self, state: SubjectState) -> SubjectState:
        if self.source == "mask":
            if state.mask is None:
                raise InputProblem("no mask or label map was given for this subject")
        elif self.source == "deepbet":
            _, mask, _ = _deepbet().run(state.image, threshold=self.deepbet_threshold)
            state.mask, state.mask_kind = np.asarray(mask.dataobj) > 0, "deepbet"
        elif self.source == "none":
            # No brain extraction: the head (Otsu foreground, holes filled) bounds the intensity statistics.
            image = to_sitk(np.asarray(state.image.dataobj, dtype=np.float32), state.image.affine)
            head = sitk.BinaryFillhole(sitk.OtsuThreshold(image, 0, 1))
            state.mask, state.mask_kind = from_sitk(head) > 0, "head"
        else:
            raise ValueError(f"brain_mask source must be 'mask', 'deepbet' or 'none', got {self.source!r}")
        if not state.mask.any():
            raise InputProblem(f"brain mask ({state.mask_kind}) is empty")
        state.record["mask_source"] = state.mask_kind
        return state


@dataclass
class BiasField:
    """N4 bias-field correction inside the mask, fitted on a shrunk image for speed."""

    name: ClassVar[str] = "bias_field"
    method: str = "N4 (SimpleITK)"
    shrink_factor: int = 4
    iterations: tuple[int, ...] = (50, 50, 30)
    convergence_threshold: float = 1e-4

    def __call__(self, state: SubjectState) -> SubjectState:
        affine = state.image.affine
        image = to_sitk(np.asarray(state.image.dataobj, dtype=np.float32), affine)
        corrected = correct_bias_field(image, to_sitk(state.mask.astype(np.uint8), affine), self)
        state.image = nib.Nifti1Image(from_sitk(corrected).astype(np.float32), affine)
        return state


@dataclass
class Register:
    """Affine registration of the (skull-stripped) subject to the (brain-masked) MNI152 template."""

    name: ClassVar[str] = "register"
    template: str = "MNI152 2009 (nilearn load_mni152_template / load_mni152_brain_mask, resolution=2)"
    masked: bool = True  # subject * mask against template * brain mask; False: whole heads
    initialisation: str = "moments"
    metric: str = "mattes_mutual_information"
    histogram_bins: int = 32
    sampling_percentage: float = 0.05
    minimum_samples: int = 10000
    sampling_seed: int = 1
    sampling_mask_dilation_voxels: int = 3  # fixed points are drawn from the dilated template brain mask
    optimizer: str = "regular_step_gradient_descent"
    minimum_step: float = 0.05
    relaxation: float = 0.8
    stages: tuple[dict[str, Any], ...] = (
        {"transform": "rigid", "shrink_factors": [4, 2], "smoothing_voxels": [2, 1], "iterations": 200, "learning_rate": 2.0},
        {"transform": "affine", "shrink_factors": [2, 1], "smoothing_voxels": [1, 0], "iterations": 100, "learning_rate": 1.0},
    )

    def __call__(self, state: SubjectState) -> SubjectState:
        template, template_mask = mni_template()
        data = np.asarray(state.image.dataobj, dtype=np.float32)
        if self.masked:
            fixed, moving = template * sitk.Cast(template_mask, sitk.sitkFloat32), to_sitk(data * state.mask, state.image.affine)
        else:
            fixed, moving = template, to_sitk(data, state.image.affine)
        try:
            state.transform, quality = register_affine(fixed, moving, self, template_mask if self.masked else None)
        except RuntimeError as error:  # ITK reports e.g. "All samples map outside moving image buffer"
            raise InputProblem(f"registration to MNI152 failed: {str(error).strip().splitlines()[-1]}") from error
        quality["template_to_subject_ras"] = transform_to_ras_matrix(state.transform).round(6).tolist()
        state.record["registration"] = quality
        return state


@dataclass
class Resample:
    """One resampling from the native image straight into the preset grid (crop/pad included)."""

    name: ClassVar[str] = "resample"
    preset: str = "4mm"
    image_interpolation: str = "linear"
    mask_interpolation: str = "nearest"
    labels_interpolation: str = "nearest"

    def __call__(self, state: SubjectState) -> SubjectState:
        reference = grid_reference(get_grid(self.preset))
        transform = state.transform if state.transform is not None else sitk.Transform()  # identity: input is in MNI space
        affine = state.image.affine
        interpolators = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}

        def resample(data: np.ndarray, interpolation: str, pixel_type) -> np.ndarray:
            moved = sitk.Resample(to_sitk(data, affine), reference, transform, interpolators[interpolation], 0.0, pixel_type)
            return from_sitk(moved)

        state.outputs["image"] = resample(np.asarray(state.image.dataobj, dtype=np.float32), self.image_interpolation, sitk.sitkFloat32)
        state.outputs["mask"] = (resample(state.mask.astype(np.uint8), self.mask_interpolation, sitk.sitkUInt8) > 0).astype(np.uint8)
        if state.labels is not None:
            state.outputs["labels"] = resample(state.labels.astype(np.int16), self.labels_interpolation, sitk.sitkInt16)
        reference_mask = template_brain_mask(self.preset)
        prepared = state.outputs["mask"] > 0
        # Overlap with the template's brain mask: a registration failure shows as a low value.
        overlap = 2.0 * (prepared & reference_mask).sum() / max(prepared.sum() + reference_mask.sum(), 1)
        state.record.setdefault("registration", {})["mask_dice_mni"] = round(float(overlap), 4)
        return state


@dataclass
class Normalize:
    """Clip to in-brain percentiles, scale to [0, 1], background (outside the mask) 0."""

    name: ClassVar[str] = "normalize"
    percentiles: tuple[float, float] = (0.5, 99.5)
    output_range: tuple[float, float] = (0.0, 1.0)
    background: float = 0.0

    def __call__(self, state: SubjectState) -> SubjectState:
        unit, (low, high) = normalize_intensity(state.outputs["image"], state.outputs["mask"], self.percentiles)
        bottom, top = self.output_range
        state.outputs["image"] = np.where(state.outputs["mask"] > 0, bottom + (top - bottom) * unit, self.background).astype(np.float32)
        state.record["normalization"] = {"low": low, "high": high}
        return state


STEPS = {step.name: step for step in (Reorient, BrainMask, BiasField, Register, Resample, Normalize)}


def build_recipe(preset: str = "4mm", skull_strip: str = "mask", n4: bool = False, register: bool = True) -> list[Any]:
    """The chain of steps for the given options; `skull_strip` is already resolved (mask|deepbet|none)."""
    get_grid(preset)
    if skull_strip not in ("mask", "deepbet", "none"):
        raise ValueError(f"skull_strip must be 'mask', 'deepbet' or 'none' here, got {skull_strip!r}")
    recipe: list[Any] = [Reorient(), BrainMask(source=skull_strip)]
    if n4:
        recipe.append(BiasField())
    if register:
        recipe.append(Register(masked=skull_strip != "none"))
    recipe += [Resample(preset=preset), Normalize()]
    return recipe


def recipe_to_data(recipe: Sequence[Any]) -> list[dict[str, Any]]:
    """The recipe as JSON-ready data: ``[{"step": name, **parameters}, ...]``."""
    return json.loads(json.dumps([{"step": step.name, **dataclasses.asdict(step)} for step in recipe]))


def recipe_from_data(data: Sequence[dict[str, Any]]) -> list[Any]:
    steps = []
    for entry in data:
        entry = dict(entry)
        name = entry.pop("step")
        if name not in STEPS:
            raise ValueError(f"unknown recipe step {name!r}; known steps: {', '.join(STEPS)}")
        cls = STEPS[name]
        kinds = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in entry.items():
            if isinstance(value, list) and key in kinds and "tuple" in str(kinds[key].type):
                entry[key] = tuple(value)
        steps.append(cls(**entry))
    return steps


# ---------------------------------------------------------------------------------------------
# One subject (runs in a worker process)


@dataclass(frozen=True)
class SubjectTask:
    subject: str
    image: str
    mask: str | None
    inputs: dict[str, Any]  # {"image": {"path", "sha256"}, "mask": {...} | None}
    recipe: list[dict[str, Any]]
    out: str


@dataclass(frozen=True)
class SubjectOutcome:
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
        **state.record,
        "seconds": round(seconds, 3),
    }
    write_text_atomic(out / "records" / f"{task.subject}.json", json.dumps(record, indent=1))
    return record


def _preset_of(recipe: Sequence[dict[str, Any]]) -> str:
    return next(step["preset"] for step in recipe if step["step"] == "resample")


_BRAIN_EXTRACTION = None


def _deepbet():
    """The deepbet model, loaded once per process on the CPU with one thread (its weights ship in the package)."""
    global _BRAIN_EXTRACTION
    if _BRAIN_EXTRACTION is None:
        import torch
        from deepbet.bet import BrainExtraction

        torch.set_num_threads(1)
        with warnings.catch_warnings():  # deepbet loads TorchScript; torch warns that jit.load is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            _BRAIN_EXTRACTION = BrainExtraction(no_gpu=True)
    return _BRAIN_EXTRACTION


_RUN_LOCK: FileLock | None = None  # a worker's hold on its run's lock, kept until the worker ends


def _init_worker(parent: int, lock: str) -> None:
    """Set a worker process up: one thread (the workers are the parallelism), ended with the run's
    process `parent`, holding the run's lock (shared) so no other run starts while it could still write."""
    global _RUN_LOCK
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[name] = "1"
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _end_with_parent(parent)
    _RUN_LOCK = FileLock(lock)
    if not _RUN_LOCK.acquire(shared=True, wait_seconds=LOCK_WAIT_SECONDS):
        raise RuntimeError(f"{lock} is held by another prepare run")


def _end_with_parent(parent: int) -> None:
    """End this process as soon as `parent` ends, however it ends (SIGKILL, out of memory): an orphaned
    worker would go on writing the subjects queued to it into a folder a rerun may be writing.

    On Linux the kernel kills it (prctl PR_SET_PDEATHSIG), at once and with no thread of ours; the
    signal follows the death of the parent *thread* that started the worker, which for the pool is the
    one calling submit(), i.e. the one running the whole run. Elsewhere a daemon thread polls
    os.getppid() twice a second (after a parent's death the orphan is re-parented, so the id changes).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # the parent died before the request was made
                    os._exit(1)
                return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


@contextlib.contextmanager
def _single_thread():
    """Run in this process with one ITK/torch thread, as a worker would, then restore the settings."""
    itk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(torch_threads or torch.get_num_threads())


# ---------------------------------------------------------------------------------------------
# The whole run


@dataclass
class PrepareResult:
    """What a run produced: subject lists, the skipped inputs and covariate notes, and where files are."""

    out: Path
    prepared: list[str]  # every subject in the manifest, sorted
    newly_prepared: list[str]  # prepared by this run
    already_done: list[str]  # skipped because a matching earlier output exists
    skipped: list[Skip]  # inputs that were not prepared, with the reason
    notes: list[Skip]  # covariate problems (values set missing), rows for unknown subjects

    @property
    def manifest(self) -> Path:
        return self.out / "manifest.csv"

    @property
    def record(self) -> Path:
        return self.out / "prepare.json"

    @property
    def report(self) -> Path:
        return self.out / "prepare_report.csv"

    def summary(self) -> str:
        """One line for the console, e.g. ``prepared 148 subjects (0 already done), skipped 2 (see .../prepare_report.csv)``."""
        line = f"prepared {len(self.prepared)} subjects ({len(self.already_done)} already done), skipped {len(self.skipped)}"
        if self.notes:
            line += f", {len(self.notes)} covariate notes"
        if self.skipped or self.notes:
            line += f" (see {self.report})"
        return line


def run_prepare(
    images: str | Path,
    out: str | Path,
    masks: str | Path | None = None,
    covariates: Sequence[str | Path] = (),
    covariate_columns: str | Sequence[str] | None = None,
    preset: str = "4mm",
    skull_strip: str = "auto",
    n4: bool = False,
    register: bool = True,
    workers: int = 1,
    force: bool = False,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    progress: bool = True,
) -> PrepareResult:
    """Prepare every scan under `images` into `out`; see the module docstring for the recipe.

    `skull_strip`: "auto" uses `masks` when given, else deepbet; "mask" needs `masks`;
    "deepbet" or "none" ignore no masks (giving `masks` with them is refused).
    `covariate_columns`: "age,sex,509:ventricles" selects (and renames) columns;
    None keeps every column. Raises PrepareError on bad arguments or when no
    subject could be prepared; a bad subject is skipped and reported instead.
    """
    started, start_time = time.perf_counter(), time.time()
    try:
        grid = get_grid(preset)
        split = check_fractions(split)
        columns = parse_covariate_columns(covariate_columns)
    except ValueError as error:
        raise PrepareError(str(error)) from None
    images, out = Path(images).expanduser(), Path(out).expanduser()
    masks = Path(masks).expanduser() if masks is not None else None
    covariate_files = [Path(p).expanduser() for p in covariates]
    if workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {workers}")
    strip = _resolve_skull_strip(skull_strip, masks)
    _check_folders(images, out, masks, covariate_files)

    try:
        found = find_scans(images)
        scans, skipped = found.scans, list(found.skipped)
        if masks is not None:
            scans, unmatched = match_masks(scans, masks)
            skipped += unmatched
    except FileNotFoundError as error:
        raise PrepareError(str(error)) from None
    if not scans and not skipped:
        raise PrepareError(f"no NIfTI files found in {images}: expected *.nii/*.nii.gz files, or a BIDS root "
                           "with sub-*/[ses-*/]anat/*_T1w.nii.gz")
    table_files = ([found.participants] if found.participants else []) + covariate_files
    try:
        covariate_table, notes = read_covariates(table_files, [s.subject for s in scans] + [s.subject for s in skipped], columns)
    except (FileNotFoundError, ValueError) as error:
        raise PrepareError(str(error)) from None

    clashes = [name for name in covariate_table.names if name in MANIFEST_COLUMNS]
    if clashes:
        raise PrepareError(f"covariate column(s) {', '.join(clashes)} would overwrite manifest columns of the same name; "
                           f"rename them, e.g. --covariate-columns {clashes[0]}:{clashes[0]}_value")

    parameters = {
        "images": str(images.resolve()), "out": str(out.resolve()), "masks": str(masks.resolve()) if masks else None,
        "covariates": [str(p.resolve()) for p in table_files], "covariate_columns": [list(c) for c in columns] if columns else None,
        "preset": preset, "skull_strip": skull_strip, "skull_strip_used": strip, "n4": n4, "register": register,
        "workers": workers, "force": force, "split": list(split), "seed": seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    with _alone_in(out):  # from here on, the only run reading and writing `out`
        for leftover in remove_stale_temporaries([out, *(out / name for name in OUTPUT_FOLDERS)], before=start_time):
            print(f"removed {leftover}: left incomplete by an interrupted run")
        if not force:
            _check_same_dataset(out, parameters)
        recipe = build_recipe(preset, strip, n4, register)
        recipe_data = recipe_to_data(recipe)
        tasks, already_done = [], []
        checksums: dict[str, str] = {}
        for scan in scans:
            inputs = _input_record(scan, checksums)
            if not force and _is_done(out, scan.subject, inputs, recipe_data):
                already_done.append(scan.subject)
            else:
                tasks.append(SubjectTask(scan.subject, str(scan.image), str(scan.mask) if scan.mask else None, inputs, recipe_data, str(out)))

        outcomes = _run_tasks(tasks, workers, progress, out / LOCK_FILE)
        newly_prepared = sorted(o.subject for o in outcomes if not o.reason)
        skipped += [Skip(o.subject, o.image, o.reason) for o in outcomes if o.reason]

        records = {}
        for subject in sorted(already_done + newly_prepared):
            records[subject] = json.loads((out / "records" / f"{subject}.json").read_text())
        notes += covariate_table.missing_rows(records)
        _write_report(out / "prepare_report.csv", skipped + notes)
        result = PrepareResult(out, sorted(records), newly_prepared, sorted(already_done), skipped, notes)
        if not records:
            raise PrepareError(f"no subject could be prepared from {images}: {len(skipped)} input(s) skipped; "
                               f"see {result.report} for the reason of each")

        assignment, split_record = _split(records, covariate_table, split, seed)
        _write_manifest(out / "manifest.csv", records, assignment, covariate_table)
        prepare_record = {
            "preset": preset,
            "grid": dataclasses.asdict(grid),
            "affine": template_affine(grid).tolist(),
            "recipe": recipe_data,
            "split": split_record,
            "covariates": {"names": covariate_table.names, "sources": covariate_table.sources},
            "parameters": parameters,
            "versions": _versions(strip == "deepbet"),
            "inputs": {
                "images": str(images.resolve()),
                "layout": found.layout,
                "checksums": {**{r["inputs"]["image"]["path"]: r["inputs"]["image"]["sha256"] for r in records.values()},
                              **{r["inputs"]["mask"]["path"]: r["inputs"]["mask"]["sha256"] for r in records.values() if r["inputs"]["mask"]},
                              **{str(p.resolve()): _sha256(p, checksums) for p in table_files}},
            },
            "subjects": {s: {k: v for k, v in r.items() if k not in ("recipe", "subject")} for s, r in records.items()},
            "counts": {"prepared": len(records), "newly_prepared": len(newly_prepared), "already_done": len(already_done),
                       "skipped": len(skipped), "covariate_notes": len(notes)},
            "seconds": round(time.perf_counter() - started, 2),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_text_atomic(out / "prepare.json", json.dumps(prepare_record, indent=1))
        return result


@contextlib.contextmanager
def _alone_in(out: Path) -> Iterator[FileLock]:
    """Hold OUT/.prepare.lock while this run reads and writes `out`; PrepareError if another run holds it.

    Taken exclusively first, which succeeds only once no process of another run holds it (not
    even a worker outliving a killed run: see _end_with_parent); then shared, as each worker of this
    run takes it (_init_worker), so that a later run is refused until every one of them has ended.
    """
    lock = FileLock(out / LOCK_FILE)
    try:
        # The conversion to shared is not atomic: a run slipping in between wins, and this one is refused.
        if not lock.acquire(wait_seconds=LOCK_WAIT_SECONDS) or not lock.acquire(shared=True):
            raise PrepareError(f"--out {out} is in use by another prepare run (or by the workers of a stopped one, "
                               "still ending); wait for it to finish, or choose another --out")
        yield lock
    finally:
        lock.release()


def _resolve_skull_strip(skull_strip: str, masks: Path | None) -> str:
    if skull_strip not in SKULL_STRIP_CHOICES:
        raise PrepareError(f"--skull-strip must be one of {', '.join(SKULL_STRIP_CHOICES)}, got {skull_strip!r}")
    if skull_strip == "mask" and masks is None:
        raise PrepareError("--skull-strip mask needs --masks DIR (the brain masks or label maps)")
    if skull_strip in ("deepbet", "none") and masks is not None:
        raise PrepareError(f"--masks is only used with --skull-strip auto or mask; drop --masks or --skull-strip {skull_strip}")
    strip = ("mask" if masks is not None else "deepbet") if skull_strip == "auto" else skull_strip
    # Checked without importing it here: deepbet imports torch, which only the workers need.
    if strip == "deepbet" and importlib.util.find_spec("deepbet") is None:
        raise PrepareError("brain extraction needs the deepbet package (pip install deepbet); or give --masks DIR, "
                           "or use --skull-strip none")
    return strip


def _check_folders(images: Path, out: Path, masks: Path | None, covariate_files: Sequence[Path]) -> None:
    if not images.is_dir():
        raise PrepareError(f"input folder {images} does not exist or is not a folder; give a folder of NIfTI files or a BIDS root")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} exists and is not a folder; choose a new folder for the prepared dataset")
    target = out.resolve()
    for name, folder in (("input folder", images), ("--masks folder", masks)):
        if folder is None:
            continue
        source = folder.resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise PrepareError(f"--out {out} and the {name} {folder} overlap; inputs are never written to, so choose an "
                               "output folder outside the input (and not containing it)")
    for path in covariate_files:
        if path.resolve().is_relative_to(target):
            raise PrepareError(f"covariate file {path} is inside --out {out}, which prepare rewrites; move it out first")


def _check_same_dataset(out: Path, parameters: dict[str, Any]) -> None:
    """Refuse to resume `out` with options that would change what its dataset holds (it would be rebuilt in place)."""
    path = out / "prepare.json"
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
        earlier = {key: record[key] for key in ("preset",) if key in record} | record.get("parameters", {})
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise PrepareError(f"{path} cannot be read ({error}); it records how {out} was prepared: restore it, choose "
                           "another --out, or pass --force to prepare the dataset again") from None
    differences = [f"{option} {_shown(earlier[key])} before, {_shown(parameters[key])} now"
                   for key, option in DATASET_OPTIONS.items() if key in earlier and earlier[key] != parameters[key]]
    if differences:
        raise PrepareError(f"--out {out} holds a dataset prepared with other options ({'; '.join(differences)}); rerun "
                           "with the earlier options to resume it, choose another --out, or pass --force to rebuild it "
                           "with the new ones (its files are replaced)")


def _shown(value: Any) -> str:
    """A recorded parameter as the command line would give it: 0.8,0.1,0.1 for a split, on/off for a switch."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == []:
        return "none"
    if isinstance(value, list):
        return ",".join(":".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
                        for v in value)
    return str(value)


def _input_record(scan: Scan, checksums: dict[str, str]) -> dict[str, Any]:
    record = {"image": {"path": str(scan.image.resolve()), "sha256": _sha256(scan.image, checksums)}, "mask": None}
    if scan.mask is not None:
        record["mask"] = {"path": str(scan.mask.resolve()), "sha256": _sha256(scan.mask, checksums)}
    return record


def _sha256(path: Path, cache: dict[str, str]) -> str:
    key = str(path.resolve())
    if key not in cache:
        try:
            cache[key] = sha256(path)
        except OSError as error:  # an unreadable file is reported by the worker
            cache[key] = f"unreadable: {error.strerror}"
    return cache[key]


def _is_done(out: Path, subject: str, inputs: dict[str, Any], recipe: list[dict[str, Any]]) -> bool:
    path = out / "records" / f"{subject}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if record.get("inputs") != inputs or record.get("recipe") != recipe:
        return False
    return all((out / rel).is_file() for rel in record.get("outputs", {}).values() if rel)


def _run_tasks(tasks: Sequence[SubjectTask], workers: int, progress: bool, lock: Path) -> list[SubjectOutcome]:
    outcomes: list[SubjectOutcome] = []
    if not tasks:
        return outcomes
    bar = tqdm(total=len(tasks), desc="prepare", unit="subject", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1 or len(tasks) == 1:
            with _single_thread():
                for task in tasks:
                    outcomes.append(prepare_subject(task))
                    bar.update()
        else:
            # spawn: fresh interpreters, so no thread pool (ITK, OpenMP, tqdm) is copied half-alive by fork.
            context = multiprocessing.get_context("spawn")
            pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context,
                                                          initializer=_init_worker, initargs=(os.getpid(), str(lock)))
            try:
                futures = {pool.submit(prepare_subject, task): task for task in tasks}
                for future in concurrent.futures.as_completed(futures):
                    task = futures[future]
                    try:
                        outcomes.append(future.result())
                    except Exception as error:  # e.g. a worker killed for memory
                        outcomes.append(SubjectOutcome(task.subject, task.image, f"worker process failed: {type(error).__name__}: {error}"))
                    bar.update()
            except BaseException:
                # Ctrl-C: drop the queued subjects instead of finishing them; finished ones are kept (resume).
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    finally:
        bar.close()
    return outcomes


def _split(records, table: Covariates, fractions, seed: int) -> tuple[dict[str, str], dict[str, Any]]:
    age_name = next((n for n in table.names if n.lower() == "age"), None)
    ages = None
    if age_name is not None:
        ages = {s: table.values[s][age_name] for s in records if isinstance(table.values.get(s, {}).get(age_name), float)}
    assignment = assign_splits(list(records), fractions, seed, ages)
    counts = {name: sum(v == name for v in assignment.values()) for name in SPLITS}
    return assignment, {
        "fractions": list(fractions), "seed": seed, "stratified_by": age_name if ages else None,
        "method": "sorted by age, binned, shuffled within bins with the seed, dealt to the split furthest below its share",
        "counts": counts,
    }


def _write_manifest(path: Path, records, assignment: dict[str, str], table: Covariates) -> None:
    rows = []
    for subject, record in records.items():
        outputs = record["outputs"]
        row = {"subject": subject, "image": outputs["image"], "mask": outputs["mask"], "labels": outputs["labels"],
               "split": assignment[subject]}
        row.update({name: table.values.get(subject, {}).get(name, "") for name in table.names})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["subject", "image", "mask", "labels", "split", *table.names])
    write_text_atomic(path, frame.to_csv(index=False))


def _write_report(path: Path, entries: Sequence[Skip]) -> None:
    frame = pd.DataFrame([dataclasses.asdict(e) for e in entries], columns=["subject", "input", "reason"])
    write_text_atomic(path, frame.to_csv(index=False))


def _versions(with_deepbet: bool) -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in VERSION_PACKAGES + (("deepbet",) if with_deepbet else ()):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
