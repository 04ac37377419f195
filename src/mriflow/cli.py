"""The `mriflow` command line: a thin shell that parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys

from mriflow import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mriflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mriflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_prepare(commands)
    return parser


def _add_prepare(commands) -> None:
    p = commands.add_parser("prepare", help="real scans (NIfTI folder or BIDS) -> prepared template-space dataset")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    raise NotImplementedError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
