from __future__ import annotations

import math

import pytest

from mriflow.data.inputs import (
    find_scans,
    match_masks,
    parse_covariate_columns,
    read_covariates,
    subject_id,
)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read here")
    return path


def test_subject_id_is_the_name_up_to_the_first_underscore_without_sub_prefix():
    assert subject_id("IXI012-HH-1211_T1.nii.gz") == "IXI012-HH-1211"
    assert subject_id("IXI012-HH-1211_T1_DLMUSE.nii.gz") == "IXI012-HH-1211"
    assert subject_id("sub-07_ses-1_T1w.nii") == "07"
    assert subject_id("plain.nii.gz") == "plain"


def test_folder_scans_skip_duplicates_naming_both_files(tmp_path):
    touch(tmp_path / "a_T1.nii.gz")
    touch(tmp_path / "a_T2.nii.gz")
    touch(tmp_path / "b.nii")
    touch(tmp_path / "notes.txt")
    found = find_scans(tmp_path)
    assert found.layout == "folder"
    assert [(s.subject, s.image.name) for s in found.scans] == [("a", "a_T1.nii.gz"), ("b", "b.nii")]
    assert len(found.skipped) == 1
    skip = found.skipped[0]
    assert skip.subject == "a" and skip.input.endswith("a_T2.nii.gz")
    assert "a_T1.nii.gz" in skip.reason and "a_T2.nii.gz" in skip.reason and "duplicate" in skip.reason


def test_bids_root_with_sessions_and_participants(tmp_path):
    touch(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    touch(tmp_path / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz")
    touch(tmp_path / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_T1w.nii.gz")
    touch(tmp_path / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T2w.nii.gz")  # not a T1w: ignored
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t30\tF\nsub-02\tn/a\tM\n")
    found = find_scans(tmp_path)
    assert found.layout == "bids"
    assert [s.subject for s in found.scans] == ["01", "02"]
    assert found.scans[1].image.name == "sub-02_ses-1_T1w.nii.gz"
    assert len(found.skipped) == 1 and "sub-02_ses-2_T1w.nii.gz" in found.skipped[0].input
    assert found.participants == tmp_path / "participants.tsv"

    table, notes = read_covariates([found.participants], ["01", "02"])
    assert table.names == ["age", "sex"]
    assert table.values["01"] == {"age": 30.0, "sex": "F"}
    assert table.values["02"] == {"sex": "M"}  # n/a is missing, not an error
    assert notes == []


def test_masks_match_on_subject_id_and_missing_or_ambiguous_masks_are_reported(tmp_path):
    for name in ("a_T1.nii.gz", "b_T1.nii.gz", "c_T1.nii.gz"):
        touch(tmp_path / "images" / name)
    touch(tmp_path / "masks" / "a_T1_DLMUSE.nii.gz")
    touch(tmp_path / "masks" / "nested" / "b_mask.nii.gz")
    touch(tmp_path / "masks" / "b_other.nii.gz")
    scans, skipped = match_masks(find_scans(tmp_path / "images").scans, tmp_path / "masks")
    assert [(s.subject, s.mask.name) for s in scans] == [("a", "a_T1_DLMUSE.nii.gz")]
    reasons = {s.subject: s.reason for s in skipped}
    assert "several masks" in reasons["b"] and "b_mask.nii.gz" in reasons["b"]
    assert "no mask" in reasons["c"]


def test_id_column_preference_and_column_selection_with_renaming(tmp_path):
    (tmp_path / "volumes.csv").write_text("MRID,509,701,name\nx1,100.5,1500,foo\nx2,90,1400,bar\n")
    (tmp_path / "first.csv").write_text("code,age\nx1,40\nx2,50\n")  # no known id column: the first column
    (tmp_path / "ids.csv").write_text("age,subject_id\n33,x1\n")
    table, notes = read_covariates(
        [tmp_path / "volumes.csv", tmp_path / "first.csv"], ["x1", "x2"], parse_covariate_columns("age,509:ventricles")
    )
    assert table.names == ["age", "ventricles"]
    assert table.values["x1"] == {"age": 40.0, "ventricles": 100.5}
    assert table.sources["ventricles"].endswith("volumes.csv")
    assert notes == []
    table, _ = read_covariates([tmp_path / "ids.csv"], ["x1"])
    assert table.values["x1"] == {"age": 33.0}
    with pytest.raises(ValueError, match="'702'.*available columns"):
        read_covariates([tmp_path / "volumes.csv"], ["x1"], parse_covariate_columns("702"))


def test_bad_covariate_rows_are_reported_and_set_missing(tmp_path):
    csv = tmp_path / "demographics.csv"
    csv.write_text("subject,age,sex\nsub-a,41.5,F\nb,forty,M\nghost,30,F\na,41.5,F\n")
    table, notes = read_covariates([csv], ["a", "b", "c"])
    assert table.values["a"] == {"age": 41.5, "sex": "F"}  # a repeated row that agrees: a note
    assert table.values["b"] == {"sex": "M"}  # non-numeric age left missing
    assert "age" not in table.values["c"]
    reasons = {(n.subject, n.reason.split()[0]) for n in notes}
    by_subject = {n.subject: n.reason for n in notes}
    assert "'forty' is not a number" in by_subject["b"]
    assert "unknown subject" in by_subject["ghost"]
    assert "repeated row" in by_subject["a"]
    assert len(reasons) == 3
    assert not math.isnan(table.values["a"]["age"])


def test_repeated_rows_that_disagree_are_refused_naming_the_subject_and_values(tmp_path):
    csv = tmp_path / "demographics.csv"
    csv.write_text("subject,age,sex,site\na,41.5,F,x\nb,30,M,y\na,99,F,z\n")
    with pytest.raises(ValueError, match=r"demographics.csv: subject 'a' has 2 rows that disagree \(age: '41.5', '99'\)"):
        read_covariates([csv], ["a", "b"], parse_covariate_columns("age,sex"))  # site differs too, but is not used
    table, _ = read_covariates([csv], ["a", "b"], parse_covariate_columns("sex"))
    assert table.values["a"] == {"sex": "F"}


def test_covariate_files_without_an_age_column_get_a_note_unless_columns_are_named(tmp_path):
    csv = tmp_path / "volumes.csv"
    csv.write_text("subject,509,701\na,25000,1100000\n")
    _, notes = read_covariates([csv], ["a"])
    assert [n.reason for n in notes if "age" in n.reason] == [
        "no 'age' column in the covariate file(s) (columns: 509, 701); models conditioned on age need one: name yours "
        "with --covariate-columns COLUMN:age"]
    _, notes = read_covariates([csv], ["a"], parse_covariate_columns("509:ventricles"))
    assert notes == []


def test_covariate_column_spec_is_parsed_and_checked():
    assert parse_covariate_columns("age,sex,509:ventricles,701:total_brain") == [
        ("age", "age"), ("sex", "sex"), ("509", "ventricles"), ("701", "total_brain")]
    assert parse_covariate_columns(None) is None
    with pytest.raises(ValueError, match="given twice"):
        parse_covariate_columns("age,509:age")
    with pytest.raises(ValueError, match="empty column"):
        parse_covariate_columns(":x")


def test_impossible_ages_and_unknown_sexes_are_noted_and_left_missing(tmp_path):
    """Issue 25.9: prepare took age -5 and sex 'Q' without a word."""
    csv = tmp_path / "demographics.csv"
    csv.write_text("subject,age,sex\na,-5,Q\nb,41,female\nc,130,m\nd,60,1\n")
    table, notes = read_covariates([csv], ["a", "b", "c", "d"])
    assert table.values["a"] == {} and table.values["b"] == {"age": 41.0, "sex": "female"}
    assert table.values["c"] == {"sex": "m"} and table.values["d"] == {"age": 60.0, "sex": "1"}  # a code, kept as text
    reasons = sorted(n.reason for n in notes)
    assert len(reasons) == 3
    assert any("age value '-5' is not an age in years" in r for r in reasons)
    assert any("age value '130' is not an age in years" in r for r in reasons)
    assert any("sex value 'Q' is not a sex mriflow reads" in r for r in reasons)
