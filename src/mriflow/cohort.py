"""A cohort: one row of covariates per sample (a CSV), and the file names its id column gives the samples.

    >>> rows = read_cohort("cohort.csv")        # [{"id": "young-f", "age": 25, "sex": "F"}, ...]
    >>> cohort_names(rows)                      # ["young-f", ...]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from mriflow.data.inputs import table_delimiter
from mriflow.generate_io import sample_name
from mriflow.models.conditioning import parse_value
from mriflow.utils.text import verb

ID_COLUMNS = ("id", "subject", "sample")  # a cohort column that names its row's sample (the first present)


def read_cohort(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a cohort CSV, one sample each: a column per covariate of the model (empty = absent) and
    optionally an id column (`id`, `subject` or `sample`) that names the sample's files."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--covariates {path}: no such file; give a CSV with one row per sample "
                                "(columns: the model's covariates, e.g. age,sex, and optionally id)")
    try:  # ',' ';' tab or '|', from the header line, as prepare reads covariate files
        table = pd.read_csv(path, sep=table_delimiter(path), engine="python", dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise ValueError(f"--covariates {path}: not a readable CSV ({error})") from None
    if table.empty:
        raise ValueError(f"--covariates {path}: no rows; give one row per sample to draw")
    table.columns = [str(c).strip() for c in table.columns]
    if any(c == "" or c.startswith("Unnamed:") for c in table.columns) or len(set(table.columns)) < len(table.columns):
        raise ValueError(f"--covariates {path}: every column needs a name of its own in the header line "
                         f"(got {', '.join(map(repr, table.columns))})")
    table = table.fillna("")  # a row with fewer cells than the header: the missing ones are empty (absent)
    rows = []
    for record in table.to_dict("records"):
        rows.append({k: None if v.strip() == "" else parse_value(v.strip()) for k, v in record.items()})
    return rows


def cohort_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """File names of a cohort's samples: the id column's values when there is one, else sample_XXXXX."""
    column = next((c for c in ID_COLUMNS if c in rows[0]), None)
    if column is None:
        return [sample_name(i) for i in range(len(rows))]
    names = [str(row[column]) if row[column] is not None else "" for row in rows]
    for i, name in enumerate(names):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name.endswith((".nii", ".gz", ".json", "_labels")):
            raise ValueError(f"cohort row {i + 1}: {column} {name!r} cannot name a file; use letters, digits, "
                             "'.', '_' and '-' (and no .nii/.json/_labels ending: _labels names label maps)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"cohort: {column} {', '.join(repeated[:5])} {verb(len(repeated), 'appears', 'appear')} more "
                         "than once; ids must be unique")
    if any(name in ("generate", "montage") for name in names):
        raise ValueError(f"cohort: {column} 'generate' and 'montage' are taken by the run's own files")
    return names
