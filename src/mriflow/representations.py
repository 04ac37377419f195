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
levels is (64, 20, 24, 20), the grid of the 2 mm autoencoder's latents. Each band is then centred and
scaled by statistics of the training volumes (`fit`, recorded in the generator's checkpoint by `to_dict`),
how far towards unit variance set by `equalisation` (e):

    band k / (sd_0^(1 - e) * sd_k^e)      so its sd becomes (sd_k / sd_0)^(1 - e), the coarsest band's 1

e = 1 (the flow-wavelet preset until 2026-12-07): every band has unit variance, so the flow's noise drowns every
band at the same time and the network draws fine detail while the coarse anatomy is still undecided. e = 0: the
bands keep their natural energies relative to the coarsest (the finest 2 mm bands' sd is about 1/160 of it), so
noise drowns fine detail first and the flow draws coarse to fine, as a flow on the voxels does (WDM keeps its
detail bands unscaled too and only divides the low band by 3). Values between trade one for the other.

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
    `band_std` holds each band's divisor, sd_0^(1 - e) * sd_k^e (the band's sd itself when equalisation e = 1).
    """

    def __init__(self, levels: int = 2, band_mean: Sequence[float] | None = None,
                 band_std: Sequence[float] | None = None, equalisation: float = 1.0):
        if levels not in (1, 2, 3):
            raise ValueError(f"representation: a Haar packet has 1, 2 or 3 levels, got {levels}")
        if not 0.0 <= float(equalisation) <= 1.0:
            raise ValueError(f"representation: band equalisation must lie in [0, 1], got {equalisation}")
        self.levels = levels
        self.equalisation = float(equalisation)
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
        """Set each band's mean and divisor from volumes (1, D, H, W) or (B, 1, D, H, W) in [0, 1] (the training
        split's), accumulated in float64: the divisor is sd_0^(1 - e) * sd_k^e (see the module docstring); a band
        that is constant keeps sd 1."""
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
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.band_mean = mean.float()
        self.band_std = (std[0] ** (1.0 - self.equalisation) * std**self.equalisation).float()
        return self

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint records (meta["representation"]), enough for `representation_from_dict`."""
        scaled = ("normalised by their training mean and sd" if self.equalisation == 1.0 else
                  "centred, the coarsest scaled to unit sd and the others by the same factor" if self.equalisation == 0.0
                  else f"centred and scaled to (sd_k / sd_0)^{1.0 - self.equalisation:g} of the coarsest's unit sd")
        return {"kind": "haar", "levels": self.levels, "band_mean": self.band_mean.tolist(),
                "band_std": self.band_std.tolist(), "equalisation": self.equalisation,
                "description": f"3D orthonormal Haar wavelet packet, {counted(self.levels, 'level')}: "
                               f"{self.channels} bands {scaled}"}

    @staticmethod
    def _stat(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device, like.dtype).reshape(1, -1, 1, 1, 1)


def make_representation(name: str, equalisation: float = 1.0) -> HaarPacket:
    """An unfitted representation by its command-line name ("haar1", "haar2", "haar3") and band equalisation."""
    if name not in REPRESENTATIONS:
        raise ValueError(f"--representation {name!r}: choose one of {', '.join(REPRESENTATIONS)}")
    return HaarPacket(levels=int(name[-1]), equalisation=equalisation)


def representation_from_dict(record: Mapping[str, Any], where: str = "checkpoint") -> HaarPacket:
    """The representation a checkpoint recorded (HaarPacket.to_dict), refusing a kind this version does not know."""
    if record.get("kind") != "haar":
        raise ValueError(f"{where}: representation {record.get('kind')!r} is unknown to this mriflow version (known: haar)")
    try:
        return HaarPacket(int(record["levels"]), record["band_mean"], record["band_std"],
                          float(record.get("equalisation", 1.0)))  # records before 2026-12-07: every band unit sd
    except (KeyError, TypeError) as error:
        raise ValueError(f"{where}: the representation record lacks or mangles {error}") from None
