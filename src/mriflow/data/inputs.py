"""Finding the inputs of `mriflow prepare`: scans, their brain masks or label maps, and covariate tables.

Two input layouts are understood:

- a folder of ``.nii``/``.nii.gz`` files; the subject id is the file name up to its
  first ``_`` (``IXI012-HH-1211_T1.nii.gz`` -> ``IXI012-HH-1211``);
- a BIDS root, ``sub-<label>/[ses-<label>/]anat/*_T1w.nii[.gz]``; the subject id is
  the ``sub-`` label and ``participants.tsv`` is read as a covariate table.

Everywhere (scans, masks, table rows) a leading ``sub-`` is dropped from ids, so
BIDS-named masks and ``participant_id`` columns match the same subjects.

Nothing here reads voxels: problems found from names alone (duplicate ids, no
matching mask, covariate rows for unknown subjects, non-numeric ages) come back
as :class:`Skip` records, which `prepare` writes to ``prepare_report.csv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from mriflow.data.io import is_nifti, strip_nifti_suffix

if TYPE_CHECKING:  # pandas is imported where it is used: `generate` starts without it
    import pandas as pd

# Id columns of a covariate table, in order of preference; else the first column.
ID_COLUMNS = ("subject", "participant_id", "MRID", "subject_id")
MISSING_TOKENS = frozenset({"", "n/a", "na", "nan", "none", "null"})
# Columns with these names must hold numbers; a value that is not one is set missing and reported.
NUMERIC_COLUMNS = frozenset({"age"})


@dataclass(frozen=True)
class Skip:
    """One line of ``prepare_report.csv``: which subject and file, and why it was skipped or changed."""

    subject: str
    input: str
    reason: str


@dataclass(frozen=True)
class Scan:
    """One subject's image and, when given, its brain mask or label map."""

    subject: str
    image: Path
    mask: Path | None = None


@dataclass
class ScanSet:
    """The scans found under an input folder, plus what was refused while finding them."""

    root: Path
    layout: str  # "folder" | "bids"
    scans: list[Scan]
    skipped: list[Skip] = field(default_factory=list)
    participants: Path | None = None  # BIDS participants.tsv, read as covariates


def subject_id(file_name: str) -> str:
    """The subject id of a file: its name up to the first ``_``, without a leading ``sub-``."""
    stem = strip_nifti_suffix(Path(file_name).name)
    return strip_subject_prefix(stem.split("_", 1)[0])


def strip_subject_prefix(text: str) -> str:
    text = text.strip()
    return text[4:] if text.startswith("sub-") and len(text) > 4 else text


def is_bids_root(folder: Path) -> bool:
    """A BIDS root has a dataset_description.json or ``sub-*`` folders."""
    return (folder / "dataset_description.json").is_file() or any(
        p.is_dir() and p.name.startswith("sub-") for p in folder.iterdir()
    )


def find_scans(images: str | Path) -> ScanSet:
    """Scans under `images` (a NIfTI folder or a BIDS root), sorted by path.

    When two files map to the same subject id the first (in sorted path order) is
    kept and each later one is skipped with a reason naming both files.
    """
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist or is not a folder; give a folder of NIfTI files or a BIDS root")
    if is_bids_root(root):
        layout = "bids"
        paths = sorted(
            p for pattern in ("sub-*/anat/*_T1w.nii*", "sub-*/ses-*/anat/*_T1w.nii*")
            for p in root.glob(pattern) if is_nifti(p)
        )
        participants = root / "participants.tsv"
        participants = participants if participants.is_file() else None
    else:
        layout = "folder"
        paths = sorted(p for p in root.iterdir() if is_nifti(p) and not p.name.startswith("."))
        participants = None
    scans, skipped = _unique_subjects((subject_id(p.name), p) for p in paths)
    return ScanSet(root, layout, scans, skipped, participants)


def _unique_subjects(candidates: Iterable[tuple[str, Path]]) -> tuple[list[Scan], list[Skip]]:
    first: dict[str, Path] = {}
    skipped = []
    for subject, path in candidates:
        if subject in first:
            skipped.append(Skip(subject, str(path), f"duplicate subject id {subject!r}: {path.name} and {first[subject].name} "
                                f"map to the same subject; kept {first[subject]}, skipped this file (rename one to keep both)"))
        else:
            first[subject] = path
    return [Scan(subject, path) for subject, path in first.items()], skipped


def match_masks(scans: Sequence[Scan], masks: str | Path) -> tuple[list[Scan], list[Skip]]:
    """Attach to each scan the NIfTI under `masks` (searched recursively) with the same subject id.

    Scans without exactly one matching file are returned as skips (no mask, or
    several candidates), so a subject is never prepared with a guessed mask.
    """
    folder = Path(masks)
    if not folder.is_dir():
        raise FileNotFoundError(f"--masks {folder} does not exist or is not a folder; give the folder of brain masks or label maps")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if is_nifti(path) and not path.name.startswith("."):
            found.setdefault(subject_id(path.name), []).append(path)
    matched, skipped = [], []
    for scan in scans:
        candidates = found.get(scan.subject, [])
        if not candidates:
            skipped.append(Skip(scan.subject, str(scan.image),
                                f"no mask or label map for subject {scan.subject!r} in {folder} (expected a file named {scan.subject}_*.nii.gz)"))
        elif len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            skipped.append(Skip(scan.subject, str(scan.image), f"several masks match subject {scan.subject!r} in {folder}: {names}; keep one"))
        else:
            matched.append(replace(scan, mask=candidates[0]))
    return matched, skipped


def parse_covariate_columns(spec: str | Sequence[str] | None) -> list[tuple[str, str]] | None:
    """``"age,sex,509:ventricles"`` -> ``[("age","age"), ("sex","sex"), ("509","ventricles")]`` (source, name)."""
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    columns = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        source, _, name = item.partition(":")
        source, name = source.strip(), (name.strip() or source.strip())
        if not source:
            raise ValueError(f"--covariate-columns: empty column name in {item!r}; write COLUMN or COLUMN:NEW_NAME")
        columns.append((source, name))
    names = [name for _, name in columns]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--covariate-columns: the name(s) {', '.join(duplicates)} are given twice; rename with COLUMN:NEW_NAME")
    if not columns:
        raise ValueError("--covariate-columns is empty; give e.g. age,sex or leave it out to keep every column")
    return columns


@dataclass
class Covariates:
    """Covariate values per subject: ``values[subject][name]`` is a float, a string, or absent (missing)."""

    names: list[str]
    values: dict[str, dict[str, float | str]]
    sources: dict[str, str]  # covariate name -> the file it came from
    rows: dict[str, set[str]] = field(default_factory=dict)  # file -> the subject ids it has a row for

    def missing_rows(self, subjects: Iterable[str]) -> list[Skip]:
        """A note per subject and file that provides covariates but has no row for the subject."""
        notes = []
        for subject in subjects:
            for path in dict.fromkeys(self.sources.values()):
                if subject not in self.rows.get(path, set()):
                    names = [n for n, p in self.sources.items() if p == path]
                    notes.append(Skip(subject, path, f"no row for this subject in {Path(path).name}; {', '.join(names)} left missing"))
        return notes


DELIMITERS = ",;\t|"


def table_delimiter(path: str | Path) -> str:
    """The delimiter of a CSV/TSV: the one of `DELIMITERS` its header line holds most often (',' when it holds none: a
    single column). A sniffer guessing from the data splits a one-column file on a letter of its header."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as stream:
        header = stream.readline()
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def read_text_table(path: str | Path) -> pd.DataFrame:
    """A CSV/TSV (',' ';' tab or '|', from its header) as strings, empty cells "", column names stripped; pandas'
    error when it cannot be parsed (callers name the argument it came from)."""
    import pandas as pd  # here: half a second of start-up that `generate` does not need

    table = pd.read_csv(path, sep=table_delimiter(path), engine="python", dtype=str, keep_default_na=False,
                        skipinitialspace=True)
    table.columns = [str(c).strip() for c in table.columns]
    return table


def read_table(path: str | Path) -> tuple[pd.DataFrame, str]:
    """Read a CSV/TSV (',' ';' tab or '|', from its header) as strings with ids normalised; returns (table indexed by
    id, id column name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"covariate file {path} does not exist")
    try:
        table = read_text_table(path)
    except Exception as error:  # pandas raises several types for malformed text
        raise ValueError(f"covariate file {path} could not be read as CSV/TSV: {error}") from error
    if table.shape[1] < 1 or table.empty:
        raise ValueError(f"covariate file {path} has no rows")
    id_column = next((c for c in ID_COLUMNS if c in table.columns), table.columns[0])
    table[id_column] = table[id_column].map(strip_subject_prefix)
    return table, id_column


def read_covariates(
    paths: Sequence[str | Path],
    subjects: Iterable[str],
    columns: list[tuple[str, str]] | None = None,
) -> tuple[Covariates, list[Skip]]:
    """Merge covariate tables on subject id for the known `subjects`.

    `columns` is ``[(source column, name), ...]`` (see :func:`parse_covariate_columns`);
    None keeps every non-id column. The first file holding a column provides it.
    A named column found in no file raises ValueError. Rows for unknown subjects,
    repeated rows and non-numeric values in numeric columns (``age``, or a column
    whose values are mostly numbers) are reported; the bad value is left missing.
    """
    known = set(subjects)
    skips: list[Skip] = []
    values: dict[str, dict[str, float | str]] = {s: {} for s in known}
    sources: dict[str, str] = {}
    tables = [(Path(p), *read_table(p)) for p in paths]

    wanted = columns
    if wanted is None:
        wanted = []
        for _, table, id_column in tables:
            wanted += [(c, c) for c in table.columns if c != id_column and (c, c) not in wanted]
    for source, name in wanted:
        owners = [(path, table, id_column) for path, table, id_column in tables if source in table.columns and source != id_column]
        if not owners:
            available = sorted({c for _, t, i in tables for c in t.columns if c != i})
            shown = ", ".join(available[:30]) + (" ..." if len(available) > 30 else "")
            raise ValueError(f"covariate column {source!r} is in none of {', '.join(str(p) for p, _, _ in tables) or 'the (no) covariate files'}; "
                             f"available columns: {shown or 'none'}")
        path, table, id_column = owners[0]
        sources[name] = str(path)
        for other, _, _ in owners[1:]:
            skips.append(Skip("", str(other), f"column {source!r} is also in {path}; the values from {path} are used"))
        skips += _fill_column(values, table, id_column, source, name, path)

    for path, table, id_column in tables:
        _refuse_conflicting_rows(path, table, id_column, [source for source, _ in wanted if source in table.columns])
        seen: set[str] = set()
        for subject in table[id_column]:
            if subject in seen:
                skips.append(Skip(subject, str(path), f"repeated row for subject {subject!r} (same values); the first row is used"))
            elif subject not in known:
                skips.append(Skip(subject, str(path), f"covariate row for unknown subject {subject!r} (no image with this id); row ignored"))
            seen.add(subject)
    rows = {str(path): set(table[id_column]) for path, table, id_column in tables}
    names = [name for _, name in wanted]
    if columns is None and tables and "age" not in names:
        skips.append(Skip("", ", ".join(str(p) for p, _, _ in tables),
                          f"no 'age' column in the covariate file(s) (columns: {', '.join(names) or 'none'}); models "
                          "conditioned on age need one: name yours with --covariate-columns COLUMN:age"))
    return Covariates(names, values, sources, rows), skips


def _refuse_conflicting_rows(path: Path, table: pd.DataFrame, id_column: str, used: Sequence[str]) -> None:
    """Repeated rows of one subject must agree on every covariate used: which one is right cannot be guessed."""
    repeated = table[table.duplicated(id_column, keep=False)]
    for subject, rows in repeated.groupby(id_column, sort=False):
        differing = [c for c in used if rows[c].str.strip().nunique() > 1]
        if differing:
            shown = "; ".join(f"{c}: {', '.join(map(repr, rows[c].str.strip().unique()))}" for c in differing)
            raise ValueError(f"covariate file {path}: subject {subject!r} has {len(rows)} rows that disagree ({shown}); "
                             "keep one row per subject and prepare again")


def _fill_column(values, table: pd.DataFrame, id_column: str, source: str, name: str, path: Path) -> list[Skip]:
    rows = table.drop_duplicates(id_column, keep="first")
    present = {s: v.strip() for s, v in zip(rows[id_column], rows[source]) if s in values and v.strip().lower() not in MISSING_TOKENS}
    numbers = {s: _to_number(v) for s, v in present.items()}
    parsed = sum(n is not None for n in numbers.values())
    numeric = name.lower() in NUMERIC_COLUMNS or source.lower() in NUMERIC_COLUMNS or (present and parsed > len(present) / 2)
    skips = []
    for subject, text in present.items():
        problem = _implausible(name, text, numbers[subject]) if numeric or name.lower() == "sex" else None
        if problem:
            skips.append(Skip(subject, str(path), f"{source} value {text!r} {problem}; {name} left missing for this subject"))
        elif not numeric:
            values[subject][name] = text
        elif numbers[subject] is None:
            skips.append(Skip(subject, str(path), f"{source} value {text!r} is not a number; {name} left missing for this subject"))
        else:
            values[subject][name] = numbers[subject]
    return skips


AGE_RANGE = (0.0, 120.0)  # years; outside it an age is a typo or another unit
SEX_VALUES = {"f", "m", "female", "male", "0", "1", "2"}  # codes: 0/1 or 1/2, whichever a dataset uses


def _implausible(name: str, text: str, number: float | None) -> str | None:
    """Why a value of a covariate mriflow knows (age, sex) cannot be right, or None: what generate refuses, prepare
    notes and leaves missing, so a model never learns from it."""
    if name.lower() == "age" and number is not None and not AGE_RANGE[0] <= number <= AGE_RANGE[1]:
        return f"is not an age in years ({AGE_RANGE[0]:g} to {AGE_RANGE[1]:g})"
    if name.lower() == "sex" and text.strip().lower() not in SEX_VALUES:
        return "is not a sex mriflow reads (F, M, female, male, or a code 0, 1, 2)"
    return None


def _to_number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
