"""Faults and bad input end as one line that names the file or option and what to do, never a traceback,
and lose nothing: malformed scans, damaged files, and runs killed midway then resumed or rerun.

The whole file is bounded in time (about a minute on one core): phantoms of 16 x 20 x 16 voxels,
tiny models, and kills at seeded random moments.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mriflow.cli import main

from conftest import save_tiny_autoencoder, save_tiny_generator, write_prepared

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reliability import kill_after  # noqa: E402  (the probes' own kill, shared with benchmarks/reliability.py)

POSIX_KILL = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# --- malformed NIfTI --------------------------------------------------------------------------


def _with_sform(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """A file whose affine nibabel would refuse to build (qform off, the sform as given)."""
    image = nib.Nifti1Image(data, None)
    image.header.set_qform(None, code=0)
    image.header.set_sform(affine, code=2)
    nib.save(image, str(path))


def _nan_inf(data: np.ndarray) -> np.ndarray:
    data = data.copy()
    data[3, 3, 3], data[4, 4, 4] = np.nan, np.inf
    return data


def _singular(affine: np.ndarray) -> np.ndarray:
    affine = affine.copy()
    affine[:3, :3] = 0.0
    return affine


def _non_finite(affine: np.ndarray) -> np.ndarray:
    affine = affine.copy()
    affine[0, 3] = np.nan
    return affine


# name -> write(path, a good volume's bytes, its data, its affine)
MALFORMED = {
    "truncated_gzip": lambda path, raw, data, affine: path.write_bytes(raw[: len(raw) // 2]),
    "garbage": lambda path, raw, data, affine: path.write_bytes(np.random.default_rng(0).bytes(3000)),
    "complex": lambda path, raw, data, affine: nib.save(nib.Nifti1Image(data.astype(np.complex64), affine), str(path)),
    "nan_inf": lambda path, raw, data, affine: nib.save(nib.Nifti1Image(_nan_inf(data), affine), str(path)),
    "two_d": lambda path, raw, data, affine: nib.save(nib.Nifti1Image(data[:, :, 5], affine), str(path)),
    "four_d": lambda path, raw, data, affine: nib.save(nib.Nifti1Image(np.stack([data, data], -1), affine), str(path)),
    "one_voxel": lambda path, raw, data, affine: nib.save(nib.Nifti1Image(data[:1, :1, :1], affine), str(path)),
    "singular_affine": lambda path, raw, data, affine: _with_sform(path, data, _singular(affine)),
    "non_finite_affine": lambda path, raw, data, affine: _with_sform(path, data, _non_finite(affine)),
}
# What the reason in prepare_report.csv must say, beyond the file's name.
PREPARE_REASONS = {"truncated_gzip": "cannot read", "garbage": "cannot read", "complex": "complex",
                   "nan_inf": "NaN/Inf", "two_d": "2D", "four_d": "4D", "one_voxel": "a single voxel",
                   "singular_affine": "affine", "non_finite_affine": "affine"}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A prepared folder of phantoms: enough test and val subjects for the set metrics of evaluate generation."""
    return write_prepared(tmp_path_factory.mktemp("faults") / "real", splits=("train",) * 2 + ("val",) * 7 + ("test",) * 7)


def write_malformed(folder: Path, name: str, source: Path) -> Path:
    image = nib.load(str(source))
    path = folder / f"{name}_T1.nii.gz"
    MALFORMED[name](path, source.read_bytes(), np.asarray(image.dataobj, np.float32), image.affine)
    return path


def test_malformed_scans_are_skipped_by_prepare_each_with_its_reason(real, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(real / "images" / "sub00.nii.gz", images / "good_T1.nii.gz")
    bad = {name: write_malformed(images, name, real / "images" / "sub00.nii.gz") for name in MALFORMED}
    code = main(["prepare", str(images), "--out", str(tmp_path / "out"), "--skull-strip", "none", "--no-register"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert f"skipped {len(MALFORMED)}" in captured.out
    with open(tmp_path / "out" / "prepare_report.csv", newline="") as stream:
        reasons = {Path(row["input"]).name: row["reason"] for row in csv.DictReader(stream)}
    for name, path in bad.items():
        assert path.name in reasons, f"{name} was prepared"
        assert path.name in reasons[path.name] and PREPARE_REASONS[name] in reasons[path.name], reasons[path.name]
        assert "\n" not in reasons[path.name]


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_generated_volume_is_one_line_naming_it(real, tmp_path, capsys, name):
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for i in range(7):
        shutil.copy(real / "images" / f"sub{9 + i:02d}.nii.gz", fakes / f"sample_{i:05d}.nii.gz")
    bad = write_malformed(fakes, name, real / "images" / "sub09.nii.gz")
    code = main(["evaluate", "generation", "--real", str(real), "--fake", str(fakes), "--out", str(tmp_path / "report"),
                 "--backbone", "intensity", "--bootstrap", "2"])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error and error.count("\n") == 1
    line = error.rsplit("\r", 1)[-1]  # after the progress bars, which redraw one line with carriage returns
    assert line.startswith("mriflow evaluate generation: error: ") and str(bad) in line


def test_a_damaged_sidecar_of_a_generated_volume_is_named(tmp_path):
    from mriflow.evaluate.sets import read_sidecar

    (tmp_path / "sample_00000.json").write_text('{"covariates": {"age": 4')  # a copy cut short
    with pytest.raises(ValueError, match=rf"{tmp_path / 'sample_00000.json'}: damaged or incomplete JSON .*delete it"):
        read_sidecar(Path(tmp_path / "sample_00000.nii.gz"))



def test_an_error_while_generating_is_the_last_line_not_a_progress_bar_drawn_after_it(tmp_path, capsys, monkeypatch):
    from mriflow import generate as generation

    model = save_tiny_generator(tmp_path / "flow", save_tiny_autoencoder(tmp_path / "autoencoder"))
    write_sample = generation.write_sample

    def taken_at_the_second(out, index, *args, **kwargs):  # another run into the folder was faster there
        if index == 1:
            raise FileExistsError(f"{out}/sample_00001.json already exists; choose another output folder")
        return write_sample(out, index, *args, **kwargs)

    monkeypatch.setattr(generation, "write_sample", taken_at_the_second)
    code = main(["generate", "--model", str(model), "--out", str(tmp_path / "samples"), "--num-samples", "3",
                 "--solver", "euler", "--steps", "1", "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1].startswith("mriflow generate: error: ")

# --- runs killed midway -----------------------------------------------------------------------


def mriflow(*arguments: str, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mriflow", *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, **options)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, error = process.communicate(timeout=timeout)
    return process.returncode, error


@POSIX_KILL
def test_training_killed_at_random_moments_resumes_to_the_same_final_step(tmp_path):
    from mriflow import checkpoint as ckpt

    data = write_prepared(tmp_path / "data")
    run, steps = tmp_path / "run", "30"
    common = ["train", "autoencoder", str(data), "--out", str(run), "--max-steps", steps, "--threads", "1"]
    # A first stretch stops cleanly with a checkpoint part way (--max-minutes), so the kills hit a run with one.
    code, error = finish(mriflow(*common, "--max-minutes", "0.01"))
    assert code == 0 and "Traceback" not in error, error
    assert ckpt.latest_checkpoint(run) is not None
    common += ["--max-minutes", "0"]  # a resumed run keeps the run's own budget unless told otherwise
    kills = 0
    for moment in random.Random(12).sample([x / 100 for x in range(100)], 2):  # seconds into the run, seeded
        kills += kill_after(mriflow(*common, "--resume"), moment, started=run / "config.yaml")  # written as it starts
    code, error = finish(mriflow(*common, "--resume"))
    assert code == 0 and "Traceback" not in error, error
    assert kills >= 1  # at least one of the runs was really killed midway
    latest = ckpt.latest_checkpoint(run)
    assert latest.name == f"step-{int(steps):08d}" and not list(run.rglob(".tmp-*"))
    model, meta = ckpt.load_autoencoder(latest)  # loadable, whole
    assert meta["step"] == int(steps)
    with open(run / "log.csv", newline="") as stream:
        logged = [int(row["step"]) for row in csv.DictReader(stream)]
    assert logged == sorted(set(logged)) and logged[-1] == int(steps)  # one row per step, none twice


@POSIX_KILL
def test_generate_killed_midway_leaves_only_whole_samples_and_a_rerun_is_refused_in_one_line(tmp_path):
    from mriflow.data.io import load_volume

    model = save_tiny_generator(tmp_path / "flow", save_tiny_autoencoder(tmp_path / "autoencoder"))
    out = tmp_path / "samples"
    command = ["generate", "--model", str(model), "--out", str(out), "--num-samples", "3000", "--batch-size", "1",
               "--solver", "euler", "--steps", "1", "--device", "cpu", "--threads", "1"]
    process = mriflow(*command)
    deadline = time.monotonic() + 120
    while not (out / "sample_00000.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "generate ended or stalled before a sample"
        time.sleep(0.01)
    assert kill_after(process, random.Random(3).uniform(0.05, 0.5))
    code, error = finish(mriflow(*command))
    assert code == 2 and error.count("\n") == 1 and "Traceback" not in error
    assert "already exist" in error and "choose another output folder" in error
    samples = sorted(out.glob("sample_*.nii.gz"))
    assert samples and len(samples) < 3000
    for sample in samples:  # every sample on disk is whole: its volume reads, and its sidecar names it
        volume, _ = load_volume(sample)
        assert volume.shape == (16, 20, 16)
        sidecar = json.loads(sample.with_name(sample.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["image"] == sample.name
    assert not list(out.glob(".tmp-*"))  # the killed write's temporary file was removed by the rerun


def test_a_full_disk_while_saving_a_checkpoint_is_one_oserror_naming_the_file(tmp_path, monkeypatch):
    """Issue 25.4: a full disk during a checkpoint save ended in a safetensors traceback."""
    import errno

    from safetensors import SafetensorError

    from mriflow import checkpoint as ckpt
    from mriflow.cli import _describe

    ckpt.save_checkpoint(tmp_path / "step-1", {"a": torch.ones(3)}, {"step": 1})

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OSError) as caught:
        ckpt.save_checkpoint(tmp_path / "step-2", {"a": torch.ones(3)}, {"step": 2})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "step-2" / ckpt.MODEL_FILE)
    assert _describe(caught.value).endswith("no space left on device; the disk is full; free some space or choose "
                                            "another disk")
    assert not (tmp_path / "step-2").exists() and ckpt.load_checkpoint(tmp_path / "step-1")[1]["step"] == 1


def test_a_full_disk_while_generating_names_the_sample_and_leaves_no_sidecar_alone(tmp_path, monkeypatch, capsys):
    """Issue 25.4: generate said only "[Errno 28] No space left on device" and left a sidecar without its volume."""
    import errno

    import nibabel

    from mriflow.cli import main

    def full(image, filename):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nibabel, "save", full)
    out = tmp_path / "samples"
    assert main(["generate", "--model", "4mm", "--out", str(out), "--n", "1", "--steps", "1", "--no-labels",
                 "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    message = [line for line in error.splitlines() if line.startswith("mriflow generate: error:")]  # beside the bar
    assert len(message) == 1 and "Traceback" not in error
    assert f"{out / 'sample_00000.nii.gz'}: no space left on device; the disk is full" in message[0]
    assert not list(out.glob("sample_*"))  # neither the volume nor its sidecar
