"""The scans the app may draw at another age (issue 28.3): a prepared folder's (`mriflow app --scans DATA`,
`scan_index`) and a researcher's own T1 uploaded to the page (`--uploads`), with the work an upload can cause bounded.

An upload's body is the NIfTI file itself (`Content-Type: application/octet-stream`, which a page on another site cannot send
without the browser asking first), at most MAX_UPLOAD bytes as sent and MAX_UNPACKED once un-gzipped (a gzip bomb is
stopped there, not after); it must be one 3D volume (or 4D with one frame) of finite values whose affine can be
inverted. It is written to a private folder of this app's run (never under a served folder, removed when the app
stops), then taken through the preparation recipe onto the model's grid by the worker, like every job, and joins the
scans the page may edit, with the covariates the uploader gave. At most MAX_UPLOADS per run.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

MAX_UPLOAD = 64 * 1024 * 1024  # bytes as sent (a 1 mm T1 is 10-30 MB gzipped)
MAX_UNPACKED = 512 * 1024 * 1024  # bytes once un-gzipped
MAX_UPLOADS = 16  # scans one run of the app takes
KINDS = ("brain", "head")  # skull-stripped already, or a head for deepbet to strip


def read_upload(data: bytes) -> nib.Nifti1Image:
    """The uploaded bytes as a NIfTI image (gzipped or not); ValueError in one line saying what is wrong."""
    if data[:2] == b"\x1f\x8b":
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            raw = inflate.decompress(data, MAX_UNPACKED)
        except zlib.error:
            raise ValueError("the upload is gzipped but damaged; send the .nii.gz file as it is") from None
        if inflate.unconsumed_tail:
            raise ValueError(f"the upload unpacks to more than {MAX_UNPACKED // 2**20} MB, more than a T1 volume; "
                             "send one 3D volume")
        if not inflate.eof:
            raise ValueError("the upload is gzipped but damaged (it ends early); send the .nii.gz file as it is")
    else:
        raw = data
    image = None
    for kind in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            image = kind.from_bytes(raw)
            break
        except Exception:  # nibabel's errors for a file that is not this kind
            continue
    if image is None:
        raise ValueError("the upload is not a NIfTI volume (.nii or .nii.gz); send a T1-weighted scan")
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        image = nib.Nifti1Image(np.asarray(image.dataobj)[..., 0], image.affine)
    elif len(shape) != 3:
        raise ValueError(f"the upload has shape {tuple(shape)}; send one 3D volume")
    if min(image.shape) < 8:
        raise ValueError(f"the upload has shape {tuple(image.shape)}, too small for a brain; send a 3D T1 volume")
    affine = image.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise ValueError("the upload's affine is not finite or cannot be inverted; send a volume with its geometry")
    try:
        volume = np.asarray(image.dataobj, dtype=np.float32)
    except Exception:  # nibabel's error for data shorter than its header says
        raise ValueError("the upload's voxels are cut short of what its header says; send the whole file") from None
    if not np.all(np.isfinite(volume)) or not volume.any():
        raise ValueError("the upload holds non-finite values or nothing but zeros; send a T1-weighted scan")
    return nib.Nifti1Image(volume, affine)


def check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (already skull-stripped, or a head), got {kind!r}")
    return kind


class UploadFolder:
    """The private folder where uploads and their preparation live for one run of the app."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="mriflow-uploads-"))  # mode 0700: this user only
        self.count = 0

    def save(self, scan_id: str, image: nib.Nifti1Image) -> Path:
        if self.count >= MAX_UPLOADS:
            raise ValueError(f"this app has taken {MAX_UPLOADS} uploads, the most one run takes; restart it for more")
        self.count += 1
        path = self.root / scan_id / "upload" / f"{scan_id}.nii.gz"
        path.parent.mkdir(parents=True)
        path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))
        return path

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def scan_index(data: str | Path, names) -> dict[str, dict[str, Any]]:
    """The scans of a prepared folder that the app may edit: {subject: {"path", "split", "covariates"}} with the
    covariates the manifest records for the model's names (None where it has none), in the manifest's order."""
    from mriflow.data.dataset import read_manifest
    from mriflow.edit import pd_missing

    data = Path(data)
    if not (data / "manifest.csv").is_file():
        raise FileNotFoundError(f"--scans {data}: not a prepared folder (no manifest.csv); give one `mriflow prepare` wrote")
    scans = {}
    for row in read_manifest(data).to_dict("records"):
        path = data / row["image"]
        if path.is_file():
            covariates = {n: (None if pd_missing(row.get(n)) else (float(row[n]) if isinstance(row[n], (int, float))
                                                                   else str(row[n]))) for n in names}
            scans[str(row["subject"])] = {"path": path, "split": str(row.get("split", "")), "covariates": covariates}
    if not scans:
        raise ValueError(f"--scans {data}: its manifest lists no image that is there")
    return scans
