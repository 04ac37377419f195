"""mriflow.evaluate.fidelity: what an anatomy predictor measures on the generated volumes, against what was asked for."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation_helpers import write_evaluation_set, write_fakes
from mriflow.data.io import load_volume


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_evaluation_set(tmp_path_factory.mktemp("prepared"))


def test_requested_volumes_are_compared_with_the_measured_ones(prepared, tmp_path):
    class MeanIntensity:  # a predictor whose "ventricles" are the mean intensity, in ml
        name, weights_sha256, sex_categories = "mean-intensity", None, ("F", "M")

        def features(self, volumes):
            return np.asarray(volumes).reshape(len(volumes), -1)[:, :8]

        def predict(self, volumes):
            means = np.asarray(volumes).reshape(len(volumes), -1).mean(1).astype(np.float64)
            return {"age": np.full(len(volumes), 50.0), "sex_prob": np.full(len(volumes), 0.5),
                    "ventricles_ml": 1000 * means, "total_brain_ml": np.full(len(volumes), 1500.0)}

    subjects = [f"sub{i:02d}" for i in range(10, 18)]
    means = {s: float(load_volume(prepared / "images" / f"{s}.nii.gz")[0].mean()) for s in subjects}
    fakes = write_fakes(tmp_path / "fakes", prepared, subjects,  # requested = 3 x measured - 5: r = 1
                        sidecar=lambda i, s: {"covariates": {"age": 40, "ventricles": 3000 * means[s] - 5,
                                                             "total_brain": 1000 + i}})
    from mriflow.evaluate.fidelity import conditional_fidelity, predict_anatomy
    from mriflow.evaluate.sets import load_sets

    sets = load_sets(prepared, fakes, tmp_path / "out")
    fidelity = conditional_fidelity(predict_anatomy(MeanIntensity(), sets), sets).record()
    ventricles = fidelity["ventricles_ml"]["requested_vs_measured"]
    assert ventricles["covariate"] == "ventricles" and ventricles["generated"]["count"] == 8
    assert ventricles["generated"]["pearson_r"] == pytest.approx(1.0, abs=1e-9)
    assert ventricles["real"] is None  # the real subjects carry no "ventricles" column here
    assert fidelity["total_brain_ml"]["requested_vs_measured"]["generated"] is None  # measured is constant: no r


def test_age_and_sex_agreement_are_measured_against_the_requested_and_the_true_covariates(prepared, tmp_path):
    from mriflow.evaluate.fidelity import AnatomyPredictions, conditional_fidelity
    from mriflow.evaluate.sets import load_sets

    subjects = [f"sub{i:02d}" for i in range(10, 14)]
    fakes = write_fakes(tmp_path / "fakes", prepared, subjects,
                        sidecar=lambda i, s: {"covariates": {"age": [30, 40, 50, 60][i], "sex": "FMFM"[i]}})
    sets = load_sets(prepared, fakes, tmp_path / "out")
    real_ages = sets.real_rows["age"].to_numpy(np.float64)  # 20 + 3 * seed, from the manifest
    real_sexes = sets.real_rows["sex"].tolist()
    predicted = AnatomyPredictions(
        predictor=type("Predictor", (), {"name": "scripted", "weights_sha256": "abc", "sex_categories": ("F", "M")})(),
        real={"age": real_ages + 2.0, "sex_prob": np.array([0.9 if s == "M" else 0.1 for s in real_sexes])},
        generated={"age": np.array([31.0, 39.0, 53.0, 61.0]), "sex_prob": np.array([0.2, 0.4, 0.3, 0.8])})
    fidelity = conditional_fidelity(predicted, sets).record()
    assert fidelity["predictor"] == "scripted" and fidelity["predictor_weights_sha256"] == "abc"
    generated, real = fidelity["age"]["generated"], fidelity["age"]["real"]
    assert generated["mae"] == pytest.approx((1 + 1 + 3 + 1) / 4) and generated["count"] == 4
    assert generated["target"] == [30.0, 40.0, 50.0, 60.0] and generated["pearson_r"] > 0.98
    assert real["mae"] == pytest.approx(2.0) and real["pearson_r"] == pytest.approx(1.0)
    assert real["count"] == len(real_ages)
    assert fidelity["sex"]["generated"] == {"accuracy": 0.75, "count": 4}  # the second (M, p = 0.4) is missed
    assert fidelity["sex"]["real"] == {"accuracy": 1.0, "count": len(real_sexes)}


def test_conditional_fidelity_is_skipped_without_requested_covariates_or_a_predictor(prepared, tmp_path):
    from mriflow.evaluate.fidelity import AnatomyPredictions, conditional_fidelity
    from mriflow.evaluate.sets import load_sets

    plain = load_sets(prepared, write_fakes(tmp_path / "plain", prepared, ["sub10", "sub11"]), tmp_path / "out")
    assert conditional_fidelity(AnatomyPredictions(None, "none here"), plain).record() == {
        "skipped": "the generated volumes carry no age or sex in JSON sidecars (x.nii.gz -> x.json)"}
    asked = load_sets(prepared, write_fakes(tmp_path / "asked", prepared, ["sub10", "sub11"],
                                            sidecar=lambda i, s: {"covariates": {"age": 40}}), tmp_path / "out")
    assert conditional_fidelity(AnatomyPredictions(None, "no network for this grid"), asked).record() == {
        "skipped": "no anatomy predictor with age/sex heads: no network for this grid"}
