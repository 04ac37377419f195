from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from conftest import head_phantom
from mriflow.evaluate.bootstrap import bootstrap
from mriflow.evaluate.memorization import find_memorized, flagged_table
from mriflow.evaluate.metrics import LOWER_IS_BETTER, set_metrics
from mriflow.evaluate.report import render_markdown, report_sections, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def diversity_part(values):
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)), "values": values, "pairs": [],
            "settings": {"window": 9, "sigma": 1.5, "scales": 3, "weights": [0.07, 0.45, 0.48]}}


def make_result(with_memorization=True, with_fidelity=False):
    rng = np.random.default_rng(0)
    real, other, fake = rng.normal(size=(20, 4)), rng.normal(size=(20, 4)), rng.normal(1.0, size=(20, 4))
    columns = {}
    for name, features in (("real_vs_real", other), ("real_vs_generated", fake)):
        summary = bootstrap(real, features, set_metrics, n=10, rounds=4, seed=0)
        summary.pop("_settings")
        columns[name] = summary
    result = {
        "mriflow_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00",
        "inputs": {"real_dir": "prepared", "split": "test", "other_split": "val", "fake_dir": "samples", "autoencoder": None,
                   "counts": {"real": 20, "other": 20, "generated": 20, "train": 30}, "shape": [40, 48, 40], "affine": np.eye(4).tolist()},
        "backbone": {"name": "medicalnet-resnet10", "weights_sha256": "ab" * 32, "feature_dim": 4},
        "settings": {"n": 10, "bootstrap_rounds": 4, "seed": 0, "sampling": "without replacement", "nearest_k": 5,
                     "mmd_bandwidth": 2.5, "diversity_pairs": 50},
        "lower_is_better": LOWER_IS_BETTER,
        "columns": columns,
        "column_sets": {"real_vs_real": ["real test (20)", "real val (20)"], "real_vs_generated": ["real test (20)", "generated (20)"]},
        "reconstruction": None,
        "diversity": {"real": diversity_part([0.3, 0.35, 0.32]), "generated": diversity_part([0.5, 0.55, 0.52])},
        "memorization": {"skipped": "needs a non-empty 'train' split"},
        "conditional_fidelity": {"skipped": "no anatomy predictor with age/sex heads: not available"},
        "warnings": ["2 generated volumes had values outside [0, 1] and were clipped"],
        "timing_s": {"total": 1.0},
    }
    result["diversity"]["settings"] = result["diversity"]["real"]["settings"]
    if with_memorization:
        train, heldout = rng.normal(size=(30, 8)), rng.normal(size=(10, 8))
        generated = np.concatenate([rng.normal(size=(18, 8)), train[:2] + 1e-3])
        names = [f"sample_{i}" for i in range(20)]
        voxel = find_memorized(generated, train, heldout, names, [f"t{i}" for i in range(30)], metric="euclidean")
        result["memorization"] = {"voxel": voxel, "feature": voxel, "table": flagged_table(voxel, voxel),
                                  "flagged_voxel": sum(voxel["flagged"]), "flagged_feature": sum(voxel["flagged"]),
                                  "heldout": 10, "train": 30, "chance_rate": 1 / 11, "mask_voxels": 1000}
    if with_fidelity:
        ages = [30.0, 50.0, 70.0]
        part = {"mae": 4.0, "pearson_r": 0.9, "count": 3, "target": ages, "predicted": [34.0, 46.0, 74.0]}
        result["conditional_fidelity"] = {"predictor": "anatomy-resnet10", "predictor_weights_sha256": "cd" * 32,
                                          "age": {"generated": part, "real": part},
                                          "sex": {"generated": {"accuracy": 0.75, "count": 4}, "real": None}}
    return result


def montage():
    volume, _ = head_phantom((40, 48, 40), seed=0)
    volume = volume / volume.max()
    return {"real": [("sub01", volume)], "generated": [("sample_000", volume[::-1])], "reconstruction": None}


def test_report_writes_three_documents_and_names_the_backbone(tmp_path):
    result = make_result()
    paths = write_report(result, tmp_path, montage())
    assert all(p.is_file() for p in paths.values())
    markdown = paths["markdown"].read_text()
    assert "medicalnet-resnet10" in markdown and "ab" * 32 in markdown
    assert "| FD | lower |" in markdown and "| coverage | higher |" in markdown
    fd = result["columns"]["real_vs_generated"]["fd"]
    assert f"{fd['mean']:.3f}" in markdown or f"{fd['mean']:.1f}" in markdown
    assert "Warning: 2 generated volumes" in markdown
    assert "sample_18" in markdown and "sample_19" in markdown  # the planted copies' table rows
    assert "Skipped: no anatomy predictor" in markdown
    for name in ("montage", "bootstrap", "diversity", "memorization"):
        assert (tmp_path / "figures" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert f"figures/{name}.png" in markdown


def test_html_is_self_contained(tmp_path):
    paths = write_report(make_result(with_fidelity=True), tmp_path, montage())
    page = paths["html"].read_text()
    images = page.split('src="data:image/png;base64,')[1:]
    assert len(images) == 5  # bootstrap, diversity, memorization, age fidelity, montage
    for encoded in images:
        assert base64.b64decode(encoded.split('"', 1)[0]).startswith(PNG_SIGNATURE)
    assert "figures/" not in page.replace("<figure>", "").replace("</figure>", "")
    assert "age MAE (generated)" in page


def test_metrics_json_round_trips_and_rebuilds_the_report(tmp_path):
    result = make_result(with_memorization=False)
    write_report(result, tmp_path / "first")
    saved = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert saved["columns"]["real_vs_real"]["fd"]["values"] == pytest.approx(result["columns"]["real_vs_real"]["fd"]["values"])
    write_report(saved, tmp_path / "second")  # a report can be rebuilt from metrics.json alone
    assert (tmp_path / "first" / "report.md").read_text() == (tmp_path / "second" / "report.md").read_text()
    assert "Skipped: needs a non-empty 'train' split" in (tmp_path / "second" / "report.md").read_text()


def test_intensity_backbone_is_marked_not_comparable():
    result = make_result(with_memorization=False)
    result["backbone"] = {"name": "intensity-v1", "weights_sha256": None, "feature_dim": 1264}
    markdown = render_markdown(report_sections(result, {}))
    assert "none (this backbone has no weights)" in markdown
    assert "not comparable with published" in markdown


def test_memorization_text_gives_the_copy_scale_and_says_which_space_cannot_see_decoded_copies():
    from mriflow.evaluate.report import _copy_note

    memorization = {"voxel": {"threshold": 0.024, "generated_nearest_distance": [0.013, 0.019, 0.03]},
                    "feature": {"threshold": 9.1, "generated_nearest_distance": [8.0, 9.0, 11.0]},
                    "decoded_copy_distance": {"subjects": ["a", "b", "c"], "voxel": [0.003, 0.004, 0.005],
                                              "feature": [10.5, 10.9, 11.3]}}
    note = _copy_note(memorization)
    assert "lie at 0.004 (voxel, median; max 0.005) and 10.9 (feature)" in note and "median 0.019" in note
    assert "In feature space a decoded copy lies beyond" in note and "In voxel space" not in note
    assert _copy_note({**memorization, "decoded_copy_distance": None}) == ""


def test_the_report_opens_with_a_verdict_against_the_yardsticks():
    from mriflow.evaluate.report import verdict

    result = make_result()
    real_fd = result["columns"]["real_vs_real"]["fd"]
    result["columns"]["real_vs_generated"]["fd"] = {**real_fd, "mean": real_fd["mean"] + 3 * real_fd["sd"] + 5, "sd": real_fd["sd"]}
    rows = {row[0]: row for row in verdict(result)}
    fd = rows["fidelity: FD"]
    assert fd[3] == "further from real data than real data is from itself"  # beyond two combined sds
    assert rows["diversity: MS-SSIM between volumes"][3] in ("as diverse as real data", "too alike (less diverse than real data)",
                                                             "more varied than real data")
    assert "privacy: near copies of training subjects (voxel space)" in rows
    same = make_result()
    same["columns"]["real_vs_generated"] = same["columns"]["real_vs_real"]
    assert {row[0]: row for row in verdict(same)}["fidelity: FD"][3] == "like real data"
    # within two sds but three times the yardstick (a small n): not read as a match
    noisy = make_result()
    noisy["columns"]["real_vs_generated"]["fd"] = {"mean": 3 * real_fd["mean"], "sd": 2 * real_fd["mean"]}
    assert {row[0]: row for row in verdict(noisy)}["fidelity: FD"][3].startswith("not told apart at this n, though 3.0 x")
    markdown = render_markdown(report_sections(result, {}))
    assert markdown.index("## Verdict") < markdown.index("## Set metrics")


def test_the_html_page_escapes_what_the_inputs_say(tmp_path):
    result = make_result(with_memorization=False)
    result["inputs"]["fake_dir"] = 'samples/<img src=x onerror="alert(1)">'  # a folder may be named anything
    result["warnings"] = ["1 generated volume had values outside [0, 1] and were clipped: <script>alert(2)</script>.nii.gz"]
    paths = write_report(result, tmp_path)
    page = paths["html"].read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
    assert "<script>alert(2)</script>" in paths["markdown"].read_text()  # the markdown says it as it is
