"""`mriflow` and `main`: every user error is one line naming what was wrong and what to do, exit code 2, no
traceback; a bug keeps its traceback."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import write_prepared
from mriflow.cli import build_parser, main


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every command the parser runs, e.g. "prepare", "train flow", "evaluate utility"."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, f"{prefix}{name} ") or [prefix + name]
    return found


def test_help_lists_every_command_on_a_line_of_its_own_and_points_to_the_readme():
    parser = build_parser()
    every = commands(parser)
    assert {"prepare", "train labels", "train gan", "export", "evaluate utility", "app"} <= set(every)
    lines = [line.strip() for line in parser.description.splitlines()]
    for command in every:
        listed = [line for line in lines if line == command or line.startswith(command + " ")]
        assert len(listed) == 1, f"mriflow --help lists {command!r} {len(listed)} times"
    assert "README" in parser.description and "400 lines" not in parser.format_help()


def test_console_command_is_installed():
    result = subprocess.run([sys.executable, "-m", "mriflow", "--help"], capture_output=True, text=True, check=True)
    for command in ("prepare", "train", "encode", "generate", "evaluate"):
        assert command in result.stdout


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


def test_nan_in_prepared_data_is_one_line_naming_the_file_and_lr_is_an_option(tmp_path, capsys):
    from mriflow.data.io import load_volume, save_volume

    data = write_prepared(tmp_path / "data")
    image, affine = load_volume(data / "images" / "sub00.nii.gz")
    image[:] = np.nan
    save_volume(data / "images" / "sub00.nii.gz", image, affine)
    code = main(["train", "autoencoder", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2", "--lr", "1e-4"])
    error = capsys.readouterr().err
    assert code == 2 and "sub00.nii.gz: holds NaN or infinite values" in error and "Traceback" not in error
