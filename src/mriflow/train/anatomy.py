"""The anatomy stage: mriflow's anatomy network (mriflow.models.anatomy) trained through the shared loop.

Supervision per training subject: its tissue map (the DLMUSE label map through `mriflow.data.labels`),
its age and its sex (manifest.csv). The loss, per micro-batch:

    L = DiceCE(logits, tissue) + age_weight * MSE((age - mean) / std) + sex_weight * BCE(sex logit, sex)

(subjects without an age or a sex leave that term out). Augmentation: a left-right flip and, inside the
brain, an intensity scale, shift and gamma; its randomness is torch's, which the loop seeds by
(seed, epoch, item). Model selection: the stage validates (the same loss and the mean Dice on the val
split, with the EMA weights) before every checkpoint, and the loop keeps the checkpoint of the lowest
validation loss ("best" in the run's result and checkpoint meta).

    >>> result = train_anatomy("prepared/", "runs/anatomy", preset="tiny", regions="muse_regions.csv")
    >>> network = anatomy_network(result["best"]["checkpoint"])       # EMA weights, uncalibrated
    >>> save_anatomy_encoder("anatomy.safetensors", network)           # the backbone's file format

The features' standardisation and the sex read-out are fitted after training (benchmarks/anatomy.py
calibrates them); the sex read-out (`sex_probe`) is not trained here.

Checkpoint meta: stage "anatomy"; config (AnatomyTrainingConfig); anatomy (the AnatomyEncoderConfig:
grid, shape, classes, age scaling, label_map); initialised_from; data. Weights under "anatomy.".
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mriflow import checkpoint as ckpt
from mriflow import distributed
from mriflow.config import LoopConfig, from_dict, load_preset, to_dict
from mriflow.data.dataset import read_manifest, read_preparation
from mriflow.data.io import load_volume
from mriflow.data.labels import dice_scores, tissue_lookup
from mriflow.models.anatomy import ANATOMY_METADATA_KEY, ANATOMY_RECORD_KEY, AnatomyEncoder, AnatomyEncoderConfig
from mriflow.train import loop
from mriflow.utils.seeding import seed_everything
from mriflow.train.labels import read_label_map, tissue_targets
from mriflow.utils.files import sha256

STAGE = "anatomy"
SEX_CATEGORIES = ("F", "M")
# Filled after training by calibration, not by gradients: absent from a network trained before they existed.
CALIBRATED = ("feature_mean", "feature_std", "sex_probe.weight", "sex_probe.bias")


@dataclass(frozen=True)
class AnatomyTrainingConfig:
    loop: LoopConfig = LoopConfig()
    channels: tuple[int, ...] = (8, 16, 32, 64)  # encoder levels (the first at full size, each next one stride 2)
    embedding_dim: int = 256
    age_weight: float = 1.0  # weight of the MSE of the standardised age
    sex_weight: float = 1.0  # weight of the sex cross-entropy
    augment: bool = True  # left-right flip, intensity scale / shift / gamma inside the brain


def load_config(preset: str = "tiny") -> AnatomyTrainingConfig:
    return from_dict(AnatomyTrainingConfig, load_preset(STAGE, preset), f"{STAGE}-{preset}.yaml")


def augment(image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One subject (1, D, H, W): left-right flip (p = 0.5; axis 0 of a volume is left-right in RAS, tissue classes
    are unsided) and, inside the brain, intensity x [0.9, 1.1] + [-0.05, 0.05], clipped to [0, 1], then ^ gamma with
    log gamma uniform in [-log 1.25, log 1.25]. Draws from torch's generator."""
    flip, scale, shift, gamma = torch.rand(4).tolist()
    if flip < 0.5:
        image, target = image.flip(1), target.flip(1)
    image = image.clone()
    brain = image > 0
    jittered = (image[brain] * (0.9 + 0.2 * scale) + (0.1 * shift - 0.05)).clamp(0, 1)
    image[brain] = jittered.pow(math.exp((gamma - 0.5) * 2 * math.log(1.25)))
    return image, target


class AnatomySubjects(Dataset):
    """The subjects of one split of a prepared folder, held in memory: items {"image" (1, D, H, W) in [0, 1],
    "target" (1, D, H, W) tissue class indices (int64), "age" (years; NaN when missing), "sex" (index into
    `SEX_CATEGORIES`; NaN when missing)}, augmented (see `augment`) when `augment`."""

    def __init__(self, data_dir: str | Path, split: str, lookup: np.ndarray, augment: bool = False):
        data_dir = Path(data_dir)
        manifest = read_manifest(data_dir)
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            raise ValueError(f"{data_dir}/manifest.csv: no subjects in the {split!r} split")
        self.subjects = rows["subject"].astype(str).tolist()
        self.images = torch.stack([torch.from_numpy(load_volume(data_dir / f)[0]).float() for f in rows["image"]])
        self.targets = tissue_targets(data_dir, self.subjects, lookup)  # (N, D, H, W) uint8
        self.age = torch.tensor(pd.to_numeric(rows.get("age"), errors="coerce").to_numpy(float)
                                if "age" in rows else np.full(len(rows), np.nan))
        sexes = rows["sex"].astype(str).str.strip().str.upper() if "sex" in rows else [""] * len(rows)
        self.sex = torch.tensor([float(SEX_CATEGORIES.index(s)) if s in SEX_CATEGORIES else math.nan for s in sexes])
        self.augment = augment

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, target = self.images[index][None], self.targets[index][None].long()
        if self.augment:
            image, target = augment(image, target)
        return {"image": image, "target": target, "age": self.age[index].float(), "sex": self.sex[index].float()}


class AnatomyStage:
    """The anatomy network as a `loop.Stage`: one network, one phase, its EMA copy; validates on the val split."""

    ema_networks = ("anatomy",)
    metric_names = ("loss", "segmentation", "age", "sex", "dice")

    def __init__(self, network: AnatomyEncoder, config: AnatomyTrainingConfig, validation: AnatomySubjects):
        from monai.losses import DiceCELoss

        network.sex_probe.requires_grad_(False)  # fitted after training (calibration), never by the loss
        self.networks: dict[str, nn.Module] = {"anatomy": network}
        self.phases = {"anatomy": [{"params": [p for p in network.parameters() if p.requires_grad]}]}
        self.config, self.validation = config, validation
        self.age_mean, self.age_std = network.config.target_mean["age"], network.config.target_std["age"]
        self.classes = len(network.config.classes)
        self.segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def losses(self, network: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The loss of the module docstring and its terms, and the batch's mean Dice of the foreground classes."""
        output = network(batch["image"])
        logits = output["logits"].float()  # (B, C, D, H, W)
        terms = {"segmentation": self.segmentation_loss(logits, batch["target"])}
        age = (batch["age"] - self.age_mean) / self.age_std
        known = torch.isfinite(age)
        terms["age"] = F.mse_loss(output["age"].float()[known], age[known]) if known.any() else logits.sum() * 0
        known = torch.isfinite(batch["sex"])
        sex_logit = output["sex_auxiliary_logit"].float()
        terms["sex"] = (F.binary_cross_entropy_with_logits(sex_logit[known], batch["sex"][known]) if known.any()
                        else logits.sum() * 0)
        terms["loss"] = (terms["segmentation"] + self.config.age_weight * terms["age"]
                         + self.config.sex_weight * terms["sex"])
        with torch.no_grad():
            terms["dice"] = torch.tensor(dice_scores(logits.argmax(1), batch["target"][:, 0], self.classes).mean())
        return terms

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.losses(self.networks["anatomy"], batch)
        return terms["loss"], {name: value.detach() for name, value in terms.items()}

    def validate(self, networks: dict[str, nn.Module]) -> dict[str, float]:
        """The loss (first: what model selection minimises) and its terms and Dice over the val split, by subject."""
        network = networks["anatomy"]
        device = next(network.parameters()).device
        sums: dict[str, float] = {}
        for start in range(0, len(self.validation), self.config.loop.batch_size):
            items = [self.validation[i] for i in range(start, min(start + self.config.loop.batch_size, len(self.validation)))]
            batch = {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}
            for name, value in self.losses(network, batch).items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(items)
        return {name: sums[name] / len(self.validation) for name in ("loss", "segmentation", "age", "sex", "dice")}

    @torch.no_grad()
    def montage(self, batch: dict, networks: dict[str, nn.Module]) -> dict[str, np.ndarray]:
        image = batch["image"][:1].float()
        predicted = networks["anatomy"](image)["logits"].argmax(1)[0]
        scale = float(self.classes - 1)
        return {"image": image[0, 0].cpu().numpy(), "tissue (label map)": batch["target"][0, 0].float().cpu().numpy() / scale,
                "tissue (predicted)": predicted.float().cpu().numpy() / scale}


def load_anatomy_weights(path: str | Path, config: AnatomyEncoderConfig, fine_tune: bool) -> tuple[AnatomyEncoder, dict | None]:
    """A trained network from an anatomy weights file, checked against `config` (made from this data), and its
    training record. Its channels and embedding size are the file's. Its calibration may be missing (a file written
    before the texture features existed; calibration refits it). With `fine_tune` (it will be trained further) it may
    come from another grid: the network is fully convolutional, so e.g. the 4 mm network starts the 2 mm one."""
    from safetensors.torch import load_file

    path = Path(path)
    stored, record = _metadata(path)
    for key in ("grid", "shape", "classes", "target_mean", "target_std", "sex_categories", "label_map"):
        if fine_tune and key in ("grid", "shape"):
            continue
        mine = json.loads(json.dumps(getattr(config, key)))
        if mine != stored.get(key):
            raise ValueError(f"--init {path}: its {key} {stored.get(key)} differs from this data's {mine}")
    config = dataclasses.replace(config, channels=tuple(stored["channels"]), embedding_dim=stored["embedding_dim"])
    network = AnatomyEncoder(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if set(missing) - set(CALIBRATED) or unexpected:
        raise ValueError(f"--init {path}: does not fit the network (missing {missing}, unexpected {unexpected})")
    return network, record


def _metadata(path: Path) -> tuple[dict[str, Any], dict | None]:
    """(the stored config as JSON values, the training record) of an anatomy weights file, of any format version."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if ANATOMY_METADATA_KEY not in metadata:
        raise ValueError(f"{path}: no {ANATOMY_METADATA_KEY!r} metadata; not an anatomy weights file")
    return json.loads(metadata[ANATOMY_METADATA_KEY]), json.loads(metadata.get(ANATOMY_RECORD_KEY, "null"))


def anatomy_network(checkpoint: str | Path) -> AnatomyEncoder:
    """The inference (EMA) network of an anatomy checkpoint folder, or of a run's latest checkpoint, in eval mode."""
    weights, meta = ckpt.load_checkpoint(checkpoint)
    if meta.get("stage") != STAGE:
        raise ValueError(f"{meta['path']}: a {meta.get('stage')!r} checkpoint, not an anatomy one")
    values = meta["anatomy"]
    config = AnatomyEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    network = AnatomyEncoder(config)
    prefix = f"{STAGE}."
    state = {k[len(prefix):]: v.float() if v.is_floating_point() else v for k, v in weights.items() if k.startswith(prefix)}
    ckpt.load_weights_into(network, state, "", meta["path"])
    return network.eval()


def encoder_config(data_dir: Path, label_map: dict[str, str], train: AnatomySubjects,
                   config: AnatomyTrainingConfig) -> AnatomyEncoderConfig:
    """The network's config for this data: its grid (prepare.json, else the volumes' shape and voxel size), the
    training subjects' age mean and sd (rounded to 3 decimals), the label map."""
    preparation = read_preparation(data_dir)
    grid = preparation.get("grid")
    if grid is None:
        _, affine = load_volume(data_dir / read_manifest(data_dir)["image"].iloc[0])
        grid = {"name": preparation.get("preset", "custom"), "voxel_mm": float(np.linalg.norm(affine[:3, 0])),
                "shape": list(train.images.shape[1:])}
    if tuple(grid["shape"]) != tuple(train.images.shape[1:]):
        raise ValueError(f"{data_dir}: prepare.json's grid {grid['shape']} differs from the volumes' "
                         f"{list(train.images.shape[1:])}")
    age = train.age.numpy()
    if not np.isfinite(age).any():
        raise ValueError(f"{data_dir}/manifest.csv: no training subject has an age; the anatomy network learns age")
    return AnatomyEncoderConfig(
        grid=str(grid["name"]), voxel_mm=float(grid["voxel_mm"]), shape=tuple(int(n) for n in grid["shape"]),
        channels=tuple(config.channels), embedding_dim=config.embedding_dim,
        target_mean={"age": round(float(np.nanmean(age)), 3)},
        target_std={"age": round(float(np.nanstd(age)), 3) or 1.0}, sex_categories=SEX_CATEGORIES,
        label_map=dict(label_map))


def train_anatomy(
    data_dir: str | Path,
    out: str | Path,
    preset: str | None = None,
    config: AnatomyTrainingConfig | None = None,
    regions: str | Path | None = None,
    label_map: dict[str, str] | None = None,
    init: str | Path | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    lr: float | None = None,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Train the anatomy network on `data_dir`'s train split (label maps, age, sex), selecting on its val split,
    into run folder `out`.

    The config is the preset (default "tiny") or `config`, with `max_steps`, `max_minutes` and `lr` replaced when
    given. Label maps become tissue classes by `label_map` ({DLMUSE label: class name}), or by the region names of
    `regions` (muse_regions.csv: index,name), or else as the shipped anatomy network's. `init`: an anatomy weights
    file to start from (fine-tuning; another grid is allowed). With `resume`, the run's own config, label map and
    weights are used. Returns the loop's {"step", "metrics", "checkpoint", "best"}."""
    data_dir, out = Path(data_dir), Path(out)
    latest = ckpt.latest_checkpoint(out) if resume else None
    initialised_from = None
    if latest is not None:
        _, saved = ckpt.load_checkpoint(latest)
        if saved.get("stage") != STAGE:
            raise ValueError(f"{out} holds a {saved.get('stage')!r} run, not an anatomy one; choose another --out")
        config = from_dict(AnatomyTrainingConfig, saved["config"], str(latest))
        label_map, preset, init = saved["anatomy"]["label_map"], saved.get("preset"), None
        initialised_from = saved.get("initialised_from")
    else:
        if config is None:
            config = load_config(preset or "tiny")
            preset = preset or "tiny"
        if label_map is not None and regions is not None:
            raise ValueError("give the label maps' classes once: regions (muse_regions.csv) or label_map, not both")
        label_map = {str(k): v for k, v in label_map.items()} if label_map is not None else read_label_map(regions)
    changes = {k: v for k, v in (("max_steps", max_steps), ("max_minutes", max_minutes), ("lr", lr)) if v is not None}
    config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, **changes))

    lookup = tissue_lookup(label_map)
    train = AnatomySubjects(data_dir, "train", lookup, augment=config.augment)
    splits = set(read_manifest(data_dir)["split"].dropna())
    if "val" not in splits:
        raise ValueError(f"{data_dir}: no 'val' split; the anatomy network is selected on validation subjects "
                         "(prepare with a val split)")
    validation = AnatomySubjects(data_dir, "val", lookup)
    network_config = encoder_config(data_dir, label_map, train, config)

    joined_group = torch.distributed.is_initialized()  # a caller's own process group is left alone
    context = distributed.setup(config.loop.device)
    try:
        seed_everything(config.loop.seed)  # identical initial weights in every process
        if init is not None:
            network, _ = load_anatomy_weights(init, network_config, fine_tune=True)
            initialised_from = {"weights": str(init), "sha256": sha256(init), "grid": _metadata(Path(init))[0]["grid"]}
        else:
            network = AnatomyEncoder(network_config)
        stage = AnatomyStage(network, config, validation)
        meta = {
            "stage": STAGE,
            "preset": preset,
            "config": to_dict(config),
            "anatomy": to_dict(network.config),
            "initialised_from": initialised_from,
            "preparation": read_preparation(data_dir),
            "data": {"dir": str(data_dir.resolve()), "name": data_dir.resolve().name, "train_subjects": len(train),
                     "val_subjects": len(validation)},
            "parameters": sum(p.numel() for p in network.parameters()),
        }
        return loop.train(stage, train, config.loop, out, meta, resume=resume, context=context, stop_at_step=stop_at_step)
    finally:
        if not joined_group:
            distributed.teardown()
