"""`mriflow app`: the browser app (`app`): generate and view brains side by side, browse reports, or run a visual
Turing test."""

from __future__ import annotations

import argparse

from mriflow.cli.common import add_threads


def add_commands(commands) -> None:
    _add_app(commands)


def _add_app(commands) -> None:
    p = commands.add_parser(
        "app", help="a browser UI: generate and view brains side by side, browse reports, or run a visual Turing test",
        description="Serve the web app (FastAPI + NiiVue; needs `npm ci` once in the repository root). It listens on "
                    "127.0.0.1 unless --host says otherwise. With --turing it runs a visual Turing test of real "
                    "(--real, its --split) against generated (--fake) volumes instead, answers kept in SQLite "
                    "outside every served folder; the results open with the link it prints (yours alone).")
    p.add_argument("--model", default="default",
                   help="generator run or checkpoint folder, a shipped model's name (4mm), or 'default' (shipped)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--out", default="app-output",
                   help="folder for generated samples, served to the page (default app-output; nothing in it "
                        "is overwritten: each request writes a new subfolder)")
    p.add_argument("--reports", action="append", metavar="DIR",
                   help="folder searched for evaluation reports (report.html; repeatable; default reports/ if present)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--trust-model-paths", action="store_true",
                   help="let an exported --model read its autoencoder from outside its own folder")
    p.add_argument("--scans", metavar="DATA",
                   help="a prepared folder whose scans the page can draw at another age or sex (the flow inverted; "
                        "flow models only)")
    p.add_argument("--uploads", action="store_true",
                   help="let the page upload a T1 of the user's (NIfTI, up to 64 MB; with its age and sex) to draw at "
                        "another age: prepared onto the model's grid in a private folder removed when the app stops")
    turing = p.add_argument_group("visual Turing test")
    turing.add_argument("--turing", action="store_true", help="run a visual Turing test instead of the generator")
    turing.add_argument("--real", metavar="DATA", help="prepared dataset folder (manifest.csv + images/)")
    turing.add_argument("--fake", metavar="DIR", help="folder of generated volumes (sample_*.nii.gz)")
    turing.add_argument("--split", default="test", help="split of the real data to show (default test)")
    turing.add_argument("--per-class", type=int, metavar="N",
                        help="volumes of each class in the study (default: the smaller class, at most 25)")
    turing.add_argument("--db", metavar="FILE",
                        help="SQLite file of the answers, one study per file, never inside --out or a report folder "
                             "(default turing.sqlite in the current folder)")
    turing.add_argument("--new-study", action="store_true",
                        help="when --db holds another study's answers, move that file aside (renamed beside it, "
                             "nothing deleted) and start this study afresh; without it another study is refused")
    add_threads(p)
    p.set_defaults(func=_run_app)


def _run_app(args: argparse.Namespace) -> int:
    from mriflow.app.launch import run

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: choose 1 to 65535 (0 picks a free one)")
    try:
        run(model=args.model, out=args.out, host=args.host, port=args.port, reports=args.reports, turing=args.turing,
            real=args.real, fake=args.fake, split=args.split, per_class=args.per_class, db=args.db, device=args.device,
            trust_paths=args.trust_model_paths, new_study=args.new_study, scans=args.scans,
            uploads=args.uploads)
    except KeyboardInterrupt:
        pass
    return 0
