"""Property-based fuzzing of what reads a user's text (issue 25): the covariate request parser, cohort CSVs, manifests
and the sampler settings. Whatever the input, each either returns a well-formed result or raises one of the errors the
command line turns into one line (ValueError, OSError) with a message; never another exception, never a crash.
Hypothesis draws the inputs from a fixed seed (derandomize), so a failure repeats."""

from __future__ import annotations

import math
import string

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mriflow.cohort import read_cohort
from mriflow.data.dataset import Covariate, CovariateSchema, read_manifest
from mriflow.models.conditioning import parse_value, resolve_request

FUZZ = settings(max_examples=150, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SCHEMA = CovariateSchema([Covariate("age", "continuous", 50.0, 15.0, 20.0, 80.0),
                          Covariate("sex", "categorical", categories=["F", "M"])])
TEXT = st.text(alphabet=string.printable + "éß€\u00a0;", max_size=40)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   TEXT, TEXT.map(parse_value))


@FUZZ
@given(st.dictionaries(st.sampled_from(["age", "sex", "height", ""]), VALUES, max_size=3))
def test_a_covariate_request_is_encoded_finite_or_refused_with_a_message(request):
    try:
        values, present = resolve_request(SCHEMA, request)
    except ValueError as error:
        assert str(error)
        return
    assert values.shape == present.shape == (2,) and bool(torch.isfinite(values).all())
    for k, name in enumerate(SCHEMA.names):
        assert bool(present[k]) == (request.get(name) is not None)


@FUZZ
@given(TEXT)
def test_parse_value_gives_a_finite_number_or_the_text(text):
    value = parse_value(text)
    assert (isinstance(value, float) and math.isfinite(value)) or value == text


CSV_CELL = st.text(alphabet=string.ascii_letters + string.digits + " .-_,;\"'\t", max_size=8)


@FUZZ
@given(st.lists(st.lists(CSV_CELL, min_size=1, max_size=4), min_size=0, max_size=5),
       st.sampled_from([",", ";", "\t", "|"]))
def test_a_cohort_file_reads_as_rows_or_is_refused_naming_it(tmp_path_factory, rows, delimiter):
    path = tmp_path_factory.mktemp("cohort") / "cohort.csv"
    path.write_text("\n".join(delimiter.join(row) for row in rows) + "\n")
    try:
        table = read_cohort(path)
    except ValueError as error:
        assert str(path) in str(error)
        return
    assert table and all(isinstance(row, dict) for row in table)
    for row in table:
        assert all(value is None or isinstance(value, (float, str)) for value in row.values())


@FUZZ
@given(st.binary(max_size=300))
def test_a_manifest_of_any_bytes_reads_or_is_refused_naming_it(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("prepared")
    (root / "manifest.csv").write_bytes(data)
    try:
        table = read_manifest(root)
    except ValueError as error:
        assert str(root / "manifest.csv") in str(error)
        return
    assert isinstance(table, pd.DataFrame) and {"subject", "image", "mask", "split"} <= set(table.columns)


@pytest.fixture(scope="module")
def shipped():
    from mriflow.generate import load_generator

    return load_generator("4mm", "cpu", labels=False)


@FUZZ
@given(st.one_of(st.none(), st.sampled_from(["heun", "euler", "dopri5", "ddim", "rk45", "", "HEUN"]), TEXT),
       st.one_of(st.none(), st.integers(-5, 10**9)),
       st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10)))
def test_sampler_settings_are_valid_or_refused_with_a_message(shipped, solver, steps, guidance):
    try:
        chosen = shipped.sampling_settings(solver, steps, guidance)
    except ValueError as error:
        assert str(error)
        return
    assert chosen["solver"] in shipped.solvers and chosen["steps"] >= 1
    assert math.isfinite(chosen["guidance"]) and chosen["guidance"] >= 0
