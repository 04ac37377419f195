"""Inter-slice consistency: a smooth volume reads as isotropic, slices that disagree read as seams, 3D smoothing does not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from evaluation_helpers import FAST, write_evaluation_set, write_fakes
from mriflow.evaluate.consistency import SLICE_AXIS, inter_slice_consistency, interior, second_difference_ratio
from mriflow.evaluate.sets import load_sets

SHAPE = (40, 48, 40)


def smooth_field(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An isotropic smooth random field (Gaussian-filtered white noise, unit sd) and a ball-shaped 'brain'."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.5)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij"))
    return field / field.std(), (grid**2).sum(0) <= 16**2


def slice_offsets(volume: np.ndarray, sd: float, seed: int) -> np.ndarray:
    """Each axial slice given its own random offset: what independently drawn slices do to a volume."""
    return volume + np.random.default_rng(seed).normal(0, sd, (1, 1, volume.shape[SLICE_AXIS]))


def slice_shifts(volume: np.ndarray, seed: int) -> np.ndarray:
    """Each axial slice moved in its plane by up to one voxel: slices that do not line up."""
    rng = np.random.default_rng(seed)
    return np.stack([np.roll(volume[:, :, k], tuple(rng.integers(-1, 2, 2)), axis=(0, 1))
                     for k in range(volume.shape[2])], -1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_smooth_isotropic_volume_gives_about_one_and_disagreeing_slices_a_clearly_larger_ratio(seed):
    field, brain = smooth_field(seed)
    isotropic = second_difference_ratio(field, brain)
    assert abs(isotropic - 1.0) < 0.15  # the same roughness along every axis
    assert second_difference_ratio(slice_offsets(field, 0.2, seed), brain) > 2 * isotropic
    assert second_difference_ratio(slice_shifts(field, seed), brain) > 3 * isotropic
    # the ratio is along the slice axis: offsets along another axis do not raise it
    across = field + np.random.default_rng(seed).normal(0, 0.2, (SHAPE[0], 1, 1))
    assert second_difference_ratio(across, brain) < isotropic
    assert second_difference_ratio(across, brain, axis=0) > 2 * second_difference_ratio(field, brain, axis=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_3d_models_smoothing_is_not_penalised(seed):
    field, brain = smooth_field(seed)
    blurred = ndimage.gaussian_filter(field, 1.0)  # a decoder's blur: all axes alike
    assert abs(second_difference_ratio(blurred, brain) - second_difference_ratio(field, brain)) < 0.15


def test_the_brain_is_measured_inside_and_a_flat_volume_is_nan():
    field, brain = smooth_field(0)
    voxels = interior(brain)
    assert voxels.sum() < brain.sum() and not (voxels & ~brain).any()
    outside = np.where(brain, field, np.random.default_rng(0).normal(0, 50, SHAPE) * (np.arange(SHAPE[2]) % 2))
    assert second_difference_ratio(outside, brain) == pytest.approx(second_difference_ratio(field, brain))
    assert np.isnan(second_difference_ratio(np.ones(SHAPE), brain))
    with pytest.raises(ValueError, match="no interior voxels"):
        second_difference_ratio(field, np.zeros(SHAPE, bool))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_evaluation_set(tmp_path_factory.mktemp("prepared"))


def test_the_evaluation_step_sets_generated_seams_against_the_real_yardstick(prepared, tmp_path):
    train = [f"sub{i:02d}" for i in range(10)]
    copies = write_fakes(tmp_path / "copies", prepared, train)  # real volumes: no seams
    seams = write_fakes(tmp_path / "seams", prepared, train, transform=lambda v: np.clip(slice_shifts(v, 0), 0, 1))
    kept = inter_slice_consistency(load_sets(prepared, copies, tmp_path / "a"), None, n=6, rounds=5, seed=0).record()
    seamed = inter_slice_consistency(load_sets(prepared, seams, tmp_path / "b"), None, n=6, rounds=5, seed=0).record()

    assert list(kept["sets"]) == ["real", "other", "generated"] and kept["axis_name"] == "axial (S-I)"
    assert kept["sets"]["real"]["count"] == 8 and kept["sets"]["generated"]["count"] == 10
    yardstick = abs(kept["sets"]["other"]["difference"]["mean"]) + 2 * kept["sets"]["other"]["difference"]["sd"]
    assert abs(kept["sets"]["generated"]["difference"]["mean"]) < yardstick + 0.2
    assert seamed["sets"]["generated"]["difference"]["mean"] > 3 * yardstick + 0.5
    assert seamed["sets"]["real"] == kept["sets"]["real"]  # the same draws of the same real volumes


def test_the_report_reads_the_seams_in_its_verdict(prepared, tmp_path):
    from mriflow.evaluate.generation import evaluate_generation

    train = [f"sub{i:02d}" for i in range(10)]
    seams = write_fakes(tmp_path / "seams", prepared, train, transform=lambda v: np.clip(slice_shifts(v, 1), 0, 1))
    result = evaluate_generation(prepared, seams, tmp_path / "report", **FAST)
    assert result["slice_consistency"]["sets"]["generated"]["difference"]["mean"] > 0.5
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Inter-slice consistency" in report
    assert "seams between slices" in report and "seams between slices" in (tmp_path / "report" / "report.html").read_text()
