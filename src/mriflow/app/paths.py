"""Files named by a request stay inside the folder they belong to.

A request names a file relative to one of the app's roots (the output folder, a report folder, the
generated folder of a Turing test); `inside` resolves it (symbolic links and `..` included) and refuses
anything that lands outside that root, is absolute, or holds a NUL byte.
"""

from __future__ import annotations

from pathlib import Path


class OutsideRootError(PermissionError):
    """A requested path that would leave its root folder."""


def inside(root: str | Path, relative: str) -> Path:
    """`root / relative`, resolved, when it stays inside `root` (resolved too); else OutsideRootError."""
    base = Path(root).resolve()
    text = str(relative)
    if "\x00" in text or text.startswith(("/", "\\")) or Path(text).is_absolute() or "\\" in text:
        raise OutsideRootError(f"{relative!r}: not a path inside {base.name}/ (absolute, or outside it)")
    target = (base / text).resolve()
    if target != base and not target.is_relative_to(base):
        raise OutsideRootError(f"{relative!r}: leads outside {base.name}/")
    return target


def existing_file(root: str | Path, relative: str) -> Path:
    """`inside(root, relative)` that is a regular file; FileNotFoundError otherwise."""
    path = inside(root, relative)
    if not path.is_file():
        raise FileNotFoundError(f"{relative}: no such file")
    return path
