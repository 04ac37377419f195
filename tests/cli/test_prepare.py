"""`mriflow prepare`: a folder of scans into a prepared dataset, and its bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import head_phantom
from mriflow.cli import main


def write_scans(folder: Path, names=("s01", "s02", "s03")) -> tuple[Path, Path]:
    """Phantom scans (3 mm, RAS, centred on the template) and their label maps, named like IXI files."""
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = np.asarray([0.0, -17.0, 5.0]) - 3.0 * (np.asarray((48, 56, 44)) - 1) / 2
    for seed, name in enumerate(names):
        image, labels = head_phantom((48, 56, 44), seed)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), str(folder / "images" / f"{name}_T1.nii.gz"))
        nib.save(nib.Nifti1Image(labels, affine), str(folder / "labels" / f"{name}_T1_labels.nii.gz"))
    pd.DataFrame({"subject": list(names), "age": [30.0, 50.0, 70.0], "sex": ["F", "M", "F"]}).to_csv(
        folder / "covariates.csv", index=False)
    return folder / "images", folder / "labels"


def test_prepare_writes_a_dataset_and_its_summary(tmp_path, capsys):
    images, labels = write_scans(tmp_path)
    code = main(["prepare", str(images), "--masks", str(labels), "--covariates", str(tmp_path / "covariates.csv"),
                 "--preset", "4mm", "--split", "0.34,0.33,0.33", "--out", str(tmp_path / "prepared")])
    assert code == 0
    assert "prepared 3 subjects" in capsys.readouterr().out
    manifest = pd.read_csv(tmp_path / "prepared" / "manifest.csv")
    assert sorted(manifest["subject"]) == ["s01", "s02", "s03"] and set(manifest["split"]) == {"train", "val", "test"}
    image = nib.load(str(tmp_path / "prepared" / manifest["image"][0]))
    assert image.shape == (40, 48, 40) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert json.loads((tmp_path / "prepared" / "prepare.json").read_text())["parameters"]["split"] == [0.34, 0.33, 0.33]


def test_bad_input_is_one_line_naming_it_and_exit_code_2(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "missing" in error and "Traceback" not in error and error.count("\n") == 1
    assert main(["prepare", str(tmp_path), "--split", "0.8,x", "--out", str(tmp_path / "out")]) == 2
    assert "--split" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown options of commands other than generate
        main(["prepare", str(tmp_path), "--out", str(tmp_path / "o"), "--ventricles", "3"])
