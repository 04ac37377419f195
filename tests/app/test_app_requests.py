"""Requests no page of the app would send (issue 25.2): each is answered 4xx with a one-line reason naming what is
wrong, never 500, never a server path; bodies and the generation queue are bounded; one unreadable entry of the
output folder does not hide the rest."""

from __future__ import annotations

import csv
import io
import json
import os
import threading

import pytest
from fastapi.testclient import TestClient

from mriflow.app import jobs
from mriflow.app.bodies import MAX_BODY
from mriflow.app.server import AppState, Turing, create_app
from mriflow.app.store import AnswerStore
from mriflow.app.turing import build_study

from app_helpers import NIIVUE_STAND_IN, write_study


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    """An app with the shipped default model whose jobs wait for `release` (so the queue can be filled)."""
    root = tmp_path_factory.mktemp("requests")
    (root / "niivue.umd.js").write_text(NIIVUE_STAND_IN)
    (root / "out").mkdir()
    service = jobs.GenerationService("default", root / "out", "cpu")
    release = threading.Event()
    release.set()

    def wait_then_finish(job, checked):  # stands in for sampling: the queue, not the model, is under test here
        job.state = "running"
        release.wait(60)
        job.state = "done"

    service._run = wait_then_finish
    state = AppState(out=root / "out", niivue=root / "niivue.umd.js", service=service)
    yield TestClient(create_app(state)), state, root, release
    release.set()
    service.close()


def post(client: TestClient, url: str, body: dict | str):
    """A JSON post; a str is sent as it is (1e400 is JSON, which the test client would not write from inf)."""
    if isinstance(body, str):
        return client.post(url, content=body, headers={"content-type": "application/json"})
    return client.post(url, json=body)


def one_line(response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, detail
    return detail


def test_a_body_nested_too_deeply_is_400_and_a_huge_one_is_413(generation):
    client, _, _, _ = generation
    deep = "[" * 5000 + "]" * 5000  # 10 KB, far below the size limit: Python's JSON parser recurses once per level
    response = client.post("/api/generate", content=f'{{"covariates": {deep}}}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nested" in one_line(response)
    huge = "[" * 200_000 + "]" * 200_000  # the probe's body: over the limit, refused before it is parsed
    response = client.post("/api/generate", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and f"{MAX_BODY}" in one_line(response)


def test_a_body_over_the_limit_is_413_with_or_without_a_declared_length(generation):
    client, _, _, _ = generation
    body = b'{"seed": 1, "pad": "' + b"x" * (MAX_BODY + 1) + b'"}'
    response = client.post("/api/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "bytes" in one_line(response)
    streamed = client.post("/api/generate", content=iter([body[:1000], body[1000:]]),  # chunked: no Content-Length
                           headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    response = client.post("/api/turing/session", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413  # before the route (which would be 404 here) reads a byte


@pytest.mark.parametrize("body, name", [
    ({"covariates": [1, 2]}, "covariates"),
    ({"covariates": "age=30"}, "covariates"),
    ({"covariates": {"age": True}}, "age"),
    ({"covariates": {"age": [30]}}, "age"),
    ({"covariates": {"sex": {"F": 1}}}, "sex"),
    ('{"covariates": {"age": 1e400}}', "age"),
    ('{"covariates": {"age": 1%s}}' % ("0" * 400), "age"),  # an integer beyond a float
    ({"guidance": True}, "guidance"),
    ({"guidance": [1]}, "guidance"),
    ('{"guidance": 1e400}', "guidance"),
    ('{"guidance": NaN}', "JSON"),
    ({"solver": ["heun"]}, "solver"),
    ({"steps": True}, "steps"),
    ({"seed": 1.5}, "seed"),
])
def test_a_value_of_the_wrong_type_is_400_naming_it(generation, body, name):
    client, _, _, _ = generation
    response = post(client, "/api/generate", body)
    assert response.status_code == 400, response.text
    assert name in one_line(response)


def test_steps_are_bounded_by_network_evaluations(generation):
    client, _, _, _ = generation
    response = client.post("/api/generate", json={"solver": "rk4", "steps": 1000})  # 4000 evaluations
    assert response.status_code == 400
    detail = one_line(response)
    assert "steps" in detail and str(jobs.MAX_EVALUATIONS) in detail
    assert client.post("/api/generate", json={"solver": "euler", "steps": jobs.MAX_EVALUATIONS + 1}).status_code == 400


def test_the_generation_queue_is_bounded_and_429_says_so(generation):
    client, state, _, release = generation
    release.clear()
    try:
        accepted = [client.post("/api/generate", json={"seed": i, "steps": 2}) for i in range(jobs.MAX_PENDING)]
        assert [r.status_code for r in accepted] == [202] * jobs.MAX_PENDING
        refused = client.post("/api/generate", json={"seed": 99, "steps": 2})
        assert refused.status_code == 429 and str(jobs.MAX_PENDING) in one_line(refused)
    finally:
        release.set()
    state.service.worker.submit(lambda: None).result(timeout=60)  # every queued job has run
    assert client.post("/api/generate", json={"seed": 100, "steps": 2}).status_code == 202


def test_a_linked_folder_in_the_output_is_skipped_and_the_rest_listed(generation):
    client, state, root, _ = generation
    outside = root / "elsewhere"
    outside.mkdir(exist_ok=True)
    (outside / "sample_00000.nii.gz").write_bytes(b"not listed")
    good = state.out / "20260101-000000-good"
    good.mkdir()
    (good / "sample_00000.nii.gz").write_bytes(b"listed")
    os.symlink(outside, state.out / "20991231-000000-link")
    os.symlink(root / "elsewhere" / "sample_00000.nii.gz", good / "sample_00001.nii.gz")  # a file linked out
    try:
        response = client.get("/api/outputs")
        assert response.status_code == 200
        listed = {o["folder"]: [s["name"] for s in o["samples"]] for o in response.json()}
        assert listed["20260101-000000-good"] == ["sample_00000"] and "20991231-000000-link" not in listed
    finally:
        (state.out / "20991231-000000-link").unlink()
        (good / "sample_00001.nii.gz").unlink()


@pytest.mark.parametrize("url", [
    "/files/nothing/here.nii.gz", "/api/difference/none/other/difference.nii.gz",
    "/api/jobs/000000000000", "/reports/0/report.html",
])
def test_a_404_names_no_server_path(generation, url):
    client, _, root, _ = generation
    response = client.get(url)
    assert response.status_code == 404
    assert str(root) not in response.text and str(root.resolve()) not in response.text and one_line(response)


def test_a_damaged_volume_in_a_difference_is_400_without_its_path(generation):
    client, state, root, _ = generation
    for name in ("broken-a", "broken-b"):
        (state.out / name).mkdir(exist_ok=True)
        (state.out / name / "sample_00000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    response = client.get("/api/difference/broken-a/broken-b/difference.nii.gz")
    assert response.status_code == 400 and str(root) not in response.text and "broken-a" in one_line(response)


# ---------------------------------------------------------------------- the Turing test's requests


@pytest.fixture
def turing(tmp_path):
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    study = build_study(real, fake, per_class=2)
    store = AnswerStore(tmp_path / "answers.sqlite")
    store.begin_study(study.fingerprint, study.items, {})
    (tmp_path / "niivue.umd.js").write_text(NIIVUE_STAND_IN)
    state = AppState(out=tmp_path / "out", niivue=tmp_path / "niivue.umd.js", turing=Turing(study, store))
    return TestClient(create_app(state)), state.turing


@pytest.mark.parametrize("body, name", [
    ({"rater": None}, "rater"), ({"rater": 5}, "rater"), ({"rater": ["ann"]}, "rater"), ({}, "rater"),
])
def test_a_session_needs_a_rater_name_that_is_a_string(turing, body, name):
    client, t = turing
    response = client.post("/api/turing/session", json=body)
    assert response.status_code == 400 and name in one_line(response)
    assert t.store.answers() == [] and client.get("/api/turing/session/None").status_code == 404


@pytest.mark.parametrize("change, name", [
    ("1e400", "seconds"), ({"seconds": True}, "seconds"), ({"seconds": -1}, "seconds"),
    ({"seconds": "3"}, "seconds"), ({"rater": None}, "rater"), ({"item": 7}, "item"), ({"answer": ["real"]}, "answer"),
    ({"confidence": 2.5}, "confidence"),
])
def test_an_answer_with_a_bad_field_is_refused_and_nothing_stored(turing, change, name):
    client, t = turing
    client.post("/api/turing/session", json={"rater": "ann"})
    item = t.study.items[0].id
    body = {"rater": "ann", "item": item, "answer": "real", "confidence": 3, "seconds": 2.0}
    if isinstance(change, str):  # a number the test client cannot write from a float
        body = json.dumps(body).replace("2.0", change)
    else:
        body.update(change)
    response = post(client, "/api/turing/answer", body)
    assert response.status_code == 400 and name in one_line(response)
    assert t.store.answers() == []


def test_rater_names_that_a_spreadsheet_would_run_are_escaped_in_the_export(turing):
    client, t = turing
    for rater in ("+1", "-2", "@SUM", "ann"):
        session = client.post("/api/turing/session", json={"rater": rater}).json()
        client.post("/api/turing/answer", json={"rater": rater, "item": session["next"], "answer": "real",
                                                "confidence": 3, "seconds": 1.0})
    rows = list(csv.DictReader(io.StringIO(t.store.csv())))
    assert sorted(r["rater"] for r in rows) == ["'+1", "'-2", "'@SUM", "ann"]
    assert all(not r["rater"].startswith(("=", "+", "-", "@")) for r in rows)
    assert {r["seconds"] for r in rows} == {"1.0"}  # numbers stay numbers
