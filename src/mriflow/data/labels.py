"""The tissue classes mriflow segments and how DLMUSE label maps become them (by MUSE region name)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Tissue classes of the anatomy network, in output-channel order. Brainstem is its own class
# because MUSE keeps it out of grey (601) and white matter (604) but inside TotalBrain (701).
TISSUE_CLASSES = ("background", "csf", "ventricles", "grey_matter", "white_matter", "brainstem")
# MUSE 701 TotalBrain = 601 GM + 604 WM + 509 Ventricles + 35 BrainStem (checked on region_volumes.csv);
# cortical CSF (1) and the unnamed CSF label (46) are inside the ICV (702) but outside TotalBrain.
BRAIN_CLASSES = ("ventricles", "grey_matter", "white_matter", "brainstem")
# DLMUSE label maps hold two labels that muse_regions.csv does not name; these are their
# Neuromorphometrics names (46: CSF outside the ventricles, 69: optic chiasm).
UNNAMED_DLMUSE_LABELS = {46: "CSF", 69: "OpticChiasm"}
# MUSE numbers single (label-map) regions below 300; 300 and above are composites of them.
MUSE_FIRST_COMPOSITE = 300


def class_indices(logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, K, ...) -> the index of each voxel's largest class (B, ...), uint8 (K <= 256), the first on a tie:
    torch.argmax(1) to the voxel (NaN aside), about 5x faster on CPU, where argmax over a strided class dimension
    was 9 % of a generated volume's tissue map (a running maximum over the K contiguous class slices instead)."""
    if logits.shape[1] > 256:
        raise ValueError(f"class_indices: {logits.shape[1]} classes do not fit uint8 indices")
    best = logits[:, 0].clone()
    indices = torch.zeros(best.shape, dtype=torch.uint8, device=logits.device)
    for index in range(1, logits.shape[1]):
        indices.masked_fill_(logits[:, index] > best, index)
        torch.maximum(best, logits[:, index], out=best)
    return indices


def muse_tissue_class(name: str) -> str:
    """The tissue class of one single DLMUSE region, by its MUSE name.

    Rules, first match wins: "...Ventricle..." -> ventricles (lateral, inferior lateral,
    3rd, 4th; MUSE 509); CortCSF / CSF -> csf; BrainStem -> brainstem; white-matter
    names (…_WM…, CorpCall, Fornix, internal capsule limbs, VentralDC, OpticChiasm) ->
    white_matter, which reproduces MUSE 604 WM; every other region (cortical gyri,
    deep nuclei, hippocampus, amygdala, cerebellar cortex and vermis) -> grey_matter (601).
    """
    if "Ventricle" in name:
        return "ventricles"
    if name in ("CortCSF", "CSF"):
        return "csf"
    if name == "BrainStem":
        return "brainstem"
    white = ("CorpCall", "Fornix", "InternalCapsule", "VentralDC", "OpticChiasm")
    if name.endswith("_WM") or "_WM_" in name or any(part in name for part in white):
        return "white_matter"
    return "grey_matter"


def muse_tissue_mapping(regions: dict[int, str], classes: Sequence[str] = TISSUE_CLASSES) -> dict[int, int]:
    """DLMUSE label -> class index in `classes`, for the single regions of `regions` (index -> name,
    as in muse_regions.csv) plus `UNNAMED_DLMUSE_LABELS`; composites (index >= 300) are skipped."""
    named = {**UNNAMED_DLMUSE_LABELS, **{int(k): str(v) for k, v in regions.items() if 0 < int(k) < MUSE_FIRST_COMPOSITE}}
    return {label: classes.index(muse_tissue_class(name)) for label, name in sorted(named.items())}


def tissue_volumes_ml(segmentation: torch.Tensor | np.ndarray, classes: Sequence[str], voxel_mm: float) -> dict[str, np.ndarray]:
    """Volume of every class in a segmentation (N, D, H, W) of class indices: voxel count x voxel volume, in ml.

    Returns one (N,) float64 array per class, plus "total_brain" = the sum over `BRAIN_CLASSES`.
    """
    segmentation = torch.as_tensor(segmentation)
    if segmentation.ndim != 4:
        raise ValueError(f"segmentation: expected (N, D, H, W) class indices, got shape {tuple(segmentation.shape)}")
    counts = F.one_hot(segmentation.long().flatten(1), len(classes)).sum(1).double()  # (N, C)
    volumes = {name: (counts[:, i] * voxel_mm**3 / 1000.0).numpy() for i, name in enumerate(classes)}
    volumes["total_brain"] = sum(volumes[name] for name in BRAIN_CLASSES)
    return volumes


def tissue_lookup(label_map: dict) -> np.ndarray:
    """A lookup table label -> class index (-1: a label the map does not know) from a label map
    {DLMUSE label: class name or index} (as `muse_tissue_mapping` makes, or an anatomy network's
    stored `label_map`); label 0 is background."""
    indices = {int(label): TISSUE_CLASSES.index(c) if isinstance(c, str) else int(c) for label, c in label_map.items()}
    lookup = np.full(max(indices, default=0) + 1, -1, np.int64)
    lookup[0] = 0
    for label, index in indices.items():
        lookup[label] = index
    return lookup


def tissue_map(labels: np.ndarray, lookup: np.ndarray, where: str = "label map") -> np.ndarray:
    """A DLMUSE label map (any numeric dtype, rounded) -> tissue class indices (uint8), refusing labels
    the lookup does not know (naming them and `where`)."""
    labels = np.rint(np.asarray(labels)).astype(np.int64)
    known = (labels >= 0) & (labels < len(lookup))
    unknown = np.unique(labels[~known]).tolist()
    mapped = np.where(known, lookup[np.clip(labels, 0, len(lookup) - 1)], -1)
    unknown += np.unique(labels[known & (mapped < 0)]).tolist()
    if unknown:
        raise ValueError(f"{where}: labels {sorted(set(unknown))[:10]} are not in the region list; "
                         "pass the label map's region names (muse_regions.csv)")
    return mapped.astype(np.uint8)


def tissue_fractions(tissue: torch.Tensor | np.ndarray, factor: int, classes: int = len(TISSUE_CLASSES)) -> torch.Tensor:
    """Class fractions of tissue maps (N, D, H, W) on a grid `factor` times coarser: (N, classes, D/f, H/f, W/f),
    each voxel the share of every class in its f^3 block (the spatial condition of a label-conditioned generator,
    on the latent grid)."""
    tissue = torch.as_tensor(np.asarray(tissue) if not isinstance(tissue, torch.Tensor) else tissue).long()
    if tissue.ndim != 4 or any(n % factor for n in tissue.shape[1:]):
        raise ValueError(f"tissue maps of shape {tuple(tissue.shape)}: expected (N, D, H, W) with D, H, W multiples of {factor}")
    if tissue.min() < 0 or tissue.max() >= classes:
        raise ValueError(f"tissue maps hold classes outside 0..{classes - 1}")
    one_hot = F.one_hot(tissue, classes).permute(0, 4, 1, 2, 3).float()
    return F.avg_pool3d(one_hot, factor)


def dice_scores(predicted: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, classes: int) -> np.ndarray:
    """(N, classes - 1) Dice 2|P∩T| / (|P| + |T|) per subject and foreground class of class-index maps (N, D, H, W):
    MONAI's compute_dice, 1 where both maps lack the class and 0 where only the prediction has it."""
    from monai.metrics import compute_dice

    def one_hot(maps) -> torch.Tensor:
        return F.one_hot(torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).long(),
                         classes).movedim(-1, 1)

    scores = compute_dice(one_hot(predicted), one_hot(target), include_background=False, ignore_empty=False)
    return scores.double().cpu().numpy()
