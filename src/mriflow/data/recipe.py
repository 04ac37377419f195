"""The preparation recipe: a declared chain of small steps over one subject, each a dataclass whose
fields are its parameters.

    reorient (RAS) -> brain_mask (given mask / label map, deepbet, or a head mask)
      -> bias_field (N4, optional) -> register (rigid then affine to MNI152, optional)
      -> resample (once, native image straight into the preset grid) -> normalize ([0, 1])

The chain is recorded as data (:func:`recipe_to_data`) in ``prepare.json`` and in every
subject's record, and rebuilt from that data (:func:`recipe_from_data`) in the worker processes:

    >>> recipe = build_recipe("4mm", skull_strip="mask", n4=False, register=True)
    >>> [step.name for step in recipe]
    ['reorient', 'brain_mask', 'register', 'resample', 'normalize']
    >>> state = SubjectState("sub-01", nib.Nifti1Image(data, affine), mask=brain)
    >>> for step in recipe_from_data(recipe_to_data(recipe)):
    ...     state = step(state)                # state.outputs: image, mask (, labels) on the preset grid
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from mriflow.config import from_dict, get_grid
from mriflow.data.geometry import from_sitk, grid_reference, mni_template, template_brain_mask, to_sitk, transform_to_ras_matrix
from mriflow.data.registration import register_affine


class InputProblem(Exception):
    """A subject's files cannot be used; the message is the reason written to prepare_report.csv."""


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


def correct_bias_field(image: sitk.Image, mask: sitk.Image, settings: BiasField) -> sitk.Image:
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
    """The steps `data` (as :func:`recipe_to_data` wrote it) describes, each built by config.from_dict: JSON
    lists become the tuples the fields declare, and an unknown or mistyped parameter is refused naming it."""
    steps = []
    for index, entry in enumerate(data):
        entry = dict(entry)
        name = entry.pop("step")
        if name not in STEPS:
            raise ValueError(f"unknown recipe step {name!r}; known steps: {', '.join(STEPS)}")
        steps.append(from_dict(STEPS[name], entry, f"recipe step {index} ({name})"))
    return steps


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
