"""REPA-style feature alignment (issue 24.2): early features of the generator's U-Net are pulled towards what a frozen
network that understands brains sees in the clean volume, so the generator need not discover anatomy from the loss
alone.

REPA (Yu et al. 2025) aligns an early transformer layer, through a small projection head, with a frozen image
encoder's patch features by maximising their cosine similarity, and reports 17.5 x faster training; iREPA found that
the teacher's spatial structure matters most. Here the teacher is mriflow's own anatomy network (a segmentation
U-Net trained on the same grid): the encoder level whose grid matches the aligned U-Net block (average-pooled to it
where it is finer). The student is the U-Net's down block `block`, taken before its downsampling; the projection head
(two 1 x 1 x 1 convolutions, `VelocityNet.align_head`) is trained with the network and unused when sampling.

    loss = flow loss + weight * mean over voxels (1 - cos(head(student), teacher))

The clean volume the teacher sees is the training batch decoded from its representation (the Haar bands), flipped
exactly as the batch is, so the alignment is defined for image-space (`--representation`) runs only.

    >>> teacher = AnatomyTeacher(anatomy_weights_for((80, 96, 80)), student_size=(20, 24, 20))
    >>> target = teacher(volumes)                     # (B, teacher.channels, 20, 24, 20)
    >>> loss = alignment_loss(net.align_head(features), target)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mriflow.families.flow import AlignmentConfig  # noqa: F401  (the config lives with the flow's others)


class AnatomyTeacher:
    """The frozen anatomy network's encoder up to the level that matches the student's grid `student_size`."""

    def __init__(self, weights: str | Path, student_size: Sequence[int], device: str | torch.device = "cpu"):
        from mriflow.models.anatomy import load_anatomy_encoder

        self.network = load_anatomy_encoder(weights).requires_grad_(False).to(device)
        config = self.network.config
        self.shape, self.size = tuple(config.shape), tuple(int(s) for s in student_size)
        sizes = [tuple(s // 2**level for s in config.shape) for level in range(len(config.channels))]
        finer = [level for level, size in enumerate(sizes) if all(a >= b for a, b in zip(size, self.size))]
        if not finer:
            raise ValueError(f"alignment: the anatomy network's levels {sizes} are all coarser than the aligned block's "
                             f"grid {self.size}; align a deeper block (alignment.block)")
        self.level = finer[-1]  # the coarsest level at least as fine as the student: pooled to it where finer
        self.channels = int(config.channels[self.level])

    @torch.no_grad()
    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) in [0, 1] on the network's grid -> (B, channels, *student_size)."""
        if tuple(volumes.shape[2:]) != self.shape:
            raise ValueError(f"alignment: the anatomy network takes volumes of shape {self.shape}, got "
                             f"{tuple(volumes.shape[2:])}")
        x = volumes.float()
        for block in self.network.encoder[: self.level + 1]:
            x = block(x)
        return x if tuple(x.shape[2:]) == self.size else F.adaptive_avg_pool3d(x, self.size)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and voxels of 1 - cosine similarity across channels; projected and target (B, C, d, h, w)
    (the student's features cropped to the target's grid where padding made them larger)."""
    projected = projected[(slice(None), slice(None), *(slice(0, n) for n in target.shape[2:]))]
    return (1 - F.cosine_similarity(projected.float(), target.float(), dim=1)).mean()


def student_size(grid: Sequence[int], block: int) -> tuple[int, ...]:
    """The grid of U-Net down block `block` before its downsampling, for a representation grid `grid` (each block
    before it halves the size, rounding up as the network's padding does)."""
    return tuple(-(-int(n) // 2**block) for n in grid)


def alignment_teacher(config: Any, representation: str | None, image_shape: Sequence[int], latent_shape: Sequence[int],
                      device: torch.device) -> tuple[AnatomyTeacher, Any]:
    """The frozen anatomy network that the U-Net's early features are aligned with (config.alignment), and the config
    with the network's projection head sized for it (model.align_block, model.align_channels)."""
    import dataclasses

    from mriflow.models.anatomy import anatomy_weights_for

    alignment = config.alignment
    if not representation:
        raise ValueError("alignment.weight > 0: feature alignment needs the volumes themselves (an image-space run: "
                         "--representation haar2 or --preset wavelet), not an autoencoder's latents")
    if config.model.backbone != "unet":
        raise ValueError(f"alignment.weight > 0: feature alignment is built for the unet backbone, not {config.model.backbone}")
    weights = anatomy_weights_for(image_shape)
    if weights is None:
        raise ValueError(f"alignment.weight > 0: mriflow ships no anatomy network for volumes of shape {list(image_shape)} "
                         "(the teacher); set alignment.weight to 0, or prepare the data with the 2mm or 4mm preset")
    teacher = AnatomyTeacher(weights, student_size(latent_shape[1:], alignment.block), device)
    model = dataclasses.replace(config.model, align_block=alignment.block, align_channels=teacher.channels)
    return teacher, dataclasses.replace(config, model=model)
