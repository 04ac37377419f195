"""Geometry: RAS (nibabel) and LPS (SimpleITK) agree on where every voxel is; transforms keep their map."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from mriflow.config import get_grid
from mriflow.data.geometry import as_affine, from_sitk, single_transform, template_brain_mask, to_sitk, transform_to_ras_matrix


def test_ras_to_lps_conversion_matches_nibabel_world_coordinates():
    affine = np.array([[0.0, 0.0, 2.0, -88.0], [-2.0, 0.0, 0.0, 118.0], [0.0, 2.0, 0.0, -135.0], [0, 0, 0, 1]])
    image = to_sitk(np.zeros((5, 6, 7), np.float32), affine)
    for index in [(0, 0, 0), (4, 1, 6), (2, 5, 3)]:
        ras = (affine @ np.append(index, 1.0))[:3]
        lps = np.asarray(image.TransformIndexToPhysicalPoint(tuple(int(i) for i in index)))
        np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)


def test_an_image_comes_back_from_sitk_as_the_same_array():
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    np.testing.assert_array_equal(from_sitk(to_sitk(data, np.eye(4))), data)


def rigid_transform():
    """A rigid LPS transform with a rotation, a translation and a centre of rotation away from the origin."""
    transform = sitk.VersorRigid3DTransform()
    transform.SetRotation((0.0, 0.0, 1.0), 0.3)
    transform.SetTranslation((4.0, -3.0, 2.0))
    transform.SetCenter((10.0, 20.0, -5.0))
    return transform


def test_as_affine_maps_every_point_where_the_rigid_transform_does():
    rigid = rigid_transform()
    composite = sitk.CompositeTransform(rigid)  # registration hands its result back inside a composite
    affine = as_affine(composite)
    assert isinstance(affine, sitk.AffineTransform) and single_transform(composite).GetName() == "VersorRigid3DTransform"
    for point in [(0.0, 0.0, 0.0), (12.5, -40.0, 7.0), (-80.0, 33.0, 60.0)]:
        np.testing.assert_allclose(affine.TransformPoint(point), rigid.TransformPoint(point), atol=1e-9)


def test_the_ras_matrix_of_a_transform_maps_ras_points_as_the_transform_maps_lps_ones():
    transform = rigid_transform()
    matrix = transform_to_ras_matrix(transform)
    flip = np.array([-1.0, -1.0, 1.0])
    for ras in [(0.0, 0.0, 0.0), (30.0, -12.0, 45.0), (-64.0, 80.0, -20.0)]:
        expected = flip * np.asarray(transform.TransformPoint(tuple(flip * ras)))
        np.testing.assert_allclose((matrix @ np.append(ras, 1.0))[:3], expected, atol=1e-9)


def test_the_template_brain_mask_lies_on_the_preset_grid():
    mask = template_brain_mask("4mm")
    assert mask.dtype == bool and mask.shape == get_grid("4mm").shape
    assert 0.1 < mask.mean() < 0.6  # a brain inside the field of view, not an empty or a full box
