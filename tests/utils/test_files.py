"""Atomic writes leave whole files only, with the permissions open() would give them."""

from __future__ import annotations

import errno
import os
import time

import pytest

from mriflow.utils.files import (
    atomic_path,
    package_versions,
    permissions,
    read_json,
    remove_stale_temporaries,
    write_text_atomic,
)


def test_files_written_atomically_get_0666_less_the_umask(tmp_path, umask_022):
    write_text_atomic(tmp_path / "record.json", "{}")
    with atomic_path(tmp_path / "volume.nii.gz") as temporary:
        temporary.write_bytes(b"data")
    assert permissions(0o666) == 0o644
    assert (tmp_path / "record.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    assert (tmp_path / "volume.nii.gz").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json", "volume.nii.gz"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    write_text_atomic(tmp_path / "record.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "record.json") as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed mid-write")
    assert (tmp_path / "record.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


@pytest.mark.parametrize("hard_links", [True, False], ids=["link", "exclusive-create"])
def test_a_write_that_must_not_overwrite_refuses_an_existing_file_and_leaves_it(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # e.g. a FAT or SMB folder: os.link is refused
        def no_link(source, target):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(source), None, str(target))

        monkeypatch.setattr(os, "link", no_link)
    with atomic_path(tmp_path / "sample.json", overwrite=False) as temporary:
        temporary.write_text("first")
    with pytest.raises(FileExistsError) as error:
        with atomic_path(tmp_path / "sample.json", overwrite=False) as temporary:
            temporary.write_text("second")
    assert error.value.filename == str(tmp_path / "sample.json")
    assert (tmp_path / "sample.json").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["sample.json"]


def test_a_damaged_json_file_is_named_with_what_to_do(tmp_path):
    (tmp_path / "good.json").write_text('{"preset": "4mm"}')
    assert read_json(tmp_path / "good.json") == {"preset": "4mm"}
    (tmp_path / "cut.json").write_text('{"preset": ')  # a copy or write that stopped
    with pytest.raises(ValueError, match=rf"{tmp_path / 'cut.json'}: damaged or incomplete JSON \(.*\); restore it"):
        read_json(tmp_path / "cut.json", advice="restore it")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'binary.json'}: damaged or incomplete JSON"):
        read_json(tmp_path / "binary.json")
    with pytest.raises(FileNotFoundError) as missing:  # a missing file stays an OSError that names it
        read_json(tmp_path / "missing.json")
    assert missing.value.filename == str(tmp_path / "missing.json")


def test_only_temporary_files_of_ended_writers_from_before_the_start_are_removed(tmp_path):
    import subprocess
    import sys
    import time

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)  # a writer killed midway
    start = time.time()
    names = {f".tmp-{dead}-k1ll3d.nii.gz": True, ".tmp-k1ll3d.json": True,  # an ended writer's; one of an old version
             f".tmp-{os.getpid()}-wr1t1ng.nii.gz": False,  # a live writer's, e.g. another run into the folder
             "sample_00000.nii.gz": False, ".prepare.lock": False}
    for name in names:
        (tmp_path / name).write_bytes(b"half")
        os.utime(tmp_path / name, (start - 60, start - 60))
    (tmp_path / f".tmp-{dead}-n3w.json").write_bytes(b"new")  # written after the start: not this run's to judge
    removed = remove_stale_temporaries([tmp_path, tmp_path / "missing"], before=start)
    assert sorted(p.name for p in removed) == sorted(name for name, stale in names.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name for name, stale in names.items() if not stale] + [f".tmp-{dead}-n3w.json"])


def test_a_temporary_file_names_its_writer(tmp_path):
    with atomic_path(tmp_path / "volume.nii.gz") as temporary:
        assert temporary.name.startswith(f".tmp-{os.getpid()}-") and temporary.name.endswith(".nii.gz")


def test_package_versions_are_the_installed_ones_and_an_absent_package_is_named():
    import platform

    import numpy

    versions = package_versions(["numpy", "no-such-package-mriflow"])
    assert versions == {"python": platform.python_version(), "numpy": numpy.__version__,
                        "no-such-package-mriflow": "not installed"}


def test_a_file_is_hashed_once_while_it_is_unchanged_and_again_once_replaced(tmp_path, monkeypatch):
    import builtins
    import hashlib

    from mriflow.utils.files import sha256, write_text_atomic

    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 3000)
    os.utime(path, (time.time() - 60, time.time() - 60))  # written a minute ago
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    first = sha256(path)
    assert first == hashlib.sha256(b"a" * 3000).hexdigest()
    assert sha256(path) == first and opened.count(str(path)) == 1  # the second call did not read the file
    write_text_atomic(path, "b" * 3000)  # same size, new inode
    assert sha256(path) == hashlib.sha256(b"b" * 3000).hexdigest()
    with open(path, "r+b") as stream:  # changed in place, just now: read again however fine the clock
        stream.write(b"c")
    assert sha256(path) == hashlib.sha256(b"c" + b"b" * 2999).hexdigest()
