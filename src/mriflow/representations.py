"""Fixed, lossless representations a generator can sample instead of an autoencoder's latents.

A representation maps prepared volumes (B, 1, D, H, W) in [0, 1] to the array the generator's network
works on, (B, C, d, h, w), and back, exactly: nothing is learned, so nothing caps what the generator can
draw (an autoencoder's reconstructions cap its samples). It is an object beside the path: `encode`,
`decode`, `latent_shape`; the family, the training loop and `generate` are the latent generators'.

`HaarPacket` is the 3D Haar wavelet packet of `levels` levels: each level splits every band into its
2 x 2 x 2 blocks' eight orthonormal Haar coefficients (the sums and differences along each axis, / sqrt 8),

    level 1: (B, 1, D, H, W) -> (B, 8, D/2, H/2, W/2)        level 2: -> (B, 64, D/4, H/4, W/4)

so a network runs on a grid 8^levels times smaller than the image with all of its information in the
channels (WDM, Friedrich et al. 2024, and FlowLet, 2026, generate Haar coefficients of 3D brains). The
transform is orthonormal: decode(encode(x)) = x up to rounding, and a 2 mm volume (80, 96, 80) at two
levels is (64, 20, 24, 20), the grid of the 2 mm autoencoder's latents. Each band is then normalised
to zero mean and unit variance over the training volumes (`fit`), so the noise of the flow drowns every
band at the same time instead of the weak fine-detail bands first; the statistics are recorded in the
generator's checkpoint with the representation (`to_dict`).

    >>> representation = HaarPacket(levels=2).fit(training_volumes)   # (N, 1, 80, 96, 80) in [0, 1]
    >>> bands = representation.encode(volumes)                         # (B, 64, 20, 24, 20)
    >>> volumes = representation.decode(bands)                          # (B, 1, 80, 96, 80), clamped to [0, 1]
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch

from mriflow.utils.text import counted

REPRESENTATIONS = ("haar1", "haar2", "haar3")  # what `mriflow train ... --representation` accepts


def haar_matrix(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal 8 x 8 matrix of the 3D Haar transform of one 2 x 2 x 2 block (rows: bands; band 0 the mean)."""
    pair = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    return torch.kron(torch.kron(pair, pair), pair).to(dtype)


def haar_split(x: torch.Tensor) -> torch.Tensor:
    """One level: (B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2), channel 8c + k = band k of input channel c."""
    b, c, d, h, w = x.shape
    blocks = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, C, 2, 2, 2, d, h, w)
    blocks = blocks.reshape(b, c, 8, d // 2, h // 2, w // 2)
    bands = torch.einsum("kj,bcjdhw->bckdhw", haar_matrix(x.dtype).to(x.device), blocks)
    return bands.reshape(b, 8 * c, d // 2, h // 2, w // 2)


def haar_merge(bands: torch.Tensor) -> torch.Tensor:
    """The inverse of `haar_split`: (B, 8C, d, h, w) -> (B, C, 2d, 2h, 2w)."""
    b, channels, d, h, w = bands.shape
    c = channels // 8
    blocks = torch.einsum("kj,bckdhw->bcjdhw", haar_matrix(bands.dtype).to(bands.device), bands.reshape(b, c, 8, d, h, w))
    blocks = blocks.reshape(b, c, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, d, 2, h, 2, w, 2)
    return blocks.reshape(b, c, 2 * d, 2 * h, 2 * w)


class HaarPacket:
    """The 3D Haar wavelet packet of `levels` levels with per-band normalisation (see the module docstring).

    Intensities are mapped from [0, 1] to [−1, 1] first, as every generator of mriflow sees its data centred.
    `band_mean` and `band_std` (C,) are set by `fit` (or read back by `from_dict`); before that they are 0 and 1.
    """

    def __init__(self, levels: int = 2, band_mean: Sequence[float] | None = None,
                 band_std: Sequence[float] | None = None):
        if levels not in (1, 2, 3):
            raise ValueError(f"representation: a Haar packet has 1, 2 or 3 levels, got {levels}")
        self.levels = levels
        self.channels = 8**levels
        self.band_mean = torch.zeros(self.channels) if band_mean is None else torch.tensor(band_mean, dtype=torch.float32)
        self.band_std = torch.ones(self.channels) if band_std is None else torch.tensor(band_std, dtype=torch.float32)
        if self.band_mean.shape != (self.channels,) or self.band_std.shape != (self.channels,):
            raise ValueError(f"representation haar{levels}: band_mean and band_std need {self.channels} values each")
        if not bool((self.band_std > 0).all()):
            raise ValueError(f"representation haar{levels}: every band_std must be > 0")

    @property
    def name(self) -> str:
        return f"haar{self.levels}"

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int, int]:
        """(C, d, h, w) of a volume of `image_shape` (D, H, W); each side must divide by 2^levels."""
        factor = 2**self.levels
        if any(n % factor for n in image_shape):
            raise ValueError(f"representation {self.name}: the grid {' x '.join(map(str, image_shape))} must divide by "
                             f"{factor} on every axis; choose fewer levels")
        return (self.channels, *(int(n) // factor for n in image_shape))

    def transform(self, volumes: torch.Tensor) -> torch.Tensor:
        """The packet's coefficients of volumes (B, 1, D, H, W) in [0, 1], before normalisation."""
        bands = volumes * 2.0 - 1.0
        for _ in range(self.levels):
            bands = haar_split(bands)
        return bands

    def encode(self, volumes: torch.Tensor) -> torch.Tensor:
        """Volumes (B, 1, D, H, W) in [0, 1] -> normalised bands (B, C, d, h, w)."""
        self.latent_shape(volumes.shape[2:])
        bands = self.transform(volumes)
        return (bands - self._stat(self.band_mean, bands)) / self._stat(self.band_std, bands)

    def decode(self, bands: torch.Tensor) -> torch.Tensor:
        """Normalised bands (B, C, d, h, w) -> volumes (B, 1, D, H, W) clamped to [0, 1]."""
        if bands.shape[1] != self.channels:
            raise ValueError(f"representation {self.name}: expected {self.channels} bands, got {bands.shape[1]}")
        x = bands * self._stat(self.band_std, bands) + self._stat(self.band_mean, bands)
        for _ in range(self.levels):
            x = haar_merge(x)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def fit(self, volumes: Iterable[torch.Tensor]) -> "HaarPacket":
        """Set each band's mean and standard deviation from volumes (1, D, H, W) or (B, 1, D, H, W) in [0, 1]
        (the training split's), accumulated in float64; a band that is constant keeps std 1."""
        total = torch.zeros(self.channels, dtype=torch.float64)
        squares = torch.zeros_like(total)
        count = 0
        for volume in volumes:
            volume = volume if volume.ndim == 5 else volume[None]
            bands = self.transform(volume.double())  # (B, C, d, h, w)
            total += bands.sum(dim=(0, 2, 3, 4))
            squares += bands.square().sum(dim=(0, 2, 3, 4))
            count += bands.shape[0] * bands[0, 0].numel()
        if count == 0:
            raise ValueError(f"representation {self.name}: no volumes to fit the band statistics on")
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        self.band_mean = mean.float()
        self.band_std = torch.where(std > 1e-6, std, torch.ones_like(std)).float()
        return self

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint records (meta["representation"]), enough for `representation_from_dict`."""
        return {"kind": "haar", "levels": self.levels, "band_mean": self.band_mean.tolist(),
                "band_std": self.band_std.tolist(),
                "description": f"3D orthonormal Haar wavelet packet, {counted(self.levels, 'level')}: "
                               f"{self.channels} bands normalised by their training mean and sd"}

    @staticmethod
    def _stat(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device, like.dtype).reshape(1, -1, 1, 1, 1)


def make_representation(name: str) -> HaarPacket:
    """An unfitted representation by its command-line name ("haar1", "haar2", "haar3")."""
    if name not in REPRESENTATIONS:
        raise ValueError(f"--representation {name!r}: choose one of {', '.join(REPRESENTATIONS)}")
    return HaarPacket(levels=int(name[-1]))


def representation_from_dict(record: Mapping[str, Any], where: str = "checkpoint") -> HaarPacket:
    """The representation a checkpoint recorded (HaarPacket.to_dict), refusing a kind this version does not know."""
    if record.get("kind") != "haar":
        raise ValueError(f"{where}: representation {record.get('kind')!r} is unknown to this mriflow version (known: haar)")
    try:
        return HaarPacket(int(record["levels"]), record["band_mean"], record["band_std"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"{where}: the representation record lacks or mangles {error}") from None
