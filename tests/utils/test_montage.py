"""Three-plane montages show what they should: each volume in its row, oriented in the neurological
convention (superior up, anterior up in the axial view, the subject's left on the left), in grey."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from conftest import brightest_quadrant, head_phantom, left_anterior_superior_block, montage_panels, shows_a_centred_head
from mriflow.utils.montage import three_plane_montage, three_plane_slices

EXPECTED = ["top right", "top left", "top left"]  # sagittal, coronal, axial of left_anterior_superior_block


def test_slices_are_oriented_superior_up_anterior_up_and_left_on_the_left():
    slices = three_plane_slices(left_anterior_superior_block((40, 48, 40)))
    assert [s.shape for s in slices] == [(40, 48), (40, 40), (48, 40)]  # (rows, columns) as shown
    assert [brightest_quadrant(s) for s in slices] == EXPECTED


def test_the_montage_shows_each_volume_in_its_row_oriented_and_in_grey(tmp_path):
    image, _ = head_phantom((40, 48, 40))
    volumes = {"block": left_anterior_superior_block(), "mid grey": np.full((40, 48, 40), 0.5, np.float32),
               "head": image / image.max(), "scaled": np.full((40, 48, 40), 1.0, np.float32)}
    picture = three_plane_montage(volumes, tmp_path / "montage.png", value_ranges={"scaled": (0.0, 4.0)}, title="step 3")
    written = matplotlib.image.imread(str(tmp_path / "montage.png"))[..., :3]
    np.testing.assert_array_equal(picture, np.round(written * 255).astype(np.uint8))  # the PNG is the returned picture

    rows = montage_panels(tmp_path / "montage.png")
    assert len(rows) == 4
    block, grey, head, scaled = rows
    assert [brightest_quadrant(panel) for panel in block] == EXPECTED
    for panel, (height, width) in zip(block, [(40, 48), (40, 40), (48, 40)]):
        assert panel.shape[1] / panel.shape[0] == pytest.approx(width / height, rel=0.05)  # voxels shown square
    assert all(abs(panel.mean() - 0.5) < 0.02 and panel.std() < 0.01 for panel in grey)
    assert all(shows_a_centred_head(panel) for panel in head)
    assert all(abs(panel.mean() - 0.25) < 0.02 for panel in scaled)  # 1.0 on a 0..4 range
