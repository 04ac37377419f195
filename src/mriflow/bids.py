"""A synthetic cohort as a BIDS dataset (issue 26.1): what fMRIPrep, FreeSurfer wrappers, pybids, BIDS Apps and
`mriflow prepare` read.

`write_bids` turns what `generate` wrote (sample volumes, tissue maps, sidecars, generate.json) into:

    DIR/dataset_description.json          Name, BIDSVersion, DatasetType raw, GeneratedBy: mriflow, its version, the
                                          model id and checksum and the command
    DIR/participants.tsv + .json          participant_id and the model's covariates (age in years, sex F/M)
    DIR/sub-<label>/anat/sub-<label>_T1w.nii.gz + .json      each volume; its sidecar holds the generation record
    DIR/derivatives/mriflow/              a derivatives dataset: sub-<label>/anat/sub-<label>_dseg.nii.gz (the tissue
                                          map, on the T1w's grid) and dseg.tsv (index, name)
    DIR/sourcedata/mriflow/               what generate wrote, as it wrote it (BIDS leaves sourcedata/ alone)

The volumes are hard links to the files in sourcedata/ where the file system allows (copies elsewhere). A label
is the cohort row's id with everything but letters and digits removed, else `synth<index>`.

    >>> write_bids(Path("cohort/sourcedata/mriflow"), Path("cohort"))
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

BIDS_VERSION = "1.10.0"


def participant_label(sidecar: dict[str, Any], index: int) -> str:
    """A BIDS participant label (letters and digits only) for a sample."""
    row = sidecar.get("cohort_row") or {}
    raw = next((str(row[key]) for key in ("id", "subject", "sample") if row.get(key) not in (None, "")), "")
    label = re.sub(r"[^A-Za-z0-9]", "", raw.removeprefix("sub-"))
    return label or f"synth{index:05d}"


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_bids(generated: Path, root: Path) -> Path:
    """The BIDS dataset at `root` of the samples `generate` wrote into `generated` (see the module docstring);
    refuses a `root` that already holds subjects. Returns `root`."""
    generated, root = Path(generated), Path(root)
    record = json.loads((generated / "generate.json").read_text())
    if any(root.glob("sub-*")):
        raise FileExistsError(f"--bids {root}: already holds sub-* folders; choose a new folder for the dataset")
    samples = [generated / name for name in record["samples"]]
    labels: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    classes = (record.get("labels") or {}).get("classes")
    for index, image in enumerate(samples):
        name = image.name.removesuffix(".nii.gz")
        sidecar = json.loads((generated / f"{name}.json").read_text())
        label = participant_label(sidecar, index)
        if label in labels.values():
            raise ValueError(f"--bids: samples {name} and {next(k for k, v in labels.items() if v == label)} give the "
                             f"same participant label {label!r}; make the cohort's ids differ in letters or digits")
        labels[name] = label
        anat = root / f"sub-{label}" / "anat"
        _link(image, anat / f"sub-{label}_T1w.nii.gz")
        _write_json(anat / f"sub-{label}_T1w.json", {
            "Description": "synthetic T1-weighted brain MRI drawn by mriflow, skull-stripped, in MNI152 template space",
            "GeneratedBy": _generated_by(record), "MriflowGeneration": sidecar})
        if classes and (generated / f"{name}_labels.nii.gz").is_file():
            _link(generated / f"{name}_labels.nii.gz",
                  root / "derivatives" / "mriflow" / f"sub-{label}" / "anat" / f"sub-{label}_dseg.nii.gz")
        covariates = sidecar.get("covariates") or {}
        rows.append({"participant_id": f"sub-{label}", **{k: ("n/a" if v is None else v) for k, v in covariates.items()}})

    columns = ["participant_id", *dict.fromkeys(k for row in rows for k in row if k != "participant_id")]
    lines = ["\t".join(columns)] + ["\t".join(_cell(row.get(c, "n/a")) for c in columns) for row in rows]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    _write_json(root / "participants.json", {c: _column_description(c) for c in columns if c != "participant_id"})
    _write_json(root / "dataset_description.json", {
        "Name": "mriflow synthetic cohort", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "GeneratedBy": [_generated_by(record)],
        "HowToAcknowledge": "Synthetic volumes drawn by mriflow; cite the model's card and the data it was trained on."})
    (root / "README").write_text(f"Synthetic brain MRI drawn by mriflow {record.get('mriflow_version', '')} with the model "
                                 f"{record.get('model_id')} ({record.get('model_checksum')}). What generate wrote is in "
                                 "sourcedata/mriflow/; tissue maps are in derivatives/mriflow/.\n")
    if classes:
        derivatives = root / "derivatives" / "mriflow"
        _write_json(derivatives / "dataset_description.json", {
            "Name": "mriflow tissue maps", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [_generated_by(record)], "SourceDatasets": [{"URL": "../../"}]})
        (derivatives / "dseg.tsv").write_text("index\tname\n" + "".join(f"{i}\t{c}\n" for i, c in enumerate(classes)))
        (derivatives / "README").write_text("Tissue maps of the synthetic T1w volumes, one _dseg.nii.gz per subject on its "
                                            "T1w's grid; dseg.tsv names the classes.\n")
    return root


def _generated_by(record: dict[str, Any]) -> dict[str, Any]:
    return {"Name": "mriflow", "Version": str(record.get("mriflow_version", "")),
            "Description": f"model {record.get('model_id')} ({record.get('model_checksum')}), {record.get('solver')} "
                           f"{record.get('steps')} steps, seed {record.get('seed')}; {record.get('command', '')}".strip()}


def _cell(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _column_description(column: str) -> dict[str, Any]:
    if column == "age":
        return {"Description": "the age the volume was drawn for", "Units": "year"}
    if column == "sex":
        return {"Description": "the sex the volume was drawn for", "Levels": {"F": "female", "M": "male"}}
    return {"Description": f"the covariate {column} the volume was drawn for"}
