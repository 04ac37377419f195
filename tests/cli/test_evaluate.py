"""`mriflow evaluate`: the generation report of a shipped model's samples, and a report folder never replaced
unless asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("grid", ["3 mm, shifted", "1.5 mm, x flipped, padded"])
def test_another_generators_volumes_on_their_own_grid_are_prepared_onto_the_real_grid_and_scored(tmp_path, capsys, grid):
    """Issue 26: score any generator's volumes (MAISI, BrLP, WDM...): --prepare-fake takes them through the recipe,
    whatever their voxel size, orientation, field of view and intensities, back onto the real grid."""
    import sys

    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluate"))
    from evaluation_helpers import write_evaluation_set  # noqa: E402

    real = write_evaluation_set(tmp_path / "real")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    sources = sorted((real / "images").glob("*.nii.gz"))[:8]
    for i, image in enumerate(sources):
        source = nib.load(str(image))
        volume = np.asarray(source.dataobj, np.float32)
        if grid == "3 mm, shifted":
            data = ndimage.zoom(volume, 4 / 3, order=1)  # 3 mm voxels, another grid
            affine = np.diag([3.0, 3.0, 3.0, 1.0])
            affine[:3, 3] = source.affine[:3, 3] + np.array([2.0, -3.0, 1.0])
        else:  # 1.5 mm voxels stored right to left (LAS), with 6 empty voxels of margin on every side
            data = np.pad(ndimage.zoom(volume, 4 / 1.5, order=1)[::-1], 6)
            affine = np.diag([-1.5, 1.5, 1.5, 1.0])
            affine[:3, 3] = source.affine[:3, 3] + np.array([(data.shape[0] - 13) * 1.5, -9.0, -9.0])
        nib.save(nib.Nifti1Image(data * 800, affine), str(foreign / f"sample_{i:05d}.nii.gz"))  # other intensities too
    report = tmp_path / "report"
    arguments = ["evaluate", "generation", "--real", str(real), "--fake", str(foreign), "--out", str(report),
                 "--backbone", "intensity", "--bootstrap", "2", "--device", "cpu"]
    assert main(arguments) == 2
    assert "--prepare-fake brain" in capsys.readouterr().err
    assert main(arguments + ["--prepare-fake", "brain"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["inputs"]["counts"]["generated"] == 8
    assert metrics["inputs"]["fake_dir"].endswith("fake-prepared/prepared/images")
    # each volume is back where its source was: it correlates with the real scan it was made from
    prepared = sorted((report / "fake-prepared" / "prepared" / "images").glob("*.nii.gz"))
    for made, source in zip(prepared, sources):
        a, b = np.asarray(nib.load(str(made)).dataobj, np.float64), np.asarray(nib.load(str(source)).dataobj, np.float64)
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8, (grid, made.name)
