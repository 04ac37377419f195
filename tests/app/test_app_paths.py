"""A file named by a request stays inside its folder: `..`, absolute paths, links out and NUL bytes are refused."""

from __future__ import annotations

import os

import pytest

from mriflow.app.paths import OutsideRootError, existing_file, inside


@pytest.fixture
def root(tmp_path):
    (tmp_path / "root" / "run").mkdir(parents=True)
    (tmp_path / "root" / "run" / "sample_00000.nii.gz").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("secret")
    return tmp_path / "root"


def test_a_path_inside_is_resolved(root):
    assert existing_file(root, "run/sample_00000.nii.gz") == (root / "run" / "sample_00000.nii.gz").resolve()
    assert inside(root, "run/../run/sample_00000.nii.gz") == (root / "run" / "sample_00000.nii.gz").resolve()


@pytest.mark.parametrize("name", ["../secret.txt", "run/../../secret.txt", "/etc/passwd", "..", "run/\x00x",
                                  "..\\secret.txt", "run/../../root/../secret.txt"])
def test_a_path_leaving_the_root_is_refused(root, name):
    with pytest.raises(OutsideRootError):
        inside(root, name)


def test_a_link_out_of_the_root_is_refused_and_one_inside_is_followed(root):
    os.symlink(root.parent / "secret.txt", root / "run" / "link.txt")
    with pytest.raises(OutsideRootError):
        existing_file(root, "run/link.txt")
    os.symlink(root / "run" / "sample_00000.nii.gz", root / "alias.nii.gz")
    assert existing_file(root, "alias.nii.gz").name == "sample_00000.nii.gz"


def test_a_missing_file_is_not_found(root):
    with pytest.raises(FileNotFoundError):
        existing_file(root, "run/none.nii.gz")
    with pytest.raises(FileNotFoundError):
        existing_file(root, "run")  # a folder is not a file
