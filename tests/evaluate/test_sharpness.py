"""High-frequency fidelity: real volumes read as sharp as real ones, a 1-voxel blur as blurred, added noise as noisy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from evaluation_helpers import FAST, write_evaluation_set, write_fakes
from mriflow.evaluate.sets import load_sets
from mriflow.evaluate.sharpness import gradient_magnitude, high_frequency_energy, high_frequency_fidelity


def test_the_measures_follow_their_formulas_on_a_ramp_and_a_checkerboard():
    voxels = np.zeros((8, 8, 8), bool)
    voxels[2:6, 2:6, 2:6] = True
    ramp = np.broadcast_to(np.arange(8, dtype=float)[:, None, None], (8, 8, 8))
    assert high_frequency_energy(ramp, voxels) == 0.0  # linear: no second derivative
    assert gradient_magnitude(ramp, voxels) == pytest.approx(1.0)
    checker = np.indices((8, 8, 8)).sum(0) % 2 * 1.0
    assert high_frequency_energy(checker, voxels) == pytest.approx(6.0)  # |6 neighbours − 6·centre| = 6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_evaluation_set(tmp_path_factory.mktemp("prepared"))


def test_blurred_and_noisy_sets_are_told_from_real_ones_against_the_real_yardstick(prepared, tmp_path):
    train = [f"sub{i:02d}" for i in range(10)]

    def record(name, transform):
        fakes = write_fakes(tmp_path / name, prepared, train, transform=transform)
        return high_frequency_fidelity(load_sets(prepared, fakes, tmp_path / f"{name}-out"), None, n=6, rounds=5,
                                       seed=0).record()

    copies = record("copies", lambda v: v)
    blurred = record("blurred", lambda v: ndimage.gaussian_filter(v, 1.0))
    noisy = record("noisy", lambda v: np.clip(v + np.random.default_rng(0).normal(0, 0.05, v.shape) * (v > 0), 0, 1))
    assert list(copies["sets"]) == ["real", "other", "generated"]
    yardstick = copies["sets"]["other"]["laplacian"]["ratio"]
    assert abs(yardstick["mean"] - 1) < 0.15
    assert abs(copies["sets"]["generated"]["laplacian"]["ratio"]["mean"] - 1) < 0.15
    assert blurred["sets"]["generated"]["laplacian"]["ratio"]["mean"] < 0.7
    assert blurred["sets"]["generated"]["gradient"]["ratio"]["mean"] < yardstick["mean"]
    assert noisy["sets"]["generated"]["laplacian"]["ratio"]["mean"] > 1.3
    assert blurred["sets"]["real"] == copies["sets"]["real"]  # the same draws of the same real volumes


def test_the_report_reads_blur_in_its_verdict(prepared, tmp_path):
    from mriflow.evaluate.generation import evaluate_generation

    train = [f"sub{i:02d}" for i in range(10)]
    blurred = write_fakes(tmp_path / "blurred", prepared, train, transform=lambda v: ndimage.gaussian_filter(v, 1.0))
    result = evaluate_generation(prepared, blurred, tmp_path / "report", **FAST)
    assert result["sharpness"]["sets"]["generated"]["laplacian"]["ratio"]["mean"] < 0.7
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Sharpness (high-frequency fidelity)" in report and "blurred: less fine detail" in report
