"""Reading the sets to compare: which files of a generated folder are volumes."""

from __future__ import annotations

import numpy as np
import pytest

from mriflow.data.io import save_volume
from mriflow.evaluate.sets import list_volumes


def test_the_generated_volumes_of_a_folder_leave_out_label_maps_and_hidden_files(tmp_path):
    for name in ("sample_00000.nii.gz", "sample_00000_labels.nii.gz", "sample_00001.nii", "sample_00001_labels.nii",
                 ".tmp-sample_00002.nii.gz"):
        save_volume(tmp_path / name, np.zeros((4, 4, 4)), np.eye(4))
    (tmp_path / "sample_00000.json").write_text("{}")
    assert [p.name for p in list_volumes(tmp_path)] == ["sample_00000.nii.gz", "sample_00001.nii"]
    for name in ("sample_00000.nii.gz", "sample_00001.nii"):
        (tmp_path / name).unlink()
    with pytest.raises(ValueError, match="no NIfTI volumes"):
        list_volumes(tmp_path)
