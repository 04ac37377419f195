"""Files named by a request stay inside the folder they belong to.

A request names a file relative to one of the app's roots (the output folder, a report folder, the
generated folder of a Turing test); `inside` resolves it (symbolic links and `..` included) and refuses
anything that lands outside that root, is absolute, or holds a NUL byte.
"""

from __future__ import annotations

from pathlib import Path


class OutsideRootError(PermissionError):
    """A requested path that would leave its root folder."""


class MissingFile(FileNotFoundError):
    """A requested file that is not there; its message names it as the request did, never by its server path."""


def inside(root: str | Path, relative: str) -> Path:
    """`root / relative`, resolved, when it stays inside `root` (resolved too); else OutsideRootError."""
    base = Path(root).resolve()
    text = str(relative)
    if "\x00" in text or text.startswith(("/", "\\")) or Path(text).is_absolute() or "\\" in text:
        raise OutsideRootError(f"{relative!r}: not a path inside {base.name}/ (absolute, or outside it)")
    try:
        target = (base / text).resolve()
    except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13), a name too long
        raise OutsideRootError(f"{relative!r}: cannot be resolved inside {base.name}/ (a link loop?)") from None
    if target != base and not target.is_relative_to(base):
        raise OutsideRootError(f"{relative!r}: leads outside {base.name}/")
    return target


def existing_file(root: str | Path, relative: str) -> Path:
    """`inside(root, relative)` that is a regular file; MissingFile otherwise."""
    path = inside(root, relative)
    try:
        found = path.is_file()
    except OSError:  # e.g. a name too long for the file system
        found = False
    if not found:
        raise MissingFile(f"{relative}: no such file")
    return path
