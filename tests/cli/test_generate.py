"""`mriflow generate`: covariates as options, refused with the ones the model knows."""

from __future__ import annotations

import json

import nibabel as nib
import pytest

from conftest import write_prepared
from mriflow.cli import main
from mriflow.cli.generate import covariate_options


def test_model_covariates_pass_through_as_name_value_items():
    assert covariate_options(["--ventricles", "30000", "--total_brain=1.2e6"]) == ["ventricles=30000",
                                                                                    "total_brain=1.2e6"]
    with pytest.raises(ValueError, match="--ventricles"):
        covariate_options(["--ventricles"])
    with pytest.raises(ValueError, match="unrecognized"):
        covariate_options(["stray"])


def test_train_flow_then_generate_withcovariate_options(tmp_path, capsys):
    data = write_prepared(tmp_path / "data", splits=("train",) * 8 + ("val", "test"))
    ae, flow = tmp_path / "ae", tmp_path / "flow"
    assert main(["train", "autoencoder", str(data), "--out", str(ae), "--max-steps", "1"]) == 0
    assert main(["train", "flow", str(data), "--autoencoder", str(ae), "--out", str(flow), "--condition", "age",
                 "--max-steps", "2"]) == 0
    capsys.readouterr()

    out = tmp_path / "samples"
    assert main(["generate", "--model", str(flow), "--out", str(out), "--n", "2", "--age", "40", "--solver", "euler",
                 "--steps", "2", "--device", "cpu"]) == 0
    assert "2 volumes" in capsys.readouterr().out
    sidecar = json.loads((out / "sample_00001.json").read_text())
    assert sidecar["covariates"] == {"age": 40.0} and sidecar["solver"] == "euler" and sidecar["steps"] == 2
    assert nib.load(str(out / "sample_00001.nii.gz")).get_qform(coded=True)[1] == 4  # MNI template space

    # A covariate the model does not know is refused with the ones it knows; nothing is written.
    assert main(["generate", "--model", str(flow), "--out", str(tmp_path / "other"), "--ventricles", "3"]) == 2
    assert "this model knows: age" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_an_age_outside_the_training_range_is_one_plain_warning_line(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "samples"), "--n", "1", "--age", "150", "--solver", "euler",
                 "--steps", "1", "--device", "cpu"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "150" in line]
    assert warning == [warning[0]] and warning[0].startswith("mriflow generate: warning: covariate 'age' = 150 is "
                                                             "outside the training range")
    assert "UserWarning" not in warning[0] and ".py" not in warning[0]


def test_an_age_that_is_not_a_finite_number_is_refused(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "samples"), "--age", "nan", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "covariate 'age': nan is not a finite number" in error and error.count("\n") == 1
    assert not (tmp_path / "samples").exists()
