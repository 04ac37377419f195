"""`mriflow generate --bids`: a synthetic cohort that the official BIDS validator passes, pybids reads, and `mriflow
prepare` and `evaluate` take back (issue 26.1)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mriflow.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent / "evaluate"))
from evaluation_helpers import write_evaluation_set  # noqa: E402  (the evaluation tests' phantom data)

COHORT = "id,age,sex\nyoung-f,25,F\nold-m,75,M\nmid_1,50,\n" + "".join(f"extra{i},{30 + 5 * i},{'FM'[i % 2]}\n"
                                                                         for i in range(5))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    (root / "cohort.csv").write_text(COHORT)
    assert main(["generate", "--model", "4mm", "--covariates", str(root / "cohort.csv"), "--bids", str(root / "cohort"),
                 "--steps", "1", "--device", "cpu", "--threads", "1"]) == 0
    return root / "cohort"


def test_the_dataset_has_the_bids_layout_the_covariates_and_the_tissue_maps_as_derivatives(dataset):
    assert sorted(p.name for p in dataset.glob("sub-*")) == ["sub-extra0", "sub-extra1", "sub-extra2", "sub-extra3",
                                                              "sub-extra4", "sub-mid1", "sub-oldm", "sub-youngf"]
    assert (dataset / "sub-oldm" / "anat" / "sub-oldm_T1w.nii.gz").is_file()
    sidecar = json.loads((dataset / "sub-oldm" / "anat" / "sub-oldm_T1w.json").read_text())
    assert sidecar["MriflowGeneration"]["covariates"] == {"age": 75.0, "sex": "M"}
    description = json.loads((dataset / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["GeneratedBy"][0]["Name"] == "mriflow"
    assert "flow-dit-4mm" in description["GeneratedBy"][0]["Description"]
    rows = (dataset / "participants.tsv").read_text().splitlines()
    assert rows[0] == "participant_id\tage\tsex" and "sub-mid1\t50\tn/a" in rows
    derivatives = dataset / "derivatives" / "mriflow"
    assert (derivatives / "sub-oldm" / "anat" / "sub-oldm_dseg.nii.gz").is_file()
    assert (derivatives / "dseg.tsv").read_text().splitlines()[:2] == ["index\tname", "0\tbackground"]
    assert (dataset / "sourcedata" / "mriflow" / "generate.json").is_file()


@pytest.mark.parametrize("folder", [".", "derivatives/mriflow"])
def test_the_official_validator_finds_no_error(dataset, folder):
    validator = shutil.which("bids-validator-deno")
    assert validator, "bids-validator-deno is not installed: pip install -e '.[test]'"
    completed = subprocess.run([validator, str(dataset / folder), "--format", "json"], capture_output=True, text=True,
                               timeout=600)
    issues = json.loads(completed.stdout)["issues"]["issues"]
    errors = [issue for issue in issues if issue["severity"] == "error"]
    assert not errors, errors[:3]


def test_pybids_reads_it_and_queries_by_sex_and_age(dataset):
    from bids import BIDSLayout

    layout = BIDSLayout(dataset, derivatives=True)
    assert len(layout.get(suffix="T1w", extension=".nii.gz")) == 8
    assert len(layout.get(suffix="dseg", extension=".nii.gz")) == 8
    participants = layout.get(suffix="participants", extension=".tsv")[0].get_df()
    old_men = participants[(participants["sex"] == "M") & (participants["age"] > 60)]
    assert old_men["participant_id"].tolist() == ["sub-oldm"]


def test_prepare_reads_it_back_and_evaluate_scores_it(dataset, tmp_path):
    prepared = tmp_path / "prepared"
    assert main(["prepare", str(dataset), "--out", str(prepared), "--preset", "4mm", "--no-register",
                 "--skull-strip", "none"]) == 0
    manifest = (prepared / "manifest.csv").read_text()
    assert "oldm" in manifest and ",75" in manifest  # participants.tsv's covariates came along
    real = write_evaluation_set(tmp_path / "real")
    assert main(["evaluate", "generation", "--real", str(real), "--fake", str(prepared / "images"), "--out",
                 str(tmp_path / "report"), "--backbone", "intensity", "--bootstrap", "2", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["inputs"]["counts"]["generated"] == 8
