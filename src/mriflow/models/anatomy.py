"""mriflow's anatomy network: a compact 3D U-Net with a tissue segmentation head, a pooled embedding
and age / sex heads, and its safetensors file format (config and training record in the metadata)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit

from mriflow.data.labels import TISSUE_CLASSES

ANATOMY_METADATA_KEY = "mriflow.anatomy_encoder"
ANATOMY_RECORD_KEY = "mriflow.anatomy_training"


@dataclass
class AnatomyEncoderConfig:
    """Architecture, grid and target scaling of the anatomy network, stored in its safetensors metadata.

    `texture_levels`: how many encoder levels (from the full-resolution one) add the
    per-channel mean and sd of their activations to the features (see `AnatomyEncoder.features`).
    `sex_blocks`: the grid of block means the sex read-out sees (see `AnatomyEncoder.sex_logit`).

    Age is a standardised regression (years = output * std + mean); sex is a logit for
    the last of `sex_categories`. `label_map` (DLMUSE label -> class name) records how
    the segmentation targets were made.
    """

    grid: str = "4mm"
    voxel_mm: float = 4.0
    shape: tuple[int, ...] = (40, 48, 40)
    channels: tuple[int, ...] = (8, 16, 32, 64)
    embedding_dim: int = 256
    classes: tuple[str, ...] = TISSUE_CLASSES
    target_mean: dict[str, float] = field(default_factory=lambda: {"age": 50.0})
    target_std: dict[str, float] = field(default_factory=lambda: {"age": 16.0})
    sex_categories: tuple[str, ...] = ("F", "M")
    label_map: dict[str, str] = field(default_factory=dict)
    texture_levels: int = 2
    sex_blocks: tuple[int, ...] = (10, 12, 10)


class AnatomyEncoder(nn.Module):
    """A compact 3D U-Net of MONAI residual units with a tissue segmentation head, a pooled
    bottleneck embedding and age / sex heads.

        x (N, 1, D, H, W) in [0, 1]
          encoder: residual units at channels[0] (full size), channels[1:] (each stride 2)
          bottleneck: residual unit to embedding_dim channels -> average pool -> embedding (N, E)
          decoder: transposed convolutions + skip connections -> logits (N, len(classes), D, H, W)
          heads: linear on the embedding -> age (N,) standardised, sex_auxiliary_logit (N,) (training only)
          sex read-out: linear on the volume's block means (`sex_logit`) -> the sex prediction

    Features for the set metrics (`features`): the embedding joined with the per-channel
    mean and sd over the volume of the first `texture_levels` encoder levels, every
    dimension standardised with the buffers `feature_mean` / `feature_std` (set from the
    training subjects by `calibrate_features`). The bottleneck alone is nearly blind to
    noise and blur (it was trained to segment through intensity jitter); the early
    levels' statistics are what see them.

    Sex is predicted by `sex_logit`, a logistic regression on the volume average-pooled
    to `sex_blocks`, fitted after training on the training subjects. The sex output of
    the jointly trained heads stays at chance on IXI (the segmentation loss shapes the
    shared embedding), and so does a linear read-out of the embedding on held-out
    subjects, while the coarse intensity pattern separates the sexes.

    D, H, W must be divisible by 2 ** (len(channels) - 1) (40 x 48 x 40 and 80 x 96 x 80 are).
    """

    def __init__(self, config: AnatomyEncoderConfig):
        super().__init__()
        self.config = config
        norm, channels = ("instance", {"affine": True}), tuple(config.channels)
        factor = 2 ** (len(channels) - 1)
        if any(size % factor for size in config.shape):
            raise ValueError(f"AnatomyEncoderConfig.shape {tuple(config.shape)}: every size must be divisible by "
                             f"{factor} for {len(channels)} levels (channels {channels}); pad the grid or drop a level")
        self.encoder = nn.ModuleList(
            ResidualUnit(3, c_in, c_out, strides=1 if i == 0 else 2, subunits=2, norm=norm)
            for i, (c_in, c_out) in enumerate(zip((1,) + channels[:-1], channels)))
        self.bottleneck = ResidualUnit(3, channels[-1], config.embedding_dim, subunits=2, norm=norm)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        in_channels = config.embedding_dim + channels[-1]  # the bottleneck joined with the deepest encoder level
        for level in reversed(range(len(channels) - 1)):  # each step doubles the size and joins a skip
            self.upsample.append(Convolution(3, in_channels, channels[level], strides=2, is_transposed=True, norm=norm))
            self.decoder.append(ResidualUnit(3, 2 * channels[level], channels[level], subunits=1, norm=norm))
            in_channels = channels[level]
        self.segmentation = Convolution(3, channels[0], len(config.classes), kernel_size=1, conv_only=True)
        self.heads = nn.Sequential(nn.Dropout(0.2), nn.Linear(config.embedding_dim, 2))  # age, sex logit
        if not 0 <= config.texture_levels <= len(channels):
            raise ValueError(f"AnatomyEncoderConfig.texture_levels {config.texture_levels}: must be between 0 and "
                             f"the {len(channels)} encoder levels")
        feature_dim = config.embedding_dim + 2 * sum(channels[: config.texture_levels])
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.sex_probe = nn.Linear(math.prod(config.sex_blocks), 1)

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    @property
    def feature_dim(self) -> int:
        return len(self.feature_mean)

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        return skips, self.bottleneck(x)

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> [embedding, (mean, sd) per channel of each texture level] (N, feature_dim),
        not standardised; the decoder is not run."""
        skips, bottom = self._encode(x)
        parts = [bottom.mean(dim=(2, 3, 4))]
        for level in skips[: self.config.texture_levels]:
            parts += [level.mean(dim=(2, 3, 4)), level.std(dim=(2, 3, 4))]
        return torch.cat(parts, dim=1)

    def sex_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> block means (N, prod(sex_blocks)), what the sex read-out sees."""
        return F.adaptive_avg_pool3d(x, tuple(self.config.sex_blocks)).flatten(1)

    def sex_logit(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> logit (N,) of the last of `config.sex_categories`."""
        return self.sex_probe(self.sex_blocks(x))[:, 0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> standardised features (N, feature_dim)."""
        return (self.raw_features(x) - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def calibrate_features(self, volumes: torch.Tensor, batch_size: int = 8) -> None:
        """Set the standardisation to the mean and sd of `raw_features` over `volumes` (the training
        subjects, N >= 2); a dimension that does not vary keeps sd 1."""
        raw = torch.cat([self.raw_features(volumes[s : s + batch_size]) for s in range(0, len(volumes), batch_size)])
        if len(raw) < 2:
            raise ValueError("calibrate_features needs at least 2 volumes")
        std = raw.std(dim=0)
        self.feature_mean.copy_(raw.mean(dim=0))
        self.feature_std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> {"logits" (N, C, D, H, W), "embedding" (N, E), "age" (N,) standardised, "sex_auxiliary_logit" (N,) (training only; predictions use `sex_logit`)}."""
        skips, bottom = self._encode(x)
        embedding = bottom.mean(dim=(2, 3, 4))
        y = torch.cat([bottom, skips[-1]], dim=1)
        for upsample, decoder, skip in zip(self.upsample, self.decoder, reversed(skips[:-1])):
            y = decoder(torch.cat([upsample(y), skip], dim=1))
        heads = self.heads(embedding)
        return {"logits": self.segmentation(y), "embedding": embedding, "age": heads[:, 0], "sex_auxiliary_logit": heads[:, 1]}


def save_anatomy_encoder(path: str | Path, model: AnatomyEncoder, record: dict | None = None,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Write weights + config (and an optional training record) as safetensors metadata, in the layout
    `AnatomyBackbone` reads. Convolution kernels (5-D, nearly all the bytes) are stored as `dtype`;
    biases, norms, the linear read-outs and the feature calibration stay float32."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() and v.ndim == 5 else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    metadata = {ANATOMY_METADATA_KEY: json.dumps(asdict(model.config))}
    if record is not None:
        metadata[ANATOMY_RECORD_KEY] = json.dumps(record)
    save_file(state, str(path), metadata=metadata)
    return path


def read_anatomy_config(path: str | Path) -> tuple[AnatomyEncoderConfig, dict | None]:
    """Config and training record from an anatomy weights file's metadata, refusing other formats."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if ANATOMY_METADATA_KEY not in metadata:
        raise ValueError(f"{path}: no {ANATOMY_METADATA_KEY!r} metadata; write it with save_anatomy_encoder")
    values = json.loads(metadata[ANATOMY_METADATA_KEY])
    known = {f.name for f in fields(AnatomyEncoderConfig)}
    if set(values) - known:
        raise ValueError(f"{path}: config keys {sorted(set(values) - known)} are unknown to this mriflow version "
                         f"(a newer anatomy weights format?); retrain with this version's benchmarks/anatomy.py")
    if known - set(values):
        raise ValueError(f"{path}: an older anatomy weights format (no {sorted(known - set(values))} in its config); "
                         f"recalibrate it with `python benchmarks/anatomy.py --data PREPARED --init {path} --epochs 0`")
    config = AnatomyEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    return config, json.loads(metadata.get(ANATOMY_RECORD_KEY, "null"))


ANATOMY_WEIGHTS = "anatomy.safetensors"


def default_anatomy_weights() -> Path:
    """The 4 mm anatomy network shipped in the package (other grids: `anatomy_weights_for`)."""
    return Path(str(resources.files("mriflow") / "weights" / ANATOMY_WEIGHTS))


def shipped_anatomy_weights() -> dict[tuple[int, ...], Path]:
    """The anatomy networks shipped in the package (weights/anatomy*.safetensors), by the volume shape
    they were trained on."""
    folder = default_anatomy_weights().parent
    return {tuple(read_anatomy_config(path)[0].shape): path for path in sorted(folder.glob("anatomy*.safetensors"))}


def anatomy_weights_for(shape: Sequence[int]) -> Path | None:
    """The shipped anatomy network trained on volumes of `shape`, if there is one."""
    return shipped_anatomy_weights().get(tuple(shape))


def load_anatomy_encoder(path: str | Path) -> AnatomyEncoder:
    """The anatomy network of a weights file (its config from the file's metadata), in float32 and eval mode."""
    from safetensors.torch import load_file

    config, _ = read_anatomy_config(path)
    network = AnatomyEncoder(config)
    network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return network.eval()
