"""`mriflow`'s parser, built from the command modules, and `main`: the one place where a user's error becomes
one line (`common.describe`) and a bug keeps its traceback."""

from __future__ import annotations

import argparse
import os
import warnings

from mriflow import __version__
from mriflow.cli import app, edit, evaluate, generate, prepare, train
from mriflow.cli.common import check_output_folder, fail, is_user_error, warning_line

DESCRIPTION = """\
Synthetic 3D brain MRI: prepare real scans, train an autoencoder and a generator, sample
NIfTI volumes with JSON sidecars, and measure them against real data.

  prepare IMAGES --out DATA          real scans (NIfTI or BIDS) -> a prepared dataset
  train autoencoder DATA --out AE    stage 1: the 3D autoencoder (KL or VQ)
  train flow DATA --autoencoder AE   stage 2: a rectified flow in its latent space
  train diffusion DATA ...           baseline: DDPM/DDIM in the same latent space
  train gan DATA ...                 baseline: a GAN (R3GAN losses), one-step sampling
  train slices DATA --out RUN        a 2D flow over axial slices, no autoencoder
  train labels DATA ...              a label decoder: a tissue map beside each sample
  train fewstep MODEL --out RUN      a student of a flow: its samples in 1 or 2 evaluations
  encode DATA --autoencoder AE       cache the latents (training does it when needed)
  generate [--model RUN] --out DIR   sample volumes (default: the shipped 2 mm model, 1 evaluation each)
  export RUN OUT [--steps K]         a model folder that travels (generate --model OUT)
  edit --scan FILE --age 60,80 ...   a real scan at other ages or sex, by inverting the flow
  evaluate reconstruction DATA ...   the autoencoder's SSIM, PSNR, MS-SSIM on a split
  evaluate generation ...            real against generated: FD, PRDC, privacy; a report
  evaluate utility ...               train on synthetic, test on real: Dice, brain age
  app                                a browser app: generate and view, a Turing test

`mriflow COMMAND --help` lists a command's options; the README (README.md, the project
page) walks through them on real data. Every command also runs under
`torchrun --nproc_per_node N -m mriflow ...`.
"""

# The command groups in the order of the pipeline; each adds its commands to the parser.
COMMAND_GROUPS = (prepare, train, generate, edit, evaluate, app)


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
    # the words of the command, e.g. "train flow", "evaluate generation": the first word of every error line
    command = " ".join(v for v in (args.command, getattr(args, "stage", None), getattr(args, "evaluation", None)) if v)
    try:
        with warnings.catch_warnings():
            if not os.environ.get("MRIFLOW_DEBUG"):
                warnings.showwarning = warning_line(command)
            if getattr(args, "out", None):
                check_output_folder(args.out, getattr(args, "out_argument", "--out"))
            if hasattr(args, "threads"):
                from mriflow.utils.threads import set_threads

                print(set_threads(args.threads))
            return int(args.func(args) or 0)
    except Exception as error:
        if os.environ.get("MRIFLOW_DEBUG") or not is_user_error(error):
            raise
        return fail(command, error)
