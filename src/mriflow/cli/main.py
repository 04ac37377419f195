"""`mriflow`'s parser, built from the command modules, and `main`: the one place where a user's error becomes
one line (`common.describe`) and a bug keeps its traceback."""

from __future__ import annotations

import argparse
import os
import warnings

from mriflow import __version__
from mriflow.cli import app, evaluate, generate, prepare, train
from mriflow.cli.common import check_output_folder, fail, is_user_error, warning_line

DESCRIPTION = """\
    mriflow prepare IMAGES --out DIR [--masks DIR] [--covariates CSV] [--preset 4mm|2mm|1mm] ...
    mriflow train autoencoder DATA --out RUN [--kind kl|vq] [--preset tiny|small|base|large] ...
    mriflow train flow DATA --autoencoder RUN --out RUN2 [--condition age,sex] ...
    mriflow train diffusion DATA --autoencoder RUN --out RUN3 [--condition age,sex] ...
    mriflow train gan DATA --autoencoder RUN --out RUN5 [--condition age,sex] ...    (R3GAN losses, one-step sampling)
    mriflow train slices DATA --out RUN4 [--condition age,sex] ...      (2D, image space: no autoencoder)
    mriflow encode DATA --autoencoder RUN
    mriflow generate [--model RUN|default] --out DIR [--n N] [--age A] [--sex F|M] [--solver heun] ...
    mriflow evaluate reconstruction DATA --autoencoder RUN [--split val] [--out DIR]
    mriflow evaluate generation --real DATA --fake DIR --out DIR [--backbone NAME] ...
    mriflow app [--model M] [--host 127.0.0.1] [--port P] | mriflow app --turing --real DATA --fake DIR

Every command also runs under `torchrun --nproc_per_node N -m mriflow ...` (training and
generation share the work out across the processes).
"""

# The command groups in the order of the pipeline; each adds its commands to the parser.
COMMAND_GROUPS = (prepare, train, generate, evaluate, app)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mriflow", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mriflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "generate":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.unknown = unknown
    command = " ".join(v for v in (args.command, getattr(args, "stage", None), getattr(args, "kind", None)) if v)
    try:
        with warnings.catch_warnings():
            if not os.environ.get("MRIFLOW_DEBUG"):
                warnings.showwarning = warning_line(command)
            if getattr(args, "out", None):
                check_output_folder(args.out)
            if hasattr(args, "threads"):
                from mriflow.utils.threads import set_threads

                print(set_threads(args.threads))
            return int(args.func(args) or 0)
    except Exception as error:
        if os.environ.get("MRIFLOW_DEBUG") or not is_user_error(error):
            raise
        return fail(command, error)
