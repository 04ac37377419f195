"""Where voxels are in the world: nibabel (RAS) and SimpleITK (LPS) images, the preset grid, the MNI152 template.

nibabel affines map voxels to RAS millimetres, SimpleITK images live in LPS
millimetres; :func:`to_sitk` flips x and y (``diag(-1, -1, 1)``) and is the only
place where the two meet. A registration transform maps a template (fixed) point
to the subject (moving) point, ITK's convention, so resampling the native image
through it onto the preset grid (:func:`grid_reference`) is one interpolation.

    >>> image = to_sitk(data, affine)          # (X, Y, Z) array + RAS affine -> LPS image
    >>> on_grid = sitk.Resample(image, grid_reference(get_grid("4mm")), transform)
    >>> from_sitk(on_grid).shape               # (X, Y, Z) again
    (40, 48, 40)
"""

from __future__ import annotations

import functools

import numpy as np
import SimpleITK as sitk

from mriflow.config import Grid, get_grid
from mriflow.data.io import template_affine

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


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
    transform = single_transform(transform)
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + center - matrix @ center  # ITK: T(x) = M (x - c) + c + t
    return RAS_TO_LPS @ lps @ RAS_TO_LPS


def single_transform(transform: sitk.Transform) -> sitk.Transform:
    """The one transform inside a composite (as registration returns it), downcast to its own class."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() != 1:
            raise ValueError("expected a single transform inside the composite")
        return composite.GetNthTransform(0).Downcast()
    return transform.Downcast()


def as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """The same map as a 12-parameter affine transform (rigid stages hand over to the affine stage this way)."""
    single = single_transform(transform)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(single.GetMatrix())
    affine.SetTranslation(single.GetTranslation())
    affine.SetCenter(single.GetCenter())
    return affine


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
