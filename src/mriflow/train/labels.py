"""The label stage: a label decoder (mriflow.models.label_decoder) trained on the cached latents of the
prepared label maps, so generated volumes come with tissue segmentations.

Each step reads a training subject's posterior q(z|x) from the latent cache, draws z from it (the
generators learn to draw from the same distribution) and fits the decoder's logits to the subject's
tissue map (its DLMUSE label map through `mriflow.data.labels`) with Dice + cross-entropy. Through
the one training loop: EMA weights, exact resume, logs, montages (real image, its label map, the
decoded labels).

    >>> train_labels("prepared/", "runs/ae", "runs/labels")                       # preset "tiny"
    >>> generate(model="runs/flow", labels="runs/labels", out="samples", n=8)    # image + label pairs

Checkpoint meta: stage "labels"; config {"model": LabelDecoderConfig fields, "loop": ..., "dice_weight"};
autoencoder {"path", "model_sha256", "latent_scale"}; classes; label_map (label -> class name);
image_shape, affine, grid, data. Weights under "labels." in model.safetensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from mriflow import checkpoint as ckpt
from mriflow import distributed
from mriflow.config import LoopConfig, from_dict, load_preset, to_dict
from mriflow.data.dataset import read_manifest
from mriflow.data.io import load_volume
from mriflow.data.labels import TISSUE_CLASSES, dice_scores, muse_tissue_mapping, tissue_lookup, tissue_map
from mriflow.latents import LatentDataset
from mriflow.models.anatomy import read_anatomy_config
from mriflow.models.label_decoder import LabelDecoder
from mriflow.train import loop
from mriflow.utils.seeding import seed_everything
from mriflow.train.generator import _ensure_latents
from mriflow.train.generator_data import geometry

STAGE = "labels"


@dataclass
class LabelTrainingConfig:
    loop: LoopConfig = LoopConfig()
    dice_weight: float = 1.0  # loss = cross-entropy + dice_weight * Dice loss (foreground classes)


def load_config(preset: str = "tiny") -> LabelTrainingConfig:
    return from_dict(LabelTrainingConfig, load_preset(STAGE, preset), f"{STAGE}-{preset}.yaml")


def default_label_map() -> dict[str, str]:
    """DLMUSE label -> tissue class name, as the shipped anatomy network was trained (MUSE region names mapped by
    `muse_tissue_mapping`)."""
    config, _ = read_anatomy_config(Path(str(resources.files("mriflow") / "weights" / "anatomy.safetensors")))
    return dict(config.label_map)


def read_label_map(regions: str | Path | None) -> dict[str, str]:
    """The label map from a muse_regions.csv (index,name), or the shipped one when `regions` is None."""
    if regions is None:
        return default_label_map()
    path = Path(regions)
    if not path.is_file():
        raise FileNotFoundError(f"--regions {path}: no such file; give the label maps' region list (index,name)")
    table = pd.read_csv(path)
    if not {"index", "name"} <= set(table.columns):
        raise ValueError(f"--regions {path}: needs the columns index,name (has {', '.join(map(str, table.columns))})")
    mapping = muse_tissue_mapping(table.set_index("index")["name"].to_dict())
    return {str(label): TISSUE_CLASSES[index] for label, index in mapping.items()}


def tissue_targets(data_dir: Path, subjects: list[str], lookup: np.ndarray) -> torch.Tensor:
    """The tissue maps (N, D, H, W) uint8 of `subjects` of a prepared folder: their label maps through `lookup`."""
    manifest = read_manifest(data_dir).set_index("subject")
    targets = []
    for subject in subjects:
        labels = manifest.loc[subject, "labels"] if "labels" in manifest.columns else None
        if not isinstance(labels, str) or not labels:
            raise ValueError(f"{data_dir}/manifest.csv: subject {subject} has no label map; prepare with --masks "
                             "pointing at label maps (e.g. DLMUSE) to train on labels")
        volume, _ = load_volume(data_dir / labels)
        targets.append(torch.from_numpy(tissue_map(volume, lookup, str(data_dir / labels))))
    return torch.stack(targets)


class LabelPairs(Dataset):
    """Items {"latent" (C, d, h, w) unscaled, drawn from the posterior, "target" (D, H, W) class indices}."""

    def __init__(self, latents: LatentDataset, data_dir: Path, lookup: np.ndarray):
        self.latents = latents
        self.targets = tissue_targets(data_dir, latents.subjects, lookup)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.latents[index]
        latent = self.latents.sample(item["latent_mean"], item["latent_logvar"]) / self.latents.scale
        return {"latent": latent, "target": self.targets[index].long()}


class LabelStage:
    """The label decoder as a `loop.Stage`: one network, one phase, its EMA copy, Dice + cross-entropy."""

    ema_networks = ("labels",)
    metric_names = ("loss", "dice")

    def __init__(self, decoder: LabelDecoder, dice_weight: float, autoencoder: nn.Module | None = None):
        from monai.losses import DiceLoss

        self.networks: dict[str, nn.Module] = {"labels": decoder}
        self.phases = {"labels": [{"params": list(decoder.parameters())}]}
        self.dice_weight = dice_weight
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)
        self.autoencoder = autoencoder
        self.classes = decoder.classes

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.networks["labels"](batch["latent"]).float()
        target = batch["target"]
        dice_loss = self.dice(logits, target.unsqueeze(1))
        loss = nn.functional.cross_entropy(logits, target) + self.dice_weight * dice_loss
        with torch.no_grad():
            dice = torch.tensor(dice_scores(logits.argmax(1), target, len(self.classes)).mean())
        return loss, {"loss": loss.detach(), "dice": dice}

    @torch.no_grad()
    def montage(self, batch: dict, networks: dict[str, nn.Module]) -> dict[str, np.ndarray] | None:
        latent = batch["latent"][:1].float()
        scale = float(len(self.classes) - 1)
        shown = {"labels (prepared)": batch["target"][0].float().cpu().numpy() / scale,
                 "labels (decoded)": networks["labels"](latent).argmax(1)[0].float().cpu().numpy() / scale}
        if self.autoencoder is not None:
            shown = {"image (decoded)": self.autoencoder.decode(latent).clamp(0, 1)[0, 0].float().cpu().numpy(), **shown}
        return shown


def train_labels(
    data_dir: str | Path,
    autoencoder: str | Path,
    out: str | Path,
    preset: str | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    config: LabelTrainingConfig | None = None,
    regions: str | Path | None = None,
    max_minutes: float | None = None,
    lr: float | None = None,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Train a label decoder for `autoencoder` on `data_dir`'s training split (its label maps) into run folder `out`.

    `regions`: the label maps' region list (muse_regions.csv: index,name) that maps labels to tissue classes by
    name; default: the DLMUSE map the shipped anatomy network was trained with. Returns {"step", "metrics",
    "checkpoint"}."""
    data_dir, out = Path(data_dir), Path(out)
    checkpoint_dir = ckpt.resolve_checkpoint(autoencoder).resolve()
    latest = ckpt.latest_checkpoint(out) if resume else None
    if latest is not None:
        _, saved = ckpt.load_checkpoint(latest)
        if saved.get("stage") != STAGE:
            raise ValueError(f"{out} holds a {saved.get('stage')!r} run, not a label one; choose another --out")
        config = from_dict(LabelTrainingConfig, {k: v for k, v in saved["config"].items() if k != "model"}, str(latest))
        label_map = saved["label_map"]
    else:
        config = config or load_config(preset or "tiny")
        preset = preset or "tiny"
        label_map = read_label_map(regions)
    changes = {k: v for k, v in (("max_steps", max_steps), ("max_minutes", max_minutes), ("lr", lr)) if v is not None}
    config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, **changes))

    joined_group = torch.distributed.is_initialized()
    context = distributed.setup(config.loop.device)
    try:
        image_decoder, autoencoder_meta = ckpt.load_autoencoder(checkpoint_dir, "cpu")
        image_decoder.requires_grad_(False)
        preparation, image_shape, affine = geometry(data_dir)
        _ensure_latents(data_dir, checkpoint_dir, context)
        latents = LatentDataset(data_dir, checkpoint_dir, "train")
        pairs = LabelPairs(latents, data_dir, tissue_lookup(label_map))
        seed_everything(config.loop.seed)
        decoder = LabelDecoder.from_autoencoder(image_decoder, TISSUE_CLASSES)
        stage = LabelStage(decoder, config.dice_weight, image_decoder.to(context.device) if context.is_main else None)
        meta = {
            "stage": STAGE,
            "preset": preset,
            "config": {"model": to_dict(decoder.config), **to_dict(config)},
            "classes": list(TISSUE_CLASSES),
            "label_map": label_map,
            "autoencoder": {"path": str(checkpoint_dir), "model_sha256": latents.index["checkpoint"]["model_sha256"],
                            "latent_scale": latents.scale, "step": autoencoder_meta.get("step")},
            "image_shape": image_shape,
            "affine": affine,
            "grid": preparation.get("preset"),
            "data": {"dir": str(data_dir.resolve()), "name": data_dir.resolve().name, "train_subjects": len(latents)},
            "parameters": sum(p.numel() for p in decoder.parameters()),
            "preparation": preparation,
        }
        return loop.train(stage, pairs, config.loop, out, meta, resume=resume, context=context, stop_at_step=stop_at_step)
    finally:
        if not joined_group:
            distributed.teardown()
