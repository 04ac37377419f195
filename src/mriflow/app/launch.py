"""`mriflow app` from its arguments to a listening server: everything a user gave checked, the model or the Turing
test set up, the socket bound (a taken port is one line), the addresses printed.

A Turing test's answer database holds every item's truth, so it is kept out of every folder an app serves: by
default `turing.sqlite` in the current folder, and a `--db` inside the output folder or a report folder is refused
(a later `mriflow app --out` on that folder would serve it to anyone). A database holds one study, recognised by
its fingerprint (`turing.fingerprint`): another study's is refused unless `--new-study` is given, which moves the
old file aside (`store.move_aside`, renamed beside it) and starts afresh. No answer is ever deleted.

The results and the answers are for the study owner: the token that opens them is made at start and printed here,
with the link that carries it, to the owner's terminal only.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path
from typing import Callable

from mriflow.app import jobs
from mriflow.app.server import LOOPBACK_NAMES, AppState, Turing, create_app
from mriflow.app.store import AnswerStore, StudyMismatch, move_aside

DEFAULT_DB = "turing.sqlite"  # in the current folder
EARLIER_DB = "turing.sqlite"  # where answers went before issue 25: inside --out, which the app serves
DEFAULT_REPORTS = Path("reports")


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


def addresses(state: AppState, host: str, port: int) -> list[str]:
    """The lines `serve` prints: the app's address and, for a Turing test, the owner's link to the results."""
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    lines = [f"mriflow app: {base}/  (Ctrl+C to stop)"]
    if state.turing is not None:
        lines.append(f"mriflow app: results and answers, for you alone (raters need only the address above): "
                     f"{base}/turing/results?token={state.turing.owner_token}")
    return lines


def serve(state: AppState, sock: socket.socket, host: str = "127.0.0.1", announce=print) -> None:
    """Serve the app on a bound socket (see `bind`) until interrupted. On a loopback address only loopback
    Host names are answered."""
    import uvicorn

    if not is_loopback(host):
        announce(f"mriflow app: warning: listening on {host}, so anyone who can reach this machine can use the app "
                 "(there is no login); use --host 127.0.0.1 to keep it to this machine", file=sys.stderr)
    allowed = LOOPBACK_NAMES if is_loopback(host) else None  # the middleware compares names without the port
    app = create_app(state, allowed_hosts=allowed)
    for line in addresses(state, host, sock.getsockname()[1]):
        announce(line, flush=True)
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
        trust_paths: bool = False, new_study: bool = False, scans: str | Path | None = None,
        uploads: bool = False) -> None:
    """`mriflow app`: check everything a user gave (NiiVue installed, model, folders), then serve."""
    from mriflow.app.niivue import locate_niivue

    niivue = locate_niivue()
    state = AppState(out=Path(out), niivue=niivue)
    if turing and reports:
        raise ValueError("--reports: a Turing test serves nothing but its items (a report would tell raters what "
                         "to look for); serve reports from a second `mriflow app` without --turing")
    roots = [Path(r) for r in reports] if reports else [p for p in (DEFAULT_REPORTS,) if p.is_dir()]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"--reports {root}: no such folder")
    sock = bind(host, port)  # before the model loads: a taken port is said at once
    try:
        if turing:
            if not real or not fake:
                raise ValueError("--turing needs --real DATA (a prepared dataset) and --fake DIR (generated volumes)")
            if scans or uploads:
                raise ValueError("--scans, --uploads: a Turing test shows no edits; drop them or --turing")
            state.turing = load_turing(real, fake, split, per_class, db, out=state.out, reports=roots,
                                       new_study=new_study)
        else:
            if real or fake or db or new_study:
                raise ValueError("--real, --fake, --db and --new-study belong to the Turing test: add --turing")
            state.reports = roots
            state.out.mkdir(parents=True, exist_ok=True)
            state.service = jobs.GenerationService(model, state.out, device, trust_paths, scans=scans, uploads=uploads)
            print(f"mriflow app: model {state.service.generator.model_id}; samples go to {state.out}/")
    except BaseException:
        sock.close()
        raise
    serve(state, sock, host)


def answer_database(db: str | Path | None, out: str | Path, reports: list[Path]) -> Path:
    """Where the answers go: `db`, or DEFAULT_DB in the current folder; ValueError when that lies inside the
    output folder or a report folder, or when answers of an earlier test lie in the output folder."""
    if db is None:
        earlier = Path(out) / EARLIER_DB
        if earlier.exists():
            raise ValueError(f"{earlier}: the answers of an earlier Turing test lie inside --out {out}, which the app "
                             f"serves to anyone who opens it; move it out of there (e.g. `mv {earlier} {DEFAULT_DB}` if it "
                             "holds this study) and start again, or give another --db")
    path = Path(DEFAULT_DB if db is None else db).expanduser()
    for flag, folder in [("--out", Path(out))] + [("--reports", Path(root)) for root in reports]:
        if path.resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"--db {path}: inside {flag} {folder}, which the app serves to anyone who opens it (the "
                             "database holds every item's truth); give --db outside it")
    return path


def load_turing(real: str | Path, fake: str | Path, split: str = "test", per_class: int | None = None,
                db: str | Path | None = None, *, out: str | Path = "app-output", reports: list[Path] | None = None,
                new_study: bool = False, say: Callable[[str], None] = print) -> Turing:
    """The Turing test of `real` (its `split`) against `fake`, its items encoded and its answer database open on
    this study (see the module's text); ValueError in one line for anything that does not fit."""
    from mriflow.app.turing import build_study, new_secret

    reports = [p for p in (DEFAULT_REPORTS,) if p.is_dir()] if reports is None else reports
    path = answer_database(db, out, reports)
    # the items' ids are keyed by the study's secret: the one this database keeps, a new one for a new database
    # (a database begun before secrets were kept goes on with the unkeyed ids it holds)
    existing = AnswerStore(path) if path.exists() else None
    secret = (existing.secret() if existing else None) or (
        new_secret() if existing is None or existing.is_empty() else None)
    study = build_study(real, fake, split=split, per_class=per_class, secret=secret)
    study.encode()
    store = existing or AnswerStore(path)
    try:
        store.begin_study(study.fingerprint, study.items, study.description, secret=secret)
    except StudyMismatch as error:
        if not new_study:
            raise StudyMismatch(f"--db {error}; give a new --db for this study, or add --new-study to move those "
                                "answers aside (renamed beside it, nothing deleted) and start afresh") from None
        say(f"mriflow app: --new-study: the answers of the earlier study were moved to {move_aside(path)}")
        store, secret = AnswerStore(path), new_secret()
        study = build_study(real, fake, split=split, per_class=per_class, secret=secret)
        study.encode()
        store.begin_study(study.fingerprint, study.items, study.description, secret=secret)
    say(f"mriflow app: Turing test of {study.counts['real']} real ({split} split of {real}) and "
        f"{study.counts['synthetic']} generated volumes ({fake}); answers in {store.path}")
    return Turing(study, store)
