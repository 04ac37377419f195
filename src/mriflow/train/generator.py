"""Stages 2 and 3: the latent generators, rectified flow and its baselines (DDPM/DDIM, a GAN).

All train the same VelocityNet on scaled latents z = (mean + exp(logvar / 2)·ε)·latent_scale,
drawn afresh from the cached posterior q(z|x) each time a subject is read, with every covariate
dropped to its null embedding with probability model.covariate_drop_prob (so one network also
learns the unconditional model that classifier-free guidance needs). Only the objective differs:

    flow       L = E_{t, x0, z} ‖v(x_t, t, c) − (z − x0)‖       mriflow.flow.objective.RectifiedFlowLoss
    diffusion  L = E_{t, ε, z} ‖f(x_t, t, c) − (ε or v)‖        mriflow.flow.diffusion.diffusion_loss
    gan        G(ε, c) = f(ε, 0, c) against a critic D(z, c)      mriflow.families.gan (R3GAN losses, R1/R2)

(the GAN drops covariates itself, the same for G and its critic, and trains the critic as a second
phase: Family.extra_networks; the critic is kept in train_state.safetensors, never in model.safetensors)

so a flow preset and the diffusion preset of the same name share network and optimisation,
and the benchmark compares the two at equal budgets. The latents are encoded on first use
(mriflow.latents.encode_dataset), and again when the cache was made with other weights.

    >>> train_flow("prepared/", "runs/ae", "runs/flow", condition=["age", "sex"], preset="tiny")
    >>> train_diffusion("prepared/", "runs/ae", "runs/diffusion", condition=["age", "sex"], preset="tiny")
    >>> train_generator("gan", "prepared/", "runs/ae", "runs/gan", condition=["age", "sex"], preset="tiny")
    >>> train_flow("prepared/", "runs/ae", "runs/flow", resume=True)   # continue the latest checkpoint

Checkpoint meta, what mriflow.generate reads (EMA weights under "velocity." in model.safetensors):

    stage          "flow" | "diffusion" | "gan" (a key of FAMILIES);  preset: the preset name, or None for a given config
    config         the full training config; "model" rebuilds the network:
                   VelocityNet(from_dict(VelocityNetConfig, meta["config"]["model"])); "objective" (flow)
                   or "diffusion" (schedule, prediction); "sampling": the default sampler settings
    schema         CovariateSchema.to_dict() of the conditioning covariates (empty: unconditional)
    autoencoder    {"path", "model_sha256", "latent_scale", "step"} of the autoencoder checkpoint used
    latent_shape   [C, d, h, w];  image_shape: [D, H, W];  affine: 4x4 template affine;  grid: prepare.json "preset"
    data           {"dir", "name", "train_subjects"};  parameters: the network's parameter count
    preparation    prepare.json of the data (empty when absent)

Under `torchrun --nproc_per_node N` the same call trains with DDP (batch_size is per process).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mriflow import checkpoint as ckpt
from mriflow.config import to_dict
from mriflow.data.dataset import PreparedDataset
from mriflow.data.labels import TISSUE_CLASSES, tissue_fractions, tissue_lookup
from mriflow.families import FAMILIES, Family, get_family
from mriflow.families.diffusion import DiffusionTrainingConfig
from mriflow.families.flow import FlowTrainingConfig
from mriflow.latents import LatentDataset, damaged_splits, encode_dataset, latent_cache_dir, read_cache_index
from mriflow.models.velocity import FlipConditioned, SpatiallyConditioned, VelocityNet, num_parameters
from mriflow.representations import make_representation, representation_from_dict
from mriflow import distributed
from mriflow.train import loop
from mriflow.train.generator_data import (PosteriorSamples, RepresentationSamples, _check_condition, band_scaling,  # noqa: F401
                                         check_same_subjects, geometry, load_config, representation_name, run_config,
                                         subjects_digest, validation_volumes)
from mriflow.utils.seeding import seed_everything
from mriflow.train.alignment import alignment_loss, alignment_teacher
from mriflow.distributed import unwrap
from mriflow.distributed import Distributed
from mriflow.utils.files import DamagedFileError

PRESETS = ("tiny", "small", "base", "large")
VALIDATION_TIMES = (0.3, 0.5, 0.7, 0.9)  # where GeneratorStage.validate measures denoising (t = 1 is data)
STAGES = tuple(FAMILIES)


# ---- the stages ---------------------------------------------------------------------------------


class GeneratorStage:
    """A latent generator of any family as a `loop.Stage`: the network "velocity" with its EMA copy (the inference
    weights), any networks the family trains beside it (Family.extra_networks, e.g. a GAN's critic), one phase each
    in that order, the family's phase losses, and a montage that decodes a real latent beside a sample with its
    covariates. `decode` maps the generator's arrays (B, C, d, h, w) to volumes (B, 1, D, H, W) in [0, 1] (the
    autoencoder's decoder, or a fixed representation's inverse); None: no montage."""

    ema_networks = ("velocity",)

    def __init__(self, family: Family, latent_shape: Sequence[int], decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 teacher: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.family = family
        self.config = family.config
        velocity_net = VelocityNet(self.config.model)
        family.init_generator(velocity_net)
        self.networks: dict[str, nn.Module] = {"velocity": velocity_net, **family.extra_networks(latent_shape)}
        self.phases: dict[str, list[dict[str, Any]]] = {name: [{"params": list(net.parameters())}]
                                                        for name, net in self.networks.items()}
        self.metric_names = family.metric_names
        # feature alignment (mriflow.train.alignment): the frozen teacher of the clean volumes, and the loss's weight
        self.teacher = teacher
        self.align_weight = float(getattr(getattr(self.config, "alignment", None), "weight", 0.0))
        if teacher is not None:
            self.metric_names = (*self.metric_names, "align")
        self.latent_shape = tuple(latent_shape)
        self.decode = decode
        self.validation: RepresentationSamples | None = None  # held-out volumes for `validate` (image-space runs)

    def validate(self, networks: dict[str, nn.Module]) -> dict[str, float]:
        """How well the EMA network denoises held-out volumes: the mean squared error of its clean-volume estimate
        x̂1 (decoded, in [0, 1]) at fixed times VALIDATION_TIMES and fixed noise per (subject, time), so the figure
        compares across checkpoints and runs of one validation split; the first ("val_x_mse", their mean) selects
        the best checkpoint. Without held-out volumes there is nothing to report."""
        if self.validation is None or self.family.path is None:
            return {}
        net, path = networks["velocity"], self.family.path
        device = next(net.parameters()).device
        errors = torch.zeros(len(VALIDATION_TIMES), dtype=torch.float64)
        for index in range(len(self.validation)):
            item = self.validation[index]
            x1 = item["latent"][None].to(device)
            covariates = (item["covariates"][None].to(device), item["covariates_present"][None].to(device))
            real = self.decode(x1)
            for k, time_value in enumerate(VALIDATION_TIMES):
                noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1000 * index + k)).to(device)
                t = torch.full((1,), time_value, device=device)
                x_t = path.sample_xt(noise, x1, t)
                x1_hat = path.convert(net(x_t, t, *covariates), x_t, t, path.prediction, "data")
                errors[k] += (self.decode(x1_hat) - real).square().mean().item()
        errors /= len(self.validation)
        return {"val_x_mse": float(errors.mean()),
                **{f"val_x_mse_t{time_value:g}": float(e) for time_value, e in zip(VALIDATION_TIMES, errors)}}

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        networks = dict(self.networks)  # the loop's (DDP-wrapped under torchrun)
        if "flipped" in batch and self.config.model.flip_channel:
            networks["velocity"] = FlipConditioned(networks["velocity"], batch["flipped"])
        if "spatial" in batch:
            networks["velocity"] = SpatiallyConditioned(networks["velocity"], batch["spatial"])
        result = self.family.phase_loss(phase, networks, batch["latent"], batch["covariates"], batch["covariates_present"])
        if self.teacher is None or phase != "velocity" or result is None:
            return result
        loss, metrics = result
        net = unwrap(self.networks["velocity"])
        target = self.teacher(self.decode(batch["latent"].float()).clamp(0, 1))  # the clean volumes, flipped as the batch
        aligned = alignment_loss(net.align_head(net.take_aligned()), target)
        return loss + self.align_weight * aligned, {**metrics, "align": aligned.detach()}

    @torch.no_grad()
    def montage(self, batch: dict, networks: dict[str, nn.Module]) -> dict[str, np.ndarray] | None:
        if self.decode is None:
            return None
        real = batch["latent"][:1].float()  # (1, C, d, h, w), scaled
        covariates = (batch["covariates"][:1], batch["covariates_present"][:1]) if self.config.model.covariate_names else None
        # the seed of sample 0 every time: the montages of a run show the same noise becoming a brain
        net = networks["velocity"]
        if "spatial" in batch:  # the real subject's label map: the sample should share its anatomy
            net = SpatiallyConditioned(net, batch["spatial"][:1].float())
        sample, _ = self.family.sample(net, (1, *self.latent_shape), covariates, self.family.default_sampling(),
                                       real.device)

        def decode(latent: torch.Tensor) -> np.ndarray:
            return self.decode(latent).float().clamp(0, 1)[0, 0].cpu().numpy()

        return {"real latent, decoded": decode(real), "sample, same covariates": decode(sample.float())}


# ---- the public functions -----------------------------------------------------------------------


def train_flow(
    data_dir: str | Path,
    autoencoder: str | Path,
    out: str | Path,
    condition: Sequence[str] | None = None,
    preset: str | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    config: FlowTrainingConfig | None = None,
    stop_at_step: int | None = None,
    max_minutes: float | None = None,
    label_condition: bool = False,
    regions: str | Path | None = None,
) -> dict[str, Any]:
    """Train a rectified flow on the latents of `data_dir`'s training split under `autoencoder` into run folder `out`.

    `autoencoder` is an autoencoder run or checkpoint folder; `condition` names covariates of the
    prepared manifest (None or empty: unconditional). The config is the preset (default "tiny"), or
    `config` when given, with `max_steps` and `max_minutes` (a wall-clock budget; the run stops with a
    checkpoint) replaced when given. With `resume`, the run's own config and covariate schema are used.
    Returns {"step", "metrics", "checkpoint"}.
    """
    return train_generator("flow", data_dir, autoencoder, out, condition, preset, max_steps, resume, config,
                           stop_at_step, max_minutes, label_condition=label_condition, regions=regions)


def train_diffusion(
    data_dir: str | Path,
    autoencoder: str | Path,
    out: str | Path,
    condition: Sequence[str] | None = None,
    preset: str | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    config: DiffusionTrainingConfig | None = None,
    stop_at_step: int | None = None,
    max_minutes: float | None = None,
) -> dict[str, Any]:
    """The DDPM/DDIM baseline on the same latents; arguments and result as `train_flow`."""
    return train_generator("diffusion", data_dir, autoencoder, out, condition, preset, max_steps, resume, config,
                           stop_at_step, max_minutes)


def train_generator(
    stage_name: str,
    data_dir: str | Path,
    autoencoder: str | Path | None,
    out: str | Path,
    condition: Sequence[str] | None = None,
    preset: str | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    config: Any | None = None,
    stop_at_step: int | None = None,
    max_minutes: float | None = None,
    lr: float | None = None,
    label_condition: bool = False,
    regions: str | Path | None = None,
    backbone: str | None = None,
    representation: str | None = None,
    loop_overrides: Mapping[str, Any] | None = None,
    warm_start: str | Path | None = None,
    alignment: float | None = None,
    band_equalisation: float | None = None,
) -> dict[str, Any]:
    """Train the latent generator of family `stage_name` (a key of mriflow.families.FAMILIES); the arguments
    and the result are train_flow's, `config` being that family's training config; `lr` replaces the peak
    learning rate (also on resume).

    The generator learns either the latents of `autoencoder` or, with `representation` (e.g. "haar2"; or the
    config's own, a flow preset's `representation`) and no autoencoder, the training volumes themselves behind that
    fixed lossless transform (mriflow.representations): nothing caps the detail it can learn, and there is no
    autoencoder to train. Recorded in meta["representation"] (with the band statistics) instead of meta["autoencoder"].

    `label_condition`: condition on each subject's tissue map as well (its label map through `regions`, a
    muse_regions.csv, or the default DLMUSE map; mriflow.train.labels.read_label_map), given to the network as the
    class fractions of each latent voxel's block (mriflow.data.labels.tissue_fractions), so `generate --label-map`
    draws a scan with a given anatomy. Recorded in meta["spatial_condition"]. `backbone` ("unet" | "dit") replaces
    the preset's network (model.backbone; the DiT's size is model.dit_*, by default matched to flow-tiny's U-Net).

    `warm_start`: a generator run, checkpoint or exported model's flow/ folder of this family (e.g. what the CPU
    long-run queue exported)
    to start a run without checkpoints from: its config, covariates, representation and inference weights at its step
    (mriflow.train.loop.train), as a resume would but with fresh optimizer moments. Ignored once `out` has a checkpoint
    and `resume` is set. `alignment`: the weight of REPA-style feature alignment on a new run (mriflow.train.alignment).
    `band_equalisation`: the Haar bands' scaling of a new run, or of a warm start that refits them (generator_data.band_scaling).
    """
    data_dir, out = Path(data_dir), Path(out)
    if label_condition and not get_family(stage_name).label_conditioning:
        raise ValueError(f"--label-condition: the {stage_name} family cannot learn a label-conditioned model; "
                         "drop --label-condition, or train flow or diffusion")
    if get_family(stage_name).space != "latent":
        raise ValueError(f"the {stage_name} family works in image space, without an autoencoder; train it with "
                         f"`mriflow train {stage_name} DATA --out RUN` (mriflow.train.slices.train_slices)")
    warm = None
    if warm_start is not None and not (resume and ckpt.latest_checkpoint(out) is not None):
        warm = ckpt.resolve_checkpoint(warm_start)
    config, names, schema, preset, saved = run_config(stage_name, get_family(stage_name).Config, data_dir, out, resume,
                                                      condition, preset, max_steps, config, max_minutes, lr,
                                                      loop_overrides, from_checkpoint=warm)
    representation = representation_name(representation, config, saved, autoencoder, out)
    config, rescaled = band_scaling(band_equalisation, config, saved, warm is not None, representation, out)
    checkpoint_dir = None if representation else ckpt.resolve_checkpoint(autoencoder).resolve()  # pinned
    if saved is not None:
        spatial_record = saved.get("spatial_condition")
        if label_condition and spatial_record is None:
            raise ValueError(f"{out} was trained without --label-condition; drop it to resume")
        if alignment is not None and alignment != getattr(getattr(config, "alignment", None), "weight", None):
            raise ValueError(f"--align {alignment:g}: {out} was trained with alignment weight "
                             f"{getattr(getattr(config, 'alignment', None), 'weight', 0):g}; drop --align to resume")
        if checkpoint_dir is not None and saved["autoencoder"]["model_sha256"] != ckpt.sha256(checkpoint_dir / ckpt.MODEL_FILE):
            raise ValueError(f"{out} was trained on the latents of {saved['autoencoder']['path']}, but {checkpoint_dir} "
                             "holds other weights; pass that autoencoder checkpoint folder to resume")
    else:
        if backbone is not None:
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, backbone=backbone))
        if alignment is not None:  # --align: REPA-style alignment at this weight (mriflow.train.alignment)
            config = dataclasses.replace(config, alignment=dataclasses.replace(config.alignment, weight=alignment))
        spatial_record = None
        if label_condition:
            from mriflow.train.labels import read_label_map

            spatial_record = {"kind": "tissue_fractions", "classes": list(TISSUE_CLASSES),
                              "label_map": read_label_map(regions)}
            config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                           spatial_channels=len(TISSUE_CLASSES)))
    joined_group = torch.distributed.is_initialized()  # a caller's own process group is left alone
    context = distributed.setup(config.loop.device)
    try:
        preparation, image_shape, affine = geometry(data_dir)
        subset = None if schema is not None else names or None  # the schema is fitted on the training split
        if representation:
            volumes = PreparedDataset(data_dir, "train", covariates=subset, schema=schema)
            transform = (representation_from_dict(saved["representation"], str(out)) if saved is not None and not rescaled
                         else make_representation(representation, getattr(config, "band_equalisation", 1.0)))
            data = RepresentationSamples(volumes, transform, flip=config.model.flip_channel)
            if saved is None or rescaled:
                transform.fit(volume for volume in data.volumes.float())
            validation = validation_volumes(data_dir, volumes.schema, transform) if context.is_main else None
            latent_shape = list(transform.latent_shape(image_shape))
            fitted_schema, subjects = volumes.schema, data.subjects
            decode = transform.decode
            source = {"space": "image", "representation": transform.to_dict()}
        else:
            # every process loads it for the record; only rank 0 draws montages, on its device
            decoder, autoencoder_meta = ckpt.load_autoencoder(checkpoint_dir, context.device if context.is_main else "cpu")
            decoder.requires_grad_(False)
            trained_shape = autoencoder_meta.get("image_shape")
            if trained_shape is not None and list(trained_shape) != image_shape:
                raise ValueError(f"{data_dir} holds volumes of shape {image_shape} but the autoencoder {checkpoint_dir} was "
                                 f"trained on {list(trained_shape)}; use an autoencoder trained on this grid")
            _ensure_latents(data_dir, checkpoint_dir, context)
            latents = LatentDataset(data_dir, checkpoint_dir, "train", covariates=subset, schema=schema)
            data = PosteriorSamples(latents)
            latent_shape = list(latents.index["latent_shape"])
            fitted_schema, subjects = latents.schema, latents.subjects
            decode = (lambda z: decoder.decode(z / latents.scale)) if context.is_main else None
            validation = None
            source = {"autoencoder": {"path": str(checkpoint_dir), "model_sha256": latents.index["checkpoint"]["model_sha256"],
                                      "latent_scale": latents.scale, "step": autoencoder_meta.get("step")}}
        check_same_subjects(saved, subjects, data_dir, str(warm or out))
        config = dataclasses.replace(config, model=config.model.with_schema(fitted_schema))
        teacher = None
        if getattr(config, "alignment", None) is not None and config.alignment.weight > 0:
            teacher, config = alignment_teacher(config, representation, image_shape, latent_shape, context.device)
        if spatial_record is not None:
            from mriflow.train.labels import tissue_targets

            factor = image_shape[0] // latent_shape[1]
            spatial_record = {**spatial_record, "factor": factor}
            targets = tissue_targets(data_dir, subjects, tissue_lookup(spatial_record["label_map"]))
            data.spatial = tissue_fractions(targets, factor)

        seed_everything(config.loop.seed)  # identical initial weights in every process
        stage = GeneratorStage(get_family(stage_name)(config), latent_shape, decode, teacher)
        stage.validation = validation
        meta = {
            "stage": stage_name,
            "preset": preset,
            "config": to_dict(config),
            "schema": fitted_schema.to_dict(),
            **source,
            "latent_shape": latent_shape,
            "image_shape": image_shape,
            "affine": affine,
            "grid": preparation.get("preset"),
            "data": {"dir": str(data_dir.resolve()), "name": data_dir.resolve().name, "train_subjects": len(data),
                     "subjects_sha256": subjects_digest(subjects)},
            "parameters": num_parameters(stage.networks["velocity"]),
            "preparation": preparation,
        }
        if spatial_record is not None:
            meta["spatial_condition"] = spatial_record
        if warm is not None:
            meta["warm_start"] = {"path": str(warm), "step": saved.get("step", 0),
                                  "model_sha256": ckpt.sha256(warm / ckpt.MODEL_FILE)}
            if rescaled:
                meta["warm_start"]["band_equalisation"] = {"from": saved["representation"].get("equalisation", 1.0),
                                                           "to": band_equalisation}
        elif saved is not None and "warm_start" in saved:
            meta["warm_start"] = saved["warm_start"]
        return loop.train(stage, data, config.loop, out, meta, resume=resume, context=context,
                          stop_at_step=stop_at_step, warm_start=warm)
    finally:
        if not joined_group:
            distributed.teardown()


# ---- helpers ------------------------------------------------------------------------------------


def latents_are_current(data_dir: str | Path, autoencoder: str | Path) -> bool:
    """Whether the latent cache of (data_dir, autoencoder) holds the training split encoded by these very weights,
    in files that are whole (a damaged cache is not current: it is encoded again)."""
    cache = latent_cache_dir(data_dir, autoencoder)
    if not (cache / "index.json").is_file():
        return False
    try:
        index = read_cache_index(cache)
    except DamagedFileError:
        return False
    weights = ckpt.resolve_checkpoint(autoencoder) / ckpt.MODEL_FILE
    return ("train" in index.get("splits", {}) and index.get("latent_scale") is not None and not damaged_splits(cache, index)
            and index.get("checkpoint", {}).get("model_sha256") == ckpt.sha256(weights))


def _ensure_latents(data_dir: Path, checkpoint_dir: Path, context: Distributed) -> None:
    """Encode every split of `data_dir` (rank 0, the others wait) unless the cache is current."""
    if context.is_main and not latents_are_current(data_dir, checkpoint_dir):
        print(f"encoding {data_dir} with {checkpoint_dir} (the latent cache is missing, damaged or was made with other weights)")
        encode_dataset(data_dir, checkpoint_dir, device=context.device)
    distributed.barrier()
