"""`mriflow evaluate`: the generation report of a shipped model's samples, and a report folder never replaced
unless asked."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_prepared
from mriflow.cli import main


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
