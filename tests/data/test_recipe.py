"""The preparation recipe is data: written to prepare.json and rebuilt from it, step for step."""

from __future__ import annotations

import itertools
import json

import pytest

from mriflow.data.recipe import STEPS, Register, build_recipe, recipe_from_data, recipe_to_data


@pytest.mark.parametrize("skull_strip, n4, register", list(itertools.product(("mask", "deepbet", "none"), (False, True), (False, True))))
def test_every_recipe_is_rebuilt_from_its_json_record(skull_strip, n4, register):
    recipe = build_recipe("2mm", skull_strip=skull_strip, n4=n4, register=register)
    record = json.loads(json.dumps(recipe_to_data(recipe)))  # as prepare.json holds it: tuples are lists
    rebuilt = recipe_from_data(record)
    assert rebuilt == recipe and [type(step) for step in rebuilt] == [type(step) for step in recipe]
    assert all(isinstance(step.stages, tuple) for step in rebuilt if isinstance(step, Register))


def test_a_bad_record_is_refused_in_one_line_naming_the_step_and_parameter():
    record = recipe_to_data(build_recipe("4mm", n4=True))
    with pytest.raises(ValueError, match=r"^unknown recipe step 'smooth'; known steps: " + ", ".join(STEPS)):
        recipe_from_data(record + [{"step": "smooth"}])
    renamed = [dict(step, shrink=2) if step["step"] == "bias_field" else step for step in record]
    with pytest.raises(ValueError, match=r"^recipe step 2 \(bias_field\): unknown field\(s\) shrink; valid fields are method, "):
        recipe_from_data(renamed)
    mistyped = [dict(step, shrink_factor="4") if step["step"] == "bias_field" else step for step in record]
    with pytest.raises(ValueError, match=r'^recipe step 2 \(bias_field\): wrong value type for field "shrink_factor"'):
        recipe_from_data(mistyped)
