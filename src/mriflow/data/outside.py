"""Volumes from outside mriflow (another generator's samples, a researcher's own T1) taken through the preparation
recipe onto a grid: what `evaluate --prepare-fake`, `edit --prepare` and the app's uploads share.

    >>> prepared = prepare_outside([Path("my_t1.nii.gz")], Path("work"), "2mm", "head", "--scan")
    >>> prepared[Path("my_t1.nii.gz")]          # work/prepared/images/my-t1.nii.gz, on the 2 mm template grid
"""

from __future__ import annotations

from pathlib import Path

from mriflow.data.io import strip_nifti_suffix
from mriflow.data.prepare import run_prepare
from mriflow.utils.text import counted


def prepare_outside(volumes: list[Path], out: Path, preset: str, kind: str, argument: str,
                    strict: bool = True, progress: bool = True) -> dict[Path, Path]:
    """Volumes from outside mriflow (any voxel size, orientation, field of view, intensities) through the preparation
    recipe onto grid `preset` in out/prepared: registered to MNI152, resampled, scaled to [0, 1], skull-stripped by
    deepbet when they are heads (`kind` "head"; "brain": already stripped). Returns {volume: its prepared image}; with
    `strict`, a volume the recipe skipped is one line naming it and why (`argument`: the option it came from), else it
    is left out (prepare_report.csv says why)."""
    # prepare names a subject by its file name up to the first "_": sample_00003 would be "sample" for every file
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    links = {}
    for volume in volumes:
        target = inputs / volume.name.replace("_", "-")
        if not target.exists():
            target.symlink_to(volume.resolve())
        links[volume] = strip_nifti_suffix(target.name)
    if progress:
        print(f"preparing {counted(len(volumes), 'volume')} onto the {preset} grid in {out}")
    result = run_prepare(inputs, out / "prepared", preset=preset, skull_strip="deepbet" if kind == "head" else "none",
                         register=True, progress=progress)
    prepared = {}
    for volume, subject in links.items():
        image = out / "prepared" / "images" / f"{subject}.nii.gz"
        if not image.is_file() and not strict:
            continue
        if not image.is_file():
            reason = next((skip.reason for skip in result.skipped if skip.subject == subject), "skipped")
            raise ValueError(f"{argument} {volume}: the preparation recipe could not take it onto the {preset} grid "
                             f"({reason}); see {out / 'prepared' / 'prepare_report.csv'}")
        prepared[volume] = image
    return prepared
