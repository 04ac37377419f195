"""Three-plane montages: named 3D volumes in rows, sagittal / coronal / axial slices in columns.

Volumes are in RAS voxel order (axis 0 left->right, 1 posterior->anterior, 2 inferior->superior),
as every prepared volume is. Slices are shown in the neurological convention: superior up in
sagittal and coronal views, anterior up in the axial view, the subject's left on the left.

    >>> image = three_plane_montage({"real": x, "reconstruction": y, "|difference|": abs(x - y)}, "montage.png")
    >>> image.shape   # (height, width, 3) uint8, e.g. for TensorBoard's add_image(..., dataformats="HWC")
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

PLANES = ("sagittal", "coronal", "axial")


def three_plane_slices(volume: np.ndarray, centre: Sequence[int] | None = None) -> list[np.ndarray]:
    """Sagittal, coronal and axial slices through `centre` (default: the middle), oriented for display (row 0 = top)."""
    volume = np.asarray(volume, dtype=np.float32)
    while volume.ndim > 3:  # drop batch / channel axes of size 1
        volume = volume[0]
    x, y, z = centre if centre is not None else [n // 2 for n in volume.shape]
    # A slice (a, b) shown with b up and a to the right is its transpose flipped vertically.
    return [volume[x, :, :].T[::-1], volume[:, y, :].T[::-1], volume[:, :, z].T[::-1]]


def three_plane_montage(
    volumes: Mapping[str, np.ndarray],
    path: str | Path | None = None,
    value_ranges: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
    centre: Sequence[int] | None = None,
) -> np.ndarray:
    """A grid of three-plane views, one row per named volume; written as PNG when `path` is given.

    Values are shown in grey over [0, 1] unless `value_ranges` names another range for a row.
    Returns the picture as an (H, W, 3) uint8 array.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    value_ranges = dict(value_ranges or {})
    rows = len(volumes)
    first = three_plane_slices(next(iter(volumes.values())), centre)
    widths = [s.shape[1] for s in first]
    height = max(s.shape[0] for s in first)
    panel = 1.6  # inches per row
    top = 0.35 if title else 0.2
    figure = Figure(figsize=(0.3 + panel * sum(widths) / height, panel * rows + top), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, 3, width_ratios=widths, wspace=0.03, hspace=0.05, left=0.3 / (0.3 + panel * sum(widths) / height),
                               right=0.99, bottom=0.01, top=1 - top / (panel * rows + top))
    for row, (name, volume) in enumerate(volumes.items()):
        low, high = value_ranges.get(name, (0.0, 1.0))
        for column, (plane, picture) in enumerate(zip(PLANES, three_plane_slices(volume, centre))):
            axes = figure.add_subplot(grid[row, column])
            axes.imshow(picture, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(name, fontsize=8)
            if row == 0:
                axes.set_title(plane, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9, y=0.995)
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    return image
