"""Files written atomically: a temporary file beside the target, renamed over it once complete.

An interrupted write never leaves a half file under the final name, and the file ends
with the permissions open() would have given it (0666 less the umask), not the private
0600 of the temporary file (mkstemp, safetensors).

    >>> write_text_atomic("prepared/manifest.csv", text)
    >>> with atomic_path("prepared/images/a.nii.gz") as temporary:  # for writers that take a path
    ...     nib.save(image, temporary)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

TEMPORARY_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffixes, so writers pick the same format) that replaces
    `path` when the block ends without an error; on an error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=TEMPORARY_PREFIX, suffix="".join(path.suffixes))
    except OSError as error:  # e.g. a folder that cannot be written: name the file being written, not a temporary one
        raise OSError(error.errno, error.strerror, str(path)) from None
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, permissions(0o666))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (see atomic_path)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def permissions(mode: int) -> int:
    """`mode` restricted by the process umask, as open() would create it."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
