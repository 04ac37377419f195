"""A researcher's own T1 uploaded to the app (issue 28.3, `mriflow app --uploads`): prepared onto the model's grid in a
private folder, then drawn at another age like the scans of --scans; what an upload may be and cost is bounded."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app_helpers import NIIVUE_STAND_IN, poll
from mriflow.app import jobs, scans
from mriflow.app.server import AppState, create_app
from mriflow.data.io import load_volume

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluate"))
from evaluation_helpers import scanner_copy  # noqa: E402


@pytest.fixture(scope="module")
def uploading(tmp_path_factory):
    root = tmp_path_factory.mktemp("app-uploads")
    (root / "niivue.umd.js").write_text(NIIVUE_STAND_IN)
    (root / "out").mkdir()
    service = jobs.GenerationService("4mm", root / "out", "cpu", uploads=True)
    client = TestClient(create_app(AppState(out=root / "out", niivue=root / "niivue.umd.js", service=service)))
    yield client, service, root
    service.close()
    assert not service.uploads.root.exists()  # the uploads go with the app


def raw_scan(root: Path) -> tuple[bytes, np.ndarray, np.ndarray]:
    """scanner_copy's .nii.gz bytes, the 4 mm volume it came from and that volume's affine."""
    raw, volume, affine = scanner_copy(root)
    return raw.read_bytes(), volume, affine


def post(client, data: bytes, query: str = "age=50&sex=F", content_type: str = "application/octet-stream"):
    return client.post(f"/api/scans?{query}", content=data, headers={"Content-Type": content_type})


def test_an_uploaded_scan_is_prepared_then_drawn_at_another_age(uploading, tmp_path):
    client, service, root = uploading
    assert client.get("/api/config").json()["generate"]["edit"]["uploads"] is True
    data, volume, affine = raw_scan(tmp_path)
    response = post(client, data)
    assert response.status_code == 202, response.text
    job = poll(client, response.json()["id"], limit=300)
    assert job["state"] == "done", job["error"]
    scan = job["request"]["scan"]
    prepared = service.scans[scan]["path"]
    assert prepared.is_relative_to(service.uploads.root) and not prepared.is_relative_to(root / "out")
    back, back_affine = load_volume(prepared)
    assert np.allclose(back_affine, affine) and np.corrcoef(back.ravel(), volume.ravel())[0, 1] > 0.8

    edit = client.post("/api/edit", json={"scan": scan, "covariates": {"age": 75}, "steps": 1})
    assert edit.status_code == 202, edit.text
    done = poll(client, edit.json()["id"], limit=300)
    assert done["state"] == "done", done["error"] and done["request"]["from"] == {"age": 50.0, "sex": "F"}
    assert client.get("/files/" + done["edit"]["image"]).status_code == 200


@pytest.mark.parametrize("case, status, words", [
    ("form post", 415, "application/octet-stream"),
    ("not nifti", 400, "not a NIfTI volume"),
    ("damaged gzip", 400, "gzipped but damaged"),
    ("a 2D image", 400, "one 3D volume"),
    ("nothing but zeros", 400, "nothing but zeros"),
    ("no age", 400, "give the scan's own age"),
    ("unknown covariate", 400, "unknown covariate"),
    ("another kind", 400, "kind must be one of brain, head"),
])
def test_what_an_upload_may_not_be_is_one_line_and_nothing_is_kept(uploading, case, status, words):
    client, service, _ = uploading
    volume = nib.Nifti1Image(np.ones((20, 24, 20), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes()
    body, query, content_type = volume, "age=50&sex=F", "application/octet-stream"
    if case == "form post":
        content_type = "application/x-www-form-urlencoded"
    elif case == "not nifti":
        body = b"hello, this is not a scan" * 20
    elif case == "damaged gzip":
        noise = nib.Nifti1Image(np.random.default_rng(0).random((20, 24, 20), np.float32), np.eye(4)).to_bytes()
        body = gzip.compress(noise)[:5000]  # cut short
    elif case == "a 2D image":
        body = nib.Nifti1Image(np.ones((20, 24), np.float32), np.eye(4)).to_bytes()
    elif case == "nothing but zeros":
        body = nib.Nifti1Image(np.zeros((20, 24, 20), np.float32), np.eye(4)).to_bytes()
    elif case == "no age":
        query = "sex=F"
    elif case == "unknown covariate":
        query = "age=50&sex=F&ventricles=3"
    elif case == "another kind":
        query = "age=50&sex=F&kind=torso"
    before = service.uploads.count
    response = post(client, body, query, content_type)
    assert response.status_code == status and words in response.json()["detail"], response.text
    assert "\n" not in response.json()["detail"] and service.uploads.count == before


def test_an_upload_is_bounded_as_sent_and_once_unpacked(uploading, monkeypatch):
    client, service, _ = uploading
    too_large = client.post("/api/scans?age=50&sex=F", content=b"\0" * (scans.MAX_UPLOAD + 1),
                            headers={"Content-Type": "application/octet-stream"})
    assert too_large.status_code == 413
    assert client.post("/api/generate", content=b"{" + b" " * 70000 + b"}",
                       headers={"Content-Type": "application/json"}).status_code == 413  # other routes keep 64 kB
    monkeypatch.setattr(scans, "MAX_UNPACKED", 1000)  # a small "bomb": 1 MB of zeros gzipped to a kilobyte
    bomb = post(client, gzip.compress(b"\0" * 2**20))
    assert bomb.status_code == 400 and "unpacks to more than" in bomb.json()["detail"]
    monkeypatch.setattr(service.uploads, "count", scans.MAX_UPLOADS)
    volume = nib.Nifti1Image(np.ones((20, 24, 20), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes()
    full = post(client, volume)
    assert full.status_code == 400 and "restart it" in full.json()["detail"]


def test_uploads_are_off_unless_asked_for(tmp_path):
    (tmp_path / "out").mkdir()
    service = jobs.GenerationService("4mm", tmp_path / "out", "cpu")
    client = TestClient(create_app(AppState(out=tmp_path / "out", niivue=tmp_path / "n.js", service=service)))
    try:
        response = post(client, b"x" * 100)
        assert response.status_code == 400 and "--uploads" in response.json()["detail"]
    finally:
        service.close()
