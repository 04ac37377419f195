"""The command line is a thin shell: it parses, calls the library, and turns bad input into one clear line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import head_phantom
from mriflow.cli import _covariate_options, main

from conftest import write_prepared


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


def test_model_covariates_pass_through_as_name_value_items():
    assert _covariate_options(["--ventricles", "30000", "--total_brain=1.2e6"]) == ["ventricles=30000",
                                                                                    "total_brain=1.2e6"]
    with pytest.raises(ValueError, match="--ventricles"):
        _covariate_options(["--ventricles"])
    with pytest.raises(ValueError, match="unrecognized"):
        _covariate_options(["stray"])


def test_train_autoencoder_then_encode_and_evaluate_reconstruction(tmp_path, capsys):
    data = write_prepared(tmp_path / "data", splits=("train", "train", "train", "val", "test"))
    run = tmp_path / "ae"
    assert main(["train", "autoencoder", str(data), "--out", str(run), "--max-steps", "1"]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    # A second start into the same run is refused (nothing overwritten); --resume continues it.
    assert main(["train", "autoencoder", str(data), "--out", str(run), "--max-steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "autoencoder", str(data), "--out", str(run), "--max-steps", "2", "--resume"]) == 0
    assert json.loads(next((run / "checkpoints").glob("step-00000002")).joinpath("checkpoint.json").read_text())["step"] == 2

    assert main(["encode", str(data), "--autoencoder", str(run), "--device", "cpu"]) == 0
    assert "latents:" in capsys.readouterr().out
    assert main(["evaluate", "reconstruction", str(data), "--autoencoder", str(run), "--split", "test",
                 "--out", str(tmp_path / "reconstruction"), "--device", "cpu"]) == 0
    assert "SSIM" in capsys.readouterr().out
    summary = json.loads((tmp_path / "reconstruction" / "summary.json").read_text())
    assert summary["split"] == "test" and summary["subjects"] == 1


def test_stop_at_step_ends_a_session_that_resume_finishes_on_the_same_schedule(tmp_path, capsys):
    data = write_prepared(tmp_path / "data", splits=("train", "train", "val", "test"))
    run = tmp_path / "ae"
    assert main(["train", "autoencoder", str(data), "--out", str(run), "--max-steps", "3", "--stop-at-step", "1"]) == 0
    first = json.loads((run / "checkpoints" / "step-00000001" / "checkpoint.json").read_text())
    assert first["step"] == 1 and first["config"]["loop"]["max_steps"] == 3  # the schedule of the whole run
    assert main(["train", "autoencoder", str(data), "--out", str(run), "--resume"]) == 0
    assert (run / "checkpoints" / "step-00000003" / "checkpoint.json").is_file()


def test_console_command_is_installed():
    result = subprocess.run([sys.executable, "-m", "mriflow", "--help"], capture_output=True, text=True, check=True)
    for command in ("prepare", "train", "encode", "generate", "evaluate"):
        assert command in result.stdout


def test_train_flow_then_generate_with_covariate_options(tmp_path, capsys):
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


def test_evaluate_generation_of_a_shipped_model_with_its_autoencoder(tmp_path, capsys):
    data = write_prepared(tmp_path / "data", splits=("train",) * 4 + ("val",) * 7 + ("test",) * 7, shape=(40, 48, 40))
    samples, report = tmp_path / "samples", tmp_path / "report"
    assert main(["generate", "--model", "4mm", "--out", str(samples), "--n", "8", "--age", "50", "--device", "cpu"]) == 0
    assert main(["evaluate", "generation", "--real", str(data), "--fake", str(samples), "--out", str(report),
                 "--autoencoder", "4mm", "--bootstrap", "3", "--device", "cpu"]) == 0
    assert "report:" in capsys.readouterr().out
    metrics = json.loads((report / "metrics.json").read_text())
    assert Path(metrics["inputs"]["autoencoder"]).parts[-2:] == ("4mm", "autoencoder")
    assert "real_vs_reconstruction" in metrics["columns"]
    assert metrics["memorization"]["heldout_reference"] == "held-out reconstructions"
    # issue 25.7: a second evaluation into the same folder is refused before any work, unless --force
    before = (report / "metrics.json").read_bytes()
    assert main(["evaluate", "generation", "--real", str(data), "--fake", str(samples), "--out", str(report),
                 "--bootstrap", "3", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "already holds a report (metrics.json, report.md, report.html)" in error and "--force" in error
    assert (report / "metrics.json").read_bytes() == before
    assert main(["evaluate", "generation", "--real", str(data), "--fake", str(samples), "--out", str(report),
                 "--bootstrap", "3", "--device", "cpu", "--force", "--backbone", "intensity"]) == 0
    assert json.loads((report / "metrics.json").read_text())["backbone"]["name"].startswith("intensity")


def test_a_damaged_model_file_is_one_line_naming_it(tmp_path, capsys):
    from mriflow.generate import default_model_dir

    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    weights = model / "flow" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    assert main(["generate", "--model", str(model / "flow"), "--out", str(tmp_path / "samples")]) == 2
    error = capsys.readouterr().err
    assert f"{weights}: damaged or changed since it was saved" in error and "Traceback" not in error and error.count("\n") == 1
    (model / "flow" / "checkpoint.json").write_text('{"format": ')
    assert main(["generate", "--model", str(model / "flow"), "--out", str(tmp_path / "samples")]) == 2
    error = capsys.readouterr().err
    assert f"{model / 'flow' / 'checkpoint.json'}: damaged or incomplete" in error and error.count("\n") == 1
    assert not (tmp_path / "samples").exists()


def test_a_damaged_prepare_json_is_one_line_naming_it(tmp_path, capsys):
    data = write_prepared(tmp_path / "data")
    (data / "prepare.json").write_text('{"preset": ')  # a copy cut short
    assert main(["train", "autoencoder", str(data), "--out", str(tmp_path / "ae"), "--max-steps", "1"]) == 2
    error = capsys.readouterr().err
    assert f"{data / 'prepare.json'}: damaged or incomplete JSON" in error and "mriflow prepare" in error
    assert "Traceback" not in error and error.count("\n") == 1


def test_an_output_path_that_is_a_file_is_one_line_saying_so(tmp_path, capsys):
    data = write_prepared(tmp_path / "data")
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    for command in (["generate"], ["train", "autoencoder", str(data), "--max-steps", "1"],
                    ["prepare", str(data), "--skull-strip", "none", "--no-register"]):
        for out in (taken, taken / "run"):
            assert main([*command, "--out", str(out)]) == 2
            error = capsys.readouterr().err
            assert f"{taken} is a file" in error and "choose a folder" in error and error.count("\n") == 1, error
    assert taken.read_text() == "keep me"


def test_an_output_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    data = write_prepared(tmp_path / "data")
    # Found before any work when the system says so (root may write anywhere, so the tests ask as a user would) ...
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert main(["train", "autoencoder", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    error = capsys.readouterr().err
    assert f"--out {tmp_path / 'run'}: {tmp_path} is not writable" in error and error.count("\n") == 1
    monkeypatch.undo()

    # ... and as one line when a write is refused all the same (read-only mount, ACL): no traceback.
    def refused(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".tmp-x"))

    monkeypatch.setattr("mriflow.utils.files.tempfile.mkstemp", refused)
    assert main(["train", "autoencoder", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'run' / 'config.yaml'}: permission denied" in error and "Traceback" not in error
    assert error.count("\n") == 1


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


def test_nan_in_prepared_data_is_one_line_naming_the_file_and_lr_is_an_option(tmp_path, capsys):
    from mriflow.data.io import load_volume, save_volume

    data = write_prepared(tmp_path / "data")
    image, affine = load_volume(data / "images" / "sub00.nii.gz")
    image[:] = np.nan
    save_volume(data / "images" / "sub00.nii.gz", image, affine)
    code = main(["train", "autoencoder", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2", "--lr", "1e-4"])
    error = capsys.readouterr().err
    assert code == 2 and "sub00.nii.gz: holds NaN or infinite values" in error and "Traceback" not in error


@pytest.mark.parametrize("stage, module, function", [("autoencoder", "autoencoder", "train_autoencoder"),
                                                     ("flow", "generator", "train_generator"),
                                                     ("gan", "generator", "train_generator"),
                                                     ("labels", "labels", "train_labels"),
                                                     ("slices", "slices", "train_slices")])
def test_every_training_command_passes_stop_at_step_on(stage, module, function, monkeypatch, tmp_path):
    import importlib

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return {"step": 3, "metrics": {}, "checkpoint": str(tmp_path / "checkpoint")}

    monkeypatch.setattr(importlib.import_module(f"mriflow.train.{module}"), function, fake)
    needs_autoencoder = ["--autoencoder", str(tmp_path)] if stage in ("flow", "gan", "labels") else []
    assert main(["train", stage, str(tmp_path), "--out", str(tmp_path / "run"), *needs_autoencoder,
                 "--stop-at-step", "3"]) == 0
    assert seen["stop_at_step"] == 3
