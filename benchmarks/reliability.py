"""Probe the command line with bad input, damaged files, kills and two runs at once, and count the outcomes.

Each probe runs `python -m mriflow ...` as a real process, on small phantoms built here, and is
judged from outside, as a user would see it:

    one-line error   exit 2, and the last line of stderr is "mriflow COMMAND: error: ..." naming the file
    skipped          prepare went on and prepare_report.csv names the file with its reason
    recovered        the command did its work in spite of the fault (a damaged cache encoded again, a run resumed)
    traceback        a Python traceback, or an exit code that is neither 0 nor 2 (target: none)
    data lost        a file that was whole before the probe is missing, changed or half-written after it (target: none)

The probes are those of tests/test_faults.py and the reliability tests beside it: malformed NIfTI
through prepare and evaluate generation, damaged JSON, checkpoints and latent caches, prepare
(2 workers), training and generate killed with SIGKILL at seeded moments, two generate or
prepare runs into one folder at once, and issue 25's findings ("round 3": tampered weights and model folders,
weights linked to /dev/zero, a report overwritten, Ctrl+C while training, implausible covariates, a semicolon
cohort, --n 1000000000). Writes benchmarks/results/reliability.json and the "## reliability" section of
docs/benchmarks.md. The app's HTTP probes are tests/app (test_app_api.py, test_app_fuzz.py).

    python benchmarks/reliability.py [--work /tmp/mriflow-reliability]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pandas as pd

from common import DOCUMENT, link, machine, replace_section, write_result  # noqa: E402  (benchmarks/ is on sys.path)

SECTION = "## reliability"
COMMAND = "python benchmarks/reliability.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("MRIFLOW_DEBUG", None)
PREPARED_SHAPE = (16, 20, 16)  # 4 mm voxels; the tiny autoencoder's factor 4 divides it
SCAN_SHAPE, SCAN_VOXEL_MM = (48, 56, 44), 3.0  # "native" scans for prepare


# --- phantoms ---------------------------------------------------------------------------------


def head(shape, seed: int) -> np.ndarray:
    """A head-like volume: skull shell, brain, white matter, ventricles, an off-centre blob, noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))

    def ellipsoid(radii, centre=(0.0, 0.0, 0.0)):
        return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0

    image = np.zeros(shape, np.float32)
    image[ellipsoid((0.95, 0.95, 0.95))] = 300.0
    image[ellipsoid((0.75, 0.8, 0.75))] = 600.0
    image[ellipsoid((0.5, 0.58, 0.5))] = 900.0
    image[ellipsoid((0.08, 0.3, 0.12), (-0.15, 0, 0.1)) | ellipsoid((0.08, 0.3, 0.12), (0.15, 0, 0.1))] = 150.0
    image[ellipsoid((0.12, 0.12, 0.12), (0.35, 0.3, -0.2))] = 1100.0
    return image + rng.normal(0, 10, shape).astype(np.float32) * (image > 0)


def write_scans(folder: Path, count: int, first_seed: int = 0) -> Path:
    """`count` native scans (3 mm, RAS, centred on the template) named like IXI files."""
    affine = np.diag([SCAN_VOXEL_MM] * 3 + [1.0])
    affine[:3, 3] = np.asarray([0.0, -17.0, 5.0]) - SCAN_VOXEL_MM * (np.asarray(SCAN_SHAPE) - 1) / 2
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        nib.save(nib.Nifti1Image(head(SCAN_SHAPE, first_seed + i), affine), str(folder / f"s{first_seed + i:02d}_T1.nii.gz"))
    return folder


def write_prepared(root: Path, splits: dict[str, int]) -> Path:
    """A prepared folder of phantoms on a 4 mm grid, as `mriflow prepare` lays it out."""
    from mriflow.config import Grid
    from mriflow.data.io import save_volume, template_affine

    affine, rows, seed = template_affine(Grid("test", 4.0, PREPARED_SHAPE)), [], 0
    for split, count in splits.items():
        for _ in range(count):
            image, subject = head(PREPARED_SHAPE, seed), f"sub{seed:02d}"
            save_volume(root / "images" / f"{subject}.nii.gz", image / image.max(), affine)
            save_volume(root / "masks" / f"{subject}.nii.gz", (image > 400).astype(np.uint8), affine, dtype=np.uint8)
            rows.append({"subject": subject, "image": f"images/{subject}.nii.gz", "mask": f"masks/{subject}.nii.gz",
                         "labels": "", "split": split, "age": 20 + 3 * seed})
            seed += 1
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "prepare.json").write_text('{"preset": "test", "recipe": ["phantom"]}')
    return root


def _with_sform(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, None)
    image.header.set_qform(None, code=0)
    image.header.set_sform(affine, code=2)
    nib.save(image, str(path))


def _changed(array: np.ndarray, index, value) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


# name -> write(path, bytes of a good volume, its data, its affine)
MALFORMED: dict[str, Callable] = {
    "truncated gzip": lambda path, raw, data, affine: path.write_bytes(raw[: len(raw) // 2]),
    "garbage bytes": lambda path, raw, data, affine: path.write_bytes(np.random.default_rng(0).bytes(3000)),
    "complex voxels": lambda path, raw, data, affine: nib.save(nib.Nifti1Image(data.astype(np.complex64), affine), str(path)),
    "NaN and inf voxels": lambda path, raw, data, affine: nib.save(
        nib.Nifti1Image(_changed(_changed(data, (3, 3, 3), np.nan), (4, 4, 4), np.inf), affine), str(path)),
    "2-D": lambda path, raw, data, affine: nib.save(nib.Nifti1Image(data[:, :, 5], affine), str(path)),
    "4-D": lambda path, raw, data, affine: nib.save(nib.Nifti1Image(np.stack([data, data], -1), affine), str(path)),
    "1x1x1": lambda path, raw, data, affine: nib.save(nib.Nifti1Image(data[:1, :1, :1], affine), str(path)),
    "singular affine": lambda path, raw, data, affine: _with_sform(path, data, _changed(affine, (slice(0, 3), slice(0, 3)), 0.0)),
    "non-finite affine": lambda path, raw, data, affine: _with_sform(path, data, _changed(affine, (0, 3), np.nan)),
}


def write_malformed(path: Path, kind: str, source: Path) -> Path:
    image = nib.load(str(source))
    MALFORMED[kind](path, source.read_bytes(), np.asarray(image.dataobj, np.float32), image.affine)
    return path


# --- running and judging ------------------------------------------------------------------------


def start(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mriflow", *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def run(*arguments: str, timeout: float = 300) -> tuple[int, str]:
    process = start(*arguments)
    _, error = process.communicate(timeout=timeout)
    return process.returncode, error


def kill_after(process: subprocess.Popen, seconds: float, started: Path | None = None) -> bool:
    """SIGKILL `process` `seconds` after it writes `started` (or after now); False if it ended before."""
    since = time.time()
    while started is not None and not (started.exists() and started.stat().st_mtime >= since):
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.communicate()
        return True


def last_line(stderr: str) -> str:
    """The last line a terminal shows: progress bars redraw their line with carriage returns."""
    lines = [line for line in stderr.rstrip("\n").split("\n") if line.strip()]
    return lines[-1].rsplit("\r", 1)[-1].strip() if lines else ""


def judged(code: int, stderr: str, names: str | None) -> str:
    """The outcome of one command: traceback, one-line error (naming `names`), or ok."""
    if "Traceback" in stderr or code not in (0, 2):
        return "traceback"
    if code == 2:
        line = last_line(stderr)
        clear = line.startswith("mriflow ") and ": error: " in line and (names is None or names in line)
        return "one-line error" if clear else "unclear error"
    return "ok"


def snapshot(*folders: Path) -> dict[str, str]:
    """{path: sha256} of every file under `folders`, temporary and lock files left out."""
    files = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.name.startswith((".tmp-", ".prepare.lock")):
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def lost(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [path for path, digest in before.items() if after.get(path) != digest]


def leftovers(*folders: Path) -> list[str]:
    return [str(p) for folder in folders for p in Path(folder).rglob(".tmp-*")]


class Probes:
    """Runs probes and keeps one record per probe."""

    def __init__(self, work: Path):
        self.work, self.records = work, []

    def add(self, group: str, name: str, command: str, outcome: str, message: str, data_lost: list[str],
            seconds: float) -> None:
        record = {"group": group, "probe": name, "command": command, "outcome": outcome, "message": message,
                  "data_lost": data_lost, "seconds": round(seconds, 1)}
        self.records.append(record)
        print(f"{group} | {name}: {outcome}{' (DATA LOST)' if data_lost else ''} | {message[:150]}", flush=True)


# --- the probes ---------------------------------------------------------------------------------


def malformed_through_prepare(probes: Probes) -> None:
    good = write_scans(probes.work / "scan", 1)
    for kind in MALFORMED:
        started = time.perf_counter()
        folder = probes.work / "prepare-malformed" / kind.replace(" ", "-")
        images = folder / "images"
        images.mkdir(parents=True)
        shutil.copy(good / "s00_T1.nii.gz", images / "good_T1.nii.gz")
        bad = write_malformed(images / "bad_T1.nii.gz", kind, good / "s00_T1.nii.gz")
        before = snapshot(images)
        arguments = ["prepare", str(images), "--out", str(folder / "out"), "--skull-strip", "none", "--no-register"]
        code, error = run(*arguments)
        outcome, message = judged(code, error, str(bad)), last_line(error)
        report = folder / "out" / "prepare_report.csv"
        if outcome == "ok":
            with open(report, newline="") as stream:
                reasons = {Path(row["input"]).name: row["reason"] for row in csv.DictReader(stream)}
            reason = reasons.get(bad.name, "")
            outcome = "skipped" if bad.name in reason else "prepared (not refused)"
            message = f"prepare_report.csv: {reason}" if reason else "prepared as if it were a scan"
        damage = lost(before, snapshot(images)) + [f"{folder / 'out' / 'images' / 'good.nii.gz'} not prepared"] * (
            not (folder / "out" / "images" / "good.nii.gz").is_file())
        probes.add("malformed NIfTI", f"prepare: {kind}", "mriflow " + " ".join(arguments[:1]) + " IMAGES --out OUT "
                   "--skull-strip none --no-register", outcome, message, damage, time.perf_counter() - started)


def malformed_through_evaluate(probes: Probes, real: Path) -> None:
    for kind in MALFORMED:
        started = time.perf_counter()
        fakes = probes.work / "evaluate-malformed" / kind.replace(" ", "-")
        fakes.mkdir(parents=True)
        for i in range(7):
            shutil.copy(real / "images" / f"sub{9 + i:02d}.nii.gz", fakes / f"sample_{i:05d}.nii.gz")
        bad = write_malformed(fakes / "bad.nii.gz", kind, real / "images" / "sub09.nii.gz")
        before = snapshot(fakes, real)
        code, error = run("evaluate", "generation", "--real", str(real), "--fake", str(fakes), "--out",
                          str(fakes.parent / f"{fakes.name}-report"), "--backbone", "intensity", "--bootstrap", "2")
        probes.add("malformed NIfTI", f"evaluate generation: {kind}",
                   "mriflow evaluate generation --real DATA --fake FAKES --out OUT --backbone intensity --bootstrap 2",
                   judged(code, error, str(bad)), last_line(error), lost(before, snapshot(fakes, real)),
                   time.perf_counter() - started)


def damaged_files(probes: Probes, real: Path, autoencoder: Path) -> None:
    from safetensors import safe_open

    from mriflow import checkpoint as ckpt

    # prepare.json cut short -> train autoencoder names it
    started = time.perf_counter()
    data = probes.work / "damaged-prepare-json"
    shutil.copytree(real, data)
    (data / "prepare.json").write_text('{"preset": ')
    before = snapshot(data)
    code, error = run("train", "autoencoder", str(data), "--out", str(probes.work / "damaged-prepare-json-run"),
                      "--max-steps", "1", "--threads", "1")
    probes.add("damaged files", "prepare.json cut short: train autoencoder", "mriflow train autoencoder DATA --out RUN",
               judged(code, error, str(data / "prepare.json")), last_line(error), lost(before, snapshot(data)),
               time.perf_counter() - started)

    # a generated sidecar cut short -> evaluate generation names it
    started = time.perf_counter()
    fakes = probes.work / "damaged-sidecar"
    fakes.mkdir()
    for i in range(7):
        shutil.copy(real / "images" / f"sub{9 + i:02d}.nii.gz", fakes / f"sample_{i:05d}.nii.gz")
    (fakes / "sample_00000.json").write_text('{"covariates": {"age": 4')
    before = snapshot(fakes)
    code, error = run("evaluate", "generation", "--real", str(real), "--fake", str(fakes), "--out",
                      str(probes.work / "damaged-sidecar-report"), "--backbone", "intensity", "--bootstrap", "2")
    probes.add("damaged files", "sidecar cut short: evaluate generation",
               "mriflow evaluate generation --real DATA --fake FAKES --out OUT",
               judged(code, error, str(fakes / "sample_00000.json")), last_line(error), lost(before, snapshot(fakes)),
               time.perf_counter() - started)

    # model.safetensors cut short -> evaluate reconstruction names it
    started = time.perf_counter()
    run_copy = probes.work / "damaged-checkpoint"
    shutil.copytree(autoencoder, run_copy)
    weights = ckpt.latest_checkpoint(run_copy) / "model.safetensors"  # the one a command loads
    weights.write_bytes(weights.read_bytes()[:1000])
    before = snapshot(real)
    code, error = run("evaluate", "reconstruction", str(real), "--autoencoder", str(run_copy), "--split", "test",
                      "--out", str(probes.work / "damaged-checkpoint-report"), "--device", "cpu", "--threads", "1")
    probes.add("damaged files", "checkpoint weights cut short: evaluate reconstruction",
               "mriflow evaluate reconstruction DATA --autoencoder RUN", judged(code, error, str(weights)),
               last_line(error), lost(before, snapshot(real)), time.perf_counter() - started)

    # the latent cache's index.json, then a split's safetensors, cut short -> encode makes it again
    for damaged, cut in (("index.json", lambda f: f.write_text('{"splits": ')),
                         ("train.safetensors", lambda f: f.write_bytes(f.read_bytes()[:100]))):
        started = time.perf_counter()
        run_copy = probes.work / f"damaged-cache-{damaged}"
        shutil.copytree(autoencoder, run_copy)
        code, error = run("encode", str(real), "--autoencoder", str(run_copy), "--device", "cpu", "--threads", "1")
        cache = next((run_copy / "latents").iterdir())
        cut(cache / damaged)
        code, error = run("encode", str(real), "--autoencoder", str(run_copy), "--device", "cpu", "--threads", "1")
        outcome = judged(code, error, str(cache / damaged))
        try:
            for split in ("train", "val", "test"):
                with safe_open(str(cache / f"{split}.safetensors"), framework="pt"):
                    pass
            whole = True
        except Exception:  # noqa: BLE001 (any failure to open is a cache left damaged)
            whole = False
        if outcome == "ok":
            outcome = "recovered" if whole else "damaged cache kept"
        probes.add("damaged files", f"latent cache {damaged} cut short: encode", "mriflow encode DATA --autoencoder RUN",
                   outcome, last_line(error) if code else "encoded again", [] if whole else [str(cache)],
                   time.perf_counter() - started)


def killed_prepare(probes: Probes) -> None:
    if not Path("/proc/self/stat").exists():
        return
    started = time.perf_counter()
    images = write_scans(probes.work / "killed-prepare" / "images", 6)
    out = probes.work / "killed-prepare" / "out"
    arguments = ["prepare", str(images), "--out", str(out), "--skull-strip", "none", "--workers", "2"]
    process = start(*arguments)
    while not list((out / "records").glob("*.json")) and process.poll() is None:
        time.sleep(0.05)
    workers = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
               if _parent(stat) == process.pid]
    process.send_signal(signal.SIGKILL)
    process.communicate()
    killed = time.time()
    time.sleep(5)
    orphans = [pid for pid in workers if _alive(pid)]
    written_after = [str(p) for p in out.rglob("*") if p.is_file() and p.stat().st_mtime > killed]
    before = snapshot(out / "records", out / "images")
    code, error = run(*arguments)
    outcome = judged(code, error, None)
    damage = lost(before, snapshot(out / "records", out / "images")) + leftovers(out) + written_after
    if outcome == "ok":
        prepared = len(list((out / "images").glob("*.nii.gz")))
        outcome = "recovered" if prepared == 6 and not orphans else f"{prepared} of 6 prepared, {len(orphans)} orphans"
    probes.add("killed runs", "prepare --workers 2 killed (SIGKILL) after its first subject, then rerun",
               "mriflow prepare IMAGES --out OUT --workers 2; kill -9; same again", outcome,
               f"{len(workers)} child processes (its 2 workers, multiprocessing's resource tracker): "
               f"{len(workers) - len(orphans)} ended with it, {len(orphans)} outlived it; nothing written after the "
               "kill; the rerun resumed" if not written_after else f"{len(written_after)} files written after the kill",
               damage, time.perf_counter() - started)


def _parent(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def killed_training(probes: Probes, real: Path, seed: int) -> Path:
    """Train a tiny autoencoder, killed twice at seeded moments and resumed; returns the run (used by other probes)."""
    from mriflow import checkpoint as ckpt

    started = time.perf_counter()
    run_dir, steps = probes.work / "killed-training", 30
    common = ["train", "autoencoder", str(real), "--out", str(run_dir), "--max-steps", str(steps), "--threads", "1"]
    code, error = run(*common, "--max-minutes", "0.01")  # a first stretch stops with a checkpoint part way
    outcomes = [judged(code, error, None)]
    first = ckpt.latest_checkpoint(run_dir)
    kills = []
    for moment in random.Random(seed).sample([x / 100 for x in range(100)], 2):  # seconds into the run
        kills.append(kill_after(start(*common, "--max-minutes", "0", "--resume"), moment, run_dir / "config.yaml"))
    code, error = run(*common, "--max-minutes", "0", "--resume")
    outcomes.append(judged(code, error, None))
    latest = ckpt.latest_checkpoint(run_dir)
    damage = leftovers(run_dir)
    try:
        _, meta = ckpt.load_autoencoder(latest)
        final = meta["step"]
    except Exception as error:  # noqa: BLE001 (an unloadable checkpoint is what this probe looks for)
        final, damage = None, damage + [f"{latest}: {error}"]
    outcome = next((o for o in outcomes if o != "ok"), "recovered" if final == steps else f"ended at step {final}")
    probes.add("killed runs", f"train autoencoder killed (SIGKILL) {sum(kills)} times, resumed",
               f"mriflow train autoencoder DATA --out RUN --max-steps {steps} --resume; kill -9 at seeded moments",
               outcome, f"first checkpoint at {first.name if first else None}; final {latest.name if latest else None}, "
               "loadable", damage, time.perf_counter() - started)
    return run_dir


def killed_generate(probes: Probes, seed: int) -> None:
    from mriflow.data.io import load_volume

    started = time.perf_counter()
    out = probes.work / "killed-generate"
    arguments = ["generate", "--out", str(out), "--num-samples", "500", "--batch-size", "1", "--solver", "euler",
                 "--steps", "1", "--threads", "1"]
    process = start(*arguments)
    while not (out / "sample_00000.nii.gz").exists() and process.poll() is None:
        time.sleep(0.01)
    kill_after(process, random.Random(seed).uniform(0.2, 1.0))
    before = snapshot(out)
    code, error = run(*arguments)
    damage = lost(before, snapshot(out)) + leftovers(out)
    for sample in sorted(out.glob("sample_?????.nii.gz")):
        try:
            load_volume(sample)
            if not sample.with_name(sample.name.replace(".nii.gz", ".json")).is_file():
                damage.append(f"{sample} has no sidecar")
        except Exception as error:  # noqa: BLE001 (a sample that does not read is half-written)
            damage.append(f"{sample}: {error}")
    probes.add("killed runs", "generate killed (SIGKILL) midway, then rerun into the same folder",
               "mriflow generate --out OUT --num-samples 500; kill -9; same again", judged(code, error, str(out)),
               last_line(error), damage, time.perf_counter() - started)


def two_at_once(probes: Probes) -> None:
    import json

    started = time.perf_counter()
    out = probes.work / "two-generates"
    arguments = ["generate", "--out", str(out), "--num-samples", "6", "--batch-size", "1", "--solver", "euler",
                 "--steps", "1", "--threads", "1"]
    first, second = start(*arguments, "--seed", "1"), start(*arguments, "--seed", "2")
    results = [(process.wait(timeout=300), process.communicate()[1]) for process in (first, second)]
    outcomes = sorted(judged(code, error, str(out)) for code, error in results)
    seeds = {json.loads(p.read_text())["seed"] for p in out.glob("sample_*.json")}
    whole = len(list(out.glob("sample_?????.nii.gz"))) == 6 and len(seeds) == 1
    refusal = next((last_line(error) for code, error in results if code == 2), "")
    probes.add("two runs at once", "two generate runs into one folder",
               "mriflow generate --out OUT --seed 1 & mriflow generate --out OUT --seed 2",
               "one-line error" if outcomes == ["ok", "one-line error"] else " + ".join(outcomes), refusal,
               [] if whole else [f"{out}: samples of both runs mixed ({sorted(seeds)})"], time.perf_counter() - started)

    started = time.perf_counter()
    images = write_scans(probes.work / "two-prepares" / "images", 16)  # the first run lasts well beyond the second's wait
    out = probes.work / "two-prepares" / "out"
    arguments = ["prepare", str(images), "--out", str(out), "--skull-strip", "none"]
    first = start(*arguments)
    while not list((out / "records").glob("*.json")) and first.poll() is None:  # at work
        time.sleep(0.05)
    code, error = run(*arguments)
    first_code, first_error = first.wait(timeout=300), first.communicate()[1]
    damage = [] if len(list((out / "images").glob("*.nii.gz"))) == 16 else [f"{out}: not every subject prepared"]
    outcome = judged(code, error, str(out))
    if judged(first_code, first_error, None) != "ok":
        outcome = f"first run: {judged(first_code, first_error, None)}"
    probes.add("two runs at once", "a second prepare into a folder a first one is writing",
               "mriflow prepare IMAGES --out OUT & mriflow prepare IMAGES --out OUT", outcome, last_line(error), damage,
               time.perf_counter() - started)


def round_three(probes: Probes, real: Path, autoencoder: Path) -> None:
    """Issue 25's findings through the command line: tampered weights and model folders, a device as weights, a
    report overwritten, Ctrl+C while training, implausible covariates, a semicolon cohort and a huge --n."""
    import json

    from mriflow import checkpoint as ckpt
    from mriflow.generator import shipped_models

    def flipped(file: Path) -> None:
        data = bytearray(file.read_bytes())
        data[-7] ^= 0x20  # one bit of a tensor: the file still parses
        file.write_bytes(bytes(data))

    def model_copy(name: str) -> Path:
        folder = probes.work / name
        shutil.copytree(shipped_models()["4mm"], folder)
        return folder

    def generate_probe(name: str, folder: Path, names: str, timeout: float = 300) -> None:
        started = time.perf_counter()
        before = snapshot(folder)
        try:
            code, error = run("generate", "--model", str(folder), "--out", str(probes.work / f"{name}-out"), "--n", "1",
                              "--steps", "1", "--no-labels", "--threads", "1", timeout=timeout)
            outcome, message = judged(code, error, names), last_line(error)
        except subprocess.TimeoutExpired:
            outcome, message = "hangs", f"no answer in {timeout:.0f} s"
        if outcome == "ok":
            outcome = "accepted (not refused)"
        probes.add("round 3", f"generate: {name.replace('-', ' ')}", "mriflow generate --model MODEL --out OUT --n 1",
                   outcome, message, lost(before, snapshot(folder)), time.perf_counter() - started)

    folder = model_copy("tampered-generator-weights")
    flipped(folder / "flow" / ckpt.MODEL_FILE)
    generate_probe("tampered-generator-weights", folder, str(folder / "flow" / ckpt.MODEL_FILE))

    folder = model_copy("model-folder-without-exported-from")
    shutil.copytree(folder / "autoencoder", probes.work / "autoencoder-elsewhere")
    meta_file = folder / "flow" / ckpt.META_FILE
    meta = json.loads(meta_file.read_text())
    meta.pop("exported_from")
    meta["autoencoder"]["path"] = str(probes.work / "autoencoder-elsewhere")
    meta_file.write_text(json.dumps(meta))
    generate_probe("model-folder-without-exported-from", folder, str(folder / "flow" / ckpt.META_FILE))

    folder = model_copy("autoencoder-weights-linked-to-dev-zero")
    (folder / "autoencoder" / ckpt.MODEL_FILE).unlink()
    (folder / "autoencoder" / ckpt.MODEL_FILE).symlink_to("/dev/zero")
    generate_probe("autoencoder-weights-linked-to-dev-zero", folder, "not a regular file", timeout=120)

    # a bit flipped in a training checkpoint's state -> resume refuses it
    started = time.perf_counter()
    run_copy = probes.work / "bit-flipped-training-state"
    shutil.copytree(autoencoder, run_copy)
    state = ckpt.latest_checkpoint(run_copy) / ckpt.TRAIN_STATE_FILE
    flipped(state)
    code, error = run("train", "autoencoder", str(real), "--out", str(run_copy), "--resume", "--max-steps", "40",
                      "--threads", "1")
    outcome = judged(code, error, str(state))
    probes.add("round 3", "train --resume from a bit-flipped training state", "mriflow train autoencoder DATA --out RUN "
               "--resume", "accepted (not refused)" if outcome == "ok" else outcome, last_line(error), [],
               time.perf_counter() - started)

    # evaluate generation into a folder that holds a report -> refused, the report unchanged
    started = time.perf_counter()
    fakes = probes.work / "report-overwrite-fakes"
    fakes.mkdir()
    for i in range(7):
        shutil.copy(real / "images" / f"sub{9 + i:02d}.nii.gz", fakes / f"sample_{i:05d}.nii.gz")
    report = probes.work / "report-overwrite"
    arguments = ["evaluate", "generation", "--real", str(real), "--fake", str(fakes), "--out", str(report),
                 "--backbone", "intensity", "--bootstrap", "2"]
    run(*arguments)
    before = snapshot(report)
    code, error = run(*arguments)
    probes.add("round 3", "evaluate generation into a folder holding a report", "mriflow evaluate generation ... --out "
               "REPORT, twice", judged(code, error, str(report)), last_line(error), lost(before, snapshot(report)),
               time.perf_counter() - started)

    # Ctrl+C while training -> a checkpoint of the step under way, one line, exit 130
    started = time.perf_counter()
    run_dir = probes.work / "interrupted-training"
    process = start("train", "autoencoder", str(real), "--out", str(run_dir), "--max-steps", "100000",
                    "--threads", "1")
    while not (run_dir / "log.csv").is_file() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    output, error = process.communicate(timeout=300)
    latest = ckpt.latest_checkpoint(run_dir)
    line = last_line(error)
    error = error + (output or "")  # "stopped by SIGINT ..." is printed as the run's result, on stdout
    if "Traceback" in error:
        outcome = "traceback"
    elif process.returncode == 130 and latest is not None and "stopped by SIGINT" in error:
        outcome = "recovered"
    else:
        outcome = f"exit {process.returncode}, checkpoint {latest.name if latest else None}"
    probes.add("round 3", "Ctrl+C (SIGINT) while training", "mriflow train autoencoder DATA --out RUN; Ctrl+C",
               outcome, next((l for l in error.splitlines() if "stopped by SIGINT" in l), line), [],
               time.perf_counter() - started)

    # prepare with an impossible age and an unknown sex -> prepared, the values noted and left missing
    started = time.perf_counter()
    images = write_scans(probes.work / "implausible-covariates" / "images", 2)
    table = probes.work / "implausible-covariates" / "demographics.csv"
    table.write_text("subject,age,sex\ns00,-5,Q\ns01,40,F\n")
    out = probes.work / "implausible-covariates" / "out"
    code, error = run("prepare", str(images), "--out", str(out), "--covariates", str(table), "--skull-strip", "none",
                      "--no-register")
    outcome = judged(code, error, None)
    if outcome == "ok":
        report_text = (out / "prepare_report.csv").read_text() if (out / "prepare_report.csv").is_file() else ""
        outcome = "skipped" if "'-5'" in report_text and "'Q'" in report_text else "accepted (not noted)"
    probes.add("round 3", "prepare with age -5 and sex Q", "mriflow prepare IMAGES --covariates CSV --out OUT", outcome,
               "prepare_report.csv names both values" if outcome == "skipped" else last_line(error), [],
               time.perf_counter() - started)

    # a semicolon-delimited cohort -> read as prepare reads it
    started = time.perf_counter()
    cohort = probes.work / "semicolon-cohort.csv"
    cohort.write_text("id;age;sex\nyoung-f;25;F\n")
    out = probes.work / "semicolon-cohort"
    code, error = run("generate", "--model", "4mm", "--out", str(out), "--covariates", str(cohort), "--steps", "1",
                      "--no-labels", "--threads", "1")
    outcome = judged(code, error, str(cohort))
    probes.add("round 3", "generate --covariates with a semicolon-delimited file", "mriflow generate --covariates "
               "COHORT.csv", "recovered" if outcome == "ok" and (out / "young-f.nii.gz").is_file() else outcome,
               last_line(error), [], time.perf_counter() - started)

    # --n 1000000000 -> the first sample arrives in bounded memory
    started = time.perf_counter()
    out = probes.work / "huge-n"
    process = start("generate", "--model", "4mm", "--out", str(out), "--n", "1000000000", "--steps", "1", "--no-labels",
                    "--threads", "1")
    peak = 0
    while process.poll() is None and not (out / "sample_00000.nii.gz").exists() and time.perf_counter() - started < 300:
        peak = max(peak, _peak_mib(process.pid))
        time.sleep(0.1)
    peak = max(peak, _peak_mib(process.pid))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    arrived = (out / "sample_00000.nii.gz").exists()
    probes.add("round 3", "generate --n 1000000000", "mriflow generate --model 4mm --n 1000000000 (killed after the "
               "first sample)", "recovered" if arrived and peak < 2048 else f"no sample in 300 s, {peak} MiB",
               f"first sample after {time.perf_counter() - started:.0f} s, peak resident memory {peak} MiB", [],
               time.perf_counter() - started)


def _peak_mib(pid: int) -> int:
    """VmHWM of a live process in MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


# --- report --------------------------------------------------------------------------------------


def counts(records: list[dict]) -> dict[str, int]:
    return {
        "probes": len(records),
        "one_line_errors": sum(r["outcome"] == "one-line error" for r in records),
        "skipped_with_reason": sum(r["outcome"] == "skipped" for r in records),
        "recovered": sum(r["outcome"] == "recovered" for r in records),
        "tracebacks": sum(r["outcome"] == "traceback" for r in records),
        "other": sum(r["outcome"] not in ("one-line error", "skipped", "recovered", "traceback") for r in records),
        "data_lost": sum(bool(r["data_lost"]) for r in records),
    }


def section(result: dict, path: Path) -> str:
    total = result["counts"]
    rows = "\n".join(f"| {r['group']} | {r['probe']} | {r['outcome']} | {'**yes**' if r['data_lost'] else 'no'} | "
                     f"{_cell(r['message'])} |" for r in result["probes"])
    return f"""How the command line takes bad input, damaged files, kills (SIGKILL) and two runs at once: each probe is a real
`python -m mriflow ...` process on small phantoms, judged from outside. A *one-line error* is exit 2 with a last
stderr line `mriflow COMMAND: error: ...` that names the file; *skipped* is prepare going on with the file named
in prepare_report.csv; *recovered* is the command doing its work in spite of the fault; *data lost* is a file
that was whole before the probe and is missing, changed or half-written after it. Machine: {result['machine']['cpus']}
CPUs, load average {result['machine']['load_average'][0]} at the end, shared with other work.

    {result['command']}

Probes: **{total['probes']}**; clear one-line errors: **{total['one_line_errors']}**, skipped with the reason:
**{total['skipped_with_reason']}**, recovered: **{total['recovered']}**; tracebacks: **{total['tracebacks']}**
(target 0); other outcomes: **{total['other']}**; probes that lost data: **{total['data_lost']}** (target 0).
Run time {result['seconds']:.0f} s. Result: {link(path, DOCUMENT)}. The same faults are tests in
`tests/test_faults.py` (about a minute on one core).

| group | probe | outcome | data lost | message (last stderr line, or the report's reason) |
|---|---|---|---|---|
{rows}
"""


def _cell(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 240 else text[:237] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="scratch folder (default: a new temporary one, removed at the end)")
    parser.add_argument("--seed", type=int, default=12, help="seed of the kill moments")
    parser.add_argument("--no-write", action="store_true", help="print the counts only; write no JSON or section")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mriflow-reliability-"))
    if work.exists() and any(work.iterdir()):
        parser.error(f"--work {work} is not empty; give a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    probes = Probes(work)
    try:
        real = write_prepared(work / "real", {"train": 2, "val": 7, "test": 7})
        malformed_through_prepare(probes)
        malformed_through_evaluate(probes, real)
        autoencoder = killed_training(probes, real, args.seed)
        damaged_files(probes, real, autoencoder)
        killed_prepare(probes)
        killed_generate(probes, args.seed)
        two_at_once(probes)
        round_three(probes, real, autoencoder)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result = {"command": COMMAND + (f" --seed {args.seed}" if args.seed != 12 else ""),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "seconds": round(time.perf_counter() - started, 1), "counts": counts(probes.records),
              "probes": probes.records}
    print(result["counts"])
    if not args.no_write:
        path = write_result("reliability", result)
        replace_section(DOCUMENT, SECTION, section(result, path))
        print(f"wrote {path} and the '{SECTION}' section of {DOCUMENT}")
    return 0 if result["counts"]["tracebacks"] == 0 and result["counts"]["data_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
