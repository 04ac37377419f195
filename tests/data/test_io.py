"""mriflow.data.io: NIfTI volumes written and read back with their geometry, refusals named, writes atomic."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mriflow.config import GRIDS, Grid, get_grid
from mriflow.data.io import is_nifti, load_volume, save_volume, strip_nifti_suffix, template_affine
from mriflow.utils.files import DamagedFileError


def oblique_affine() -> np.ndarray:
    """A rotated, anisotropic, shifted affine: a round trip that kept only the diagonal would be caught."""
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, 2.0, 2.5])
    affine[:3, 3] = (-80.25, -110.5, -70.0)
    return affine


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_volume_and_its_affine_survive_a_round_trip(tmp_path, suffix):
    data = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    affine = oblique_affine()
    path = save_volume(tmp_path / "sub" / f"volume{suffix}", data, affine)  # the folder is made
    assert path == tmp_path / "sub" / f"volume{suffix}" and path.is_file()
    loaded, loaded_affine = load_volume(path)
    assert loaded.dtype == np.float32 and loaded_affine.dtype == np.float64
    np.testing.assert_array_equal(loaded, data)
    np.testing.assert_allclose(loaded_affine, affine, atol=1e-5)
    if suffix == ".nii.gz":
        with gzip.open(path) as stream:  # really compressed, not a .nii under a .gz name
            assert len(stream.read(348)) == 348


def test_the_affine_is_written_as_qform_and_sform_code_4_in_millimetres(tmp_path):
    affine = template_affine(get_grid("4mm"))
    header = nib.load(save_volume(tmp_path / "v.nii.gz", np.zeros((40, 48, 40)), affine)).header
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    assert int(qcode) == 4 and int(scode) == 4  # MNI-152 template space
    np.testing.assert_allclose(qform, affine, atol=1e-5)
    np.testing.assert_allclose(sform, affine, atol=1e-5)
    assert header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(header.get_zooms(), (4.0, 4.0, 4.0))


def test_the_stored_dtype_is_the_one_asked_for_and_reads_back_as_float32(tmp_path):
    labels = np.array([[[0, 1], [2, 255]]], dtype=np.int64)
    path = save_volume(tmp_path / "labels.nii.gz", labels, np.eye(4), dtype=np.uint8)
    assert nib.load(path).get_data_dtype() == np.uint8
    loaded, _ = load_volume(path)
    assert loaded.dtype == np.float32 and loaded.tolist() == labels.tolist()

    image = np.linspace(0, 1, 24, dtype=np.float64).reshape(2, 3, 4)
    path = save_volume(tmp_path / "image.nii.gz", image, np.eye(4))  # float32 by default
    assert nib.load(path).get_data_dtype() == np.float32
    np.testing.assert_array_equal(load_volume(path)[0], image.astype(np.float32))


def test_scale_factors_of_a_file_written_elsewhere_are_applied(tmp_path):
    image = nib.Nifti1Image(np.array([[[0, 1], [2, 3]]], dtype=np.int16), np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, tmp_path / "scaled.nii")
    assert load_volume(tmp_path / "scaled.nii")[0].tolist() == [[[10.0, 10.5], [11.0, 11.5]]]


@pytest.mark.parametrize("affine", [np.zeros((4, 4)), np.eye(3), np.diag([0.0, 0.0, 0.0, 1.0])],
                         ids=["all-zero", "3x3", "zero-spacing"])
def test_a_volume_without_a_valid_affine_is_refused_and_nothing_is_written(tmp_path, affine):
    with pytest.raises(ValueError, match=r"v.nii.gz: refusing to write a volume without a valid 4x4 affine"):
        save_volume(tmp_path / "v.nii.gz", np.zeros((2, 2, 2)), affine)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_false_refuses_an_existing_file_and_leaves_it_untouched(tmp_path):
    path = save_volume(tmp_path / "v.nii.gz", np.ones((2, 3, 4)), np.eye(4))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="v.nii.gz"):
        save_volume(path, np.zeros((2, 3, 4)), np.eye(4), overwrite=False)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]  # no temporary left beside it
    save_volume(path, np.zeros((2, 3, 4)), np.eye(4))  # overwrite=True (the default) replaces it
    assert load_volume(path)[0].max() == 0.0
    assert save_volume(tmp_path / "new.nii.gz", np.ones((2, 2, 2)), np.eye(4), overwrite=False).is_file()


def test_a_failed_write_leaves_no_half_file_under_the_final_name(tmp_path, monkeypatch):
    path = save_volume(tmp_path / "v.nii.gz", np.ones((2, 3, 4)), np.eye(4))
    before = path.read_bytes()

    def cut_short(image, filename):
        Path(filename).write_bytes(b"half a header")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", cut_short)
    with pytest.raises(OSError, match="disk full"):
        save_volume(path, np.zeros((2, 3, 4)), np.eye(4))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]


def test_a_missing_damaged_or_complex_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_volume(tmp_path / "absent.nii.gz")
    path = save_volume(tmp_path / "cut.nii.gz", np.random.default_rng(0).random((8, 8, 8)), np.eye(4))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DamagedFileError, match=r"cut.nii.gz: cannot be read as NIfTI.*restore or regenerate it"):
        load_volume(path)
    (tmp_path / "text.nii").write_text("not an image")
    with pytest.raises(DamagedFileError, match="text.nii"):
        load_volume(tmp_path / "text.nii")
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.complex64), np.eye(4)), tmp_path / "complex.nii")
    with pytest.raises(ValueError, match=r"complex.nii: holds complex voxels.*save the magnitude image"):
        load_volume(tmp_path / "complex.nii")


def test_nifti_names_are_recognised_and_stripped():
    assert is_nifti(Path("a/sub01.nii.gz")) and is_nifti(Path("sub01.nii"))
    assert not is_nifti(Path("sub01.nii.gz.json")) and not is_nifti(Path("sub01.mgz")) and not is_nifti(Path("nii"))
    assert strip_nifti_suffix("sub01.nii.gz") == "sub01"  # both suffixes, not only ".gz"
    assert strip_nifti_suffix("sub01.nii") == "sub01"
    assert strip_nifti_suffix("sub.01.json") == "sub.01.json"  # other names unchanged


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_the_template_affine_centres_each_preset_grid_on_the_mni_brain(name):
    grid = GRIDS[name]
    affine = template_affine(grid)
    np.testing.assert_array_equal(affine[:3, :3], np.diag([grid.voxel_mm] * 3))  # RAS, isotropic
    np.testing.assert_array_equal(affine[3], [0, 0, 0, 1])
    centre = affine @ np.append((np.asarray(grid.shape) - 1) / 2.0, 1.0)
    np.testing.assert_allclose(centre[:3], (0.0, -17.0, 5.0))  # the middle of the MNI152 brain mask's box
    # every preset spans the same 160 x 192 x 160 mm field of view, which holds the MNI brain (x -72..72,
    # y -107..73, z -72..82 mm) with a margin on every side
    first, last = affine[:3, 3], (affine @ np.append(np.asarray(grid.shape) - 1, 1.0))[:3]
    np.testing.assert_allclose(np.asarray(grid.shape) * grid.voxel_mm, (160, 192, 160))
    assert np.all(first < (-72, -107, -72)) and np.all(last > (72, 73, 82))


def test_the_template_affine_takes_another_centre():
    grid = Grid("test", 2.0, (3, 5, 7))
    affine = template_affine(grid, center_mm=(10.0, 20.0, 30.0))
    np.testing.assert_allclose(affine[:3, 3], (10.0 - 2.0, 20.0 - 4.0, 30.0 - 6.0))
