from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from evaluation_helpers import FAST, GRID, SPLITS, write_evaluation_set, write_fakes
from mriflow.data.io import load_volume, save_volume, template_affine
from mriflow.evaluate.backbones import AnatomyBackbone
from mriflow.models.anatomy import AnatomyEncoder, AnatomyEncoderConfig, save_anatomy_encoder
from mriflow.evaluate.fidelity import anatomy_predictor
from mriflow.evaluate.generation import evaluate_generation
from mriflow.evaluate.sets import check_geometry


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_evaluation_set(tmp_path_factory.mktemp("prepared"))


def test_refuses_fakes_with_another_shape_or_affine(prepared, tmp_path):
    affine = template_affine(GRID)
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    save_volume(tmp_path / "fakes" / "shifted.nii.gz", np.zeros(GRID.shape, np.float32), shifted)
    with pytest.raises(ValueError) as error:
        evaluate_generation(prepared, tmp_path / "fakes", tmp_path / "out", **FAST)
    message = str(error.value)
    assert "shifted.nii.gz" in message and "affine do not match" in message and str((40, 48, 40)) in message
    assert str(round(shifted[0, 3], 4)) in message and str(round(affine[0, 3], 4)) in message

    save_volume(tmp_path / "small.nii.gz", np.zeros((20, 24, 20), np.float32), affine)
    with pytest.raises(ValueError, match=r"small.nii.gz: shape do not match.*shape \(20, 24, 20\)"):
        check_geometry(tmp_path / "small.nii.gz", GRID.shape, affine)
    check_geometry(prepared / "images" / "sub00.nii.gz", GRID.shape, affine + 1e-4)  # within tolerance


def test_full_evaluation_writes_report_and_flags_planted_copies(prepared, tmp_path):
    val = [f"sub{i:02d}" for i in range(10, 18)]
    fakes = write_fakes(tmp_path / "fakes", prepared, val + ["sub01", "sub04"])
    out = tmp_path / "report"
    result = evaluate_generation(prepared, fakes, out, seed=1, **FAST)

    assert list(result["columns"]) == ["real_vs_real", "real_vs_generated"]
    assert result["inputs"]["other_split"] == "val"
    assert result["settings"]["n"] == 7 and result["settings"]["bootstrap_rounds"] == 3
    for metric in ("fd", "kid", "mmd", "precision", "recall", "density", "coverage"):
        assert len(result["columns"]["real_vs_generated"][metric]["values"]) == 3
    flagged = {row["generated"]: row["voxel_nearest"] for row in result["memorization"]["table"] if row["voxel_flagged"]}
    assert flagged == {"sample_008": "sub01", "sample_009": "sub04"}
    assert result["conditional_fidelity"]["skipped"].startswith("the generated volumes carry no age")
    assert result["diversity"]["settings"]["window"] % 2 == 1

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["backbone"] == {"name": "intensity-v1", "weights_sha256": None, "feature_dim": 1264}
    markdown = (out / "report.md").read_text()
    assert "Backbone: intensity-v1" in markdown and "Real vs Generated" in markdown
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5  # bootstrap, diversity, memorization, morphometry, montage
    assert "src=\"figures" not in page  # self-contained
    assert {p.name for p in (out / "figures").iterdir()} == {"bootstrap.png", "diversity.png", "memorization.png",
                                                             "morphometry.png", "montage.png"}
    # tissue volumes from the shipped 4 mm anatomy network, whatever the feature backbone
    morphometry = result["morphometry"]
    assert set(morphometry["regions"]) == {"csf", "ventricles", "grey_matter", "white_matter", "brainstem", "total_brain"}
    assert all(part["w1_generated"]["value"] >= 0 for part in morphometry["regions"].values())
    assert "Anatomy: tissue volumes" in markdown


def test_broken_fakes_score_worse_than_real_ones(prepared, tmp_path):
    # Real vs Real compares test with the val volumes; the fakes are those val volumes with noise.
    val = [f"sub{i:02d}" for i in range(10, 18)]
    rng = np.random.default_rng(0)
    noisy = write_fakes(tmp_path / "noisy", prepared, val,
                        lambda v: np.clip(v + rng.normal(0, 0.15, v.shape), 0, 1).astype(np.float32))
    result = evaluate_generation(prepared, noisy, tmp_path / "report", **FAST)
    good, bad = result["columns"]["real_vs_real"], result["columns"]["real_vs_generated"]
    for metric, lower in result["lower_is_better"].items():
        assert (bad[metric]["mean"] > good[metric]["mean"]) == lower, metric
    assert result["memorization"]["flagged_voxel"] == 0


def test_reconstruction_column_and_conditional_fidelity(prepared, tmp_path):
    val = [f"sub{i:02d}" for i in range(10, 18)]
    fakes = write_fakes(tmp_path / "fakes", prepared, val,
                        sidecar=lambda i, s: {"covariates": {"age": 30 + i, "sex": "F", "ventricles": 20.0 + i}})
    model = AnatomyEncoder(AnatomyEncoderConfig())
    weights = save_anatomy_encoder(tmp_path / "anatomy.safetensors", model)
    calls = []

    def reconstruct(volumes: torch.Tensor) -> torch.Tensor:
        calls.append(volumes.shape)
        return torch.nn.functional.avg_pool3d(volumes, 3, stride=1, padding=1, count_include_pad=False)

    result = evaluate_generation(prepared, fakes, tmp_path / "out", **{**FAST, "backbone": AnatomyBackbone(weights)},
                                 reconstruct=reconstruct, autoencoder="runs/ae")
    assert list(result["columns"]) == ["real_vs_reconstruction", "real_vs_real", "real_vs_generated"]
    # each subject reconstructed once: test for the column, val + test as the memorization yardstick, and
    # up to 12 training subjects to show where a decoded copy lies
    assert sum(shape[0] for shape in calls) == SPLITS["test"] + SPLITS["val"] + min(12, SPLITS["train"])
    assert 0.5 < result["reconstruction"]["ssim"]["mean"] < 1.0
    memorization = result["memorization"]
    assert memorization["heldout_reference"] == "held-out reconstructions"
    copies = memorization["decoded_copy_distance"]
    assert len(copies["voxel"]) == len(copies["feature"]) == len(copies["subjects"]) == min(12, SPLITS["train"])
    assert max(copies["voxel"]) < min(memorization["voxel"]["heldout_nearest_distance"])  # a copy is nearer than anyone
    plain = evaluate_generation(prepared, fakes, tmp_path / "plain", **{**FAST, "backbone": AnatomyBackbone(weights)})
    assert plain["memorization"]["heldout_reference"] == "held-out volumes"
    # smoothed held-out subjects correlate better with the training set than raw ones: a lower yardstick
    assert np.mean(memorization["voxel"]["heldout_nearest_distance"]) < \
        np.mean(plain["memorization"]["voxel"]["heldout_nearest_distance"])
    fidelity = result["conditional_fidelity"]
    assert fidelity["age"]["generated"]["target"] == [30.0 + i for i in range(8)]
    assert fidelity["age"]["real"]["count"] == SPLITS["test"]
    assert 0 <= fidelity["sex"]["generated"]["accuracy"] <= 1
    assert fidelity["ventricles_ml"]["requested_vs_measured"]["covariate"] == "ventricles"
    assert result["backbone"]["name"].startswith("anatomy-")
    assert (tmp_path / "out" / "figures" / "age_fidelity.png").is_file()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "runs/ae" in report and "passed through the autoencoder" in report


def test_refuses_writing_into_an_input_folder_and_unknown_splits(prepared, tmp_path):
    fakes = write_fakes(tmp_path / "fakes", prepared, ["sub10", "sub11"])
    with pytest.raises(ValueError, match="inputs are never written"):
        evaluate_generation(prepared, fakes, fakes, **FAST)
    with pytest.raises(ValueError, match="--split 'holdout'.*available splits: test, train, val"):
        evaluate_generation(prepared, fakes, tmp_path / "out", split="holdout", **FAST)
    shutil.rmtree(fakes)


def test_auto_backbone_is_the_shipped_anatomy_network_on_its_grid_only(prepared, tmp_path):
    fakes = write_fakes(tmp_path / "fakes", prepared, [f"sub{i:02d}" for i in range(10, 18)])
    result = evaluate_generation(prepared, fakes, tmp_path / "out", **{**FAST, "backbone": "auto"})
    assert result["backbone"]["name"].startswith("anatomy-") and result["backbone"]["weights_sha256"]
    predictor, reason = anatomy_predictor(None, (16, 20, 16))
    assert predictor is None and "grid" in reason


def test_auto_backbone_on_another_grid_falls_back_to_deepbet_and_says_so(prepared, tmp_path):
    # the same subjects cropped to 32 x 40 x 32: not the grid the shipped anatomy network was trained on
    manifest = pd.read_csv(prepared / "manifest.csv")
    crop = (slice(4, 36), slice(4, 44), slice(4, 36))
    other = tmp_path / "cropped"
    for row in manifest.itertuples():
        for column in ("image", "mask"):
            volume, affine = load_volume(prepared / getattr(row, column))
            save_volume(other / getattr(row, column), np.ascontiguousarray(volume[crop]), affine,
                        dtype=np.uint8 if column == "mask" else np.float32)
    manifest.to_csv(other / "manifest.csv", index=False)
    fakes = write_fakes(tmp_path / "fakes", other, [f"sub{i:02d}" for i in range(10, 18)],
                        sidecar=lambda i, s: {"covariates": {"age": 40 + i, "sex": "F"}})
    result = evaluate_generation(other, fakes, tmp_path / "out", **{**FAST, "backbone": "auto"})
    assert result["backbone"]["name"].startswith("deepbet") and result["backbone"]["feature_dim"] == 288
    assert any("fell back to 'deepbet'" in w and "(32, 40, 32)" in w for w in result["warnings"])
    assert "(32, 40, 32)" in result["conditional_fidelity"]["skipped"]
    assert "fell back to 'deepbet'" in (tmp_path / "out" / "report.md").read_text()


def test_a_protocol_fixes_the_settings_and_the_report_names_it(prepared, tmp_path, monkeypatch, capsys):
    import dataclasses

    from mriflow.cli import main
    from mriflow.evaluate import protocols

    fakes = write_fakes(tmp_path / "fakes", prepared, [f"sub{i:02d}" for i in range(10, 18)])
    base = ["evaluate", "generation", "--real", str(prepared), "--fake", str(fakes), "--out", str(tmp_path / "out"),
            "--protocol", "mriflow-v1"]
    assert main(base + ["--num-samples", "5", "--seed", "3"]) == 2
    assert "--protocol mriflow-v1 fixes --num-samples, --seed; drop them" in capsys.readouterr().err
    small = dataclasses.replace(protocols.PROTOCOLS["mriflow-v1"], n=6, bootstrap=2, seed=4, diversity_pairs=5)
    monkeypatch.setitem(protocols.PROTOCOLS, "mriflow-v1", small)  # the phantom sets hold 8 volumes, fewer than 12
    assert main(base) == 0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["settings"]["protocol"]["name"] == "mriflow-v1"
    assert (saved["settings"]["n"], saved["settings"]["bootstrap_rounds"], saved["settings"]["seed"]) == (6, 2, 4)
    assert saved["backbone"]["name"].startswith("anatomy")
    assert "Protocol mriflow-v1:" in (tmp_path / "out" / "report.md").read_text()


def test_a_damaged_prepare_json_of_the_real_data_is_named(prepared, tmp_path):
    import shutil

    real = tmp_path / "real"
    shutil.copytree(prepared, real)
    (real / "prepare.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"prepare.json.*restore it, or prepare the dataset again"):
        evaluate_generation(real, write_fakes(tmp_path / "fakes", real, ["sub10", "sub11"]), tmp_path / "out", **FAST)


# --- what metrics.json and report.md hold: pinned by a snapshot of their outline ------------------

SNAPSHOT = Path(__file__).parent / "data" / "generation_outline.json"


def key_paths(value, prefix=""):
    """Every key path of a JSON value ("memorization.voxel.threshold"); list items are "[]", merged."""
    if isinstance(value, dict):
        return sorted({path for key, item in value.items() for path in key_paths(item, f"{prefix}.{key}" if prefix else key)})
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return sorted({path for item in value for path in key_paths(item, prefix + "[]")})
    return [prefix]


def report_outline(markdown):
    """The skeleton of report.md: headings, table headers, the first cell of each table row, figures and the
    opening words of each paragraph; what the numbers are is left to the tests of each measure."""
    outline = []
    for line in markdown.splitlines():
        if line.startswith(("#", "![")):
            outline.append(line)
        elif line.startswith("|---"):
            continue
        elif line.startswith("| "):
            outline.append("| " + line[2:].split(" | ")[0])
        elif line:  # a paragraph: its first words, any with a digit or a path masked
            outline.append(" ".join("#" if any(c.isdigit() or c == "/" for c in word) else word for word in line.split()[:3]))
    return outline


def write_label_maps(fakes, shift=0):
    """Each fake's tissue map as the shipped 4 mm anatomy network segments it (rolled by `shift` voxels)."""
    from mriflow.evaluate.backbones.anatomy import AnatomyBackbone, anatomy_weights_for

    network = AnatomyBackbone(anatomy_weights_for(GRID.shape))
    for path in sorted(fakes.glob("sample_???.nii.gz")):
        volume, affine = load_volume(path)
        tissue = network.segment(np.clip(volume, 0, 1)[None, None]).numpy()[0].astype(np.uint8)
        save_volume(path.with_name(path.name.replace(".nii.gz", "_labels.nii.gz")), np.roll(tissue, shift, 1), affine,
                    dtype=np.uint8)


def test_delivered_label_maps_are_scored_against_the_segmentation_of_their_own_images(prepared, tmp_path):
    subjects = [f"sub{i:02d}" for i in range(10, 18)]
    exact = write_fakes(tmp_path / "exact", prepared, subjects)
    write_label_maps(exact)
    shifted = write_fakes(tmp_path / "shifted", prepared, subjects)
    write_label_maps(shifted, shift=4)
    fits = evaluate_generation(prepared, exact, tmp_path / "a", **FAST)["label_fidelity"]
    off = evaluate_generation(prepared, shifted, tmp_path / "b", **FAST)["label_fidelity"]
    assert fits["generated"]["count"] == 8 and fits["generated"]["mean_dice"]["mean"] == pytest.approx(1.0)
    assert off["generated"]["mean_dice"]["mean"] < 0.9
    assert fits["real"] is None  # these real subjects have no label maps: no yardstick
    assert "Label maps" in (tmp_path / "a" / "report.md").read_text()
    (shifted / "sample_002_labels.nii.gz").unlink()
    partial = evaluate_generation(prepared, shifted, tmp_path / "c", **FAST)["label_fidelity"]
    assert "sample_002_labels.nii.gz" in partial["skipped"]
    plain = write_fakes(tmp_path / "plain", prepared, subjects)
    assert "no label maps" in evaluate_generation(prepared, plain, tmp_path / "d", **FAST)["label_fidelity"]["skipped"]
    # maps written by the anatomy network itself (generate --labels anatomy) would score 1 by construction: not measured
    (exact / "sample_000.json").write_text(json.dumps({"labels_source": "anatomy"}))
    assert "by construction" in evaluate_generation(prepared, exact, tmp_path / "e", **FAST)["label_fidelity"]["skipped"]


def everything_case(prepared, folder):
    """A run that fills every part of the report: a reconstruction column, planted copies, a clipped volume,
    requested age, sex and ventricle volume (conditional fidelity and tissue volumes by the shipped network)."""
    val = [f"sub{i:02d}" for i in range(10, 18)]
    fakes = write_fakes(folder / "fakes", prepared, val + ["sub01", "sub04"],
                        sidecar=lambda i, s: {"covariates": {"age": 30 + i, "sex": "FM"[i % 2], "ventricles": 20.0 + i}})
    volume, affine = load_volume(fakes / "sample_000.nii.gz")
    save_volume(fakes / "sample_000.nii.gz", volume * 1.2, affine)  # over 1: clipped, and a warning
    write_label_maps(fakes)

    def reconstruct(volumes: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool3d(volumes, 3, stride=1, padding=1, count_include_pad=False)

    result = evaluate_generation(prepared, fakes, folder / "out", seed=1, reconstruct=reconstruct, autoencoder="runs/ae",
                                 **FAST)
    return result, folder / "out"


def outline_of(out):
    return {"metrics_keys": key_paths(json.loads((out / "metrics.json").read_text())),
            "report": report_outline((out / "report.md").read_text())}


def test_metrics_json_keys_and_report_sections_are_the_snapshot_ones(prepared, tmp_path):
    result, out = everything_case(prepared, tmp_path)
    if os.environ.get("MRIFLOW_UPDATE_SNAPSHOT"):  # after a change meant to alter the outline; review the diff
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(outline_of(out), indent=1) + "\n")
    expected, actual = json.loads(SNAPSHOT.read_text()), outline_of(out)
    advice = f"metrics.json or report.md changed shape; if meant, rerun with MRIFLOW_UPDATE_SNAPSHOT=1 and review {SNAPSHOT.name}"
    assert actual["metrics_keys"] == expected["metrics_keys"], advice
    assert actual["report"] == expected["report"], advice
    # every part was filled, so the outline pins each of them
    assert all(part in actual["metrics_keys"] for part in ("reconstruction.ssim.mean", "memorization.decoded_copy_distance.voxel",
                                                           "conditional_fidelity.age.generated.mae", "morphometry.frechet_generated.value"))
    assert any(w.startswith("1 generated volume had values outside [0, 1]") for w in result["warnings"])


class CountingPredictor:
    """A predictive backbone that counts the volumes it is asked to predict; its "ventricles" are the mean intensity."""

    name, weights_sha256, sex_categories = "counting", None, ("F", "M")

    def __init__(self):
        self.predicted = 0

    def features(self, volumes):
        return np.asarray(volumes).reshape(len(volumes), -1)[:, ::997].astype(np.float32)

    def predict(self, volumes):
        self.predicted += len(volumes)
        means = np.asarray(volumes).reshape(len(volumes), -1).mean(1).astype(np.float64)
        return {"age": 100 * means, "sex_prob": means, "ventricles_ml": 1000 * means, "total_brain_ml": 1500 - 100 * means}


def test_the_anatomy_predictions_are_made_once_for_conditioning_and_tissue_volumes(prepared, tmp_path):
    fakes = write_fakes(tmp_path / "fakes", prepared, [f"sub{i:02d}" for i in range(10, 18)],
                        sidecar=lambda i, s: {"covariates": {"age": 30 + i, "sex": "F"}})
    predictor = CountingPredictor()
    result = evaluate_generation(prepared, fakes, tmp_path / "out", **{**FAST, "backbone": predictor})
    assert predictor.predicted == SPLITS["test"] + SPLITS["val"] + 8  # real, other real and generated, once each
    fidelity, morphometry = result["conditional_fidelity"], result["morphometry"]
    for key in ("generated", "real"):  # both read the same predictions
        assert fidelity["ventricles_ml"][key]["mean"] == pytest.approx(np.mean(morphometry["curves"][key]["ventricles"]))
    assert morphometry["counts"] == {"real": SPLITS["test"], "other": SPLITS["val"], "generated": 8}


def test_the_audit_threshold_is_the_one_the_privacy_filter_uses(prepared, tmp_path):
    from mriflow.evaluate.memorization import MemorizationReference

    fakes = write_fakes(tmp_path / "fakes", prepared, [f"sub{i:02d}" for i in range(10, 18)])
    audit = evaluate_generation(prepared, fakes, tmp_path / "out", **FAST)["memorization"]["voxel"]
    reference = MemorizationReference.from_prepared(prepared)  # what `mriflow generate --privacy-filter` applies
    assert audit["threshold"] == pytest.approx(reference.threshold, abs=1e-12)
    assert audit["ratio_threshold"] == pytest.approx(reference.ratio_threshold, abs=1e-12)
