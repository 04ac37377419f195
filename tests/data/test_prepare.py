from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from mriflow.config import get_grid
from mriflow.data.io import load_volume, template_affine
from mriflow.data import workers
from mriflow.data.geometry import template_brain_mask, to_sitk
from mriflow.data.prepare import PrepareError, run_prepare
from mriflow.data.recipe import BiasField, Reorient, SubjectState, correct_bias_field, normalize_intensity
from conftest import head_phantom

VOXEL_MM = 3.0
SHAPE = (48, 56, 44)
BLOB = 4  # label given to the phantom's off-centre bright blob, a landmark that breaks every symmetry


def phantom_ras_affine(shape=SHAPE, voxel=VOXEL_MM, centre=(0.0, -17.0, 5.0)):
    """A RAS affine that centres the phantom on the middle of the preset grids (already in MNI space)."""
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = np.asarray(centre) - voxel * (np.asarray(shape) - 1) / 2
    return affine


def phantom(seed=0):
    image, labels = head_phantom(SHAPE, seed)
    labels[image > 1050] = BLOB
    return image, labels


def reoriented(data, affine, codes):
    """The same volume stored with voxel axes `codes` (e.g. "LPS"); world coordinates unchanged."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(tuple(codes)))
    return nib.apply_orientation(data, transform), affine @ nib.orientations.inv_ornt_aff(transform, data.shape)


def write(path, data, affine, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine), str(path))
    return path


def world_centroid(mask, affine):
    return (affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0))[:3]


def checksums(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def make_inputs(root, names=("a", "b"), codes="RAS"):
    for seed, name in enumerate(names):
        image, labels = phantom(seed)
        data, affine = reoriented(image, phantom_ras_affine(), codes)
        label_data, _ = reoriented(labels, phantom_ras_affine(), codes)
        write(root / "images" / f"{name}_T1.nii.gz", data, affine)
        write(root / "labels" / f"{name}_T1_labels.nii.gz", label_data, affine, np.uint8)
    return root / "images", root / "labels"


# --- orientation: the reorient step, and scans stored in any axis order ------------------------


def test_reorient_keeps_world_coordinates_of_a_landmark():
    image, labels = phantom()
    ras_affine = phantom_ras_affine()
    expected = world_centroid(labels == BLOB, ras_affine)
    for codes in ("LPS", "PSR"):
        data, affine = reoriented(image, ras_affine, codes)
        label_data, _ = reoriented(labels, ras_affine, codes)
        assert nib.aff2axcodes(affine) == tuple(codes)
        state = SubjectState("x", nib.Nifti1Image(data, affine), mask=label_data > 0, labels=label_data)
        state = Reorient()(state)
        assert nib.aff2axcodes(state.image.affine) == ("R", "A", "S")
        assert state.record["orientation_in"] == codes
        np.testing.assert_allclose(world_centroid(state.labels == BLOB, state.image.affine), expected, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(state.image.dataobj), image)


def test_lps_and_psr_inputs_come_back_ras_on_the_template_grid(tmp_path):
    image, labels = phantom()
    ras_affine = phantom_ras_affine()
    for codes in ("RAS", "LPS", "PSR"):
        data, affine = reoriented(image, ras_affine, codes)
        label_data, _ = reoriented(labels, ras_affine, codes)
        write(tmp_path / "images" / f"{codes.lower()}_T1.nii.gz", data, affine)
        write(tmp_path / "labels" / f"{codes.lower()}_labels.nii.gz", label_data, affine, np.uint8)
    result = run_prepare(tmp_path / "images", tmp_path / "out", masks=tmp_path / "labels", register=False, progress=False)
    assert result.prepared == ["lps", "psr", "ras"]
    grid = get_grid("4mm")
    outputs = {}
    for name in result.prepared:
        volume, affine = load_volume(tmp_path / "out" / "images" / f"{name}.nii.gz")
        out_labels, _ = load_volume(tmp_path / "out" / "labels" / f"{name}.nii.gz")
        assert volume.shape == grid.shape
        np.testing.assert_allclose(affine, template_affine(grid))
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        # The landmark lands where it was in the world, within one output voxel.
        assert np.linalg.norm(world_centroid(out_labels == BLOB, affine) - world_centroid(labels == BLOB, ras_affine)) < grid.voxel_mm
        outputs[name] = volume
    np.testing.assert_allclose(outputs["lps"], outputs["ras"], atol=1e-5)
    np.testing.assert_allclose(outputs["psr"], outputs["ras"], atol=1e-5)


# --- intensities ----------------------------------------------------------------------------


def test_intensity_normalisation_clips_percentiles_and_zeros_background():
    rng = np.random.default_rng(0)
    image = rng.gamma(4.0, 100.0, size=(30, 30, 30)).astype(np.float32) + 500.0
    mask = np.zeros(image.shape, bool)
    mask[5:25, 5:25, 5:25] = True
    normalised, (low, high) = normalize_intensity(image, mask, (0.5, 99.5))
    inside = normalised[mask]
    assert normalised.dtype == np.float32
    assert normalised.min() == 0.0 and normalised.max() == 1.0
    assert np.all(normalised[~mask] == 0.0)
    assert (low, high) == pytest.approx(tuple(np.percentile(image[mask], (0.5, 99.5))))
    assert np.mean(inside >= 1.0) == pytest.approx(0.005, abs=0.002)
    assert np.mean(inside <= 0.0) == pytest.approx(0.005, abs=0.002)
    middle = mask & (image > low) & (image < high)
    np.testing.assert_allclose(normalised[middle], (image[middle] - low) / (high - low), rtol=1e-5)


def test_bias_field_correction_flattens_a_smooth_gain():
    image, labels = phantom()
    x = np.linspace(0.7, 1.3, SHAPE[0])[:, None, None]
    biased = image * x  # a smooth left-right gain
    white = labels == 3

    def spread(values):
        return values.std() / values.mean()

    corrected = correct_bias_field(to_sitk(biased, phantom_ras_affine()), to_sitk((labels > 0).astype(np.uint8), phantom_ras_affine()),
                                   BiasField(shrink_factor=2, iterations=(50, 50)))
    corrected = np.transpose(sitk.GetArrayFromImage(corrected), (2, 1, 0))
    assert spread(corrected[white]) < 0.5 * spread(biased[white])


def test_prepared_volumes_are_in_unit_range_with_zero_background(tmp_path):
    images, labels = make_inputs(tmp_path, ("a",))
    result = run_prepare(images, tmp_path / "out", masks=labels, register=False, n4=True, progress=False)
    image, _ = load_volume(result.out / "images" / "a.nii.gz")
    mask, _ = load_volume(result.out / "masks" / "a.nii.gz")
    assert image.min() == 0.0 and image.max() == 1.0
    assert np.all(image[mask == 0] == 0.0)
    assert set(np.unique(mask)) == {0.0, 1.0}
    recipe = [step["step"] for step in json.loads(result.record.read_text())["recipe"]]
    assert recipe == ["reorient", "brain_mask", "bias_field", "resample", "normalize"]


# --- the run: resume, bad inputs, BIDS, records -----------------------------------------------


def test_resume_skips_done_subjects_and_force_redoes_them(tmp_path):
    images, labels = make_inputs(tmp_path, ("a", "b"))
    before = checksums(tmp_path / "images") | checksums(tmp_path / "labels")
    out = tmp_path / "out"
    first = run_prepare(images, out, masks=labels, register=False, progress=False)
    assert first.newly_prepared == ["a", "b"] and first.already_done == []
    stamp = (out / "images" / "a.nii.gz").stat().st_mtime_ns

    second = run_prepare(images, out, masks=labels, register=False, progress=False)
    assert second.newly_prepared == [] and second.already_done == ["a", "b"]
    assert (out / "images" / "a.nii.gz").stat().st_mtime_ns == stamp
    assert "2 already done" in second.summary()

    # A prepared image cut short (a copy or a disk that stopped) is prepared again, not taken as done (issue 25.9).
    prepared = out / "images" / "a.nii.gz"
    prepared.write_bytes(prepared.read_bytes()[:200])
    cut = run_prepare(images, out, masks=labels, register=False, progress=False)
    assert cut.newly_prepared == ["a"] and cut.already_done == ["b"]
    stamp = prepared.stat().st_mtime_ns

    # A changed input (new checksum) is redone, the other is kept.
    image, _ = phantom(seed=9)
    write(images / "b_T1.nii.gz", image, phantom_ras_affine())
    before = checksums(tmp_path / "images") | checksums(tmp_path / "labels")
    third = run_prepare(images, out, masks=labels, register=False, progress=False)
    assert third.newly_prepared == ["b"] and third.already_done == ["a"]

    # Another recipe (preset) is refused without --force (test below); with it, every subject is redone.
    forced = run_prepare(images, out, masks=labels, register=False, preset="2mm", force=True, progress=False)
    assert forced.newly_prepared == ["a", "b"] and forced.already_done == []
    assert (out / "images" / "a.nii.gz").stat().st_mtime_ns != stamp
    assert checksums(tmp_path / "images") | checksums(tmp_path / "labels") == before  # inputs never modified


def test_other_parameters_into_a_prepared_folder_are_refused_naming_them_unless_forced(tmp_path):
    images, labels = make_inputs(tmp_path, ("a", "b"))
    out = tmp_path / "out"
    run_prepare(images, out, masks=labels, register=False, progress=False)
    before = checksums(out)
    with pytest.raises(PrepareError, match=r"--preset 4mm before, 2mm now.*--force"):
        run_prepare(images, out, masks=labels, register=False, preset="2mm", progress=False)
    with pytest.raises(PrepareError, match=r"--split 0\.8,0\.1,0\.1 before, 0\.5,0\.25,0\.25 now; --seed 0 before, 1 now"):
        run_prepare(images, out, masks=labels, register=False, split=(0.5, 0.25, 0.25), seed=1, progress=False)
    with pytest.raises(PrepareError, match=r"--skull-strip mask before, none now"):
        run_prepare(images, out, skull_strip="none", register=False, progress=False)
    assert checksums(out) == before  # the dataset is untouched
    # Options that do not change the dataset (workers) resume it; --force rebuilds it with the new ones.
    assert run_prepare(images, out, masks=labels, register=False, workers=2, progress=False).already_done == ["a", "b"]
    forced = run_prepare(images, out, masks=labels, register=False, split=(0.5, 0.25, 0.25), force=True, progress=False)
    assert json.loads(forced.record.read_text())["parameters"]["split"] == [0.5, 0.25, 0.25]


def test_every_kind_of_bad_input_is_skipped_with_a_reason(tmp_path):
    images, labels = make_inputs(tmp_path, ("good1", "good2"))
    affine = phantom_ras_affine()
    image, label_map = phantom()
    good_bytes = (images / "good1_T1.nii.gz").read_bytes()
    (images / "corrupt_T1.nii.gz").write_bytes(b"this is not a NIfTI file at all" * 20)
    (images / "truncated_T1.nii.gz").write_bytes(good_bytes[: len(good_bytes) // 2])
    write(images / "flat_T1.nii.gz", image[:, :, :1], affine)
    write(images / "series_T1.nii.gz", np.stack([image, image], axis=-1), affine)
    with_nan = image.copy()
    with_nan[10, 10, 10] = np.nan
    write(images / "nan_T1.nii.gz", with_nan, affine)
    write(images / "zero_T1.nii.gz", np.zeros(SHAPE), affine)
    write(images / "constant_T1.nii.gz", np.full(SHAPE, 7.0), affine)
    write(images / "shape_T1.nii.gz", image, affine)
    write(labels / "shape_labels.nii.gz", label_map[:-2], affine, np.uint8)
    write(images / "geometry_T1.nii.gz", image, affine)
    shifted = affine.copy()
    shifted[0, 3] += 1.5
    write(labels / "geometry_labels.nii.gz", label_map, shifted, np.uint8)
    write(images / "emptymask_T1.nii.gz", image, affine)
    write(labels / "emptymask_labels.nii.gz", np.zeros(SHAPE), affine, np.uint8)
    write(images / "nomask_T1.nii.gz", image, affine)
    shutil.copy(images / "good1_T1.nii.gz", images / "good1_T2.nii.gz")  # duplicate id
    for name in ("corrupt", "truncated", "flat", "series", "nan", "zero", "constant"):
        write(labels / f"{name}_labels.nii.gz", label_map, affine, np.uint8)
    csv = tmp_path / "demographics.csv"
    csv.write_text("subject,age,sex\ngood1,35,F\ngood2,unknown,M\nstranger,50,F\n")
    before = checksums(tmp_path / "images") | checksums(tmp_path / "labels") | {csv: hashlib.sha256(csv.read_bytes()).hexdigest()}

    result = run_prepare(images, tmp_path / "out", masks=labels, covariates=[csv], register=False, progress=False)

    assert result.prepared == ["good1", "good2"]
    report = pd.read_csv(result.report, keep_default_na=False)
    assert list(report.columns) == ["subject", "input", "reason"]
    reasons = dict(zip(report["subject"], report["reason"]))
    expected = {
        "corrupt": "cannot read image", "truncated": "cannot read image", "flat": "2D", "series": "4D with 2 volumes",
        "nan": "1 NaN/Inf", "zero": "image is empty", "constant": "image is empty", "shape": "has shape",
        "geometry": "different affine", "emptymask": "is empty", "nomask": "no mask", "good1": "duplicate subject id",
        "good2": "'unknown' is not a number", "stranger": "unknown subject",
    }
    for subject, fragment in expected.items():
        assert fragment in reasons[subject], (subject, reasons[subject])
    assert "good1_T2.nii.gz" in reasons["good1"] and "good1_T1.nii.gz" in reasons["good1"]
    assert len(result.skipped) == 12
    assert result.summary().startswith("prepared 2 subjects (0 already done), skipped 12")
    assert str(result.report) in result.summary()

    manifest = pd.read_csv(result.manifest)
    assert manifest.loc[manifest.subject == "good1", "age"].item() == 35.0
    assert np.isnan(manifest.loc[manifest.subject == "good2", "age"].item())  # non-numeric age -> missing
    assert manifest.loc[manifest.subject == "good2", "sex"].item() == "M"
    after = checksums(tmp_path / "images") | checksums(tmp_path / "labels") | {csv: hashlib.sha256(csv.read_bytes()).hexdigest()}
    assert after == before


def test_no_preparable_subject_or_overlapping_folders_raise_prepare_error(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken_T1.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(PrepareError, match=str(images)):
        run_prepare(images, tmp_path / "out", skull_strip="none", register=False, progress=False)
    assert "cannot read" in (tmp_path / "out" / "prepare_report.csv").read_text()
    with pytest.raises(PrepareError, match="overlap"):
        run_prepare(images, images, skull_strip="none", progress=False)
    with pytest.raises(PrepareError, match="overlap"):
        run_prepare(images, images / "prepared", skull_strip="none", progress=False)
    with pytest.raises(PrepareError, match="overlap"):
        run_prepare(images, tmp_path, skull_strip="none", progress=False)
    with pytest.raises(PrepareError, match="--masks"):
        run_prepare(images, tmp_path / "o2", skull_strip="mask", progress=False)
    (tmp_path / "clash.csv").write_text("subject,split,age\nbroken,A,3\n")
    with pytest.raises(PrepareError, match="split.*manifest"):
        run_prepare(images, tmp_path / "o2", skull_strip="none", covariates=[tmp_path / "clash.csv"], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no NIfTI"):
        run_prepare(tmp_path / "empty", tmp_path / "o3", skull_strip="none", progress=False)
    with pytest.raises(PrepareError, match="does not exist"):
        run_prepare(tmp_path / "missing", tmp_path / "o4", skull_strip="none", progress=False)


def test_bids_input_uses_participants_tsv_and_writes_the_manifest(tmp_path):
    root = tmp_path / "bids"
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "phantoms", "BIDSVersion": "1.8.0"}')
    affine = phantom_ras_affine()
    for seed, (subject, session) in enumerate([("01", None), ("02", "1"), ("03", "1")]):
        image, labels = phantom(seed)
        anat = root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
        stem = f"sub-{subject}" + (f"_ses-{session}" if session else "")
        write(anat / f"{stem}_T1w.nii.gz", image, affine)
        write(tmp_path / "masks" / f"sub-{subject}_desc-brain_mask.nii.gz", labels > 0, affine, np.uint8)
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t25\tF\nsub-02\tn/a\tM\n")

    result = run_prepare(root, tmp_path / "out", masks=tmp_path / "masks", register=False, split=(0.4, 0.3, 0.3), seed=4, progress=False)
    manifest = pd.read_csv(result.manifest, dtype={"subject": str}, keep_default_na=False)
    assert list(manifest.columns) == ["subject", "image", "mask", "labels", "split", "age", "sex"]
    assert list(manifest.subject) == ["01", "02", "03"]
    assert list(manifest.age) == ["25.0", "", ""]
    assert list(manifest.sex) == ["F", "M", ""]
    assert set(manifest.split) == {"train", "val", "test"}
    assert (manifest.labels == "").all()  # binary masks are not label maps
    assert not (result.out / "labels").exists()
    record = json.loads(result.record.read_text())
    assert record["inputs"]["layout"] == "bids"
    assert record["split"]["seed"] == 4 and record["split"]["stratified_by"] == "age"
    assert any(path.endswith("participants.tsv") for path in record["inputs"]["checksums"])
    # sub-03 has no row: reported, left missing; sub-02's "n/a" is a deliberate blank, not reported.
    assert [n.subject for n in result.notes] == ["03"] and "participants.tsv" in result.notes[0].reason


def test_prepare_json_records_parameters_versions_checksums_and_quality(tmp_path):
    images, labels = make_inputs(tmp_path, ("a",))
    result = run_prepare(images, tmp_path / "out", masks=labels, preset="4mm", seed=3, register=False, progress=False)
    record = json.loads(result.record.read_text())
    assert record["preset"] == "4mm" and record["grid"]["shape"] == [40, 48, 40]
    np.testing.assert_allclose(record["affine"], template_affine(get_grid("4mm")))
    assert {"mriflow", "torch", "nibabel", "SimpleITK", "nilearn", "numpy"} <= set(record["versions"])
    image_path = str((images / "a_T1.nii.gz").resolve())
    assert record["inputs"]["checksums"][image_path] == hashlib.sha256((images / "a_T1.nii.gz").read_bytes()).hexdigest()
    assert record["parameters"]["seed"] == 3 and record["parameters"]["register"] is False
    assert 0.0 < record["subjects"]["a"]["registration"]["mask_dice_mni"] <= 1.0


def test_prepared_files_get_the_permissions_the_umask_allows(tmp_path, umask_022):
    images, labels = make_inputs(tmp_path, ("a",))
    result = run_prepare(images, tmp_path / "out", masks=labels, register=False, progress=False)
    for path in (result.out / "images" / "a.nii.gz", result.out / "masks" / "a.nii.gz", result.manifest, result.record,
                 result.report, result.out / "records" / "a.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path  # readable by the group and others, as any new file


# --- faults: a killed run, two runs at once ----------------------------------------------------


def child_processes(pid):
    """Ids of the processes whose parent is `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; it only waits to be reaped


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/stat").exists(),
                    reason="needs Linux /proc to find the worker processes (and prctl to end them)")
def test_workers_of_a_killed_prepare_end_with_it_and_write_nothing_more(tmp_path):
    images, labels = make_inputs(tmp_path, tuple("abcdef"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mriflow", "prepare", str(images), "--masks", str(labels), "--out", str(out),
               "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not list((out / "records").glob("*.json")):  # the workers are at work, subjects are queued
            assert process.poll() is None and time.monotonic() < deadline, "prepare ended or stalled before a subject was done"
            time.sleep(0.05)
        workers = child_processes(process.pid)
        process.kill()
        process.wait()
        killed = time.time()
    finally:
        if process.poll() is None:
            process.kill()
    assert workers
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers = [pid for pid in workers if alive(pid)]
    for pid in leftovers:  # do not leave them running after the test
        os.kill(pid, 9)
    written_after = [p.name for p in out.rglob("*") if p.is_file() and p.stat().st_mtime > killed]
    assert not leftovers and not written_after  # they used to finish the queued subjects, orphaned


def test_a_second_prepare_into_a_folder_in_use_is_refused_in_one_line(tmp_path, monkeypatch):
    images, labels = make_inputs(tmp_path, ("a",))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(workers, "LOCK_WAIT_SECONDS", 0.2)
    from mriflow.utils.files import FileLock

    held = FileLock(out / workers.LOCK_FILE)
    assert held.acquire(shared=True)  # as a run's worker (or one outliving a killed run) holds it
    try:
        with pytest.raises(PrepareError, match=r"--out .*out is in use by another prepare run") as error:
            run_prepare(images, out, masks=labels, register=False, progress=False)
        assert "\n" not in str(error.value) and not (out / "records").exists()
    finally:
        held.release()
    assert run_prepare(images, out, masks=labels, register=False, progress=False).newly_prepared == ["a"]



def test_temporary_files_a_killed_run_left_are_removed_when_the_next_one_starts(tmp_path):
    images, labels = make_inputs(tmp_path, ("a",))
    out = tmp_path / "out"
    run_prepare(images, out, masks=labels, register=False, progress=False)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = [out / "images" / f".tmp-{ended.stdout.strip()}-k1ll3d.nii.gz", out / "records" / ".tmp-x1y2.json",
                 out / ".tmp-p4rt.csv"]  # a worker killed mid-write; files of an older version, without a process id
    for path in leftovers:
        path.write_bytes(b"half a file")
        os.utime(path, (time.time() - 60, time.time() - 60))
    assert run_prepare(images, out, masks=labels, register=False, progress=False).already_done == ["a"]
    assert not [path for path in leftovers if path.exists()]

# --- real data ------------------------------------------------------------------------------


def link_subjects(ixi_dir, folder, subjects):
    for subject in subjects:
        for kind, suffix in (("T1", "_T1.nii.gz"), ("labels", "_T1_DLMUSE.nii.gz")):
            target = folder / kind / f"{subject}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(ixi_dir / kind / f"{subject}{suffix}")


@pytest.mark.ixi
def test_ixi_subjects_are_prepared_into_mni_space(ixi_dir, tmp_path):
    subjects = sorted(p.name.split("_")[0] for p in (ixi_dir / "T1").glob("*_T1.nii.gz"))[:3]
    link_subjects(ixi_dir, tmp_path, subjects)
    demographics = pd.read_csv(ixi_dir / "demographics.csv")
    (tmp_path / "demographics.csv").write_text(demographics[demographics.subject.isin(subjects)].to_csv(index=False))
    before = {s: hashlib.sha256((ixi_dir / "T1" / f"{s}_T1.nii.gz").read_bytes()).hexdigest() for s in subjects}

    result = run_prepare(tmp_path / "T1", tmp_path / "out", masks=tmp_path / "labels", covariates=[tmp_path / "demographics.csv"],
                         preset="4mm", workers=2, progress=False)

    assert result.prepared == subjects and not result.skipped
    grid = get_grid("4mm")
    reference = template_brain_mask("4mm")
    manifest = pd.read_csv(result.manifest)
    assert manifest[["age", "sex"]].notna().all().all()
    for subject in subjects:
        image, affine = load_volume(result.out / "images" / f"{subject}.nii.gz")
        mask, _ = load_volume(result.out / "masks" / f"{subject}.nii.gz")
        labels, _ = load_volume(result.out / "labels" / f"{subject}.nii.gz")
        np.testing.assert_allclose(affine, template_affine(grid))
        assert image.shape == mask.shape == labels.shape == grid.shape
        assert image.min() == 0.0 and image.max() == 1.0
        brain = mask > 0
        assert 2 * (brain & reference).sum() / (brain.sum() + reference.sum()) > 0.8
        assert len(np.unique(labels)) > 50  # the DLMUSE parcellation survives nearest-neighbour resampling
    assert {s: hashlib.sha256((ixi_dir / "T1" / f"{s}_T1.nii.gz").read_bytes()).hexdigest() for s in subjects} == before


@pytest.mark.ixi
def test_ixi_subject_without_mask_uses_deepbet(ixi_dir, tmp_path):
    subject = sorted(p.name.split("_")[0] for p in (ixi_dir / "T1").glob("*_T1.nii.gz"))[0]
    link_subjects(ixi_dir, tmp_path, [subject])
    result = run_prepare(tmp_path / "T1", tmp_path / "out", preset="4mm", progress=False)  # auto: no masks -> deepbet
    record = json.loads(result.record.read_text())
    assert record["parameters"]["skull_strip_used"] == "deepbet" and "deepbet" in record["versions"]
    assert record["subjects"][subject]["mask_source"] == "deepbet"
    # deepbet's brain agrees with the DLMUSE label map (label > 0), both taken to the template grid.
    labelled = run_prepare(tmp_path / "T1", tmp_path / "out_labels", masks=tmp_path / "labels", preset="4mm", progress=False)
    ours, _ = load_volume(result.out / "masks" / f"{subject}.nii.gz")
    theirs, _ = load_volume(labelled.out / "masks" / f"{subject}.nii.gz")
    assert 2 * ((ours > 0) & (theirs > 0)).sum() / ((ours > 0).sum() + (theirs > 0).sum()) > 0.85


def test_manifest_columns_agree_with_the_dataset_reader():
    from mriflow.data import dataset, prepare

    assert prepare.MANIFEST_COLUMNS == dataset.MANIFEST_COLUMNS
