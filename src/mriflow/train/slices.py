"""Training the slice model (mriflow.families.slices): a 2D rectified flow on every axial slice of the training split.

No autoencoder and no latent cache: the training subjects' volumes are read once through the prepared
dataset (mriflow.data.dataset.PreparedDataset) and held in memory with intensities in [−1, 1] (4 mm: 120
subjects × 40 slices of 40 × 48, 37 MB); an item is one slice with its position k / (D − 1) and its
subject's covariates. The shared loop (mriflow.train.loop) does the rest: EMA, checkpoints, exact resume,
montages (a real volume beside one drawn slice by slice for its covariates, in three planes, where the
sagittal and coronal views show the seams between slices). The log's `volumes_per_second` counts slices.

    >>> train_slices("prepared/", "runs/slices", condition=["age", "sex"], preset="tiny")
    >>> train_slices("prepared/", "runs/slices", resume=True)      # continue the latest checkpoint

Checkpoint meta, what mriflow.generator reads (EMA weights under "velocity." in model.safetensors):

    stage "slices";  space "image" (no "autoencoder", no "latent_shape");  preset;  config (model: the 2D
    VelocityNetConfig; objective; sampling);  schema;  image_shape [D, H, W];  affine;  grid;  slice_axis 2;
    data {"dir", "name", "train_subjects", "train_slices"};  parameters;  preparation
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mriflow import distributed
from mriflow.config import to_dict
from mriflow.data.dataset import PreparedDataset
from mriflow.families.slices import SliceFlow, SliceTrainingConfig, image_to_model, model_to_image, slice_positions
from mriflow.models.velocity import VelocityNet, num_parameters
from mriflow.train import loop
from mriflow.train.generator_data import geometry, run_config
from mriflow.utils.seeding import seed_everything

STAGE = SliceFlow.name


class SliceDataset(Dataset):
    """Every axial slice (the last axis) of a split's volumes, in memory: item j is slice k of subject i, j = i·D + k,
    {"image" (1, X, Y) in [−1, 1], "position" () = k / (D − 1), "covariates" (K,), "covariates_present" (K,)}."""

    def __init__(self, volumes: PreparedDataset):
        if len(volumes) == 0:
            raise ValueError(f"{volumes.root}: no training subjects to take slices from")
        items = [volumes[i] for i in range(len(volumes))]
        self.volumes = image_to_model(torch.stack([item["image"][0] for item in items]))  # (N, X, Y, Z)
        self.covariates = torch.stack([item["covariates"] for item in items])  # (N, K)
        self.present = torch.stack([item["covariates_present"] for item in items])
        self.reference = items[0]  # a real volume in [0, 1] and its covariates, for the montages
        self.depth = int(self.volumes.shape[-1])
        self.positions = slice_positions(self.depth)

    def __len__(self) -> int:
        return len(self.volumes) * self.depth

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        subject, k = divmod(index, self.depth)
        return {"image": self.volumes[subject, :, :, k][None], "position": self.positions[k],
                "covariates": self.covariates[subject], "covariates_present": self.present[subject]}


class SliceStage:
    """The slice model as a `loop.Stage`: one network "velocity" and its EMA copy, the family's loss over a batch of
    slices, and a montage of a real volume beside a volume drawn slice by slice for the same covariates."""

    ema_networks = ("velocity",)
    metric_names = ("loss",)

    def __init__(self, family: SliceFlow, reference: dict[str, Any] | None = None):
        self.family = family
        velocity_net = VelocityNet(family.config.model)
        self.networks: dict[str, nn.Module] = {"velocity": velocity_net}
        self.phases: dict[str, list[dict[str, Any]]] = {"velocity": [{"params": list(velocity_net.parameters())}]}
        self.reference = reference  # {"image" (1, X, Y, Z) in [0, 1], "covariates", "covariates_present"}; None: no montage

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.family.loss(self.networks["velocity"], batch["image"], batch["covariates"],
                                batch["covariates_present"], positions=batch["position"])
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def montage(self, batch: dict, networks: dict[str, nn.Module]) -> dict[str, np.ndarray] | None:
        if self.reference is None:
            return None
        device = batch["image"].device
        real = self.reference["image"]  # (1, X, Y, Z)
        covariates = ((self.reference["covariates"], self.reference["covariates_present"])
                      if self.family.config.model.covariate_names else None)
        # the seed of sample 0 every time: the montages of a run show the same noise becoming a brain
        sample, _ = self.family.sample(networks["velocity"], (1, *real.shape), covariates,
                                       self.family.default_sampling(), device)
        return {"real volume": real[0].numpy(), "sample, same covariates": model_to_image(sample.float())[0, 0].cpu().numpy()}


def train_slices(
    data_dir: str | Path,
    out: str | Path,
    condition: Sequence[str] | None = None,
    preset: str | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    config: SliceTrainingConfig | None = None,
    stop_at_step: int | None = None,
    max_minutes: float | None = None,
    lr: float | None = None,
) -> dict[str, Any]:
    """Train the slice model on every axial slice of `data_dir`'s training split into run folder `out`.

    `condition` names covariates of the prepared manifest (None or empty: unconditional). The config is the
    preset `slices-<preset>.yaml` (default "tiny"), or `config` when given, with `max_steps`, `max_minutes` (a
    wall-clock budget; the run stops with a checkpoint) and `lr` replaced when given. With `resume`, the run's own
    config and covariate schema are used. Returns {"step", "metrics", "checkpoint", "best"} as mriflow.train.loop.
    """
    data_dir, out = Path(data_dir), Path(out)
    config, names, schema, preset, _ = run_config(STAGE, SliceTrainingConfig, data_dir, out, resume, condition, preset,
                                                  max_steps, config, max_minutes, lr)

    joined_group = torch.distributed.is_initialized()  # a caller's own process group is left alone
    context = distributed.setup(config.loop.device)
    try:
        preparation, image_shape, affine = geometry(data_dir)
        volumes = PreparedDataset(data_dir, "train", covariates=None if schema is not None else names or None,
                                  schema=schema)  # the schema is fitted on the training split (or is the run's own)
        slices = SliceDataset(volumes)
        config = dataclasses.replace(config, model=config.model.with_schema(volumes.schema))
        seed_everything(config.loop.seed)  # identical initial weights in every process
        stage = SliceStage(SliceFlow(config), slices.reference if context.is_main else None)
        meta = {
            "stage": STAGE,
            "space": SliceFlow.space,
            "preset": preset,
            "config": to_dict(config),
            "schema": volumes.schema.to_dict(),
            "image_shape": image_shape,
            "affine": affine,
            "grid": preparation.get("preset"),
            "slice_axis": 2,
            "data": {"dir": str(data_dir.resolve()), "name": data_dir.resolve().name, "train_subjects": len(volumes),
                     "train_slices": len(slices)},
            "parameters": num_parameters(stage.networks["velocity"]),
            "preparation": preparation,
        }
        return loop.train(stage, slices, config.loop, out, meta, resume=resume, context=context,
                          stop_at_step=stop_at_step)
    finally:
        if not joined_group:
            distributed.teardown()
