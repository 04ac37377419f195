"""The app's API fuzzed from its own OpenAPI schema with Schemathesis (issue 25.3): no request gets a 500.

Two apps are fuzzed: one generating with the shipped default model, whose jobs finish at once without sampling
(the requests are under test here, not the model: sampling is tested in test_app_api.py), and one running a
Turing test of phantoms, called with the owner's token so that the results and the export are reached too.
Schemathesis runs its phases on every operation: the schema's examples, its coverage cases (each field missing,
of every wrong type, at and past its bounds) and EXAMPLES requests drawn by Hypothesis that fit the schema or
break it, with derandomize=True (the same requests on every run, so a failure reproduces) and no example
database. The module takes well under a minute on a CPU.

Schemathesis's pytest integration (`schema.parametrize`) does not run under pytest 9 (it reads a node attribute
pytest 9 removed), so each operation's test is built with the builder that integration uses, `create_test`.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.generation.hypothesis.builder import HypothesisTestConfig, HypothesisTestMode, create_test

from app_helpers import NIIVUE_STAND_IN, write_study
from mriflow.app import jobs
from mriflow.app.server import OWNER_HEADER, AppState, Turing, create_app
from mriflow.app.store import AnswerStore
from mriflow.app.turing import build_study

EXAMPLES = 25  # drawn requests per operation, beside the coverage cases
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


def schema_of(app):
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.app = app  # requests go to the app in this process, through ASGI
    return schema


def fuzz(schema, headers: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Every operation of the schema through every phase; (requests sent, those answered 5xx as one line each)."""
    sent, failures = [0], []

    def call(case):
        response = case.call(headers=headers)
        sent[0] += 1
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} query={case.query} body={case.body!r:.300} -> "
                            f"{response.status_code}: {response.text[:300]}")

    for result in schema.get_all_operations():
        config = HypothesisTestConfig(project=schema.config, settings=FUZZ, modes=list(HypothesisTestMode))
        create_test(operation=result.ok(), test_func=call, config=config)()
    return sent[0], failures


@pytest.fixture
def generating_api(tmp_path):
    (tmp_path / "niivue.umd.js").write_text(NIIVUE_STAND_IN)
    (tmp_path / "out" / "20260101-000000-a").mkdir(parents=True)
    (tmp_path / "out" / "20260101-000000-a" / "sample_00000.nii.gz").write_bytes(b"\x1f\x8b damaged")
    (tmp_path / "reports" / "flow").mkdir(parents=True)
    (tmp_path / "reports" / "flow" / "report.html").write_text("<html></html>")
    service = jobs.GenerationService("default", tmp_path / "out", "cpu")

    def finish(job, checked):  # the job is accepted, checked and queued as for real; no volume is drawn
        job.state = "done"

    service._run = finish
    app = create_app(AppState(out=tmp_path / "out", niivue=tmp_path / "niivue.umd.js", service=service,
                              reports=[tmp_path / "reports"]))
    schema = schema_of(app)
    assert {"/api/generate", "/files/{path}", "/api/outputs", "/api/difference/{a}/{b}/difference.nii.gz"} <= \
        {result.ok().path for result in schema.get_all_operations()}
    yield schema
    service.close()


@pytest.fixture
def turing_api(tmp_path):
    real, fake = write_study(tmp_path, real_test=2, fakes=2)
    study = build_study(real, fake, per_class=2)
    store = AnswerStore(tmp_path / "answers.sqlite")
    store.begin_study(study.fingerprint, study.items, study.description)
    store.start_session("ann", [item.id for item in study.items])
    (tmp_path / "niivue.umd.js").write_text(NIIVUE_STAND_IN)
    turing = Turing(study, store, owner_token="owner-token-of-the-fuzzing-test")
    app = create_app(AppState(out=tmp_path / "out", niivue=tmp_path / "niivue.umd.js", turing=turing))
    assert TestClient(app).get("/api/turing/results", headers={OWNER_HEADER: turing.owner_token}).status_code == 200
    return schema_of(app)


def test_no_request_to_the_generating_app_gets_a_500(generating_api):
    sent, failures = fuzz(generating_api)
    assert not failures, "\n".join(failures)
    assert sent > 20 * EXAMPLES  # every operation was reached, many times


def test_no_request_to_a_turing_test_gets_a_500(turing_api):
    sent, failures = fuzz(turing_api, headers={OWNER_HEADER: "owner-token-of-the-fuzzing-test"})
    assert not failures, "\n".join(failures)
    assert sent > 10 * EXAMPLES
