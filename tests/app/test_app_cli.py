"""`mriflow app` turns bad input into one line (exit 2), never a traceback, and listens on 127.0.0.1 by default."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from app_helpers import write_study
from mriflow.app import niivue
from mriflow.app.launch import bind, is_loopback
from mriflow.cli import build_parser, main


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    path = tmp_path / "niivue.umd.js"
    path.write_text("window.niivue = {};")
    monkeypatch.setenv("MRIFLOW_NIIVUE", str(path))
    return path


def one_line_error(capsys, argv, *words):
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    for word in words:
        assert word in error, error
    return error


def test_the_defaults_keep_the_app_to_this_machine():
    args = build_parser().parse_args(["app"])
    assert args.host == "127.0.0.1" and args.model == "default" and args.out == "app-output" and not args.turing
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_without_niivue_the_app_says_to_run_npm_ci(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MRIFLOW_NIIVUE", str(tmp_path / "nowhere"))
    one_line_error(capsys, ["app", "--out", str(tmp_path / "out")], "npm ci")
    monkeypatch.delenv("MRIFLOW_NIIVUE")
    monkeypatch.setattr(niivue, "candidates", lambda: [tmp_path / "none.js"])
    one_line_error(capsys, ["app", "--out", str(tmp_path / "out")], "npm ci")


def test_a_taken_port_is_one_line(tmp_path, bundle, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        one_line_error(capsys, ["app", "--port", str(port), "--out", str(tmp_path / "out")], f"--port {port}", "in use")
    with pytest.raises(OSError, match="in use"):
        with socket.socket() as again:
            again.bind(("127.0.0.1", 0))
            again.listen(1)
            bind("127.0.0.1", again.getsockname()[1])


def test_bad_folders_and_options_are_one_line(tmp_path, bundle, capsys):
    out = str(tmp_path / "out")
    one_line_error(capsys, ["app", "--model", str(tmp_path / "missing"), "--port", "0", "--out", out], "missing")
    one_line_error(capsys, ["app", "--turing", "--port", "0", "--out", out], "--real")
    one_line_error(capsys, ["app", "--turing", "--real", str(tmp_path / "none"), "--fake", str(tmp_path),
                            "--port", "0", "--out", out], "--real", "no such folder")
    real, fake = write_study(tmp_path)
    one_line_error(capsys, ["app", "--turing", "--real", str(real), "--fake", str(fake), "--split", "val",
                            "--port", "0", "--out", out], "split 'val'")
    one_line_error(capsys, ["app", "--real", str(real), "--port", "0", "--out", out], "--turing")
    (tmp_path / "junk.sqlite").write_text("this is no database " * 50)
    one_line_error(capsys, ["app", "--turing", "--real", str(real), "--fake", str(fake), "--db",
                            str(tmp_path / "junk.sqlite"), "--port", "0", "--out", out], "junk.sqlite")
    one_line_error(capsys, ["app", "--port", "70000", "--out", out], "--port 70000")
    one_line_error(capsys, ["app", "--reports", str(tmp_path / "nothere"), "--port", "0", "--out", out], "--reports")


def test_a_real_process_reports_a_missing_model_without_a_traceback(tmp_path, bundle):
    result = subprocess.run([sys.executable, "-m", "mriflow", "app", "--model", str(tmp_path / "gone"), "--port", "0",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("mriflow app: error:")


def test_niivue_is_found_in_the_folder_or_file_mriflow_niivue_names(tmp_path, monkeypatch):
    (tmp_path / "dist").mkdir()
    bundle = tmp_path / "dist" / "niivue.umd.js"
    bundle.write_text("window.niivue = {};")
    monkeypatch.setenv("MRIFLOW_NIIVUE", str(tmp_path / "dist"))
    assert niivue.locate_niivue() == bundle.resolve()
    monkeypatch.setenv("MRIFLOW_NIIVUE", str(bundle))
    assert niivue.locate_niivue() == bundle.resolve()
    monkeypatch.delenv("MRIFLOW_NIIVUE")
    found = [p for p in niivue.candidates() if p.is_file()]
    if found:  # after `npm ci` in the repository: the npm-installed bundle, not a copy in the package
        assert niivue.locate_niivue() == found[0].resolve() and "node_modules" in found[0].parts
