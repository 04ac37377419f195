"""The app draws a real scan at another age (issue 28.3): `mriflow app --scans DATA` lists the prepared scans, and
POST /api/edit inverts one under its recorded covariates and draws it again under the requested ones, with the round
trip and the difference map beside the edit, bounded like every generation request."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app_helpers import NIIVUE_STAND_IN, poll
from conftest import train_tiny_image_flow
from mriflow.app import jobs
from mriflow.app.server import AppState, create_app
from mriflow.data.io import load_volume

SHAPE = (16, 20, 16)


@pytest.fixture(scope="module")
def editing(tmp_path_factory):
    root = tmp_path_factory.mktemp("app-edit")
    data, _ = train_tiny_image_flow(root, SHAPE)
    (root / "niivue.umd.js").write_text(NIIVUE_STAND_IN)
    (root / "out").mkdir()
    service = jobs.GenerationService(str(root / "run"), root / "out", "cpu", scans=data)
    client = TestClient(create_app(AppState(out=root / "out", niivue=root / "niivue.umd.js", service=service)))
    yield client, service, data, root
    service.close()


def test_the_config_lists_the_scans_with_their_recorded_covariates(editing):
    client, service, data, _ = editing
    edit = client.get("/api/config").json()["generate"]["edit"]
    scans = {scan["id"]: scan for scan in edit["scans"]}
    assert scans["sub02"]["covariates"] == {"age": 34.0, "sex": "F"} and len(scans) == 7
    assert edit["steps"] == jobs.EDIT_STEPS and edit["max_steps"] == jobs.MAX_EVALUATIONS // jobs.EDIT_EVALUATIONS_PER_STEP
    assert "edit.js" in client.get("/").text


def test_an_edit_is_drawn_with_its_round_trip_and_difference_and_says_where_it_came_from(editing):
    client, _, data, root = editing
    response = client.post("/api/edit", json={"scan": "sub02", "covariates": {"age": 60}, "steps": 2})
    assert response.status_code == 202, response.text
    job = poll(client, response.json()["id"])
    assert job["state"] == "done", job["error"]
    assert job["calls"] == job["expected"] == jobs.EDIT_EVALUATIONS_PER_STEP * 2
    files = job["edit"]
    edited, affine = load_volume(root / "out" / files["image"])
    round_trip, _ = load_volume(root / "out" / files["round_trip"])
    difference, _ = load_volume(root / "out" / files["difference"])
    scan, scan_affine = load_volume(data / "images" / "sub02.nii.gz")
    np.testing.assert_allclose(difference, edited - scan, atol=1e-6)  # the change to the scan, whose detail is kept
    assert np.abs(round_trip - scan).mean() > 0  # the model's own round trip, offered for download
    assert np.allclose(affine, scan_affine)
    served = client.get("/api/scans/sub02/volume.nii.gz")  # what viewer A shows the edit against
    assert served.status_code == 200 and served.content == (data / "images" / "sub02.nii.gz").read_bytes()
    assert client.get("/api/scans/nobody/volume.nii.gz").status_code == 404
    sidecar = json.loads((root / "out" / files["sidecar"]).read_text())
    assert sidecar["covariates"] == {"age": 60.0, "sex": "F"} and sidecar["derived_from_real_person"] is True
    assert sidecar["source"]["covariates"] == {"age": 34.0, "sex": "F"}
    assert client.get("/files/" + files["difference"]).status_code == 200
    assert job["request"]["from"] == {"age": 34.0, "sex": "F"}


@pytest.mark.parametrize("body, words", [
    ({"scan": "nobody", "covariates": {"age": 60}}, "7 scans (--scans, uploads)"),
    ({"scan": "sub02", "covariates": {}}, "say what to change"),
    ({"scan": "sub02", "covariates": {"shoe": 3}}, "shoe"),
    ({"scan": "sub02", "covariates": {"age": 60}, "steps": 10_000}, "steps must be an integer from 1 to"),
    ({"scan": ["sub02"], "covariates": {"age": 60}}, "scan"),
])
def test_a_bad_edit_request_is_400_in_one_line(editing, body, words):
    client = editing[0]
    response = client.post("/api/edit", json=body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert words in detail and "\n" not in detail


def test_without_scans_editing_is_off_and_says_how_to_turn_it_on(editing, tmp_path):
    _, service, _, root = editing
    bare = jobs.GenerationService(str(root / "run"), tmp_path, "cpu")
    try:
        client = TestClient(create_app(AppState(out=tmp_path, niivue=root / "niivue.umd.js", service=bare)))
        assert client.get("/api/config").json()["generate"]["edit"] is None
        response = client.post("/api/edit", json={"scan": "sub02", "covariates": {"age": 60}})
        assert response.status_code == 400 and "--scans" in response.json()["detail"]
    finally:
        bare.close()
    with pytest.raises(FileNotFoundError, match="not a prepared folder"):
        jobs.GenerationService(str(root / "run"), tmp_path, "cpu", scans=tmp_path)
