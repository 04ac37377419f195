"""The device kit's rehearsal: pack -> run J1a -> run J1b -> land -> generate, and pack -> run J2 -> land (the
anatomy network, calibrated and measured here), on the CPU, on phantoms.

This is the code path a lent GPU runs (benchmarks/device/README.md), with a few steps, so the
first GPU call works; the GPU only changes the device, the preset's batch size and the step count.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import PHANTOM_MUSE_LABELS, PHANTOM_REGIONS, head_phantom
from mriflow.config import Grid
from mriflow.data.io import load_volume, save_volume, template_affine
from mriflow.data.labels import tissue_lookup, tissue_map
from mriflow.train.labels import read_label_map

KIT_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "device"
sys.path.insert(0, str(KIT_DIR.parent))
sys.path.insert(0, str(KIT_DIR))
import jobqueue  # noqa: E402
import land  # noqa: E402
import pack  # noqa: E402
import run  # noqa: E402

SHAPE = (32, 48, 32)  # divisible by the base presets' factors (autoencoder 4, then the flow network's 4)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    affine = template_affine(Grid("test", 4.0, SHAPE))
    rows = []
    for i, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"]):
        image, labels = head_phantom(SHAPE, seed=i)
        image[labels == 0] = 0.0  # a prepared volume: brain only, background 0
        subject = f"sub{i:02d}"
        save_volume(root / "images" / f"{subject}.nii.gz", image / image.max(), affine)
        save_volume(root / "masks" / f"{subject}.nii.gz", (labels > 0).astype(np.uint8), affine, dtype=np.uint8)
        muse = np.zeros(SHAPE, np.int16)  # a DLMUSE-like label map of the phantom's classes
        for phantom_class, label in PHANTOM_MUSE_LABELS.items():
            muse[labels == phantom_class] = label
        save_volume(root / "labels" / f"{subject}.nii.gz", muse, affine, dtype=np.int16)
        rows.append({"subject": subject, "image": f"images/{subject}.nii.gz", "mask": f"masks/{subject}.nii.gz",
                     "labels": f"labels/{subject}.nii.gz", "split": split, "age": 20.0 + 9 * i, "sex": "FM"[i % 2]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    PHANTOM_REGIONS.to_csv(root / "muse_regions.csv", index=False)  # what land.py's --regions folder holds
    (root / "prepare.json").write_text(json.dumps({"preset": "test", "affine": affine.tolist(), "records": [1, 2]}))
    return root


@pytest.fixture(scope="module")
def kit(prepared, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kit")
    assert pack.main(["--data", str(prepared), "--kit", str(folder), "--no-wheels",
                      "--regions", str(prepared / "muse_regions.csv")]) == 0
    return folder


def test_the_packed_data_unpacks_to_the_same_prepared_dataset_less_the_test_split(prepared, kit, tmp_path):
    record = json.loads((kit / pack.RECORD_FILE).read_text())
    assert record["data"]["subjects"] == 6 and record["data"]["splits"] == ["train", "val"]
    assert record["files"][pack.DATA_FILE]["bytes"] == (kit / pack.DATA_FILE).stat().st_size
    unpacked = pack.unpack(kit, tmp_path / "data")
    original, copy = pd.read_csv(prepared / "manifest.csv"), pd.read_csv(unpacked / "manifest.csv")
    assert list(copy["split"]) == ["train"] * 4 + ["val"] * 2  # the test split stays at home
    assert list(copy["age"]) == list(original["age"][:6]) and list(copy["sex"]) == list(original["sex"][:6])
    for (_, a), (_, b) in zip(original.head(6).iterrows(), copy.iterrows()):
        image, affine = load_volume(prepared / a["image"])
        image_copy, affine_copy = load_volume(unpacked / b["image"])
        assert np.abs(image - image_copy).max() <= 0.5 / 255 + 1e-6  # uint8 rounding, nothing more
        assert np.array_equal(load_volume(prepared / a["mask"])[0], load_volume(unpacked / b["mask"])[0])
        assert np.allclose(affine, affine_copy)
    assert "records" not in json.loads((unpacked / "prepare.json").read_text())
    # the label maps travel as tissue classes and come back as label maps that give the same classes
    assert record["data"]["tissue_maps"] and 0 < record["data"]["tissue_bytes"] < record["data"]["bytes"]
    label_map = pack.label_map(unpacked)
    assert label_map == read_label_map(prepared / "muse_regions.csv")
    lookup = tissue_lookup(label_map)
    for (_, a), (_, b) in zip(original.head(6).iterrows(), copy.iterrows()):
        assert np.array_equal(tissue_map(load_volume(prepared / a["labels"])[0], lookup),
                              tissue_map(load_volume(unpacked / b["labels"])[0], lookup))


def test_the_travelling_tree_counts_tracked_files_and_the_kit():
    files = dict(pack.travelling_files())
    assert pack.ROOT / "README.md" in files and files[pack.ROOT / "README.md"] == (pack.ROOT / "README.md").stat().st_size
    assert not any(".venv" in p.parts or ".git" in p.parts for p in files)


def test_committed_folders_a_job_does_not_read_stay_home_and_come_back_unchanged(tmp_path):
    import subprocess

    root, kit = tmp_path / "repo", tmp_path / "repo" / ".device"
    model = root / "weights" / "4mm"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (root / "README.md").write_text("r\n")
    git = dict(cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "init", "-q"], **git)
    subprocess.run(["git", "add", "."], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"], **git)

    assert pack.leave_home(["weights/4mm"], root) == ["weights/4mm"]
    assert not model.exists() and root / "README.md" in dict(pack.travelling_files(root, carried=()))
    assert all("weights" not in p.parts for p, _ in pack.travelling_files(root, carried=()))
    kit.mkdir()
    (kit / pack.RECORD_FILE).write_text(json.dumps({"left_home": ["weights/4mm"]}))
    assert pack.restore(kit, root) == ["weights/4mm"]
    assert (model / "model.safetensors").read_bytes() == bytes(range(256)) * 40

    (model / "model.safetensors").write_bytes(b"changed")  # a change of the user's is never removed
    with pytest.raises(ValueError, match="differs from the last commit"):
        pack.leave_home(["weights/4mm"], root)
    (root / "new").mkdir()
    (root / "new" / "x").write_text("untracked")
    with pytest.raises(ValueError, match="not committed"):
        pack.leave_home(["new"], root)
    assert (model / "model.safetensors").read_bytes() == b"changed" and (root / "new" / "x").is_file()


def test_outputs_the_device_tool_would_not_bring_back_are_named(tmp_path):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "odd name.txt").write_text("x")
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text("x")
    problems = run.check_outputs(tmp_path)
    assert any("10 files" in p for p in problems)
    assert any("deep.txt is more than 2 folders down" in p for p in problems)
    assert any("odd name.txt" in p for p in problems)
    assert run.check_outputs(tmp_path / "a") == []  # b/c/deep.txt: two folders down still comes back


def test_the_schedule_is_fitted_to_the_budget():
    from mriflow.train.loop import LoopConfig

    assert run.fit_steps(rate=10.0, seconds=300, rehearse=False) == 2700
    loop = run.fitted_loop(LoopConfig(max_steps=30000, warmup_steps=500, ema_decay=0.9995, log_every=50), 2700, False)
    assert loop.max_steps == 2700 and loop.warmup_steps == 270 and loop.device == "cuda"
    assert 1 / (1 - loop.ema_decay) == pytest.approx(270)  # the EMA horizon is a tenth of the run
    assert loop.checkpoint_every == loop.montage_every == 2700
    assert run.fitted_loop(LoopConfig(), 4, True).ema_decay == 0.0  # a few rehearsal steps: no average, not a negative one


def test_rehearsal_of_the_2mm_model_jobs_lands_a_model_that_generates(kit, prepared, tmp_path):
    from mriflow.generate import load_generator

    first, second = tmp_path / "J1a", tmp_path / "J1b"
    assert run.main(["J1a", "--minutes", "5", "--out", str(first), "--kit", str(kit), "--rehearse"]) == 0
    record = json.loads((first / "result.json").read_text())
    assert record["status"] == "done" and record["result"]["steps"] == 4
    assert record["result"]["schedule"]["adversarial_start"] == 2  # the critics' phase is rehearsed too
    assert -1 <= record["result"]["validation"]["ssim"] <= 1 and record["result"]["validation_subjects"] == 2
    assert sorted(p.name for p in first.rglob("*") if p.is_file()) == [
        "checkpoint.json", "log.csv", "model.safetensors", "montage.png", "result.json"]
    assert json.loads((first / "autoencoder" / "checkpoint.json").read_text())["weights_dtype"] == "float16"
    assert run.check_outputs(first) == []

    assert run.main(["J1b", "--minutes", "5", "--out", str(second), "--kit", str(kit), "--rehearse",
                     "--autoencoder", str(first / "autoencoder")]) == 0
    record = json.loads((second / "result.json").read_text())
    assert record["status"] == "done", record.get("traceback")
    meta = json.loads((second / "flow" / "checkpoint.json").read_text())
    assert meta["autoencoder"]["path"] == "../autoencoder" and meta["trained_on"]["device"] == "cpu"
    assert meta["schema"]["covariates"][0]["name"] == "age"

    # land both, into a copy of the queue and a scratch document, and generate from the landed model
    queue, document, results = tmp_path / "queue.yaml", tmp_path / "docs" / "benchmarks.md", tmp_path / "results"
    shutil.copy(jobqueue.QUEUE, queue)
    document.parent.mkdir()
    places = {"J1a": ("autoencoder", tmp_path / "2mm" / "autoencoder"), "J1b": ("flow", tmp_path / "2mm" / "flow")}
    landed = land.land(first, prepared, document=document, results=results, queue=queue, places=places)
    assert landed["test_subjects"] == 1 and -1 <= landed["test"]["ssim"] <= 1  # measured here, on the test split
    land.land(second, document=document, results=results, queue=queue, places=places)
    with pytest.raises(FileExistsError, match="--replace"):
        land.land(second, document=document, results=results, queue=queue, places=places)
    _, jobs = jobqueue.load(queue)
    assert [job["status"] for job in jobs[:2]] == ["done", "done"] and jobs[0]["device"] == "cpu"
    assert jobqueue.next_job(jobs) is None or jobqueue.next_job(jobs)["id"] not in ("J1a", "J1b")
    text = document.read_text()
    assert "## device J1a" in text and "## device J1b" in text and "Test split, measured here" in text
    assert (results / "device-J1a.json").is_file() and (document.parent / "device_J1a.png").is_file()

    generator = load_generator(tmp_path / "2mm" / "flow", device="cpu")
    volumes, nfe = generator.sample([0], None, generator.sampling_settings("euler", 1))
    assert volumes.shape == (1, *SHAPE) and nfe == 1 and np.isfinite(volumes).all()


def test_rehearsal_of_the_anatomy_job_lands_a_network_measured_here_that_segments(kit, prepared, tmp_path):
    from mriflow.evaluate.backbones import AnatomyBackbone
    from mriflow.models.anatomy import read_anatomy_config

    out = tmp_path / "J2"
    assert run.main(["J2", "--minutes", "5", "--out", str(out), "--kit", str(kit), "--rehearse"]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "done", record.get("traceback")
    assert record["result"]["steps"] == 4 and record["result"]["validation_subjects"] == 2
    assert 1 <= record["result"]["best_step"] <= 4 and record["result"]["validation"]["dice"] >= 0
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "anatomy.safetensors", "log.csv", "montage.png", "result.json", "validation.csv"]
    assert run.check_outputs(out) == []
    config, training = read_anatomy_config(out / "anatomy.safetensors")
    assert config.label_map == read_label_map(prepared / "muse_regions.csv")  # the DLMUSE map, not the carried classes
    assert training["best_step"] == record["result"]["best_step"] and "J2" in training["commands"][0]

    # land: refused without the test split's folder; then calibrated and measured here, and only then installed
    queue, document, results = tmp_path / "queue.yaml", tmp_path / "docs" / "benchmarks.md", tmp_path / "results"
    shutil.copy(jobqueue.QUEUE, queue)
    document.parent.mkdir()
    target = tmp_path / "weights" / "anatomy-2mm.safetensors"
    places = {"J2": ("anatomy.safetensors", target)}
    with pytest.raises(ValueError, match="--data"):
        land.land(out, document=document, results=results, queue=queue, places=places, regions=prepared)
    assert not target.exists()
    landed = land.land(out, prepared, document=document, results=results, queue=queue, places=places, regions=prepared)
    assert landed["test"]["subjects"] == 1 and 0 <= landed["test"]["dice_white_matter"] <= 1
    text = document.read_text()
    assert "## anatomy backbone: test" in text and "## device J2" in text and "Test split, measured here" in text
    assert json.loads((results / "anatomy-test.json").read_text())["commands"][0] == training["commands"][0]
    backbone = AnatomyBackbone(target)
    assert backbone.network.feature_std.ne(1).any()  # calibrated here (the device does not calibrate)
    segmentation = backbone.segment(np.zeros((1, 1, *SHAPE), np.float32))
    assert segmentation.shape == (1, *SHAPE)
    _, jobs = jobqueue.load(queue)
    assert next(job for job in jobs if job["id"] == "J2")["status"] == "done"
    with pytest.raises(FileExistsError, match="--replace"):
        land.land(out, prepared, document=document, results=results, queue=queue, places=places, regions=prepared)


def test_a_failed_job_comes_back_with_its_error_and_is_not_landed(kit, tmp_path):
    out = tmp_path / "out"
    assert run.main(["J1b", "--minutes", "1", "--out", str(out), "--kit", str(kit), "--rehearse",
                     "--autoencoder", str(tmp_path / "missing")]) == 1
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "failed" and "land J1a first" in record["error"]
    with pytest.raises(ValueError, match="stays open"):
        land.land(out, queue=tmp_path / "queue.yaml")


def test_the_queue_says_which_job_is_next_and_how_to_run_it():
    _, jobs = jobqueue.load()
    assert [job["id"] for job in jobs] == ["J1a", "J1b", "J2", "J3", "J4", "J5", "J6"]
    job = jobqueue.next_job(jobs)
    call = jobqueue.device_call(job)
    assert f"run.py {job['id']} --minutes {job['minutes']}" in call["command"] and call["carry"] == [".device"]
    assert call["timeout_s"] <= 600 and set(run.JOBS) >= {j["id"] for j in jobs if j["status"] == "open"}
    # each job packs what it reads: only the anatomy network's job carries the tissue maps, J5 no data at all, and
    # the jobs that load no shipped model leave them home
    carried = {j["id"]: jobqueue.pack_command(j) for j in jobs}
    assert {i for i, command in carried.items() if "--no-tissue" not in command} == {"J2", "J5"}
    assert "--no-data" in carried["J5"]
    assert all("--leave-home src/mriflow/weights/2mm" in carried[i] for i in ("J1a", "J1b", "J2", "J3", "J4", "J6"))
    assert jobqueue.pack_command(job, "/data/ixi2").startswith("python benchmarks/device/pack.py --data /data/ixi2")


def test_every_job_that_carries_data_fits_the_device_limit_with_what_it_leaves_home():
    """The committed tree grows (each shipped model is about 9 MiB): a job's tracked files, less what its `pack`
    leaves home, plus the 2 mm train + val data and the wheels (26.8 and 2.0 MiB as pack.py measured them) and, for a
    job that needs J1a, J1a's autoencoder once landed (about 11 MiB), must stay under the device's 64 MiB."""
    import shlex

    _, jobs = jobqueue.load()
    tracked = pack.travelling_files(carried=())
    for job in jobs:
        words = shlex.split(job.get("pack", ""))
        if "--no-data" in words:
            continue
        home = [pack.ROOT / words[i + 1] for i, w in enumerate(words) if w == "--leave-home"]
        travels = sum(size for path, size in tracked if not any(path.is_relative_to(h) for h in home))
        landed = (pack.ROOT / "src/mriflow/weights/2mm-gpu/autoencoder").exists()
        extra = 11 * 2**20 if "J1a" in job.get("needs", "") and not landed else 0
        assert travels + 29 * 2**20 + extra < pack.TRAVEL_LIMIT, (
            f"{job['id']}: {(travels + extra) / 2**20:.1f} MiB of tracked files travel; leave more home")


def test_a_kit_for_a_job_that_reads_no_data_carries_none(kit, tmp_path):
    import shutil

    lean = tmp_path / "lean"
    shutil.copytree(kit, lean)  # an earlier pack's data file goes
    assert pack.main(["--no-data", "--kit", str(lean), "--no-wheels"]) == 0
    record = json.loads((lean / pack.RECORD_FILE).read_text())
    assert record["data"]["subjects"] == 0 and not (lean / pack.DATA_FILE).exists() and pack.DATA_FILE not in record["files"]
    _, jobs = jobqueue.load()
    j5 = next(job for job in jobs if job["id"] == "J5")
    assert "--data" not in jobqueue.pack_command(j5) and "--no-data" in jobqueue.pack_command(j5)


def test_a_kit_without_tissue_maps_is_smaller_and_unpacks_without_labels(prepared, kit, tmp_path):
    lean = tmp_path / "lean"
    assert pack.main(["--data", str(prepared), "--kit", str(lean), "--no-wheels", "--no-tissue",
                      "--regions", str(prepared / "muse_regions.csv")]) == 0
    record = json.loads((lean / pack.RECORD_FILE).read_text())
    assert not record["data"]["tissue_maps"] and record["data"]["bytes"] < (kit / pack.DATA_FILE).stat().st_size
    unpacked = pd.read_csv(pack.unpack(lean, tmp_path / "data") / "manifest.csv")
    assert len(unpacked) == 6 and unpacked["labels"].isna().all()


def test_rehearsal_of_the_large_presets_job_measures_both_stages_and_runs_torchrun(kit, tmp_path):
    out = tmp_path / "J4"
    assert run.main(["J4", "--minutes", "5", "--out", str(out), "--kit", str(kit), "--rehearse"]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "done", record.get("traceback")
    result = record["result"]
    for stage in ("autoencoder_large", "flow_large"):
        assert result[stage]["steps_per_second"] > 0 and result[stage]["batch_size"] == 2
    for command in ("train_autoencoder_torchrun", "generate_torchrun"):
        assert result[command]["exit_code"] == 0, result[command]["output_tail"]
    assert run.check_outputs(out) == []


def test_a_wheel_loses_its_tests_folders_and_still_installs(tmp_path):
    """pack.slim_wheel: the tests/ data of a carried wheel stays home; pip installs what is left, importable."""
    import subprocess
    import zipfile

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    files = {"demo/__init__.py": "VALUE = 3\n", "demo/tests/__init__.py": "", "demo/tests/data.bin": "x" * 50000,
             "demo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
             "demo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "demo-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as out:
        for name, text in {**files, "demo-1.0.dist-info/RECORD": record}.items():
            out.writestr(name, text)
    before = wheel.stat().st_size
    assert pack.slim_wheel(wheel) == before - wheel.stat().st_size > 0
    with zipfile.ZipFile(wheel) as slim:
        assert not any("/tests/" in name for name in slim.namelist())
        assert "tests" not in slim.read("demo-1.0.dist-info/RECORD").decode()
    assert pack.slim_wheel(wheel) == 0  # nothing left to remove
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    found = subprocess.run([sys.executable, "-c", "import demo; print(demo.VALUE)"], capture_output=True, text=True,
                           env={"PYTHONPATH": str(target)}, check=True)
    assert found.stdout.strip() == "3" and not (target / "demo" / "tests").exists()
