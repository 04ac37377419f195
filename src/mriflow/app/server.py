"""The app's HTTP side: FastAPI routes over the generation service, the output and report folders and the
Turing test, the static front end, and `serve`, which binds the socket itself (a taken port is one line).

Every file a request names is looked up with `paths.inside` under the folder it belongs to; a name that
leaves it is answered 403. State-changing requests must be JSON (`Content-Type: application/json`), which
a page on another site cannot send without the browser asking first (and the app allows no other
origin); on a loopback address the Host header must be a loopback name, so a DNS-rebinding page cannot
reach it either.
"""

from __future__ import annotations

import gzip
import ipaddress
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from mriflow.app import jobs
from mriflow.app.paths import OutsideRootError, existing_file, inside
from mriflow.app.store import AnswerStore, check_rater
from mriflow.app.turing import Study

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]
REPORT_FILE = "report.html"
REPORT_DEPTH = 4  # how deep under a report root a report.html is looked for


@dataclass
class Turing:
    study: Study
    store: AnswerStore


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
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.exception_handler(OutsideRootError)
    async def outside(_: Request, error: OutsideRootError):
        return JSONResponse({"detail": str(error)}, status_code=403)

    @app.exception_handler(FileNotFoundError)
    async def missing(_: Request, error: FileNotFoundError):
        return JSONResponse({"detail": str(error)}, status_code=404)

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
                "out": str(state.out), "reports": len(state.reports)}

    # ------------------------------------------------------------------ generation

    def service() -> jobs.GenerationService:
        if state.service is None:
            raise HTTPException(404, "generation is off in this app (started with --turing)")
        return state.service

    @app.post("/api/generate", status_code=202)
    async def generate(request: Request):
        job = service().submit(await json_body(request))
        return job.view()

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str):
        found = service().job(job_id)
        view = found.view()
        if found.folder:
            view["samples"] = jobs.sample_files(state.out, found.folder)
        return view

    @app.get("/api/outputs")
    def outputs():
        return jobs.outputs(state.out)

    @app.get("/files/{path:path}")
    def files(path: str, download: bool = False):
        target = existing_file(state.out, path)
        return file_response(target, download)

    @app.get("/api/difference/{a}/{b}/difference.nii.gz")
    def difference(a: str, b: str, sample: str = "sample_00000", download: bool = False):
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
        found = []
        for index, root in enumerate(state.reports):
            for report in sorted(_reports_under(root)):
                relative = report.parent.relative_to(root.resolve()).as_posix()
                found.append({"root": index, "name": f"{root.name}/{relative}".rstrip("/."),
                              "url": f"/reports/{index}/{report.relative_to(root.resolve()).as_posix()}"})
        return found

    @app.get("/reports/{root}/{path:path}")
    def report_file(root: int, path: str):
        if not 0 <= root < len(state.reports):
            raise HTTPException(404, f"no report folder {root}")
        return file_response(existing_file(state.reports[root], path), False)

    # ------------------------------------------------------------------ Turing test

    def turing() -> Turing:
        if state.turing is None:
            raise HTTPException(404, "no Turing test in this app (start it with --turing --real DATA --fake DIR)")
        return state.turing

    @app.post("/api/turing/session")
    async def start_session(request: Request):
        t = turing()
        rater = check_rater(str((await json_body(request)).get("rater", "")).strip())
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

    @app.post("/api/turing/answer")
    async def answer(request: Request):
        t = turing()
        body = await json_body(request)
        rater = str(body.get("rater", ""))
        seconds = body.get("seconds")
        stored = t.store.answer(rater, str(body.get("item", "")), body.get("answer"), body.get("confidence"),
                                float(seconds) if isinstance(seconds, (int, float)) else None)
        return {"stored": stored, **t.store.session(rater)}

    @app.get("/api/turing/results")
    def results():
        t = turing()
        return {**t.store.results(), "items": t.study.counts}

    @app.get("/api/turing/answers.csv")
    def answers_csv():
        return Response(turing().store.csv(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="turing_answers.csv"'})

    return app


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; a form post (which another site could send unasked) is refused."""
    if not request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        raise HTTPException(415, "send JSON (Content-Type: application/json)")
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


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


# ---------------------------------------------------------------------- serving


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; OSError with one line when it cannot be had (port taken, bad address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise OSError(f"--host {host}: not an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        taken = error.errno in (98, 48)  # EADDRINUSE on Linux, macOS
        raise OSError(f"--port {port}: " + ("already in use on " + host + "; choose another port (--port 0 picks a "
                                            "free one)" if taken else f"cannot listen on {host} ({error.strerror})")) from None
    return sock


def serve(state: AppState, sock: socket.socket, host: str = "127.0.0.1", announce=print) -> None:
    """Serve the app on a bound socket (see `bind`) until interrupted. On a loopback address only loopback
    Host names are answered."""
    import uvicorn

    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(host):
        announce(f"mriflow app: warning: listening on {host}, so anyone who can reach this machine can use the app "
                 "(there is no login); use --host 127.0.0.1 to keep it to this machine", file=sys.stderr)
    allowed = LOOPBACK_NAMES if is_loopback(host) else None  # the middleware compares names without the port
    app = create_app(state, allowed_hosts=allowed)
    announce(f"mriflow app: http://{shown}:{actual}/  (Ctrl+C to stop)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if state.service is not None:
            state.service.close()


def run(model: str = "default", out: str | Path = "app-output", host: str = "127.0.0.1", port: int = 8765,
        reports: list[str] | None = None, turing: bool = False, real: str | None = None, fake: str | None = None,
        split: str = "test", per_class: int | None = None, db: str | None = None, device: str = "cpu",
        trust_paths: bool = False) -> None:
    """`mriflow app`: check everything a user gave (NiiVue installed, model, folders), then serve."""
    from mriflow.app.niivue import locate_niivue

    niivue = locate_niivue()
    out = Path(out)
    state = AppState(out=out, niivue=niivue)
    roots = [Path(r) for r in reports] if reports else [p for p in (Path("reports"),) if p.is_dir()]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"--reports {root}: no such folder")
    state.reports = roots
    sock = bind(host, port)  # before the model loads: a taken port is said at once
    try:
        _load(state, model, turing, real, fake, split, per_class, db, device, trust_paths)
    except BaseException:
        sock.close()
        raise
    serve(state, sock, host)


def _load(state: AppState, model: str, turing: bool, real: str | None, fake: str | None, split: str,
          per_class: int | None, db: str | None, device: str, trust_paths: bool) -> None:
    from mriflow.app.turing import build_study

    out = state.out
    if turing:
        if not real or not fake:
            raise ValueError("--turing needs --real DATA (a prepared dataset) and --fake DIR (generated volumes)")
        study = build_study(real, fake, split=split, per_class=per_class)
        out.mkdir(parents=True, exist_ok=True)
        store = AnswerStore(Path(db) if db else out / "turing.sqlite")
        store.add_items(study.items)
        state.turing = Turing(study, store)
        print(f"mriflow app: Turing test of {study.counts['real']} real ({split} split of {real}) and "
              f"{study.counts['synthetic']} generated volumes ({fake}); answers in {store.path}")
    else:
        if real or fake or db:
            raise ValueError("--real, --fake and --db belong to the Turing test: add --turing")
        out.mkdir(parents=True, exist_ok=True)
        state.service = jobs.GenerationService(model, out, device, trust_paths)
        print(f"mriflow app: model {state.service.generator.model_id}; samples go to {out}/")
