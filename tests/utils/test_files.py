"""Atomic writes leave whole files only, with the permissions open() would give them."""

from __future__ import annotations

import errno
import os

import pytest

from mriflow.utils.files import atomic_path, permissions, read_json, write_text_atomic


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
