"""What the commands share: the --threads option, the main process under torchrun, and how a user's error
becomes one line (no traceback unless MRIFLOW_DEBUG=1)."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Callable

# Problems with the user's input or files: reported as one line, without a traceback
# (MRIFLOW_DEBUG=1 shows it). OSError covers every file-system refusal: a missing file, a folder that
# cannot be written, a file where a folder should be, a full disk. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
# What to do about an operating system's refusal, by errno; its own text ("[Errno 13] ...") says neither.
OS_ERROR_ADVICE = {
    errno.EACCES: "change its permissions, or choose another location",
    errno.EPERM: "change its permissions, or choose another location",
    errno.EROFS: "the disk is mounted read-only; choose a location on a writable disk",
    errno.ENOSPC: "the disk is full; free some space or choose another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another disk",
    errno.ENOTDIR: "a file stands where a folder is expected; choose another path",
    errno.EISDIR: "a folder stands where a file is expected; give the file",
}


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: the free cores, i.e. usable CPUs less the load average)")


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def fail(command: str, error: BaseException) -> int:
    print(f"mriflow {command}: error: {describe(error)}", file=sys.stderr)
    return 2


def warning_line(command: str) -> Callable[..., None]:
    """warnings.showwarning that prints one plain line: the source file and line of a warning mean nothing to a user."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"mriflow {command}: warning: {message}", file=sys.stderr if file is None else file)

    return show


def describe(error: BaseException) -> str:
    """The error as one line: an operating system's refusal names its file and what to do."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        advice = OS_ERROR_ADVICE.get(error.errno)
        return f"{error.filename}: {error.strerror.lower()}" + (f"; {advice}" if advice else "")
    if is_image_file_error(error):  # its text names the file, not what to do
        return f"{error} (damaged, cut short or not NIfTI: restore, regenerate or remove it)"
    return str(error)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, USER_ERRORS) or is_image_file_error(error)


def check_output_folder(out: str, argument: str = "--out") -> None:
    """Refuse an output folder (`argument`: --out, or a command's positional OUT) that is a file, or that cannot be
    written, before a command works for hours towards it."""
    path = Path(out).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder itself, or where it will be made
    if not existing.is_dir():
        raise NotADirectoryError(f"{argument} {out}: {existing} is a file; choose a folder (new or existing) for the output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{argument} {out}: {existing} is not writable; choose another folder, or change its "
                              "permissions")


def is_image_file_error(error: BaseException) -> bool:
    """nibabel's "not an image file", from a module that reads a volume with nibabel directly (data.io.load_volume
    names the file itself). Looked up, not imported: most commands never load nibabel."""
    images = sys.modules.get("nibabel.filebasedimages")
    return images is not None and isinstance(error, images.ImageFileError)

