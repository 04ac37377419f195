"""NIfTI reading and writing with the geometry kept: every volume mriflow writes has a real affine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from mriflow.config import Grid
from mriflow.utils.files import DamagedFileError, atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI as float32 (scale factors applied) and its 4x4 voxel-to-world affine.

    A file that cannot be read as NIfTI (cut short, damaged, another format) raises DamagedFileError,
    and one of complex voxels ValueError, each naming the file; nibabel's and gzip's errors name none
    or say nothing a user can act on. A missing or unreadable file stays an OSError naming it.
    """
    try:
        image = nib.load(str(path))
        dtype = image.get_data_dtype()
        data = np.asarray(image.dataobj, dtype=np.float32) if dtype.kind != "c" else None
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as error:  # nibabel, gzip, zlib and numpy each have their own
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DamagedFileError(f"{path}: cannot be read as NIfTI ({message}); it is damaged, cut short or not NIfTI: "
                               "restore or regenerate it") from None
    if data is None:  # a cast would have dropped the imaginary part without a word
        raise ValueError(f"{path}: holds complex voxels ({dtype}); mriflow reads real-valued volumes: save the "
                         "magnitude image")
    return data, image.affine.astype(np.float64)


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32,
                overwrite: bool = True) -> Path:
    """Write `data` with `affine` as both qform and sform (code 4, MNI-152 template space).

    The file is written to a temporary name in the same folder and renamed, so an
    interrupted write never leaves a half file under the final name. With overwrite=False an
    existing `path` (even one another process wrote a moment ago) raises FileExistsError.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or np.allclose(affine[:3, :3], 0):
        raise ValueError(f"{path}: refusing to write a volume without a valid 4x4 affine")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.set_qform(affine, code=4)
    image.set_sform(affine, code=4)
    image.header.set_xyzt_units("mm")
    with atomic_path(path, overwrite=overwrite) as temporary:
        nib.save(image, temporary)
    return path


def template_affine(grid: Grid, center_mm: tuple[float, float, float] = (0.0, -17.0, 5.0)) -> np.ndarray:
    """RAS affine of the preset grid in MNI152 space, centred on `center_mm`.

    The default centre is the middle of the MNI152 brain mask's bounding box
    (nilearn's 1 mm mask: x −72…72, y −107…73, z −72…82 mm), so the preset field of view
    (160 × 192 × 160 mm) holds the whole brain with a margin on every side.
    """
    spacing = grid.voxel_mm
    affine = np.diag([spacing, spacing, spacing, 1.0])
    # World coordinate of voxel i is origin + i*spacing; the grid's centre is at (shape-1)/2.
    affine[:3, 3] = np.asarray(center_mm) - spacing * (np.asarray(grid.shape) - 1) / 2.0
    return affine
