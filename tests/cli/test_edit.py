"""`mriflow edit`: a prepared scan at other ages, with tissue maps, difference maps and sidecars that name the source."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import train_tiny_image_flow
from mriflow.cli import main
from mriflow.data.io import load_volume

SHAPE = (16, 20, 16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_image_flow(tmp_path_factory.mktemp("edit-cli"), SHAPE)


def test_edit_writes_each_target_with_its_difference_map_and_a_sidecar_naming_the_source(trained, tmp_path, capsys):
    data, run = trained
    scan = data / "images" / "sub02.nii.gz"  # age 34, sex F in the manifest
    out = tmp_path / "edits"
    assert main(["edit", "--model", str(run), "--scan", str(scan), "--age", "25,45", "--out", str(out),
                 "--steps", "4", "--no-labels", "--threads", "1"]) == 0
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert names == ["sub02_age-25.nii.gz", "sub02_age-25_diff.nii.gz", "sub02_age-45.nii.gz",
                     "sub02_age-45_diff.nii.gz", "sub02_roundtrip.nii.gz"]
    edited, affine = load_volume(out / "sub02_age-45.nii.gz")
    round_trip, _ = load_volume(out / "sub02_roundtrip.nii.gz")
    difference, _ = load_volume(out / "sub02_age-45_diff.nii.gz")
    np.testing.assert_allclose(difference, edited - load_volume(scan)[0], atol=1e-6)  # the change to the scan
    assert np.allclose(affine, load_volume(scan)[1]) and edited.shape == SHAPE
    sidecar = json.loads((out / "sub02_age-45.json").read_text())
    assert sidecar["source"]["covariates"] == {"age": 34.0, "sex": "F"}  # read from the prepared manifest
    assert sidecar["covariates"] == {"age": 45.0, "sex": "F"} and sidecar["derived_from_real_person"] is True
    assert sidecar["source"]["scan"] == str(scan.resolve()) and len(sidecar["source"]["sha256"]) == 64
    assert "does not apply" in sidecar["privacy_filter"] and sidecar["steps"] == 4 and sidecar["nfe"] > 0
    assert sidecar["detail"]["kept"] == "moved"  # the default: the scan's own detail moved with the edit
    assert "outline" in sidecar["background"] and sidecar["background"] != sidecar["detail"]["how"]
    # a second run into the folder is refused, nothing overwritten
    before = (out / "sub02_age-45.nii.gz").read_bytes()
    assert main(["edit", "--model", str(run), "--scan", str(scan), "--age", "45", "--out", str(out),
                 "--steps", "4", "--no-labels"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "sub02_age-45.nii.gz").read_bytes() == before


@pytest.mark.parametrize("arguments, message", [
    (["--age", "40", "--from", "age"], "--from 'age': give NAME=VALUE pairs"),
    ([], "--age, --sex or --covariate: say what to change"),
    (["--age", "40", "--solver", "dopri5"], "invalid choice"),
])
def test_bad_edit_requests_are_one_line(trained, tmp_path, capsys, arguments, message):
    data, run = trained
    code = None
    try:
        code = main(["edit", "--model", str(run), "--scan", str(data / "images" / "sub02.nii.gz"),
                     "--out", str(tmp_path / "out"), *arguments])
    except SystemExit as exit_:  # argparse's own refusal of a choice
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_scan_outside_a_prepared_folder_needs_its_covariates(trained, tmp_path, capsys):
    data, run = trained
    loose = tmp_path / "loose.nii.gz"
    loose.write_bytes((data / "images" / "sub02.nii.gz").read_bytes())
    assert main(["edit", "--model", str(run), "--scan", str(loose), "--age", "40", "--out", str(tmp_path / "o")]) == 2
    assert "give them with --from" in capsys.readouterr().err
    assert main(["edit", "--model", str(run), "--scan", str(loose), "--age", "40", "--from", "age=34,sex=F",
                 "--out", str(tmp_path / "o"), "--steps", "2", "--no-labels"]) == 0


def test_a_batch_table_edits_many_scans_sharing_each_scans_inversion(trained, tmp_path):
    data, run = trained
    table = tmp_path / "edits.csv"
    table.write_text("scan;age;sex;from_age;from_sex\n"  # a semicolon table, as prepare and generate accept
                     f"{data / 'images' / 'sub02.nii.gz'};60;;;\n"
                     f"{data / 'images' / 'sub02.nii.gz'};70;M;;\n"
                     f"{data / 'images' / 'sub03.nii.gz'};50;;45;F\n")
    out = tmp_path / "batch"
    assert main(["edit", "--model", str(run), "--batch", str(table), "--out", str(out), "--steps", "2", "--no-labels",
                 "--threads", "1"]) == 0
    edits = sorted(p.name for p in out.glob("*.nii.gz") if "_diff" not in p.name)
    assert edits == ["sub02_age-60.nii.gz", "sub02_age-70_sex-M.nii.gz", "sub02_roundtrip.nii.gz",
                     "sub03_age-50.nii.gz", "sub03_roundtrip.nii.gz"]
    assert json.loads((out / "sub03_age-50.json").read_text())["source"]["covariates"] == {"age": 45.0, "sex": "F"}
    assert json.loads((out / "sub02_age-70_sex-M.json").read_text())["covariates"] == {"age": 70.0, "sex": "M"}


def test_a_folder_of_scans_is_edited_to_the_same_targets(trained, tmp_path):
    data, run = trained
    out = tmp_path / "folder"
    assert main(["edit", "--model", str(run), "--scan", str(data / "images"), "--age", "50", "--out", str(out),
                 "--steps", "2", "--no-labels", "--threads", "1"]) == 0
    scans = sorted(p.name.removesuffix(".nii.gz") for p in (data / "images").glob("*.nii.gz"))
    assert sorted(p.name for p in out.glob("*_age-50.nii.gz")) == [f"{s}_age-50.nii.gz" for s in scans]


@pytest.mark.parametrize("text, message", [
    ("subject,age\nsub02,60\n", "needs a 'scan' column"),
    ("scan\nimages/sub02.nii.gz\n", "no target column"),
    ("scan,age\nimages/sub02.nii.gz,\n", "line 2: no target value"),
    ("scan,age\nimages/nobody.nii.gz,60\n", "line 2: .*nobody.nii.gz: no such file"),
])
def test_a_bad_batch_table_is_one_line_naming_the_table_and_line(trained, tmp_path, capsys, text, message):
    data, run = trained
    table = data / "bad-batch.csv"  # scan paths relative to the table's folder
    table.write_text(text)
    try:
        assert main(["edit", "--model", str(run), "--batch", str(table), "--out", str(tmp_path / "out")]) == 2
    finally:
        table.unlink()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch" in err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_raw_scan_is_prepared_onto_the_models_grid_before_it_is_edited(tmp_path, capsys):
    """Issue 28.1: a T1 from outside mriflow (here 1.5 mm voxels stored right to left, with a margin, other intensities)
    goes through the preparation recipe onto the shipped 4 mm model's grid, then is edited; its covariates come from
    --from, which a raw scan cannot do without."""
    import nibabel as nib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluate"))
    from evaluation_helpers import scanner_copy  # noqa: E402

    raw, volume, affine = scanner_copy(tmp_path)
    out = tmp_path / "edits"
    arguments = ["edit", "--model", "4mm", "--scan", str(raw), "--prepare", "brain", "--age", "70", "--out", str(out),
                 "--steps", "2", "--solver", "euler", "--device", "cpu", "--no-labels"]
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--from" in error[0] and "my_t1" in error[0]
    assert main(arguments + ["--from", "age=50,sex=F"]) == 0
    prepared = out / "prepared" / "images" / "my-t1.nii.gz"
    edited = out / "my-t1_age-70.nii.gz"
    assert prepared.is_file() and edited.is_file() and (out / "my-t1_roundtrip.nii.gz").is_file()
    image = nib.load(str(edited))
    assert np.allclose(image.affine, affine) and image.shape == volume.shape  # the model's (4 mm) grid
    back = np.asarray(nib.load(str(prepared)).dataobj, np.float64)
    assert np.corrcoef(back.ravel(), volume.ravel())[0, 1] > 0.8  # where the scan was, whatever its voxels
    sidecar = json.loads((out / "my-t1_age-70.json").read_text())
    assert sidecar["source"]["scan"] == str(prepared.resolve()) and sidecar["edit"]["to"]["age"] == 70.0


def test_the_commands_detail_choices_and_default_are_the_modules():
    """`mriflow edit --detail` offers what mriflow.edit delivers, defaulting to its DEFAULT_DETAIL (the CLI does not
    import the module at start-up, so the two lists are kept in step by this test)."""
    import argparse

    from mriflow.cli import edit as cli_edit
    from mriflow.edit import DEFAULT_DETAIL, DETAILS

    parser = argparse.ArgumentParser()
    cli_edit.add_commands(parser.add_subparsers())
    action = next(a for a in parser._subparsers._group_actions[0].choices["edit"]._actions if a.dest == "detail")
    assert set(action.choices) == set(DETAILS) and action.default == DEFAULT_DETAIL
