"""`mriflow train` and `mriflow encode`: each stage's options reach the library; runs resume and stop on schedule."""

from __future__ import annotations

import json

import pytest

from conftest import write_prepared
from mriflow.cli import main


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
    assert "1 test subject: SSIM" in capsys.readouterr().out
    summary = json.loads((tmp_path / "reconstruction" / "summary.json").read_text())
    assert summary["split"] == "test" and summary["subjects"] == 1


def test_an_error_line_names_the_command_not_an_option_value(tmp_path, capsys):
    """--kind vq of train autoencoder once read as the third word of the command: "mriflow train autoencoder vq"."""
    assert main(["train", "autoencoder", str(tmp_path / "absent"), "--kind", "vq", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"mriflow train autoencoder: error: {tmp_path / 'absent'} ")
    assert main(["evaluate", "reconstruction", str(tmp_path), "--autoencoder", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.startswith("mriflow evaluate reconstruction: error: ")


def test_stop_at_step_ends_a_session_that_resume_finishes_on_the_same_schedule(tmp_path, capsys):
    data = write_prepared(tmp_path / "data", splits=("train", "train", "val", "test"))
    run = tmp_path / "ae"
    assert main(["train", "autoencoder", str(data), "--out", str(run), "--max-steps", "3", "--stop-at-step", "1"]) == 0
    first = json.loads((run / "checkpoints" / "step-00000001" / "checkpoint.json").read_text())
    assert first["step"] == 1 and first["config"]["loop"]["max_steps"] == 3  # the schedule of the whole run
    assert main(["train", "autoencoder", str(data), "--out", str(run), "--resume"]) == 0
    assert (run / "checkpoints" / "step-00000003" / "checkpoint.json").is_file()


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
