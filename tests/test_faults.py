"""Faults and bad input end as one line that names the file or option and what to do, never a traceback,
and lose nothing: damaged files, malformed scans, runs killed midway and resumed."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_damaged_sidecar_of_a_generated_volume_is_named(tmp_path):
    from mriflow.evaluate.generation import read_sidecar

    (tmp_path / "sample_00000.json").write_text('{"covariates": {"age": 4')  # a copy cut short
    with pytest.raises(ValueError, match=rf"{tmp_path / 'sample_00000.json'}: damaged or incomplete JSON .*delete it"):
        read_sidecar(Path(tmp_path / "sample_00000.nii.gz"))
