"""Counterfactual edits by inverting the flow (mriflow.edit): the round trip comes back to the scan, an edit moves it
toward the new covariates, and what cannot be inverted is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import train_tiny_image_flow
from mriflow.data.io import load_volume
from mriflow.edit import edit_volume, encode_volume, integrate
from mriflow.generate import load_generator

SHAPE = (16, 20, 16)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny image-space flow (Haar packet, preconditioned prediction) trained a few steps on phantoms."""
    data, run = train_tiny_image_flow(tmp_path_factory.mktemp("edit"), SHAPE, max_steps=4)
    return load_generator(run, "cpu"), data


def test_integrating_back_and_forth_on_one_grid_comes_back_to_the_start(model):
    generator, data = model
    volume, _ = load_volume(data / "images" / "sub00.nii.gz")
    x1 = encode_volume(generator, volume)
    grid = generator.family.path.time_grid(64, 1.0)
    condition = (torch.tensor([0.0, 1.0]), torch.tensor([True, True]))
    x0 = integrate(generator, x1, condition, grid.flip(0), "heun")
    back = integrate(generator, x0, condition, grid, "heun")
    assert (back - x1).abs().max() < 1e-2 * x1.abs().max()  # the discretisation's error only
    assert (x0 - x1).abs().mean() > 0.1  # it did travel to the noise end


def test_an_edit_keeps_the_person_and_follows_the_new_covariates_of_its_own_request(model):
    generator, data = model
    volume, _ = load_volume(data / "images" / "sub01.nii.gz")
    result = edit_volume(generator, volume, {"age": 27, "sex": "M"}, [{"age": 50}, {"sex": "F"}], steps=16)
    assert result.targets == [{"age": 50, "sex": "M"}, {"age": 27, "sex": "F"}]  # the rest kept from the source
    assert len(result.edited) == len(result.difference) == 2 and result.round_trip.shape == SHAPE
    assert result.source.min() >= 0 and result.source.max() <= 1
    correlation = np.corrcoef(result.round_trip.ravel(), result.source.ravel())[0, 1]
    assert correlation > 0.95  # the round trip is the scan, to the solver's error
    np.testing.assert_allclose(result.difference[0], result.edited[0] - result.round_trip)
    assert result.settings["guidance"] == 1.0 and result.settings["source_covariates"] == {"age": 27, "sex": "M"}


def test_what_cannot_be_inverted_is_refused(model, tmp_path):
    generator, data = model
    volume, _ = load_volume(data / "images" / "sub01.nii.gz")
    with pytest.raises(ValueError, match="fixed grid to run backwards|choose one of euler, heun"):
        edit_volume(generator, volume, {"age": 30}, [{"age": 60}], solver="dopri5")
    with pytest.raises(ValueError, match="grid .* is not the model's"):
        edit_volume(generator, np.zeros((8, 8, 8)), {"age": 30}, [{"age": 60}])
    with pytest.raises(ValueError, match="unknown covariate"):
        edit_volume(generator, volume, {"age": 30}, [{"height": 180}])


def test_a_guided_edit_still_comes_back_and_changes_more_than_an_unguided_one(model):
    """Guidance both ways is still an ODE: the round trip returns (to the solver's error) while the edit moves further."""
    generator, data = model
    volume, _ = load_volume(data / "images" / "sub01.nii.gz")
    plain = edit_volume(generator, volume, {"age": 27, "sex": "M"}, [{"age": 50}], steps=32)
    guided = edit_volume(generator, volume, {"age": 27, "sex": "M"}, [{"age": 50}], steps=32, guidance=3.0)
    assert guided.settings["guidance"] == 3.0
    assert np.corrcoef(guided.round_trip.ravel(), guided.source.ravel())[0, 1] > 0.9
    assert np.abs(guided.difference[0]).mean() > 1.2 * np.abs(plain.difference[0]).mean()
    x1 = encode_volume(generator, volume)
    grid = generator.family.path.time_grid(64, 1.0)
    condition = (torch.tensor([0.0, 1.0]), torch.tensor([True, True]))
    back = integrate(generator, integrate(generator, x1, condition, grid.flip(0), "heun", 3.0), condition, grid, "heun", 3.0)
    assert (back - x1).abs().max() < 2e-2 * x1.abs().max()
