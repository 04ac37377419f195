"""mriflow's Python API (mriflow.api): the README's example runs as it stands, samples are the ones `generate` writes,
and the progress callback and files behave as documented."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mriflow
from mriflow.data.io import load_volume

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_example_runs_as_it_stands(tmp_path, monkeypatch, capsys):
    block = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md lost its Python API example"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    output = capsys.readouterr().out
    assert "['age', 'sex'] (40, 48, 40) {'age': 70.0, 'sex': 'M'}" in output and "4/4" in output
    assert sorted(p.name for p in (tmp_path / "samples-api").iterdir()) == [
        "old-man.json", "old-man.nii.gz", "old-man_labels.nii.gz"]


@pytest.fixture(scope="module")
def model():
    return mriflow.load("4mm", device="cpu")


def test_sample_i_is_the_volume_generate_writes_as_sample_i(model, tmp_path):
    seen = []
    brains = model.sample_many(3, seed=5, steps=2, batch_size=2, age=50, sex="F",
                               progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 3), (3, 3)]
    result = model.generate(tmp_path / "files", n=3, seed=5, steps=2, age=50, sex="F", progress=False)
    written, affine = load_volume(result.paths[2])
    np.testing.assert_allclose(brains[2].array, written, atol=1e-5)  # other batches round differently
    assert np.allclose(brains[2].image.affine, affine) and int(brains[2].image.header["qform_code"]) == 4
    assert brains[2].sidecar["sample_seed"] == mriflow.read_sidecar(result.paths[2])["sample_seed"]
    assert isinstance(brains[0].labels, nib.Nifti1Image) and brains[0].labels.get_data_dtype() == np.uint8


def test_bad_requests_and_existing_files_are_refused(model, tmp_path):
    with pytest.raises(ValueError, match="unknown covariate"):
        model.sample(height=180)
    with pytest.raises(ValueError, match="n and batch_size must be >= 1"):
        model.sample_many(0)
    brain = model.sample(steps=1)
    brain.save(tmp_path / "one")
    with pytest.raises(FileExistsError, match="already exist"):
        brain.save(tmp_path / "one")
    assert "mriflow.Model('flow-dit-4mm" in repr(model)
