"""Morphometric fidelity separates volumes drawn like the real ones from shrunken ones."""

from __future__ import annotations

import numpy as np
import pytest

from mriflow.evaluate.morphometry import cohens_d, morphometry


def draw(rng, count, scale=1.0):
    return {"ventricles": rng.normal(30, 8, count) * scale, "grey_matter": rng.normal(650, 50, count) * scale,
            "white_matter": rng.normal(480, 40, count)}


def test_a_shrunken_region_is_far_beyond_real_vs_real_and_a_faithful_one_is_not():
    rng = np.random.default_rng(0)
    real, other, faithful = draw(rng, 60), draw(rng, 60), draw(rng, 60)
    shrunk = {**draw(rng, 60), "grey_matter": rng.normal(650, 50, 60) * 0.85}
    good, bad = morphometry(real, other, faithful, seed=1), morphometry(real, other, shrunk, seed=1)
    grey, grey_bad = good["regions"]["grey_matter"], bad["regions"]["grey_matter"]
    assert grey_bad["w1_generated"]["value"] > 3 * (grey["w1_real_vs_real"]["value"] + grey["w1_real_vs_real"]["sd"])
    assert grey_bad["effect_size_generated"] < -1.5 < grey["effect_size_generated"]
    assert bad["frechet_generated"]["value"] > 5 * good["frechet_real_vs_real"]["value"]
    assert good["frechet_generated"]["value"] < 3 * (good["frechet_real_vs_real"]["value"] + good["frechet_real_vs_real"]["sd"])
    assert good["counts"] == {"real": 60, "other": 60, "generated": 60}


def test_effect_size_is_the_mean_difference_in_pooled_sds():
    assert cohens_d(np.array([2.0, 4.0]), np.array([0.0, 2.0])) == pytest.approx(2 / np.sqrt(2))
    assert cohens_d(np.ones(3), np.ones(4)) == 0.0
    with pytest.raises(ValueError, match="same regions"):
        morphometry({"a": np.ones(3)}, {"b": np.ones(3)}, {"a": np.ones(3)})
