"""Affine registration of a subject to the MNI152 template with SimpleITK: rigid first, then 12 dof.

    >>> template, template_mask = mni_template()
    >>> transform, quality = register_affine(template, to_sitk(data, affine), Register(), template_mask)
    >>> transform_to_ras_matrix(transform)     # template point -> subject point, RAS millimetres

The settings (stages, sampling, optimizer) are the fields of the recipe's ``Register`` step
(:mod:`mriflow.data.recipe`), so what ran is recorded with the prepared data.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from mriflow.data.geometry import as_affine

if TYPE_CHECKING:
    from mriflow.data.recipe import Register


def register_affine(
    fixed: sitk.Image, moving: sitk.Image, settings: Register, fixed_mask: sitk.Image | None = None
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
            transform = as_affine(transform)
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
    return as_affine(transform), quality
