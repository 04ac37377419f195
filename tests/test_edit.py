"""Counterfactual edits by inverting the flow (mriflow.edit): the round trip comes back to the scan, an edit moves it
toward the new covariates, and what cannot be inverted is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import train_tiny_image_flow
from mriflow.data.io import load_volume
from mriflow.edit import DETAILS, edit_volume, encode_volume, integrate, move_detail, transfer_detail
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
    np.testing.assert_allclose(result.difference[0], result.edited[0] - volume, atol=1e-6)  # the change to the scan
    assert result.settings["guidance"] == 1.0 and result.settings["detail"] == "moved" and result.settings["source_covariates"] == {"age": 27, "sex": "M"}


def test_an_edit_keeps_the_scans_own_detail_and_an_unchanged_one_is_the_scan(model):
    """detail="scan": the scan plus (model edit − round trip), so what the model cannot represent is kept and an edit
    under unchanged covariates returns the scan itself; detail="model" returns the model's drawing."""
    generator, data = model
    volume, _ = load_volume(data / "images" / "sub01.nii.gz")
    source = {"age": 27, "sex": "M"}
    kept = edit_volume(generator, volume, source, [source, {"age": 60}], steps=8, detail="scan")
    np.testing.assert_array_equal(kept.edited[0], volume)  # unchanged: the scan itself, not its round trip
    inside = (kept.drawn[1] > 0) & (volume > 0)
    expected = np.clip(volume + kept.drawn[1] - kept.round_trip, 0, 1)
    np.testing.assert_allclose(kept.edited[1][inside], expected[inside], atol=1e-6)  # the scan moved by the edit
    assert np.all(kept.edited[1][(kept.drawn[1] == 0) & (kept.round_trip > 0)] == 0)  # what the edit emptied
    own = edit_volume(generator, volume, source, [source, {"age": 60}], steps=8, detail="model")
    assert own.settings["detail"] == "model"
    np.testing.assert_array_equal(own.edited[1], own.drawn[1])
    np.testing.assert_allclose(own.difference[1], own.drawn[1] - own.round_trip)  # against the model's round trip
    assert np.abs(own.edited[0] - volume).mean() > np.abs(kept.edited[0] - volume).mean()
    moved = edit_volume(generator, volume, source, [source, {"age": 60}], steps=8)  # the default
    np.testing.assert_array_equal(moved.edited[0], volume)  # unchanged: the scan itself here too
    np.testing.assert_allclose(moved.difference[1], moved.edited[1] - volume, atol=1e-6)
    with pytest.raises(ValueError, match="--detail sharp: choose one of scan, moved, model"):
        edit_volume(generator, volume, source, [{"age": 60}], detail="sharp")


def test_detail_transfer_follows_the_edited_brain_outline():
    """Where the edited brain ends the output is 0 even if the scan had brain there; where it grows, the edit shows."""
    scan = np.zeros((12, 12, 12), np.float32)
    scan[2:10, 2:10, 2:10] = 0.6
    round_trip = np.where(scan > 0, 0.5, 0).astype(np.float32)
    edited = np.zeros_like(scan)
    edited[3:11, 2:10, 2:10] = 0.5  # shifted by one voxel
    edited[5, 5, 5] = 0.2  # a darker spot inside
    out = transfer_detail(scan, round_trip, edited)
    assert np.all(out[2] == 0)  # the scan's slab the edit left
    assert np.all(out[:2] == 0) and np.all(out[11:] == 0)  # outside both brains
    np.testing.assert_array_equal(transfer_detail(scan, round_trip, round_trip), scan)  # nothing changed: the scan
    np.testing.assert_allclose(out[10, 5, 5], 0.5)  # grown: the edit itself (scan 0, round trip 0)
    np.testing.assert_allclose(out[6, 6, 6], 0.6)  # unchanged inside: the scan's value
    np.testing.assert_allclose(out[5, 5, 5], 0.3)  # the change added to the scan


def test_moved_detail_follows_the_anatomy_the_edit_moved():
    """detail="moved": when the edit shifts a structure, the scan's own texture moves with it (to where a shifted
    scan has it), where adding the change would leave the texture in its old place; unchanged, the scan itself."""
    from scipy import ndimage

    z, y, x = np.indices((24, 28, 24)).astype(np.float32)

    def brain(centre: float) -> np.ndarray:  # a smooth model-like drawing: a ball with a bright soft core
        r = np.sqrt((z - centre) ** 2 + (y - 14) ** 2 + (x - 12) ** 2)
        return np.where(r < 9, 0.3 + 0.5 * np.exp(-(r / 6) ** 2), 0).astype(np.float32)

    round_trip, edited = brain(11), brain(13)  # the edit moves the brain two voxels along the first axis
    texture = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(round_trip.shape), 0.7) * 0.1
    scan = np.where(round_trip > 0, (round_trip + texture).clip(0.01, 1), 0).astype(np.float32)
    shifted = np.roll(scan, 2, axis=0)  # the scan as the edit would have it: its detail two voxels further
    inner = ndimage.binary_erosion(edited > 0, iterations=3)
    moved, added = move_detail(scan, round_trip, edited), transfer_detail(scan, round_trip, edited)
    follows = lambda out: np.corrcoef((out - edited)[inner], (shifted - edited)[inner])[0, 1]  # noqa: E731
    assert follows(moved) > 0.7 and follows(added) < 0.4  # the texture went with the anatomy only when moved
    assert np.abs(moved - shifted)[inner].mean() < 0.6 * np.abs(added - shifted)[inner].mean()
    assert np.all(moved[edited == 0] == 0) and moved.min() >= 0 and moved.max() <= 1
    np.testing.assert_array_equal(move_detail(scan, round_trip, round_trip), scan)  # nothing changed: the scan
    assert set(DETAILS) == {"scan", "moved", "model"}


def test_a_cubic_warp_keeps_more_fine_detail_than_a_linear_one():
    """warp: moving fine texture by half a voxel averages neighbours when linear; cubic splines keep more of it."""
    from scipy import ndimage

    from mriflow.edit import sample_points, warp

    texture = ndimage.gaussian_filter(np.random.default_rng(1).standard_normal((20, 20, 20)), 0.6).astype(np.float32)
    points = sample_points(np.full((20, 20, 20, 3), 0.5, np.float32))
    detail = lambda v: np.abs(ndimage.laplace(v))[4:-4, 4:-4, 4:-4].mean()  # noqa: E731
    linear, cubic = detail(warp(texture, points, 1)), detail(warp(texture, points, 3))
    assert cubic > 1.3 * linear and cubic < 1.05 * detail(texture)
    np.testing.assert_allclose(warp(texture, sample_points(np.zeros((20, 20, 20, 3), np.float32)), 3), texture,
                               atol=1e-4)  # no displacement: the volume itself


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
