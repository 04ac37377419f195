"""Registration to MNI152: a known affine motion is recovered, on a phantom and on the template itself."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import head_phantom
from mriflow.data.geometry import mni_template, template_brain_mask, to_sitk, transform_to_ras_matrix
from mriflow.data.io import load_volume
from mriflow.data.prepare import run_prepare
from mriflow.data.recipe import Register
from mriflow.data.registration import register_affine

VOXEL_MM = 3.0
SHAPE = (48, 56, 44)


def write(path, data, affine, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine), str(path))
    return path


def rotation(degrees_x, degrees_z):
    ax, az = np.radians(degrees_x), np.radians(degrees_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def known_motion():
    """A world (RAS) transform: rotation, anisotropic scale and translation."""
    motion = np.eye(4)
    motion[:3, :3] = rotation(6.0, -8.0) @ np.diag([1.05, 0.96, 1.02])
    motion[:3, 3] = [6.0, -7.0, 4.0]
    return motion


def test_registration_recovers_a_known_affine_to_within_one_voxel():
    image, labels = head_phantom(SHAPE, 0)
    brain = image * (labels > 0)
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = np.array([0.0, -17.0, 5.0]) - VOXEL_MM * (np.array(SHAPE) - 1) / 2  # centred near the template's middle
    motion = known_motion()
    # The same voxels placed in the world through `motion`: the true template->subject map is `motion`.
    fixed, moving = to_sitk(brain, affine), to_sitk(brain, motion @ affine)
    transform, quality = register_affine(fixed, moving, Register(), to_sitk((labels > 0).astype(np.uint8), affine))
    recovered = transform_to_ras_matrix(transform)
    corners = np.array([[i, j, k, 1.0] for i in (8, 40) for j in (8, 48) for k in (8, 36)]) @ affine.T
    errors = np.linalg.norm((corners @ recovered.T - corners @ motion.T)[:, :3], axis=1)
    assert errors.max() < VOXEL_MM, errors
    # 12 degrees of freedom: the anisotropic scale is recovered too, not only the rotation.
    np.testing.assert_allclose(np.linalg.svd(recovered[:3, :3], compute_uv=False), [1.05, 1.02, 0.96], atol=0.03)
    assert [stage["transform"] for stage in quality["stages"]] == ["rigid", "affine"]
    assert quality["metric"] == quality["stages"][-1]["metric"] < 0  # Mattes MI is negated: lower is better


def test_template_moved_by_a_known_affine_is_registered_back_into_mni_space(tmp_path):
    template, template_mask = mni_template()
    motion = known_motion()
    data = np.transpose(sitk.GetArrayFromImage(template), (2, 1, 0))
    mask = np.transpose(sitk.GetArrayFromImage(template_mask), (2, 1, 0))
    # nilearn's 2 mm template affine, in RAS.
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-98.0, -134.0, -72.0]
    write(tmp_path / "in" / "mni_T1.nii.gz", data, motion @ affine)
    write(tmp_path / "masks" / "mni_mask.nii.gz", mask, motion @ affine, np.uint8)
    run_prepare(tmp_path / "in", tmp_path / "out", masks=tmp_path / "masks", progress=False)
    record = json.loads((tmp_path / "out" / "prepare.json").read_text())["subjects"]["mni"]["registration"]
    recovered = np.asarray(record["template_to_subject_ras"])
    points = np.array([[x, y, z, 1.0] for x in (-60, 60) for y in (-90, 50) for z in (-40, 60)])
    assert np.linalg.norm((points @ recovered.T - points @ motion.T)[:, :3], axis=1).max() < 4.0
    prepared, _ = load_volume(tmp_path / "out" / "masks" / "mni.nii.gz")
    reference = template_brain_mask("4mm")
    dice = 2 * (reference & (prepared > 0)).sum() / (reference.sum() + (prepared > 0).sum())
    assert dice > 0.95
    assert record["mask_dice_mni"] == pytest.approx(dice, abs=1e-3)
    # Seeded sampling, one thread: a second run gives the same volume, bit for bit.
    run_prepare(tmp_path / "in", tmp_path / "again", masks=tmp_path / "masks", progress=False)
    np.testing.assert_array_equal(load_volume(tmp_path / "again" / "images" / "mni.nii.gz")[0],
                                  load_volume(tmp_path / "out" / "images" / "mni.nii.gz")[0])
