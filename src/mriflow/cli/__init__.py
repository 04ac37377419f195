"""The `mriflow` command line: a thin shell that parses arguments and calls the same functions a notebook calls.

One module per command group, in the order of the pipeline: `prepare`, `train` (with `encode`), `generate` (with
`export`), `evaluate`, `app`. `main` builds the parser from them and turns a user's error into one line;
`common` holds what the commands share (--threads, the output-folder check, the error line).
"""

from mriflow.cli.common import OS_ERROR_ADVICE, USER_ERRORS
from mriflow.cli.common import describe as _describe  # the names the command line has always had
from mriflow.cli.main import build_parser, main

__all__ = ["OS_ERROR_ADVICE", "USER_ERRORS", "build_parser", "main", "_describe"]
