"""`mriflow generate`: covariates as options, refused with the ones the model knows; `mriflow export`: a trained
generator (and its label decoder) as a model folder that `generate --model` samples, refusals as one line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest

from conftest import save_tiny_autoencoder, save_tiny_generator, write_labelled, write_prepared
from mriflow import checkpoint as ckpt
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
    captured = capsys.readouterr()
    assert f"1 volume in {tmp_path / 'samples'}" in captured.out  # not "1 volumes"
    warning = [line for line in captured.err.splitlines() if "150" in line]
    assert warning == [warning[0]] and warning[0].startswith("mriflow generate: warning: covariate 'age' = 150 is "
                                                             "outside the training range")
    assert "UserWarning" not in warning[0] and ".py" not in warning[0]


def test_an_age_that_is_not_a_finite_number_is_refused(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "samples"), "--age", "nan", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "covariate 'age': nan is not a finite number" in error and error.count("\n") == 1
    assert not (tmp_path / "samples").exists()


def test_export_writes_a_model_folder_that_generate_samples(tmp_path, capsys):
    run = save_tiny_generator(tmp_path / "flow", save_tiny_autoencoder(tmp_path / "autoencoder"))
    model = tmp_path / "model"
    assert main(["export", str(run), str(model)]) == 0
    assert f"mriflow generate --model {model} --out DIR" in capsys.readouterr().out
    files = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    assert files == ["autoencoder/checkpoint.json", "autoencoder/model.safetensors",
                     "flow/checkpoint.json", "flow/model.safetensors"]  # no training state travels

    samples = tmp_path / "samples"
    assert main(["generate", "--model", str(model), "--out", str(samples), "--n", "2", "--age", "40",
                 "--device", "cpu"]) == 0
    record = json.loads((samples / "generate.json").read_text())
    assert Path(record["model"]).resolve() == (model / "flow").resolve()
    assert ckpt.sha256(model / "flow" / ckpt.MODEL_FILE) in record["model_checksum"]
    assert json.loads((samples / "sample_00001.json").read_text())["covariates"]["age"] == 40.0
    assert nib.load(str(samples / "sample_00001.nii.gz")).shape == (16, 20, 16)


def test_export_takes_a_label_decoder_along_and_generate_writes_its_tissue_maps(tmp_path, capsys):
    data = write_labelled(tmp_path / "data", splits=("train",) * 8 + ("test",))  # the tiny preset's batch of 8
    autoencoder = save_tiny_autoencoder(tmp_path / "autoencoder")
    run = save_tiny_generator(tmp_path / "flow", autoencoder)
    assert main(["train", "labels", str(data), "--autoencoder", str(autoencoder), "--out", str(tmp_path / "labels"),
                 "--regions", str(data / "regions.csv"), "--max-steps", "1"]) == 0
    model = tmp_path / "model"
    assert main(["export", str(run), str(model), "--labels", str(tmp_path / "labels")]) == 0
    assert f"{model / 'labels'}" in capsys.readouterr().out and (model / "labels" / ckpt.META_FILE).is_file()
    samples = tmp_path / "samples"
    assert main(["generate", "--model", str(model), "--out", str(samples), "--n", "1", "--device", "cpu"]) == 0
    assert (samples / "sample_00000_labels.nii.gz").is_file()
    assert json.loads((samples / "sample_00000.json").read_text())["labels_source"] == "decoder"


def test_an_export_refusal_is_one_line_with_exit_code_2_and_leaves_nothing_half_written(tmp_path, capsys):
    run = save_tiny_generator(tmp_path / "flow", save_tiny_autoencoder(tmp_path / "autoencoder"))
    model = tmp_path / "model"
    (model / "flow").mkdir(parents=True)  # a model folder already there: never overwritten
    assert main(["export", str(run), str(model)]) == 2
    error = capsys.readouterr().err
    assert error == f"mriflow export: error: {model / 'flow'} already exists; export into an empty folder\n"
    assert not (model / "autoencoder").exists() and not any((model / "flow").iterdir())

    # a label decoder that is not one is refused after the generator was exported, which goes with it
    other = tmp_path / "other"
    assert main(["export", str(run), str(other), "--labels", str(run)]) == 2
    error = capsys.readouterr().err
    assert "not a label decoder (`mriflow train labels`)" in error and error.count("\n") == 1
    assert not other.exists()

    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    assert main(["export", str(run), str(taken)]) == 2
    error = capsys.readouterr().err
    assert f"OUT {taken}: {taken} is a file; choose a folder" in error and error.count("\n") == 1
    assert main(["export", str(tmp_path / "absent"), str(tmp_path / "model2")]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "absent") in error and error.count("\n") == 1 and not (tmp_path / "model2").exists()


def test_export_can_set_the_models_default_sampler_and_refuses_an_invalid_one(tmp_path, capsys):
    """A few-step student is shipped with the steps it was measured best at: `generate` then uses them by default."""
    run = save_tiny_generator(tmp_path / "flow", save_tiny_autoencoder(tmp_path / "autoencoder"))
    model = tmp_path / "model"
    assert main(["export", str(run), str(model), "--solver", "euler", "--steps", "1"]) == 0
    sampling = json.loads((model / "flow" / ckpt.META_FILE).read_text())["config"]["sampling"]
    assert sampling["solver"] == "euler" and sampling["steps"] == 1
    samples = tmp_path / "samples"
    assert main(["generate", "--model", str(model), "--out", str(samples), "--n", "1", "--device", "cpu"]) == 0
    sidecar = json.loads((samples / "sample_00000.json").read_text())
    assert (sidecar["solver"], sidecar["steps"], sidecar["nfe"]) == ("euler", 1, 1)
    capsys.readouterr()

    for option, value, message in (("--steps", "0", "sampling.steps must be >= 1"),
                                   ("--solver", "ddim", "sampling.solver")):
        other = tmp_path / f"other{option}"
        assert main(["export", str(run), str(other), option, value]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1 and not other.exists()
