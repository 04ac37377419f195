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
import errno
import hashlib
import json
import os
import stat
import re
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: FileLock always succeeds, a run is then only as safe as its own checks
    fcntl = None

TEMPORARY_PREFIX = ".tmp-"
# A temporary file is named .tmp-<id of the writing process>-<random><suffixes>, so that what a killed
# writer left can be told from what a live one is writing (remove_stale_temporaries).
_WRITER = re.compile(rf"^{re.escape(TEMPORARY_PREFIX)}(\d+)-")


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` (same suffixes, so writers pick the same format) that replaces
    `path` when the block ends without an error; on an error it is removed and `path` is untouched.

    With overwrite=False the finished file is hard-linked to `path`, which the file system refuses
    atomically when `path` exists (FileExistsError naming it), so of two processes writing one name
    at once exactly one wins and the other's file is dropped. Where hard links are refused (FAT, some
    network shares), `path` is claimed by an exclusive create, then replaced by the finished file:
    as safe against a second writer, but a kill in between leaves an empty file under its name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-",
                                             suffix="".join(path.suffixes))
    except OSError as error:  # e.g. a folder that cannot be written: name the file being written, not a temporary one
        raise OSError(error.errno, error.strerror, str(path)) from None
    os.close(handle)
    try:
        try:
            yield Path(temporary)
        except OSError as error:  # a full disk while writing: name the file being written, not the temporary one
            if error.errno is None or error.filename not in (None, temporary):
                raise
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from None
        os.chmod(temporary, permissions(0o666))
        if overwrite:
            os.replace(temporary, path)
        else:
            _publish_new(Path(temporary), path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _publish_new(temporary: Path, path: Path) -> None:
    """Give finished file `temporary` the name `path`, which must not exist yet (FileExistsError otherwise)."""
    try:
        os.link(temporary, path)
        return
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
    try:  # no hard links here: claim the name, then move the whole file onto it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    os.replace(temporary, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (see atomic_path)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def remove_stale_temporaries(folders: Iterable[str | Path], before: float) -> list[Path]:
    """Remove the temporary files (TEMPORARY_PREFIX) that killed writes left in `folders`; returns them.

    A file is stale when it was last written before `before` (a time.time(), e.g. the start of the
    run that calls this) and the process named in it has ended; one without a process id (an older
    mriflow) is judged by its age alone. A live writer's file is kept, even one from before the start
    (another run into the same folder); so is one whose id a new process has taken since, until a
    later run. Process ids are this machine's: call it for folders only this machine writes into.
    """
    removed = []
    for folder in folders:
        for path in sorted(Path(folder).glob(f"{TEMPORARY_PREFIX}*")):
            try:
                if not path.is_file() or path.stat().st_mtime >= before:
                    continue
            except OSError:  # removed meanwhile
                continue
            writer = _WRITER.match(path.name)
            if writer is not None and _is_alive(int(writer.group(1))):
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _is_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class DamagedFileError(ValueError):
    """A file cannot be parsed: cut short (a copy, download or write that stopped), overwritten or not what it should be."""


def read_json(path: str | Path, advice: str = "restore it from where it came from, or write it again") -> Any:
    """The JSON value in `path`. One that cannot be parsed raises DamagedFileError naming the file, what is
    wrong and `advice` (what to do); json's own message names no file. A missing file is an OSError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedFileError(f"{path}: damaged or incomplete JSON ({error}); {advice}") from None


def permissions(mode: int) -> int:
    """`mode` restricted by the process umask, as open() would create it."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


_DIGESTS: dict[tuple, str] = {}  # (real path, device, inode, size, mtime in ns) -> hex digest


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks.

    Remembered for the process while the file is the same (path, inode, size and modification time unchanged), so
    a weights file that several steps check (training a generator checks its autoencoder's weights three times) is
    read once; a file replaced by an atomic write has a new inode and is hashed again. A file modified in the last
    two seconds is always read (file times are only as fine as the kernel's clock tick, so two writes in one tick
    could look alike)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):  # a device (/dev/zero) or a pipe would be read for ever
        raise ValueError(f"{path}: not a regular file (a device, pipe or socket, perhaps behind a symlink); "
                         "give the file itself")
    key = (os.path.realpath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    if time.time() - info.st_mtime > 2.0:
        _DIGESTS[key] = digest.hexdigest()
    return digest.hexdigest()


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """The Python version and each package's installed version ("not installed" if absent), for the record
    of what wrote a file; read from the installed metadata, so nothing is imported."""
    versions = {"python": sys.version.split()[0]}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class FileLock:
    """An advisory flock(2) on `path` (created empty, and left in place: removing a lock file races with its next user).

    The kernel releases it when the holder ends, however it ends (SIGKILL included), so a lock
    is never left stale. Holders that share it (`shared=True`) exclude an exclusive holder, and
    the other way round.

        >>> lock = FileLock("prepared/.prepare.lock")
        >>> if not lock.acquire(wait_seconds=5):
        ...     raise SystemExit("another run writes into prepared/")
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._descriptor: int | None = None

    def acquire(self, shared: bool = False, wait_seconds: float = 0.0) -> bool:
        """Take the lock, or convert the one held (exclusive <-> shared); False if another process holds it
        still after `wait_seconds`. A conversion is not atomic (flock(2)): check its result too."""
        if fcntl is None:
            return True
        if self._descriptor is None:
            self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, permissions(0o666))
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(self._descriptor, mode)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing drops the lock
            self._descriptor = None
