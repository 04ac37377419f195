"""The app's HTTP API through FastAPI's TestClient: generation with progress, downloads, the difference view,
reports, the Turing test, and refusals (paths out of their folder, bad requests, foreign Host names)."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from mriflow.app import jobs
from mriflow.app.server import LOOPBACK_NAMES, AppState, Turing, create_app
from mriflow.app.store import AnswerStore, clopper_pearson
from mriflow.app.turing import build_study

from app_helpers import NIIVUE_STAND_IN, poll, write_study


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    """An app with the shipped default model, an output folder, and a report folder holding one report."""
    root = tmp_path_factory.mktemp("app")
    niivue = root / "niivue.umd.js"
    niivue.write_text(NIIVUE_STAND_IN)
    (root / "reports" / "flow").mkdir(parents=True)
    (root / "reports" / "flow" / "report.html").write_text("<html>report</html>")
    (root / "secret.txt").write_text("secret")
    service = jobs.GenerationService("default", root / "out", "cpu")
    (root / "out").mkdir()
    state = AppState(out=root / "out", niivue=niivue, service=service, reports=[root / "reports"])
    client = TestClient(create_app(state))
    yield client, state, root
    service.close()


def test_the_model_schema_becomes_the_controls(generation):
    client, state, _ = generation
    config = client.get("/api/config").json()["generate"]
    covariates = {c["name"]: c for c in config["covariates"]}
    schema = state.service.generator.schema
    assert covariates["age"]["minimum"] == schema["age"].minimum and covariates["age"]["maximum"] == schema["age"].maximum
    assert covariates["sex"]["categories"] == list(schema["sex"].categories)
    assert config["defaults"]["solver"] in config["solvers"]
    # the default is a few-step student: its guidance is fixed, and the page says so instead of failing a request
    assert config["guidance_fixed"] is True and config["defaults"]["guidance"] == 1.0
    refused = client.post("/api/generate", json={"covariates": {"age": 30, "sex": "F"}, "guidance": 2.0})
    assert refused.status_code == 400 and "guidance" in refused.json()["detail"]
    assert client.get("/vendor/niivue.umd.js").text == NIIVUE_STAND_IN
    assert "Generate A and B" in client.get("/").text


def test_a_request_runs_with_progress_and_writes_a_sample_with_the_model_affine(generation):
    client, state, root = generation
    response = client.post("/api/generate", json={"covariates": {"age": 30, "sex": "F"}, "seed": 3, "steps": 4,
                                                  "solver": "heun"})
    assert response.status_code == 202
    job = poll(client, response.json()["id"])
    assert job["state"] == "done", job["error"]
    assert job["progress"] == 1.0 and job["calls"] == job["expected"] == 8  # heun: 2 evaluations per step
    sample = job["samples"][0]
    has_decoder = state.service.generator.labels is not None  # a shipped label decoder: a label map beside it
    assert sample["image"].startswith(job["folder"] + "/") and (sample["labels"] is not None) == has_decoder
    download = client.get(f"/files/{sample['image']}", params={"download": True})
    assert download.status_code == 200 and "attachment" in download.headers["content-disposition"]
    image = nib.Nifti1Image.from_bytes(gzip.decompress(download.content))
    assert np.allclose(image.affine, state.service.generator.affine) and image.get_data_dtype() == np.float32
    assert image.shape == tuple(state.service.generator.image_shape)
    sidecar = client.get(f"/files/{sample['sidecar']}").json()
    assert sidecar["covariates"] == {"age": 30.0, "sex": "F"} and sidecar["seed"] == 3 and sidecar["steps"] == 4
    assert [o["folder"] for o in client.get("/api/outputs").json()] == [job["folder"]]
    # a label map beside the sample (as a model with a label decoder writes it) is offered, not listed as a sample
    labels = state.out / job["folder"] / "sample_00000_labels.nii.gz"
    if not has_decoder:
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(labels))
    listed = client.get("/api/outputs").json()[0]["samples"]
    assert len(listed) == 1 and listed[0]["labels"] == f"{job['folder']}/sample_00000_labels.nii.gz"
    assert client.get(f"/api/jobs/{job['id']}").json()["samples"][0]["labels"] == listed[0]["labels"]
    assert client.get(f"/files/{listed[0]['labels']}").status_code == 200
    if not has_decoder:
        labels.unlink()


def test_a_model_with_a_label_decoder_gets_its_label_map_written_and_offered(generation, monkeypatch):
    client, state, _ = generation
    generator = state.service.generator
    def with_labels(seeds, covariates, settings):  # what a model with a label decoder returns: image and tissue map
        latents, nfe = generator.draw_latents(seeds, covariates, settings)
        volumes = generator.decode(latents)
        return volumes, (volumes > 0.5).astype(np.uint8), nfe

    monkeypatch.setattr(generator, "sample_pairs", with_labels)
    monkeypatch.setattr(generator, "labels", type("Decoder", (), {"classes": ("background", "tissue")})())
    job = poll(client, client.post("/api/generate", json={"seed": 11}).json()["id"])
    assert job["state"] == "done", job["error"]
    sample = job["samples"][0]
    assert sample["labels"] == f"{job['folder']}/sample_00000_labels.nii.gz"
    labels = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(f"/files/{sample['labels']}").content))
    image = nib.load(str(state.out / sample["image"]))
    assert np.array_equal(np.asarray(labels.dataobj), (image.get_fdata() > 0.5).astype(np.uint8))
    assert np.allclose(labels.affine, generator.affine)
    sidecar = client.get(f"/files/{sample['sidecar']}").json()
    assert sidecar["labels"] == "sample_00000_labels.nii.gz" and sidecar["label_classes"] == ["background", "tissue"]


def test_the_same_seed_gives_the_same_volume_and_the_difference_view_is_b_minus_a(generation):
    client, state, _ = generation
    a = poll(client, client.post("/api/generate", json={"covariates": {"age": 25, "sex": "F"}, "seed": 7}).json()["id"])
    b = poll(client, client.post("/api/generate", json={"covariates": {"age": 75, "sex": "F"}, "seed": 7}).json()["id"])
    again = poll(client, client.post("/api/generate", json={"covariates": {"age": 25, "sex": "F"}, "seed": 7}).json()["id"])
    load = lambda job: nib.load(str(state.out / job["samples"][0]["image"])).get_fdata()  # noqa: E731
    assert np.array_equal(load(a), load(again)) and not np.array_equal(load(a), load(b))
    response = client.get(f"/api/difference/{a['folder']}/{b['folder']}/difference.nii.gz")
    difference = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    assert np.allclose(difference.get_fdata(), load(b) - load(a), atol=1e-6)
    assert np.allclose(difference.affine, state.service.generator.affine)


@pytest.mark.parametrize("body, message", [
    ({"covariates": {"height": 180}}, "unknown covariate"),
    ({"covariates": {"sex": "X"}}, "sex"),
    ({"covariates": {"age": "old"}}, "age"),
    ({"steps": 0}, "steps"),
    ({"steps": 10**6}, "steps"),
    ({"seed": -1}, "seed"),
    ({"solver": "ddim"}, "solver"),
    ({"guidance": -2}, "guidance"),
])
def test_a_bad_request_is_refused_with_what_is_wrong(generation, body, message):
    client, _, _ = generation
    response = client.post("/api/generate", json=body)
    assert response.status_code == 400 and message in response.json()["detail"]


def test_a_form_post_is_refused(generation):
    client, _, _ = generation
    response = client.post("/api/generate", data={"seed": "1"})
    assert response.status_code == 415


@pytest.mark.parametrize("url", [
    "/files/..%2fsecret.txt", "/files/%2e%2e/secret.txt", "/files/..%2f..%2f..%2fetc%2fpasswd",
    "/files/%2fetc%2fpasswd", "/reports/0/..%2fsecret.txt", "/reports/0/%2e%2e%2fsecret.txt",
    "/api/difference/%2e%2e/out/difference.nii.gz", "/api/difference/x/y/difference.nii.gz?sample=..%2f..%2fsecret",
])
def test_a_path_out_of_its_folder_is_refused(generation, url):
    client, _, _ = generation
    response = client.get(url)
    assert response.status_code == 403 and "outside" in response.json()["detail"], response.text


def test_a_link_from_the_output_folder_to_elsewhere_is_not_served(generation):
    client, state, root = generation
    os.symlink(root / "secret.txt", state.out / "innocent.nii.gz")
    try:
        response = client.get("/files/innocent.nii.gz")
        assert response.status_code == 403 and "secret" not in response.text
    finally:
        (state.out / "innocent.nii.gz").unlink()


def test_reports_are_listed_and_served(generation):
    client, _, _ = generation
    reports = client.get("/api/reports").json()
    assert [r["name"] for r in reports] == ["reports/flow"]
    assert client.get(reports[0]["url"]).text == "<html>report</html>"
    assert client.get("/reports/5/flow/report.html").status_code == 404


def test_on_loopback_a_foreign_host_name_is_refused(generation):
    _, state, _ = generation
    client = TestClient(create_app(state, allowed_hosts=LOOPBACK_NAMES), base_url="http://127.0.0.1:8765")
    assert client.get("/api/config").status_code == 200
    assert client.get("/api/config", headers={"host": "attacker.example:8765"}).status_code == 400


# ---------------------------------------------------------------------- the Turing test


@pytest.fixture
def turing(tmp_path):
    real, fake = write_study(tmp_path)
    study = build_study(real, fake, per_class=5)
    store = AnswerStore(tmp_path / "answers.sqlite")
    store.begin_study(study.fingerprint, study.items, study.description)
    niivue = tmp_path / "niivue.umd.js"
    niivue.write_text(NIIVUE_STAND_IN)
    state = AppState(out=tmp_path / "out", niivue=niivue, turing=Turing(study, store))
    return TestClient(create_app(state)), study, store


def test_items_of_both_classes_look_the_same_from_the_outside(turing):
    client, study, _ = turing
    assert study.counts == {"real": 5, "synthetic": 5} and len({i.id for i in study.items}) == 10
    assert not any("_labels" in i.source for i in study.items)
    headers, contents = {}, set()
    for item in study.items:
        response = client.get(f"/api/turing/item/{item.id}/volume.nii.gz")
        assert response.status_code == 200 and item.source not in response.text
        image = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
        header = image.header.copy()
        headers.setdefault(item.truth, header.binaryblock)
        assert image.get_data_dtype() == np.float32 and np.allclose(image.affine, study.affine)
        data = image.get_fdata()
        assert data.min() >= 0 and data.max() <= 1
        contents.add(data.astype(np.float32).tobytes())
    assert len(contents) == 10  # each id serves its own volume
    assert headers["real"] == headers["synthetic"]  # byte for byte
    assert client.get("/api/turing/item/0123456789abcdef/volume.nii.gz").status_code == 404
    assert client.get("/api/generate").status_code in (404, 405) and client.get("/").url.path == "/turing"


def test_a_session_of_ten_answers_gives_accuracy_interval_and_csv(turing):
    client, study, store = turing
    truth = {i.id: i.truth for i in study.items}
    session = client.post("/api/turing/session", json={"rater": "ann"}).json()
    assert session["total"] == 10 and session["answered"] == 0
    answers = []
    while session["next"]:
        item = session["next"]
        answer = "real" if len(answers) % 3 else "synthetic"
        response = client.post("/api/turing/answer", json={"rater": "ann", "item": item, "answer": answer,
                                                           "confidence": 1 + len(answers) % 5, "seconds": 1.5})
        assert response.status_code == 200 and response.json()["stored"]
        answers.append(answer == truth[item])
        session = response.json()
    repeat = client.post("/api/turing/answer", json={"rater": "ann", "item": item, "answer": "real", "confidence": 3})
    assert repeat.json()["stored"] is False
    owner = {"token": client.app.state.mriflow.turing.owner_token}  # what `mriflow app` prints for the organizer
    results = client.get("/api/turing/results", params=owner).json()
    assert results["overall"]["n"] == 10 and results["overall"]["correct"] == sum(answers)
    assert (results["overall"]["ci_low"], results["overall"]["ci_high"]) == pytest.approx(clopper_pearson(sum(answers), 10))
    assert results["anchor"]["accuracy"] == 0.594
    rows = client.get("/api/turing/answers.csv", params=owner).text.strip().splitlines()
    assert rows[0].startswith("rater,item,truth,answer,correct") and len(rows) == 11
    assert client.post("/api/turing/session", json={"rater": "ann"}).json()["next"] is None  # resumed: done


def test_turing_requests_are_checked(turing):
    client, study, _ = turing
    assert client.post("/api/turing/session", json={"rater": "../../x"}).status_code == 400
    assert client.post("/api/turing/answer", json={"rater": "ghost", "item": study.items[0].id, "answer": "real",
                                                   "confidence": 3}).status_code == 404
    client.post("/api/turing/session", json={"rater": "bob"})
    assert client.post("/api/turing/answer", json={"rater": "bob", "item": "nope", "answer": "real",
                                                   "confidence": 3}).status_code == 400
    assert client.post("/api/turing/answer", json={"rater": "bob", "item": study.items[0].id, "answer": "fake",
                                                   "confidence": 3}).status_code == 400


def test_a_study_is_refused_when_its_folders_do_not_fit(tmp_path):
    real, fake = write_study(tmp_path)
    with pytest.raises(ValueError, match="split 'val'"):
        build_study(real, fake, split="val")
    with pytest.raises(ValueError, match="--per-class 7"):
        build_study(real, fake, per_class=7)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no sample_"):
        build_study(real, empty)
    other = write_study(tmp_path / "other", shape=(12, 16, 12))[1]
    with pytest.raises(ValueError, match="grid"):
        build_study(real, other)
    with pytest.raises(FileNotFoundError):
        build_study(tmp_path / "none", fake)


def test_an_adaptive_solver_is_stopped_at_the_apps_evaluation_limit(generation, monkeypatch):
    """dopri5 chooses its own steps, so the request check cannot bound it: the job stops when it reaches the limit,
    says so in one line, writes nothing, and the worker goes on with the next request."""
    client, state, _ = generation
    monkeypatch.setattr(jobs, "MAX_EVALUATIONS", 5)  # dopri5 needs at least 6 (one step of its 6 stages)
    before = sorted(state.out.iterdir())
    job = poll(client, client.post("/api/generate", json={"seed": 1, "solver": "dopri5"}).json()["id"])
    assert job["state"] == "error" and "5 network evaluations" in job["error"] and "\n" not in job["error"]
    assert sorted(state.out.iterdir()) == before
    job = poll(client, client.post("/api/generate", json={"seed": 1, "solver": "euler", "steps": 2}).json()["id"])
    assert job["state"] == "done", job["error"]
