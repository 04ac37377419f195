"""A trained generator loaded for sampling: the velocity network, its autoencoder and label decoder, and
what its checkpoint says about them; the shipped models by name.

A generator checkpoint (``RUN/checkpoints/step-XXXXXXXX/``, see mriflow.checkpoint) holds the
EMA velocity network under ``velocity.`` and, in checkpoint.json: "stage" ("flow" |
"diffusion"), "config" ("model": the VelocityNetConfig; "diffusion": the VPDiffusionPath
of the baseline; "sampling": default solver, steps, guidance and, for the flow, time_shift),
"schema" (the covariates), "autoencoder" ({"path", "model_sha256", "latent_scale", "step"};
a relative path is relative to the checkpoint folder), "latent_shape", "image_shape",
"affine" and "grid". Sampling runs in the scaled latent space; a latent is decoded as

    volume = clamp(decode(z / latent_scale), 0, 1)

An image-space generator (meta "space": "image") has no autoencoder: a generator trained on a fixed representation
of the images (meta "representation", e.g. Haar wavelet bands, mriflow.representations) is decoded by that
transform's exact inverse, and the slice model (mriflow.families.slices) samples intensities in [−1, 1] itself,
"decoded" as clamp((x + 1) / 2, 0, 1). Neither has latents for a label decoder nor anything to reconstruct (their
`autoencoder` and `autoencoder_checksum` are None).

    >>> generator = load_generator()        # the shipped default model (mriflow/weights/<DEFAULT_MODEL>)
    >>> volumes, nfe = generator.sample([sample_seed(0, i) for i in range(4)], None, generator.sampling_settings())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mriflow import checkpoint as ckpt
from mriflow import distributed
from mriflow.config import from_dict
from mriflow.data.dataset import CovariateSchema
from mriflow.data.background import zero_background
from mriflow.data.io import load_volume
from mriflow.families import FAMILIES, Family
from mriflow.models.velocity import SpatiallyConditioned, VelocityNet, VelocityNetConfig
from mriflow.representations import HaarPacket, representation_from_dict
from mriflow.tissue_maps import LABELS_DIR, AnatomySegmenter, latent_sources, load_labels  # noqa: F401 (re-exported)

REQUIRED_META = ("config", "schema", "autoencoder", "latent_shape", "image_shape", "affine")
IMAGE_SPACE_META = ("config", "schema", "image_shape", "affine")  # what an image-space generator's meta needs
REPRESENTATION_META = ("config", "schema", "representation", "latent_shape", "image_shape", "affine")
GENERATOR_DIR, AUTOENCODER_DIR = "flow", "autoencoder"  # the folders of an exported model (and LABELS_DIR)
AFFINE_TOLERANCE = 1e-3  # mm; a prepared folder this close to the model's affine is on its grid


DEFAULT_MODEL = "2mm-fewstep"  # the shipped model `--model default` means: the 2 mm flow's one-evaluation student


def shipped_models() -> dict[str, Path]:
    """The models shipped with mriflow by name: mriflow/weights/<name>/{flow,autoencoder}/ (see export_generator)."""
    folder = Path(str(resources.files("mriflow").joinpath("weights")))
    return {p.name: p for p in sorted(folder.iterdir()) if (p / GENERATOR_DIR / ckpt.META_FILE).is_file()}


def default_model_dir() -> Path:
    """The folder of the shipped default model (DEFAULT_MODEL)."""
    return Path(str(resources.files("mriflow").joinpath("weights", DEFAULT_MODEL)))


@dataclass
class Generator:
    """A loaded generator: velocity network, autoencoder, and what its checkpoint says about them."""

    velocity_net: VelocityNet
    autoencoder: torch.nn.Module | None  # None: an image-space generator (the slice model)
    meta: dict[str, Any]
    schema: CovariateSchema
    affine: np.ndarray  # (4, 4) template-space affine of every generated volume
    stage: str  # "flow" | "diffusion"
    model_id: str
    model_checksum: str  # "sha256:<hex>" of the generator's model.safetensors
    autoencoder_checksum: str | None
    latent_scale: float
    latent_shape: tuple[int, ...]  # (C, d, h, w); an image-space generator's (1, D, H, W)
    image_shape: tuple[int, int, int]  # (D, H, W)
    device: torch.device
    path: Path  # the checkpoint folder
    family: Family  # how it samples (mriflow.families), built from the checkpoint's config
    labels: torch.nn.Module | AnatomySegmenter | None = None  # each sample's tissue map: a LabelDecoder of the same
    # autoencoder (reads the latent), else the grid's anatomy network (reads the decoded volume), else none
    labels_meta: dict[str, Any] | None = None  # its meta (classes, path, checksum; "source": "decoder" | "anatomy")
    representation: HaarPacket | None = None  # the fixed transform an image-space generator samples (meta "representation")

    @property
    def label_classes(self) -> tuple[str, ...]:
        return tuple(self.labels.classes) if self.labels is not None else ()

    @property
    def solvers(self) -> tuple[str, ...]:
        return self.family.solvers

    @property
    def space(self) -> str:
        """"latent" (decoded by the autoencoder) or "image" (no autoencoder: a fixed representation, or the slice model)."""
        return "image" if self.representation is not None else self.family.space

    def sampling_settings(self, solver: str | None = None, steps: int | None = None,
                          guidance: float | None = None) -> dict[str, Any]:
        """{"solver", "steps", "guidance", and the family's own keys (a flow's "time_shift")}: the given
        values, else the model's defaults."""
        defaults = self.family.default_sampling()
        settings = {**defaults, "solver": solver or defaults["solver"],
                    "steps": int(defaults["steps"] if steps is None else steps),
                    "guidance": float(defaults["guidance"] if guidance is None else guidance)}
        if settings["solver"] not in self.solvers:
            family = next((name for name, f in FAMILIES.items() if settings["solver"] in f.solvers), None)
            kind = f" ({settings['solver']!r} samples a {family} model)" if family else ""
            raise ValueError(f"solver {settings['solver']!r} does not apply to this {self.stage} model{kind}; "
                             f"valid solvers: {', '.join(self.solvers)}")
        if settings["steps"] < 1:
            raise ValueError(f"steps must be >= 1, got {settings['steps']}")
        if not math.isfinite(settings["guidance"]) or settings["guidance"] < 0:
            raise ValueError(f"guidance must be a finite number >= 0 (1 = conditional), got {settings['guidance']}")
        self.family.check_sampling(settings)  # e.g. a GAN refuses guidance
        return settings

    @property
    def spatial_condition(self) -> dict[str, Any] | None:
        """What a label-conditioned model is conditioned on (meta["spatial_condition"]), or None."""
        return self.meta.get("spatial_condition")

    def label_condition(self, path: str | Path) -> torch.Tensor:
        """The spatial condition (1, S, d, h, w) of a label map on the model's grid: mriflow's tissue classes
        (0..5, e.g. a sample's _labels.nii.gz or an edited one) or labels of the model's label map (e.g. DLMUSE),
        as class fractions per latent voxel."""
        from mriflow.data.labels import tissue_fractions, tissue_lookup, tissue_map

        record = self.spatial_condition
        if record is None:
            raise ValueError(f"--label-map: the model {self.path} is not conditioned on label maps; train one with "
                             "`mriflow train flow ... --label-condition`")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--label-map {path}: no such file; give a label map on the model's grid (NIfTI)")
        volume, affine = load_volume(path)
        if tuple(volume.shape) != self.image_shape or not np.allclose(affine, self.affine, atol=AFFINE_TOLERANCE):
            raise ValueError(f"--label-map {path}: shape {tuple(volume.shape)} / affine differ from the model's grid "
                             f"{self.image_shape}; give a label map on the model's template grid (a prepared one)")
        values = np.rint(volume).astype(np.int64)
        classes = len(record["classes"])
        if values.min() >= 0 and values.max() < classes:
            tissue = values.astype(np.uint8)
        else:
            tissue = tissue_map(values, tissue_lookup(record["label_map"]), f"--label-map {path}")
        return tissue_fractions(tissue[None], int(record["factor"]), classes)

    def draw_latents(self, sample_seeds: Sequence[int], covariates: tuple[torch.Tensor, torch.Tensor] | None,
                     settings: Mapping[str, Any], spatial: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Scaled latents (B, C, d, h, w), one per seed (see utils.seeding.sample_seed), and the NFE per sample.
        `spatial` (1 or B, S, d, h, w): the condition of a label-conditioned model (see `label_condition`)."""
        shape = (len(sample_seeds), *self.latent_shape)
        net = self.velocity_net
        if self.velocity_net.config.spatial_channels and self.family.space == "latent":  # the slice model's is its position
            if spatial is None:
                raise ValueError(f"the model {self.path} draws scans for a given label map; pass --label-map FILE")
            net = SpatiallyConditioned(net, spatial.to(self.device).expand(len(sample_seeds), *spatial.shape[1:]))
        elif spatial is not None:
            raise ValueError(f"--label-map: the model {self.path} is not conditioned on label maps")
        return self.family.sample(net, shape, covariates, settings, self.device, sample_seeds)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents (B, C, d, h, w) -> volumes (B, D, H, W) float32 in [0, 1] on the CPU, exactly 0 outside the
        brain like prepared scans (`BACKGROUND_RULE`, in every sidecar). An image-space generator's samples
        (B, 1, D, H, W) in [−1, 1] are mapped to [0, 1]; a representation's are decoded by its inverse."""
        with torch.no_grad():
            if self.representation is not None:
                images = self.representation.decode(latents.float())
            elif self.autoencoder is None:
                images = (latents + 1.0) / 2.0
            else:
                images = self.autoencoder.decode(latents / self.latent_scale)  # (B, 1, D, H, W)
        return zero_background(images.clamp(0.0, 1.0)[:, 0].float().cpu().numpy())

    @property
    def representation_name(self) -> str:
        """What the network samples, for sidecars: "autoencoder latents", a representation's name ("haar2"), or
        "image slices" (the slice model)."""
        if self.representation is not None:
            return self.representation.name
        return "autoencoder latents" if self.autoencoder is not None else "image slices"

    def decode_labels(self, latents: torch.Tensor, volumes: np.ndarray | None = None) -> np.ndarray | None:
        """Scaled latents (B, C, d, h, w) -> tissue maps (B, D, H, W) uint8 on the CPU (class indices of
        `label_classes`), or None without a label decoder."""
        if self.labels is None:
            return None
        if isinstance(self.labels, AnatomySegmenter):  # reads the image: `volumes`, the decoded latents if given
            return self.labels.segment_volumes(self.decode(latents) if volumes is None else volumes)
        with torch.no_grad():
            return self.labels.segment(latents / self.latent_scale).cpu().numpy()

    def reconstruct(self, volumes: torch.Tensor) -> torch.Tensor:
        """Real volumes (B, 1, D, H, W) through the autoencoder (decode of the posterior mean) -> the same
        shape in [0, 1] on the CPU: how subjects look after the decoder every sample comes out of
        (the `reconstruct` that evaluate_generation takes). An image-space generator has none: ValueError."""
        if self.autoencoder is None:
            raise ValueError(f"the {self.stage} model {self.path} works in image space and has no autoencoder: there is "
                             "nothing to reconstruct (evaluate it without --autoencoder)")
        with torch.no_grad():
            return self.autoencoder.reconstruct(volumes.to(self.device)).clamp(0.0, 1.0).float().cpu()

    def sample(self, sample_seeds: Sequence[int], covariates: tuple[torch.Tensor, torch.Tensor] | None,
               settings: Mapping[str, Any], spatial: torch.Tensor | None = None) -> tuple[np.ndarray, int]:
        """Volumes (B, D, H, W) in [0, 1], one per seed, and the NFE per sample."""
        latents, nfe = self.draw_latents(sample_seeds, covariates, settings, spatial)
        return self.decode(latents), nfe

    def sample_pairs(self, sample_seeds: Sequence[int], covariates: tuple[torch.Tensor, torch.Tensor] | None,
                     settings: Mapping[str, Any], spatial: torch.Tensor | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Volumes (B, D, H, W) in [0, 1], their tissue maps (B, D, H, W) uint8 (None without `labels`), and the NFE
        per sample: what `generate` writes."""
        latents, nfe = self.draw_latents(sample_seeds, covariates, settings, spatial)
        volumes = self.decode(latents)
        return volumes, self.decode_labels(latents, volumes), nfe


def load_generator(model: str | Path = "default", device: str | torch.device = "auto", trust_paths: bool = False,
                   labels: str | Path | bool | None = None) -> Generator:
    """Load a generator: "default" (the shipped default model), a shipped model's name ("2mm", "4mm"; see
    `shipped_models`), a generator run folder (its latest checkpoint) or a checkpoint folder. The
    autoencoder it was trained with is loaded from meta["autoencoder"]["path"] and refused unless
    its weights have the recorded sha256; an exported model's must lie in its own folder unless `trust_paths`
    (see `autoencoder_folder`). `labels`: a label decoder run or checkpoint (`mriflow train labels`) of the same
    autoencoder; None: the model's own `labels/` folder when it has one (shipped and exported models); False: none."""
    device = distributed.resolve_device(device)
    if str(model) == "default":
        model = default_model_dir() / GENERATOR_DIR
        if not (model / ckpt.META_FILE).is_file():
            raise FileNotFoundError(f"{model}: no default model is installed with this copy of mriflow; pass a "
                                    "generator run folder (--model RUN), or export one there with export_generator")
    elif not Path(model).exists():
        shipped = shipped_models()
        if str(model) not in shipped:
            raise FileNotFoundError(f"--model {model}: no such run or checkpoint folder, and not a shipped model "
                                    f"(shipped: {', '.join(['default', *shipped])})")
        model = shipped[str(model)] / GENERATOR_DIR
    elif (Path(model) / GENERATOR_DIR / ckpt.META_FILE).is_file():  # an exported model's folder (export_generator)
        model = Path(model) / GENERATOR_DIR
    weights, meta = ckpt.load_checkpoint(model)
    directory = Path(meta["path"])
    where = directory / ckpt.META_FILE
    if meta.get("stage") not in FAMILIES:
        raise ValueError(f"{directory}: this is a {meta.get('stage')!r} checkpoint, not a generator "
                         f"({' or '.join(FAMILIES)}); pass the run folder of `mriflow train {'` or `mriflow train '.join(FAMILIES)}`")
    family_class = FAMILIES[meta["stage"]]
    image_space = family_class.space == "image" or "representation" in meta
    required = (REPRESENTATION_META if "representation" in meta else IMAGE_SPACE_META if image_space else REQUIRED_META)
    missing = [key for key in required if key not in meta]
    if missing or "model" not in meta["config"]:
        raise ValueError(f"{where}: lacks {', '.join(missing or ['config.model'])}; it was not written by a generator "
                         "training run of this mriflow version")
    model_config = meta["config"]["model"]
    stored = ckpt.weights_config(directory).get("model")
    if stored is not None and ckpt.config_differences(model_config, stored, "model"):
        raise ckpt.CheckpointMismatchError(
            f"{where}: the model config differs from the one the weights were saved with: "
            + "; ".join(ckpt.config_differences(model_config, stored, "model")) + ". Restore the config or retrain."
        )
    velocity_net = VelocityNet(from_dict(VelocityNetConfig, model_config, "model"))
    ckpt.load_weights_into(velocity_net, weights, "velocity.", str(directory / ckpt.MODEL_FILE))
    schema = CovariateSchema.from_dict(meta["schema"])
    if tuple(schema.names) != tuple(velocity_net.config.covariate_names):
        raise ValueError(f"{where}: the schema's covariates {schema.names} differ from the network's "
                         f"{list(velocity_net.config.covariate_names)}")

    image_shape = tuple(int(n) for n in meta["image_shape"])
    representation = None
    if "representation" in meta:  # the images behind a fixed transform
        representation = representation_from_dict(meta["representation"], str(where))
        autoencoder, autoencoder_dir = None, None
        latent_shape = tuple(int(n) for n in meta["latent_shape"])
        if representation.latent_shape(image_shape) != latent_shape or latent_shape[0] != velocity_net.config.in_channels:
            raise ValueError(f"{where}: latent_shape {list(latent_shape)} does not match the representation "
                             f"{representation.name} of images {list(image_shape)} or the network's "
                             f"{velocity_net.config.in_channels} input channels")
    elif image_space:  # the slice model samples the image itself
        autoencoder, autoencoder_dir, latent_shape = None, None, (velocity_net.config.in_channels, *image_shape)
    else:
        autoencoder_dir = autoencoder_folder(meta, directory, trust_paths)
        autoencoder, _ = ckpt.load_autoencoder(autoencoder_dir, device)
        latent_shape = tuple(int(n) for n in meta["latent_shape"])
        expected = tuple(autoencoder.config.latent_shape(image_shape))
        if expected != latent_shape or latent_shape[0] != velocity_net.config.in_channels:
            raise ValueError(f"{where}: latent_shape {list(latent_shape)} does not match the autoencoder at {autoencoder_dir} "
                             f"({list(expected)} for images {list(image_shape)}) or the network's "
                             f"{velocity_net.config.in_channels} input channels")
    affine = np.asarray(meta["affine"], dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{where}: affine must be a 4x4 matrix, got shape {affine.shape}")

    label_decoder, labels_meta = load_labels(labels, directory, meta, device, image_shape, autoencoder_dir)
    step = meta.get("step", 0)
    return Generator(
        velocity_net=velocity_net.to(device).eval(),
        autoencoder=autoencoder,
        meta=meta,
        schema=schema,
        affine=affine,
        stage=meta["stage"],
        model_id=meta.get("model_id") or f"{ckpt.run_folder(directory).name}-step{step}",
        model_checksum="sha256:" + ckpt.sha256(directory / ckpt.MODEL_FILE),
        autoencoder_checksum=None if image_space else "sha256:" + meta["autoencoder"]["model_sha256"],
        latent_scale=1.0 if image_space else float(meta["autoencoder"]["latent_scale"]),
        latent_shape=latent_shape,
        image_shape=image_shape,
        device=device,
        path=directory,
        family=family_class.from_config(meta["config"], str(where)),
        labels=label_decoder,
        labels_meta=labels_meta,
        representation=representation,
    )


def autoencoder_folder(meta: Mapping[str, Any], directory: Path, trust_paths: bool = False) -> Path:
    """The autoencoder checkpoint folder of a generator checkpoint `directory`, checked against its sha256.

    A model that travels (exported: meta has "exported_from"; or any checkpoint folder that is not a training run's
    RUN/checkpoints/step-*, so deleting that key changes nothing) keeps its autoencoder in its own folder, the one
    holding flow/ and autoencoder/. A path in it that is absolute or climbs out of that folder is refused unless
    `trust_paths`, so a model received from someone else cannot make mriflow read files elsewhere. A training run's
    checkpoint records where its autoencoder is on this machine."""
    record = meta["autoencoder"]
    path = Path(record["path"])
    travelling = "exported_from" in meta or directory.parent.name != ckpt.CHECKPOINTS_DIR
    if travelling and not trust_paths:
        home = directory.resolve().parent
        if path.is_absolute() or not (directory / path).resolve().is_relative_to(home):
            raise ValueError(f"{directory / ckpt.META_FILE}: the autoencoder path {record['path']!r} leads outside the "
                             f"model's folder {home}; an exported model keeps its autoencoder beside it (../autoencoder). "
                             "If you trust where this model came from, pass --trust-model-paths")
    path = ckpt.resolve_checkpoint(path if path.is_absolute() else directory / path)
    actual = ckpt.sha256(path / ckpt.MODEL_FILE)
    if actual != record["model_sha256"]:
        raise ValueError(
            f"{path / ckpt.MODEL_FILE}: sha256 {actual} differs from {record['model_sha256']} recorded in "
            f"{directory / ckpt.META_FILE}; these are not the autoencoder weights the generator was trained with. "
            "Restore that autoencoder checkpoint (or the exported model) unchanged."
        )
    return path
