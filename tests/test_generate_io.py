import json

import nibabel as nib
import numpy as np
import pytest

import mriflow
from conftest import brightest_quadrant, left_anterior_superior_block, montage_panels, shows_a_centred_head
from mriflow.config import get_grid
from mriflow.data.io import template_affine
from mriflow.generate_io import SIDECAR_KEYS, batch_montage, write_sample


def sidecar(**overrides):
    record = {
        "covariates": {"age": 45.0, "sex": "F"},
        "seed": np.int64(3),
        "solver": "heun",
        "steps": 16,
        "nfe": 32,
        "guidance": 1.5,
        "model_id": "flow-test",
        "model_checksum": "sha256:0123",
    }
    return {**record, **overrides}


@pytest.fixture
def volume(phantom):
    image, _ = phantom
    return image / image.max()  # (D, H, W) in [0, 1]


def test_written_sample_keeps_the_template_affine(tmp_path, volume):
    affine = template_affine(get_grid("4mm"))
    path = write_sample(tmp_path, 7, volume, affine, sidecar())
    assert path.name == "sample_00007.nii.gz"
    image = nib.load(str(path))
    qform, qform_code = image.get_qform(coded=True)
    sform, sform_code = image.get_sform(coded=True)
    assert int(qform_code) == int(sform_code) == 4
    np.testing.assert_allclose(qform, affine, atol=1e-5)
    np.testing.assert_allclose(sform, affine, atol=1e-5)
    assert not np.allclose(image.affine, np.eye(4))
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(image.dataobj), volume, atol=1e-6)


def test_sidecar_records_the_generation(tmp_path, volume):
    write_sample(tmp_path, 0, volume, template_affine(get_grid("4mm")), sidecar())
    record = json.loads((tmp_path / "sample_00000.json").read_text())
    for key in SIDECAR_KEYS:
        assert key in record
    assert record["seed"] == 3 and record["covariates"] == {"age": 45.0, "sex": "F"}
    assert record["mriflow_version"] == mriflow.__version__
    assert record["image"] == "sample_00000.nii.gz"


def test_overshoot_is_clipped_and_bad_volumes_refused(tmp_path, volume):
    affine = template_affine(get_grid("4mm"))
    path = write_sample(tmp_path, 1, volume * 1.02 - 0.01, affine, sidecar())
    data = np.asarray(nib.load(str(path)).dataobj)
    assert data.min() == 0.0 and data.max() == 1.0
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        write_sample(tmp_path, 2, volume[None], affine, sidecar())
    with pytest.raises(ValueError, match="NaN"):
        write_sample(tmp_path, 2, np.full((4, 4, 4), np.nan), affine, sidecar())
    incomplete = sidecar()
    del incomplete["model_checksum"]
    with pytest.raises(ValueError, match="model_checksum"):
        write_sample(tmp_path, 2, volume, affine, incomplete)
    assert not (tmp_path / "sample_00002.nii.gz").exists()


def test_existing_samples_are_not_overwritten(tmp_path, volume):
    affine = template_affine(get_grid("4mm"))
    write_sample(tmp_path, 0, volume, affine, sidecar(seed=1))
    # E.g. the slower of two runs into one folder: told what it can do (no option overwrites samples).
    with pytest.raises(FileExistsError, match=r"sample_00000.*; choose another output folder \(existing samples "
                                              r"are never overwritten\)$"):
        write_sample(tmp_path, 0, volume * 0.5, affine, sidecar(seed=2))
    assert json.loads((tmp_path / "sample_00000.json").read_text())["seed"] == 1
    write_sample(tmp_path, 0, volume * 0.5, affine, sidecar(seed=2), overwrite=True)
    assert json.loads((tmp_path / "sample_00000.json").read_text())["seed"] == 2


def test_samples_get_the_permissions_the_umask_allows(tmp_path, volume, umask_022):
    path = write_sample(tmp_path, 0, volume, template_affine(get_grid("4mm")), sidecar())
    assert path.stat().st_mode & 0o777 == 0o644  # not the private 0600 of a temporary file
    assert (tmp_path / "sample_00000.json").stat().st_mode & 0o777 == 0o644


def test_batch_montage(tmp_path, volume):
    block = left_anterior_superior_block(volume.shape)
    path = batch_montage([volume, block, 1 - volume], tmp_path / "montage.png", titles=["a", "b", "c"])
    head, marked, inverted = montage_panels(path)
    assert all(shows_a_centred_head(panel) for panel in head)
    assert [brightest_quadrant(panel) for panel in marked] == ["top right", "top left", "top left"]  # as three_plane_montage
    assert all(not shows_a_centred_head(panel) and panel.mean() > 0.5 for panel in inverted)
    with pytest.raises(ValueError):
        batch_montage([volume[0]], tmp_path / "bad.png")


def test_two_runs_writing_one_sample_at_once_leave_one_whole_sample_and_one_refusal(tmp_path, volume, monkeypatch):
    import threading

    from mriflow import generate_io

    # Both writers pass the exists-check before either writes: the race of two `generate` runs into one folder.
    both_checked = threading.Barrier(2, timeout=30)
    write_json = generate_io._write_json  # the first of the sample's two files

    def write_after_both_checked(*args, **kwargs):
        both_checked.wait()
        return write_json(*args, **kwargs)

    monkeypatch.setattr(generate_io, "_write_json", write_after_both_checked)
    affine = template_affine(get_grid("4mm"))
    volumes = {0: volume, 1: volume[::-1].copy()}
    outcomes = {}

    def write(run):
        try:
            write_sample(tmp_path, 0, volumes[run], affine, sidecar(seed=run))
            outcomes[run] = "written"
        except FileExistsError as error:
            outcomes[run] = str(error)

    threads = [threading.Thread(target=write, args=(run,)) for run in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes.values(), key=len)[0] == "written"  # one wins, the other is refused ...
    winner, loser = sorted(outcomes, key=lambda run: outcomes[run] != "written")
    assert "sample_00000" in outcomes[loser] and "choose another output folder" in outcomes[loser]
    assert "\n" not in outcomes[loser]
    # ... and the sample on disk is the winner's whole: its volume with its sidecar, nothing of the other run.
    np.testing.assert_allclose(np.asarray(nib.load(str(tmp_path / "sample_00000.nii.gz")).dataobj), volumes[winner],
                               atol=1e-6)
    assert json.loads((tmp_path / "sample_00000.json").read_text())["seed"] == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_00000.json", "sample_00000.nii.gz"]
