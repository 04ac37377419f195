"""The app's HTTP side: FastAPI routes over the generation service, the output and report folders and the
Turing test, and the static front end (`launch` serves them).

Every file a request names is looked up with `paths.inside` under the folder it belongs to; a name that
leaves it is answered 403, one that is not there 404, by the name the request gave, never a server path.
State-changing requests must be JSON (`Content-Type: application/json`), which a page on another site
cannot send without the browser asking first (and the app allows no other origin); their bodies are
bounded and their fields typed (`bodies`); on a loopback address the Host header must be a loopback name,
so a DNS-rebinding page cannot reach it either.

During a Turing test the app serves nothing but the test: no output or report folder, and the results and
the answers (which hold every item's truth) only to the study owner, who holds the token `mriflow app`
printed (`?token=` or the X-Mriflow-Token header); a rater without it gets 403.
"""

from __future__ import annotations

import gzip
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from mriflow.app import jobs
from mriflow.app.bodies import BodyLimit, file_body, json_body, number, text
from mriflow.app.scans import KINDS, MAX_UPLOAD
from mriflow.app.paths import MissingFile, OutsideRootError, existing_file, inside
from mriflow.app.store import CONFIDENCE, TRUTHS, AnswerStore, check_rater
from mriflow.app.turing import Study

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]
REPORT_FILE = "report.html"
REPORT_DEPTH = 4  # how deep under a report root a report.html is looked for
OWNER_HEADER = "X-Mriflow-Token"
NOT_OWNER = ("the results and the answers are for the study owner: open the results link with ?token= that "
             "`mriflow app` printed when it started")
OFF_IN_TURING = "not served during a Turing test (raters see nothing but the items)"


@dataclass
class Turing:
    study: Study
    store: AnswerStore
    owner_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # 192 bits, printed at start


def body_spec(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The OpenAPI description of a JSON body read by `json_body` (the schema the fuzzing tests draw from)."""
    schema = {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def generate_spec(service: jobs.GenerationService | None) -> dict[str, Any]:
    """The body of a generation request, with the model's own covariates (a number or one of its categories)."""
    info = {"covariates": [], "solvers": list(jobs.STAGES_PER_STEP)} if service is None else service.model_info()
    covariates = {c["name"]: {"type": ["number", "null"]} if c["kind"] == "continuous" else
                  {"enum": [*c["categories"], None]} for c in info["covariates"]}
    return body_spec({
        "covariates": {"type": "object", "properties": covariates, "additionalProperties": False},
        "seed": {"type": "integer", "minimum": 0, "maximum": jobs.MAX_SEED},
        "steps": {"type": "integer", "minimum": 1, "maximum": jobs.MAX_STEPS},
        "solver": {"enum": info["solvers"]}, "guidance": {"type": "number", "minimum": 0}})


def edit_spec(service: jobs.GenerationService | None) -> dict[str, Any]:
    """The body of an edit request: one of the app's scans (--scans) and the covariates to draw it under."""
    spec = generate_spec(service)["requestBody"]["content"]["application/json"]["schema"]["properties"]
    scans = list(service.scans) if service is not None else []
    return body_spec({"scan": {"enum": scans} if scans else {"type": "string"}, "covariates": spec["covariates"],
                      "steps": {"type": "integer", "minimum": 1, "maximum": jobs.MAX_EVALUATIONS // jobs.EDIT_EVALUATIONS_PER_STEP}},
                     ("scan", "covariates"))


UPLOAD_SPEC = {
    "parameters": [{"name": "kind", "in": "query", "schema": {"enum": list(KINDS)}},
                   {"name": "age", "in": "query", "schema": {"type": "number"}},
                   {"name": "sex", "in": "query", "schema": {"type": "string"}}],
    "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                          "format": "binary"}}}}}
SESSION_BODY = body_spec({"rater": {"type": "string", "minLength": 1, "maxLength": 64}}, ("rater",))
ANSWER_BODY = body_spec({
    "rater": {"type": "string"}, "item": {"type": "string"}, "answer": {"enum": list(TRUTHS)},
    "confidence": {"type": "integer", "minimum": CONFIDENCE[0], "maximum": CONFIDENCE[1]},
    "seconds": {"type": ["number", "null"], "minimum": 0}}, ("rater", "item", "answer", "confidence"))


@dataclass
class AppState:
    out: Path
    niivue: Path
    service: jobs.GenerationService | None = None
    turing: Turing | None = None
    reports: list[Path] = field(default_factory=list)


def create_app(state: AppState, allowed_hosts: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="mriflow", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mriflow = state
    app.add_middleware(BodyLimit, limits={"/api/scans": MAX_UPLOAD})
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.exception_handler(OutsideRootError)
    async def outside(_: Request, error: OutsideRootError):
        return JSONResponse({"detail": str(error)}, status_code=403)

    @app.exception_handler(FileNotFoundError)
    async def missing(_: Request, error: FileNotFoundError):  # another's message may hold a server path
        return JSONResponse({"detail": str(error) if isinstance(error, MissingFile) else "not found"}, status_code=404)

    @app.exception_handler(jobs.QueueFull)
    async def busy(_: Request, error: jobs.QueueFull):
        return JSONResponse({"detail": str(error)}, status_code=429)

    @app.exception_handler(KeyError)
    async def unknown(_: Request, error: KeyError):
        return JSONResponse({"detail": str(error.args[0]) if error.args else "not found"}, status_code=404)

    @app.exception_handler(ValueError)
    async def invalid(_: Request, error: ValueError):
        return JSONResponse({"detail": str(error)}, status_code=400)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------------ pages

    def page(name: str) -> FileResponse:
        return FileResponse(STATIC / name, media_type="text/html", headers={"Cache-Control": "no-store"})

    @app.get("/", include_in_schema=False)
    def home():
        return RedirectResponse("/turing") if state.service is None and state.turing is not None else page("index.html")

    @app.get("/turing", include_in_schema=False)
    def turing_page():
        return page("turing.html")

    @app.get("/turing/results", include_in_schema=False)
    def results_page():
        return page("results.html")

    @app.get("/reports", include_in_schema=False)
    def reports_page():
        return page("reports.html")

    @app.get("/vendor/niivue.umd.js", include_in_schema=False)
    def niivue():
        return FileResponse(state.niivue, media_type="text/javascript")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/api/config")
    def config():
        return {"generate": state.service.model_info() if state.service else None,
                "turing": None if state.turing is None else {"items": len(state.turing.study.items),
                                                             "per_class": state.turing.study.counts},
                "reports": len(state.reports)}

    # ------------------------------------------------------------------ generation

    def service() -> jobs.GenerationService:
        if state.service is None:
            raise HTTPException(404, "generation is off in this app (started with --turing)")
        return state.service

    def not_in_turing() -> None:
        if state.turing is not None:
            raise HTTPException(404, OFF_IN_TURING)

    @app.post("/api/generate", status_code=202, openapi_extra=generate_spec(state.service))
    async def generate(request: Request):
        job = service().submit(await json_body(request))
        return job.view()

    @app.post("/api/edit", status_code=202, openapi_extra=edit_spec(state.service))
    async def edit(request: Request):
        job = service().submit_edit(await json_body(request))
        return job.view()

    @app.post("/api/scans", status_code=202, openapi_extra=UPLOAD_SPEC)
    async def upload(request: Request, kind: str = "brain"):
        """A T1 of the user's (the NIfTI file as the body; its covariates as query parameters, e.g. ?age=52&sex=F):
        prepared onto the model's grid, then one of the scans /api/edit takes (the job's request.scan)."""
        from mriflow.models.conditioning import parse_value

        data = await file_body(request, MAX_UPLOAD)
        covariates = {name: parse_value(value) for name, value in request.query_params.items() if name != "kind"}
        return service().submit_upload(data, covariates, kind).view()

    @app.get("/api/scans/{scan_id}/volume.nii.gz")
    def scan_volume(scan_id: str, download: bool = False):
        """One of the scans /api/edit takes (--scans or uploaded and prepared), what its edits are drawn over."""
        not_in_turing()
        known = service().scans.get(scan_id)
        if known is None or not Path(known["path"]).is_file():
            raise HTTPException(404, f"no scan {scan_id!r} in this app; choose one of /api/config's scans")
        return file_response(Path(known["path"]), download)

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str):
        found = service().job(job_id)
        view = found.view()
        if found.folder:
            view["samples"] = jobs.sample_files(state.out, found.folder)
        return view

    @app.get("/api/outputs")
    def outputs():
        not_in_turing()
        return jobs.outputs(state.out)

    @app.get("/files/{path:path}")
    def files(path: str, download: bool = False):
        not_in_turing()
        target = existing_file(state.out, path)
        return file_response(target, download)

    @app.get("/api/difference/{a}/{b}/difference.nii.gz")
    def difference(a: str, b: str, sample: str = "sample_00000", download: bool = False):
        not_in_turing()
        volume, affine = jobs.difference(state.out, f"{a}/{sample}.nii.gz", f"{b}/{sample}.nii.gz")
        image = nib.Nifti1Image(volume, affine)
        image.header.set_qform(affine, code=4)
        image.header.set_sform(affine, code=4)
        body = image.to_bytes()
        headers = {"Content-Disposition": f'attachment; filename="difference_{a}_{b}.nii.gz"'} if download else {}
        return Response(gzip.compress(body, mtime=0), media_type="application/gzip", headers=headers)

    # ------------------------------------------------------------------ evaluation reports

    @app.get("/api/reports")
    def reports():
        not_in_turing()
        found = []
        for index, root in enumerate(state.reports):
            for report in sorted(_reports_under(root)):
                relative = report.parent.relative_to(root.resolve()).as_posix()
                found.append({"root": index, "name": f"{root.name}/{relative}".rstrip("/."),
                              "url": f"/reports/{index}/{report.relative_to(root.resolve()).as_posix()}"})
        return found

    @app.get("/reports/{root}/{path:path}")
    def report_file(root: int, path: str):
        not_in_turing()
        if not 0 <= root < len(state.reports):
            raise HTTPException(404, f"no report folder {root}")
        return file_response(existing_file(state.reports[root], path), False)

    # ------------------------------------------------------------------ Turing test

    def turing() -> Turing:
        if state.turing is None:
            raise HTTPException(404, "no Turing test in this app (start it with --turing --real DATA --fake DIR)")
        return state.turing

    def owner(request: Request, token: str | None) -> Turing:
        """The Turing test, for a request that carries the owner's token (query or header); 403 otherwise."""
        t = turing()
        expected = t.owner_token.encode()
        if not any(secrets.compare_digest(given.encode(), expected)
                   for given in (token, request.headers.get(OWNER_HEADER)) if given):
            raise HTTPException(403, NOT_OWNER)
        return t

    @app.post("/api/turing/session", openapi_extra=SESSION_BODY)
    async def start_session(request: Request):
        t = turing()
        rater = check_rater(text(await json_body(request), "rater").strip())
        t.store.start_session(rater, [item.id for item in t.study.items])
        return t.store.session(rater)

    @app.get("/api/turing/session/{rater}")
    def session(rater: str):
        return turing().store.session(rater)

    @app.get("/api/turing/item/{item_id}/volume.nii.gz")
    def item_volume(item_id: str):
        t = turing()
        if item_id not in t.study.paths:
            raise HTTPException(404, "no such item")
        return Response(t.study.volume_bytes(item_id), media_type="application/octet-stream",
                        headers={"Cache-Control": "no-store"})

    @app.post("/api/turing/answer", openapi_extra=ANSWER_BODY)
    async def answer(request: Request):
        t = turing()
        body = await json_body(request)
        rater, item, given = text(body, "rater"), text(body, "item"), text(body, "answer")
        seconds = number(body, "seconds", minimum=0.0)
        stored = t.store.answer(rater, item, given, body.get("confidence"), seconds)
        return {"stored": stored, **t.store.session(rater)}

    @app.get("/api/turing/results")
    def results(request: Request, token: str | None = None):
        t = owner(request, token)
        return JSONResponse({**t.store.results(), "items": t.study.counts}, headers={"Cache-Control": "no-store"})

    @app.get("/api/turing/answers.csv")
    def answers_csv(request: Request, token: str | None = None):
        return Response(owner(request, token).store.csv(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="turing_answers.csv"',
                                 "Cache-Control": "no-store"})

    return app


def file_response(path: Path, download: bool) -> FileResponse:
    kind = "application/gzip" if path.name.endswith(".gz") else None
    return FileResponse(path, media_type=kind, filename=path.name if download else None,
                        content_disposition_type="attachment" if download else "inline")


def _reports_under(root: Path) -> list[Path]:
    base = root.resolve()
    found = []
    for depth in range(REPORT_DEPTH + 1):
        for report in base.glob("/".join(["*"] * depth + [REPORT_FILE])):
            try:
                found.append(inside(base, report.relative_to(base).as_posix()))
            except OutsideRootError:  # a link out of the report folder is not followed
                continue
    return found
