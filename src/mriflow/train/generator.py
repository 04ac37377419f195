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
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mriflow import checkpoint as ckpt
from mriflow.config import from_dict, load_preset, to_dict
from mriflow.data.dataset import CovariateSchema, covariate_columns, read_manifest, read_preparation
from mriflow.data.labels import TISSUE_CLASSES, tissue_fractions, tissue_lookup
from mriflow.families import FAMILIES, Family, get_family
from mriflow.families.diffusion import DiffusionTrainingConfig
from mriflow.families.flow import FlowTrainingConfig
from mriflow.latents import LatentDataset, damaged_splits, encode_dataset, latent_cache_dir, read_cache_index
from mriflow.models.velocity import SpatiallyConditioned, VelocityNet, num_parameters
from mriflow import distributed
from mriflow.train import loop
from mriflow.utils.seeding import seed_everything
from mriflow.distributed import Distributed
from mriflow.utils.files import DamagedFileError

PRESETS = ("tiny", "small", "base", "large")
STAGES = tuple(FAMILIES)


def load_config(stage: str, preset: str = "tiny", max_steps: int | None = None) -> Any:
    """The training config (Family.Config) of preset `<stage>-<preset>.yaml` of a generative family ("flow",
    "diffusion", "gan", ...), with the step count replaced when given."""
    config_class = get_family(stage).Config
    config = from_dict(config_class, load_preset(stage, preset), f"{stage}-{preset}.yaml")
    return _override(config, max_steps)


# ---- the stages ---------------------------------------------------------------------------------


class PosteriorSamples(Dataset):
    """Items of a LatentDataset with one scaled latent drawn from the subject's posterior: {"latent" (C, d, h, w),
    "covariates" (K,), "covariates_present" (K,)}.

    The draw uses torch's global generator, which the training loop seeds per (seed, epoch, item),
    so a resumed run draws the same latents as an uninterrupted one.
    """

    def __init__(self, latents: LatentDataset, spatial: torch.Tensor | None = None):
        self.latents = latents
        self.spatial = spatial  # (N, S, d, h, w): each subject's spatial condition (label-conditioned models)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.latents[index]
        sample = {"latent": self.latents.sample(item["latent_mean"], item["latent_logvar"]),
                  "covariates": item["covariates"], "covariates_present": item["covariates_present"]}
        if self.spatial is not None:
            sample["spatial"] = self.spatial[index]
        return sample


class GeneratorStage:
    """A latent generator of any family as a `loop.Stage`: the network "velocity" with its EMA copy (the inference
    weights), any networks the family trains beside it (Family.extra_networks, e.g. a GAN's critic), one phase each
    in that order, the family's phase losses, and a montage that decodes a real latent beside a sample with its
    covariates."""

    ema_networks = ("velocity",)

    def __init__(self, family: Family, latent_shape: Sequence[int], autoencoder: nn.Module | None = None,
                 latent_scale: float = 1.0):
        self.family = family
        self.config = family.config
        velocity_net = VelocityNet(self.config.model)
        family.init_generator(velocity_net)
        self.networks: dict[str, nn.Module] = {"velocity": velocity_net, **family.extra_networks(latent_shape)}
        self.phases: dict[str, list[dict[str, Any]]] = {name: [{"params": list(net.parameters())}]
                                                        for name, net in self.networks.items()}
        self.metric_names = family.metric_names
        self.latent_shape = tuple(latent_shape)
        self.autoencoder = autoencoder  # frozen, for montages only (None: no montage)
        self.latent_scale = latent_scale

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        networks = dict(self.networks)  # the loop's (DDP-wrapped under torchrun)
        if "spatial" in batch:
            networks["velocity"] = SpatiallyConditioned(networks["velocity"], batch["spatial"])
        return self.family.phase_loss(phase, networks, batch["latent"], batch["covariates"], batch["covariates_present"])

    @torch.no_grad()
    def montage(self, batch: dict, networks: dict[str, nn.Module]) -> dict[str, np.ndarray] | None:
        if self.autoencoder is None:
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
            return self.autoencoder.decode(latent / self.latent_scale).float().clamp(0, 1)[0, 0].cpu().numpy()

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
    autoencoder: str | Path,
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
) -> dict[str, Any]:
    """Train the latent generator of family `stage_name` (a key of mriflow.families.FAMILIES); the arguments
    and the result are train_flow's, `config` being that family's training config; `lr` replaces the peak
    learning rate (also on resume).

    `label_condition`: condition on each subject's tissue map as well (its label map through `regions`, a
    muse_regions.csv, or the default DLMUSE map; mriflow.train.labels.read_label_map), given to the network as the
    class fractions of each latent voxel's block (mriflow.data.labels.tissue_fractions), so `generate --label-map`
    draws a scan with a given anatomy. Recorded in meta["spatial_condition"]. `backbone` ("unet" | "dit") replaces
    the preset's network (model.backbone; the DiT's size is model.dit_*, by default matched to flow-tiny's U-Net)."""
    data_dir, out = Path(data_dir), Path(out)
    if label_condition and not get_family(stage_name).label_conditioning:
        raise ValueError(f"--label-condition: the {stage_name} family cannot learn a label-conditioned model; "
                         "drop --label-condition, or train flow or diffusion")
    if get_family(stage_name).space != "latent":
        raise ValueError(f"the {stage_name} family works in image space, without an autoencoder; train it with "
                         f"`mriflow train {stage_name} DATA --out RUN` (mriflow.train.slices.train_slices)")
    checkpoint_dir = ckpt.resolve_checkpoint(autoencoder).resolve()  # pinned: a newer checkpoint of the run is not used
    config, names, schema, preset, saved = run_config(stage_name, get_family(stage_name).Config, data_dir, out, resume,
                                                      condition, preset, max_steps, config, max_minutes, lr)
    if saved is not None:
        spatial_record = saved.get("spatial_condition")
        if label_condition and spatial_record is None:
            raise ValueError(f"{out} was trained without --label-condition; drop it to resume")
        if saved["autoencoder"]["model_sha256"] != ckpt.sha256(checkpoint_dir / ckpt.MODEL_FILE):
            raise ValueError(f"{out} was trained on the latents of {saved['autoencoder']['path']}, but {checkpoint_dir} "
                             "holds other weights; pass that autoencoder checkpoint folder to resume")
    else:
        if backbone is not None:
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, backbone=backbone))
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
        # every process loads it for the record; only rank 0 draws montages, on its device
        decoder, autoencoder_meta = ckpt.load_autoencoder(checkpoint_dir, context.device if context.is_main else "cpu")
        decoder.requires_grad_(False)
        preparation, image_shape, affine = _geometry(data_dir)
        trained_shape = autoencoder_meta.get("image_shape")
        if trained_shape is not None and list(trained_shape) != image_shape:
            raise ValueError(f"{data_dir} holds volumes of shape {image_shape} but the autoencoder {checkpoint_dir} was "
                             f"trained on {list(trained_shape)}; use an autoencoder trained on this grid")
        _ensure_latents(data_dir, checkpoint_dir, context)
        # the schema is fitted on the training split (or is the resumed run's own)
        latents = LatentDataset(data_dir, checkpoint_dir, "train", covariates=None if schema is not None else names or None,
                                schema=schema)
        config = dataclasses.replace(config, model=config.model.with_schema(latents.schema))
        latent_shape = list(latents.index["latent_shape"])
        spatial = None
        if spatial_record is not None:
            from mriflow.train.labels import tissue_targets

            factor = image_shape[0] // latent_shape[1]
            spatial_record = {**spatial_record, "factor": factor}
            targets = tissue_targets(data_dir, latents.subjects, tissue_lookup(spatial_record["label_map"]))
            spatial = tissue_fractions(targets, factor)

        seed_everything(config.loop.seed)  # identical initial weights in every process
        stage = GeneratorStage(get_family(stage_name)(config), latent_shape, decoder if context.is_main else None,
                               latents.scale)
        meta = {
            "stage": stage_name,
            "preset": preset,
            "config": to_dict(config),
            "schema": latents.schema.to_dict(),
            "autoencoder": {"path": str(checkpoint_dir), "model_sha256": latents.index["checkpoint"]["model_sha256"],
                            "latent_scale": latents.scale, "step": autoencoder_meta.get("step")},
            "latent_shape": latent_shape,
            "image_shape": image_shape,
            "affine": affine,
            "grid": preparation.get("preset"),
            "data": {"dir": str(data_dir.resolve()), "name": data_dir.resolve().name, "train_subjects": len(latents)},
            "parameters": num_parameters(stage.networks["velocity"]),
            "preparation": preparation,
        }
        if spatial_record is not None:
            meta["spatial_condition"] = spatial_record
        return loop.train(stage, PosteriorSamples(latents, spatial), config.loop, out, meta, resume=resume, context=context,
                          stop_at_step=stop_at_step)
    finally:
        if not joined_group:
            distributed.teardown()


# ---- helpers ------------------------------------------------------------------------------------


def run_config(stage: str, config_class: type, data_dir: Path, out: Path, resume: bool, condition: Sequence[str] | None,
               preset: str | None, max_steps: int | None, config: Any | None, max_minutes: float | None,
               lr: float | None) -> tuple[Any, list[str], CovariateSchema | None, str | None, dict | None]:
    """The config of a generator run (latent or image space) and what a resume keeps: (config, covariate names, the
    run's schema or None, preset, the resumed checkpoint's meta or None). Resuming takes the run's own config and
    schema and refuses another stage or other covariates; a new run takes `config` or the preset (default "tiny") and
    checks the covariates against the manifest. `max_steps`, `max_minutes` and `lr` replace the loop's in both."""
    latest = ckpt.latest_checkpoint(out) if resume else None
    saved, schema = None, None
    if latest is not None:
        _, saved = ckpt.load_checkpoint(latest)
        if saved.get("stage") != stage:
            raise ValueError(f"{out} holds a {saved.get('stage')!r} run, not a {stage} one; "
                             "resume it with its own command, or choose another --out")
        config = _override(from_dict(config_class, saved["config"], str(latest)), max_steps)
        names = list(config.model.covariate_names)
        if condition is not None and list(condition) != names:
            raise ValueError(f"condition {list(condition)} differs from the run's covariates {names} in {out}; "
                             "drop --condition to resume")
        schema = CovariateSchema.from_dict(saved["schema"])
        preset = saved.get("preset")
    else:
        if config is None:
            preset = preset or "tiny"
            config = load_config(stage, preset, max_steps)
        else:
            config = _override(config, max_steps)
        names = list(condition) if condition is not None else list(config.model.covariate_names)
        _check_condition(data_dir, names)
    if max_minutes is not None:
        config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, max_minutes=max_minutes))
    if lr is not None:
        config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, lr=lr))
    return config, names, schema, preset, saved


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


def _check_condition(data_dir: Path, names: Sequence[str]) -> None:
    """Refuse covariate names the prepared manifest does not have, listing the ones it has."""
    if not names:
        return
    available = covariate_columns(read_manifest(data_dir))
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"condition: unknown covariate(s) {', '.join(map(repr, unknown))}; {data_dir / 'manifest.csv'} "
                         f"has: {', '.join(available) or 'none (train unconditionally)'}")
    if len(set(names)) != len(names):
        raise ValueError(f"condition: a covariate is named twice in {list(names)}")


def _geometry(data_dir: Path) -> tuple[dict[str, Any], list[int], list[list[float]]]:
    """(prepare.json or {}, image shape [D, H, W], template affine): the affine from prepare.json when it
    has one, else from the header of the first volume (all prepared volumes share the grid)."""
    preparation = read_preparation(data_dir)
    header = nib.load(str(data_dir / read_manifest(data_dir)["image"].iloc[0]))
    affine = preparation.get("affine", np.asarray(header.affine, dtype=np.float64).tolist())
    return preparation, [int(n) for n in header.shape[:3]], affine


def _override(config, max_steps: int | None):
    if max_steps is not None:
        config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, max_steps=max_steps))
    return config

