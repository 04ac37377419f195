"""`mriflow prepare`: real T1 scans -> a prepared dataset in MNI152 template space.

Every scan found under IMAGES runs through the preparation recipe (:mod:`mriflow.data.recipe`),
one subject at a time (:mod:`mriflow.data.subject`) in a pool of worker processes
(:mod:`mriflow.data.workers`); this module checks the arguments, decides what is still to do and
writes what describes the whole dataset: ``manifest.csv`` (files, split, covariates),
``prepare.json`` (the recipe as data, parameters, versions, input checksums, every subject's
record) and ``prepare_report.csv`` (what was skipped and why).

    >>> result = run_prepare("scans/", "prepared/", masks="labels/", covariates=["demographics.csv"])
    >>> print(result.summary())
    prepared 148 subjects (0 already done), skipped 2 (see prepared/prepare_report.csv)

Outputs are written atomically (volumes by ``save_volume``, JSON/CSV by rename);
a subject is done once its record ``records/<subject>.json`` exists, naming the
sha256 of its inputs and the recipe; a re-run skips such subjects unless forced.
A run holds ``OUT/.prepare.lock`` (so does each of its workers, which end with it):
a second run into the same folder is refused while any of them lives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

from mriflow.config import get_grid
from mriflow.data import workers as worker_pool
from mriflow.data.inputs import (
    Covariates,
    Scan,
    Skip,
    find_scans,
    match_masks,
    parse_covariate_columns,
    read_covariates,
)
from mriflow.data.io import template_affine
from mriflow.data.recipe import build_recipe, recipe_to_data
from mriflow.data.split import SPLITS, assign_splits, check_fractions
from mriflow.data.subject import SubjectTask
from mriflow.utils.files import FileLock, package_versions, read_json, remove_stale_temporaries, sha256, write_text_atomic
from mriflow.utils.text import counted

SKULL_STRIP_CHOICES = ("auto", "mask", "deepbet", "none")
# The manifest's own columns (as mriflow.data.dataset.MANIFEST_COLUMNS; not imported, which would pull torch into every worker).
MANIFEST_COLUMNS = ("subject", "image", "mask", "labels", "split")
# The options that decide what a prepared dataset holds, as prepare.json's "parameters" and the command
# line name them; re-running into a prepared --out with other values is refused unless forced.
DATASET_OPTIONS = {"images": "IMAGES", "masks": "--masks", "covariates": "--covariates",
                   "covariate_columns": "--covariate-columns", "preset": "--preset", "skull_strip_used": "--skull-strip",
                   "n4": "--n4", "register": "registration (--no-register)", "split": "--split", "seed": "--seed"}
VERSION_PACKAGES = ("mriflow", "torch", "nibabel", "SimpleITK", "nilearn", "numpy", "scipy", "pandas")
OUTPUT_FOLDERS = ("images", "masks", "labels", "records")  # beside manifest.csv, prepare.json, prepare_report.csv


class PrepareError(RuntimeError):
    """`prepare` could not run or prepared no subject; the message says which input and what to do."""



@dataclass
class PrepareResult:
    """What a run produced: subject lists, the skipped inputs and covariate notes, and where files are."""

    out: Path
    prepared: list[str]  # every subject in the manifest, sorted
    newly_prepared: list[str]  # prepared by this run
    already_done: list[str]  # skipped because a matching earlier output exists
    skipped: list[Skip]  # inputs that were not prepared, with the reason
    notes: list[Skip]  # covariate problems (values set missing), rows for unknown subjects

    @property
    def manifest(self) -> Path:
        return self.out / "manifest.csv"

    @property
    def record(self) -> Path:
        return self.out / "prepare.json"

    @property
    def report(self) -> Path:
        return self.out / "prepare_report.csv"

    def summary(self) -> str:
        """One line for the console, e.g. ``prepared 148 subjects (0 already done), skipped 2 (see .../prepare_report.csv)``."""
        line = (f"prepared {counted(len(self.prepared), 'subject')} ({len(self.already_done)} already done), "
                f"skipped {len(self.skipped)}")
        if self.notes:
            line += f", {counted(len(self.notes), 'covariate note')}"
        if self.skipped or self.notes:
            line += f" (see {self.report})"
        return line


def run_prepare(
    images: str | Path,
    out: str | Path,
    masks: str | Path | None = None,
    covariates: Sequence[str | Path] = (),
    covariate_columns: str | Sequence[str] | None = None,
    preset: str = "4mm",
    skull_strip: str = "auto",
    n4: bool = False,
    register: bool = True,
    workers: int = 1,
    force: bool = False,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    progress: bool = True,
) -> PrepareResult:
    """Prepare every scan under `images` into `out`; see the module docstring for the recipe.

    `skull_strip`: "auto" uses `masks` when given, else deepbet; "mask" needs `masks`;
    "deepbet" or "none" ignore no masks (giving `masks` with them is refused).
    `covariate_columns`: "age,sex,509:ventricles" selects (and renames) columns;
    None keeps every column. Raises PrepareError on bad arguments or when no
    subject could be prepared; a bad subject is skipped and reported instead.
    """
    started, start_time = time.perf_counter(), time.time()
    try:
        grid = get_grid(preset)
        split = check_fractions(split)
        columns = parse_covariate_columns(covariate_columns)
    except ValueError as error:
        raise PrepareError(str(error)) from None
    images, out = Path(images).expanduser(), Path(out).expanduser()
    masks = Path(masks).expanduser() if masks is not None else None
    covariate_files = [Path(p).expanduser() for p in covariates]
    if workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {workers}")
    strip = _resolve_skull_strip(skull_strip, masks)
    _check_folders(images, out, masks, covariate_files)

    try:
        found = find_scans(images)
        scans, skipped = found.scans, list(found.skipped)
        if masks is not None:
            scans, unmatched = match_masks(scans, masks)
            skipped += unmatched
    except FileNotFoundError as error:
        raise PrepareError(str(error)) from None
    if not scans and not skipped:
        raise PrepareError(f"no NIfTI files found in {images}: expected *.nii/*.nii.gz files, or a BIDS root "
                           "with sub-*/[ses-*/]anat/*_T1w.nii.gz")
    table_files = ([found.participants] if found.participants else []) + covariate_files
    try:
        covariate_table, notes = read_covariates(table_files, [s.subject for s in scans] + [s.subject for s in skipped], columns)
    except (FileNotFoundError, ValueError) as error:
        raise PrepareError(str(error)) from None

    clashes = [name for name in covariate_table.names if name in MANIFEST_COLUMNS]
    if clashes:
        raise PrepareError(f"covariate column(s) {', '.join(clashes)} would overwrite manifest columns of the same name; "
                           f"rename them, e.g. --covariate-columns {clashes[0]}:{clashes[0]}_value")

    parameters = {
        "images": str(images.resolve()), "out": str(out.resolve()), "masks": str(masks.resolve()) if masks else None,
        "covariates": [str(p.resolve()) for p in table_files], "covariate_columns": [list(c) for c in columns] if columns else None,
        "preset": preset, "skull_strip": skull_strip, "skull_strip_used": strip, "n4": n4, "register": register,
        "workers": workers, "force": force, "split": list(split), "seed": seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    with _alone_in(out):  # from here on, the only run reading and writing `out`
        for leftover in remove_stale_temporaries([out, *(out / name for name in OUTPUT_FOLDERS)], before=start_time):
            print(f"removed {leftover}: left incomplete by an interrupted run")
        if not force:
            _check_same_dataset(out, parameters)
        recipe = build_recipe(preset, strip, n4, register)
        recipe_data = recipe_to_data(recipe)
        tasks, already_done = [], []
        checksums: dict[str, str] = {}
        for scan in scans:
            inputs = _input_record(scan, checksums)
            if not force and _is_done(out, scan.subject, inputs, recipe_data):
                already_done.append(scan.subject)
            else:
                tasks.append(SubjectTask(scan.subject, str(scan.image), str(scan.mask) if scan.mask else None, inputs, recipe_data, str(out)))

        outcomes = worker_pool.run_subjects(tasks, workers, progress, out / worker_pool.LOCK_FILE)
        newly_prepared = sorted(o.subject for o in outcomes if not o.reason)
        skipped += [Skip(o.subject, o.image, o.reason) for o in outcomes if o.reason]

        records = {}
        for subject in sorted(already_done + newly_prepared):
            records[subject] = read_json(out / "records" / f"{subject}.json")
        notes += covariate_table.missing_rows(records)
        _write_report(out / "prepare_report.csv", skipped + notes)
        result = PrepareResult(out, sorted(records), newly_prepared, sorted(already_done), skipped, notes)
        if not records:
            raise PrepareError(f"no subject could be prepared from {images}: {counted(len(skipped), 'input')} "
                               f"skipped; see {result.report} for the reason of each")

        assignment, split_record = _split(records, covariate_table, split, seed)
        _write_manifest(out / "manifest.csv", records, assignment, covariate_table)
        prepare_record = {
            "preset": preset,
            "grid": dataclasses.asdict(grid),
            "affine": template_affine(grid).tolist(),
            "recipe": recipe_data,
            "split": split_record,
            "covariates": {"names": covariate_table.names, "sources": covariate_table.sources},
            "parameters": parameters,
            "versions": package_versions(VERSION_PACKAGES + (("deepbet",) if strip == "deepbet" else ())),
            "inputs": {
                "images": str(images.resolve()),
                "layout": found.layout,
                "checksums": {**{r["inputs"]["image"]["path"]: r["inputs"]["image"]["sha256"] for r in records.values()},
                              **{r["inputs"]["mask"]["path"]: r["inputs"]["mask"]["sha256"] for r in records.values() if r["inputs"]["mask"]},
                              **{str(p.resolve()): _sha256(p, checksums) for p in table_files}},
            },
            "subjects": {s: {k: v for k, v in r.items() if k not in ("recipe", "subject")} for s, r in records.items()},
            "counts": {"prepared": len(records), "newly_prepared": len(newly_prepared), "already_done": len(already_done),
                       "skipped": len(skipped), "covariate_notes": len(notes)},
            "seconds": round(time.perf_counter() - started, 2),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_text_atomic(out / "prepare.json", json.dumps(prepare_record, indent=1))
        return result


@contextlib.contextmanager
def _alone_in(out: Path) -> Iterator[FileLock]:
    """Hold OUT/.prepare.lock while this run reads and writes `out`; PrepareError if another run holds it.

    Taken exclusively first, which succeeds only once no process of another run holds it (not
    even a worker outliving a killed run: see workers._end_with_parent); then shared, as each worker of this
    run takes it (workers._init_worker), so that a later run is refused until every one of them has ended.
    """
    lock = FileLock(out / worker_pool.LOCK_FILE)
    try:
        # The conversion to shared is not atomic: a run slipping in between wins, and this one is refused.
        if not lock.acquire(wait_seconds=worker_pool.LOCK_WAIT_SECONDS) or not lock.acquire(shared=True):
            raise PrepareError(f"--out {out} is in use by another prepare run (or by the workers of a stopped one, "
                               "still ending); wait for it to finish, or choose another --out")
        yield lock
    finally:
        lock.release()


def _resolve_skull_strip(skull_strip: str, masks: Path | None) -> str:
    if skull_strip not in SKULL_STRIP_CHOICES:
        raise PrepareError(f"--skull-strip must be one of {', '.join(SKULL_STRIP_CHOICES)}, got {skull_strip!r}")
    if skull_strip == "mask" and masks is None:
        raise PrepareError("--skull-strip mask needs --masks DIR (the brain masks or label maps)")
    if skull_strip in ("deepbet", "none") and masks is not None:
        raise PrepareError(f"--masks is only used with --skull-strip auto or mask; drop --masks or --skull-strip {skull_strip}")
    strip = ("mask" if masks is not None else "deepbet") if skull_strip == "auto" else skull_strip
    # Checked without importing it here: deepbet imports torch, which only the workers need.
    if strip == "deepbet" and importlib.util.find_spec("deepbet") is None:
        raise PrepareError("brain extraction needs the deepbet package (pip install deepbet); or give --masks DIR, "
                           "or use --skull-strip none")
    return strip


def _check_folders(images: Path, out: Path, masks: Path | None, covariate_files: Sequence[Path]) -> None:
    if not images.is_dir():
        raise PrepareError(f"input folder {images} does not exist or is not a folder; give a folder of NIfTI files or a BIDS root")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} exists and is not a folder; choose a new folder for the prepared dataset")
    target = out.resolve()
    for name, folder in (("input folder", images), ("--masks folder", masks)):
        if folder is None:
            continue
        source = folder.resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise PrepareError(f"--out {out} and the {name} {folder} overlap; inputs are never written to, so choose an "
                               "output folder outside the input (and not containing it)")
    for path in covariate_files:
        if path.resolve().is_relative_to(target):
            raise PrepareError(f"covariate file {path} is inside --out {out}, which prepare rewrites; move it out first")


def _check_same_dataset(out: Path, parameters: dict[str, Any]) -> None:
    """Refuse to resume `out` with options that would change what its dataset holds (it would be rebuilt in place)."""
    path = out / "prepare.json"
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
        earlier = {key: record[key] for key in ("preset",) if key in record} | record.get("parameters", {})
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise PrepareError(f"{path} cannot be read ({error}); it records how {out} was prepared: restore it, choose "
                           "another --out, or pass --force to prepare the dataset again") from None
    differences = [f"{option} {_shown(earlier[key])} before, {_shown(parameters[key])} now"
                   for key, option in DATASET_OPTIONS.items() if key in earlier and earlier[key] != parameters[key]]
    if differences:
        raise PrepareError(f"--out {out} holds a dataset prepared with other options ({'; '.join(differences)}); rerun "
                           "with the earlier options to resume it, choose another --out, or pass --force to rebuild it "
                           "with the new ones (its files are replaced)")


def _shown(value: Any) -> str:
    """A recorded parameter as the command line would give it: 0.8,0.1,0.1 for a split, on/off for a switch."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == []:
        return "none"
    if isinstance(value, list):
        return ",".join(":".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
                        for v in value)
    return str(value)


def _input_record(scan: Scan, checksums: dict[str, str]) -> dict[str, Any]:
    record = {"image": {"path": str(scan.image.resolve()), "sha256": _sha256(scan.image, checksums)}, "mask": None}
    if scan.mask is not None:
        record["mask"] = {"path": str(scan.mask.resolve()), "sha256": _sha256(scan.mask, checksums)}
    return record


def _sha256(path: Path, cache: dict[str, str]) -> str:
    key = str(path.resolve())
    if key not in cache:
        try:
            cache[key] = sha256(path)
        except OSError as error:  # an unreadable file is reported by the worker
            cache[key] = f"unreadable: {error.strerror}"
    return cache[key]


def _is_done(out: Path, subject: str, inputs: dict[str, Any], recipe: list[dict[str, Any]]) -> bool:
    try:
        record = read_json(out / "records" / f"{subject}.json")
    except (OSError, ValueError):  # a damaged record (DamagedFileError is a ValueError): prepare the subject again
        return False
    if record.get("inputs") != inputs or record.get("recipe") != recipe:
        return False
    outputs = {key: rel for key, rel in record.get("outputs", {}).items() if rel}
    if not all((out / rel).is_file() for rel in outputs.values()):
        return False
    recorded = record.get("output_sha256")  # records written before it: the files' presence is all that is known
    return recorded is None or all(recorded.get(key) == sha256(out / rel) for key, rel in outputs.items())


def _split(records, table: Covariates, fractions, seed: int) -> tuple[dict[str, str], dict[str, Any]]:
    age_name = next((n for n in table.names if n.lower() == "age"), None)
    ages = None
    if age_name is not None:
        ages = {s: table.values[s][age_name] for s in records if isinstance(table.values.get(s, {}).get(age_name), float)}
    assignment = assign_splits(list(records), fractions, seed, ages)
    counts = {name: sum(v == name for v in assignment.values()) for name in SPLITS}
    return assignment, {
        "fractions": list(fractions), "seed": seed, "stratified_by": age_name if ages else None,
        "method": "sorted by age, binned, shuffled within bins with the seed, dealt to the split furthest below its share",
        "counts": counts,
    }


def _write_manifest(path: Path, records, assignment: dict[str, str], table: Covariates) -> None:
    rows = []
    for subject, record in records.items():
        outputs = record["outputs"]
        row = {"subject": subject, "image": outputs["image"], "mask": outputs["mask"], "labels": outputs["labels"],
               "split": assignment[subject]}
        row.update({name: table.values.get(subject, {}).get(name, "") for name in table.names})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["subject", "image", "mask", "labels", "split", *table.names])
    write_text_atomic(path, frame.to_csv(index=False))


def _write_report(path: Path, entries: Sequence[Skip]) -> None:
    frame = pd.DataFrame([dataclasses.asdict(e) for e in entries], columns=["subject", "input", "reason"])
    write_text_atomic(path, frame.to_csv(index=False))
