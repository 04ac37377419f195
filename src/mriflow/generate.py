"""Generation: a trained generator (latent flow or diffusion baseline + its autoencoder) -> NIfTI volumes.

A generator checkpoint (``RUN/checkpoints/step-XXXXXXXX/``, see mriflow.checkpoint) holds the
EMA velocity network under ``velocity.`` and, in checkpoint.json: "stage" ("flow" |
"diffusion"), "config" ("model": the VelocityNetConfig; "diffusion": the VPDiffusionPath
of the baseline; "sampling": default solver, steps, guidance and, for the flow, time_shift),
"schema" (the covariates), "autoencoder" ({"path", "model_sha256", "latent_scale", "step"};
a relative path is relative to the checkpoint folder), "latent_shape", "image_shape",
"affine" and "grid". Sampling runs in the scaled latent space; a latent is decoded as

    volume = clamp(decode(z / latent_scale), 0, 1)

and written in template space with its sidecar. Sample i of a run with seed s starts from
its own noise stream sample_seed(s, i) (mriflow.flow.sampling), so it is the same whatever
the batch size and the number of processes: under ``torchrun --nproc_per_node N`` process
r writes samples r, r + N, r + 2N, ... A privacy filter redraws a sample that is a near
copy of a training subject from the stream sample_seed(s, i, attempt).

    >>> result = generate("runs/flow", "samples/", n=8, covariates={"age": 45, "sex": "F"}, seed=0)
    >>> result.paths[0]                     # samples/sample_00000.nii.gz (+ .json), montage.png, generate.json
    >>> generator = load_generator()        # the shipped default model (mriflow/weights/<DEFAULT_MODEL>)
    >>> export_generator("runs/flow", "release/")   # release/flow + release/autoencoder, fp16, <= 16 MB each
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mriflow import __version__
from mriflow import checkpoint as ckpt
from mriflow.config import from_dict
from mriflow.data.dataset import CovariateSchema, read_manifest
from mriflow.data.io import load_volume
from mriflow.families import FAMILIES, Family
from mriflow.utils.seeding import sample_seed
from mriflow.generate_io import batch_montage, labels_name, sample_name, write_labels, write_sample
from mriflow.models.conditioning import parse_value, resolve_request
from mriflow.models.velocity import SpatiallyConditioned, VelocityNet, VelocityNetConfig
from mriflow import distributed
from mriflow.utils.files import remove_stale_temporaries

REQUIRED_META = ("config", "schema", "autoencoder", "latent_shape", "image_shape", "affine")
GENERATOR_DIR, AUTOENCODER_DIR, LABELS_DIR = "flow", "autoencoder", "labels"  # the folders of an exported model
ID_COLUMNS = ("id", "subject", "sample")  # a cohort column that names its row's sample (the first present)
MONTAGE_SAMPLES = 8
AFFINE_TOLERANCE = 1e-3  # mm; a prepared folder this close to the model's affine is on its grid


DEFAULT_MODEL = "4mm"  # the shipped model `--model default` means


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
    autoencoder: torch.nn.Module
    meta: dict[str, Any]
    schema: CovariateSchema
    affine: np.ndarray  # (4, 4) template-space affine of every generated volume
    stage: str  # "flow" | "diffusion"
    model_id: str
    model_checksum: str  # "sha256:<hex>" of the generator's model.safetensors
    autoencoder_checksum: str
    latent_scale: float
    latent_shape: tuple[int, ...]  # (C, d, h, w)
    image_shape: tuple[int, int, int]  # (D, H, W)
    device: torch.device
    path: Path  # the checkpoint folder
    family: Family  # how it samples (mriflow.families), built from the checkpoint's config
    labels: torch.nn.Module | None = None  # a LabelDecoder of the same autoencoder: each sample's tissue map
    labels_meta: dict[str, Any] | None = None  # its checkpoint meta (classes, label_map, path, checksum)

    @property
    def label_classes(self) -> tuple[str, ...]:
        return tuple(self.labels.classes) if self.labels is not None else ()

    @property
    def solvers(self) -> tuple[str, ...]:
        return self.family.solvers

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
        """Scaled latents (B, C, d, h, w), one per seed (see flow.sampling.sample_seed), and the NFE per sample.
        `spatial` (1 or B, S, d, h, w): the condition of a label-conditioned model (see `label_condition`)."""
        shape = (len(sample_seeds), *self.latent_shape)
        net = self.velocity_net
        if self.velocity_net.config.spatial_channels:
            if spatial is None:
                raise ValueError(f"the model {self.path} draws scans for a given label map; pass --label-map FILE")
            net = SpatiallyConditioned(net, spatial.to(self.device).expand(len(sample_seeds), *spatial.shape[1:]))
        elif spatial is not None:
            raise ValueError(f"--label-map: the model {self.path} is not conditioned on label maps")
        return self.family.sample(net, shape, covariates, settings, self.device, sample_seeds)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents (B, C, d, h, w) -> volumes (B, D, H, W) float32 in [0, 1] on the CPU."""
        with torch.no_grad():
            images = self.autoencoder.decode(latents / self.latent_scale)  # (B, 1, D, H, W)
        return images.clamp(0.0, 1.0)[:, 0].float().cpu().numpy()

    def decode_labels(self, latents: torch.Tensor) -> np.ndarray | None:
        """Scaled latents (B, C, d, h, w) -> tissue maps (B, D, H, W) uint8 on the CPU (class indices of
        `label_classes`), or None without a label decoder."""
        if self.labels is None:
            return None
        with torch.no_grad():
            return self.labels.segment(latents / self.latent_scale).cpu().numpy()

    def reconstruct(self, volumes: torch.Tensor) -> torch.Tensor:
        """Real volumes (B, 1, D, H, W) through the autoencoder (decode of the posterior mean) -> the same
        shape in [0, 1] on the CPU: how subjects look after the decoder every sample comes out of
        (the `reconstruct` that evaluate_generation takes)."""
        with torch.no_grad():
            return self.autoencoder.reconstruct(volumes.to(self.device)).clamp(0.0, 1.0).float().cpu()

    def sample(self, sample_seeds: Sequence[int], covariates: tuple[torch.Tensor, torch.Tensor] | None,
               settings: Mapping[str, Any], spatial: torch.Tensor | None = None) -> tuple[np.ndarray, int]:
        """Volumes (B, D, H, W) in [0, 1], one per seed, and the NFE per sample."""
        volumes, _, nfe = self.sample_pairs(sample_seeds, covariates, settings, spatial)
        return volumes, nfe

    def sample_pairs(self, sample_seeds: Sequence[int], covariates: tuple[torch.Tensor, torch.Tensor] | None,
                     settings: Mapping[str, Any], spatial: torch.Tensor | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Volumes (B, D, H, W) in [0, 1], their tissue maps (B, D, H, W) uint8 from the same latents (None without
        a label decoder), and the NFE per sample: what `generate` writes."""
        latents, nfe = self.draw_latents(sample_seeds, covariates, settings, spatial)
        return self.decode(latents), self.decode_labels(latents), nfe


def load_generator(model: str | Path = "default", device: str | torch.device = "auto", trust_paths: bool = False,
                   labels: str | Path | bool | None = None) -> Generator:
    """Load a generator: "default" (the shipped default model), a shipped model's name ("4mm"; see
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
    missing = [key for key in REQUIRED_META if key not in meta]
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

    autoencoder_dir = autoencoder_folder(meta, directory, trust_paths)
    autoencoder, _ = ckpt.load_autoencoder(autoencoder_dir, device)
    latent_shape = tuple(int(n) for n in meta["latent_shape"])
    image_shape = tuple(int(n) for n in meta["image_shape"])
    if tuple(autoencoder.config.latent_shape(image_shape)) != latent_shape or latent_shape[0] != velocity_net.config.in_channels:
        raise ValueError(f"{where}: latent_shape {list(latent_shape)} does not match the autoencoder at {autoencoder_dir} "
                         f"({list(autoencoder.config.latent_shape(image_shape))} for images {list(image_shape)}) or the "
                         f"network's {velocity_net.config.in_channels} input channels")
    affine = np.asarray(meta["affine"], dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{where}: affine must be a 4x4 matrix, got shape {affine.shape}")

    label_decoder, labels_meta = _load_labels(labels, directory, meta, device)
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
        autoencoder_checksum="sha256:" + meta["autoencoder"]["model_sha256"],
        latent_scale=float(meta["autoencoder"]["latent_scale"]),
        latent_shape=latent_shape,
        image_shape=image_shape,
        device=device,
        path=directory,
        family=FAMILIES[meta["stage"]].from_config(meta["config"], str(where)),
        labels=label_decoder,
        labels_meta=labels_meta,
    )


def _load_labels(labels: str | Path | bool | None, directory: Path, meta: Mapping[str, Any],
                 device: torch.device) -> tuple[torch.nn.Module | None, dict[str, Any] | None]:
    """The label decoder `load_generator` was asked for, refused unless it segments the latents of the generator's
    own autoencoder (same weights, by SHA-256)."""
    if labels is False:
        return None, None
    if labels is None or labels is True:
        own = directory.parent / LABELS_DIR
        if "exported_from" not in meta or not (own / ckpt.META_FILE).is_file():
            if labels is True:
                raise FileNotFoundError(f"{directory}: this model has no label decoder ({own} is absent); train one with "
                                        "`mriflow train labels DATA --autoencoder AE --out RUN` and pass --labels RUN")
            return None, None
        labels = own
    elif not Path(labels).exists():
        raise FileNotFoundError(f"--labels {labels}: no such label decoder run or checkpoint folder")
    decoder, labels_meta = ckpt.load_label_decoder(labels, device)
    label_dir = Path(labels_meta["path"])
    recorded = labels_meta["autoencoder"]
    if recorded["model_sha256"] != meta["autoencoder"]["model_sha256"]:
        raise ValueError(f"{label_dir}: this label decoder was trained on the latents of {recorded['path']} (sha256 "
                         f"{recorded['model_sha256'][:12]}…), not on the generator's autoencoder (sha256 "
                         f"{meta['autoencoder']['model_sha256'][:12]}…); train one with --autoencoder set to the generator's")
    labels_meta = {**labels_meta, "checksum": "sha256:" + ckpt.sha256(label_dir / ckpt.MODEL_FILE)}
    return decoder, labels_meta


def autoencoder_folder(meta: Mapping[str, Any], directory: Path, trust_paths: bool = False) -> Path:
    """The autoencoder checkpoint folder of a generator checkpoint `directory`, checked against its sha256.

    An exported model (one that travels: meta has "exported_from") keeps its autoencoder in its own
    folder, the one holding flow/ and autoencoder/. A path in it that is absolute or climbs out of that
    folder is refused unless `trust_paths`, so a model received from someone else cannot make mriflow
    read files elsewhere. A training run's checkpoint records where its autoencoder is on this machine."""
    record = meta["autoencoder"]
    path = Path(record["path"])
    if "exported_from" in meta and not trust_paths:
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


@dataclass
class GenerateResult:
    """What `generate` wrote: sample paths in index order, NFE per sample, wall time, redraws."""

    out: Path
    paths: list[Path]
    nfe: int
    seconds: float
    redraws: int = 0
    withheld: list[int] = field(default_factory=list)  # still memorized after max_redraws; not written
    montage: Path | None = None
    record: Path | None = None

    def summary(self) -> str:
        text = f"{len(self.paths)} volumes in {self.out} ({self.seconds:.1f} s, NFE {self.nfe} per sample"
        if self.redraws or self.withheld:
            text += f", {self.redraws} redrawn by the privacy filter"
        text += ")"
        if self.withheld:
            text += f"; withheld as near copies of training subjects: samples {', '.join(map(str, self.withheld))}"
        return text


def generate(
    model: str | Path = "default",
    out: str | Path = "samples",
    n: int = 8,
    covariates: Mapping[str, Any] | None = None,
    solver: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 4,
    device: str | torch.device = "auto",
    privacy_filter: str | Path | None = None,
    max_redraws: int = 10,
    progress: bool = True,
    overwrite: bool = False,
    cohort: Sequence[Mapping[str, Any]] | None = None,
    trust_paths: bool = False,
    labels: str | Path | bool | None = None,
    label_map: str | Path | None = None,
) -> GenerateResult:
    """Sample `n` volumes into `out`: sample_XXXXX.nii.gz + .json per sample, montage.png and generate.json.

    With a label decoder (`labels`: a `mriflow train labels` run; None: the model's own when it has one, as the
    shipped models do; False: none) each sample also gets sample_XXXXX_labels.nii.gz: its tissue map (uint8 class
    indices, same grid and affine), decoded from the same latent as the image; the sidecar names it and its classes.
    With a label-conditioned model (`mriflow train flow --label-condition`), `label_map` (a NIfTI on the model's grid:
    tissue classes 0..5 or the training label map's labels) is the anatomy every sample is drawn to match.

    `covariates` ({name: value}; absent ones are unconditional) is checked against the model's
    schema; solver/steps/guidance default to the model's. A `cohort` (one {column: value} per
    sample, e.g. the rows of a CSV; see `read_cohort`) replaces `covariates` and `n`: sample i is
    drawn for row i, named after the row's id when it has one, and its sidecar holds the row. Under torchrun each process writes
    its share (indices rank, rank + N, ...) and rank 0 writes montage.png and generate.json.
    With `privacy_filter` (a prepared folder on the model's grid), a sample that is a near copy
    of one of its training subjects is redrawn from its next seed stream, at most `max_redraws`
    times; one still memorized then is withheld (not written) and reported. "Near copy": closer
    to a training subject than the held-out subjects, passed through the model's autoencoder,
    come (evaluate/memorization.py).
    """
    if cohort is not None:
        if covariates:
            raise ValueError("a cohort gives each sample its covariates; do not pass covariates as well")
        n = len(cohort)
    if n < 1 or batch_size < 1 or seed < 0 or max_redraws < 0:
        raise ValueError(f"n and batch_size must be >= 1, seed and max_redraws >= 0; got n={n}, "
                         f"batch_size={batch_size}, seed={seed}, max_redraws={max_redraws}")
    out, start_time = Path(out), time.time()
    joined_group = torch.distributed.is_initialized()  # a caller's own process group is left alone
    context = distributed.setup(device)
    try:
        generator = load_generator(model, context.device, trust_paths, labels)
        settings = generator.sampling_settings(solver, steps, guidance)
        spatial = generator.label_condition(label_map) if label_map is not None else None
        rows = [dict(row) for row in cohort] if cohort is not None else [dict(covariates or {})] * n
        names = cohort_names(rows) if cohort is not None else [sample_name(i) for i in range(n)]
        requests = [{k: v for k, v in row.items() if k not in ID_COLUMNS} for row in rows]
        conditions = [resolve_request(generator.schema, request) for request in requests]
        requested = [requested_covariates(generator.schema, r, *c) for r, c in zip(requests, conditions)]
        if context.is_main and out.is_dir():  # before any process of this run writes into `out`
            for leftover in remove_stale_temporaries([out], before=start_time):
                print(f"removed {leftover}: left incomplete by an interrupted run")
        if not overwrite:
            refuse_existing(out, n, names, with_labels=generator.labels is not None)
        reference = privacy_reference(privacy_filter, generator) if privacy_filter is not None else None
        distributed.barrier()  # every process has checked `out` before any writes to it
        out.mkdir(parents=True, exist_ok=True)

        indices = list(range(context.rank, n, context.world_size))
        common = {"seed": seed, **settings, "model_id": generator.model_id,
                  "model_checksum": generator.model_checksum, "autoencoder_checksum": generator.autoencoder_checksum,
                  "stage": generator.stage, "device": str(context.device)}
        if label_map is not None:
            common["label_map"] = {"path": str(Path(label_map).resolve()), "sha256": ckpt.sha256(Path(label_map))}
        if generator.labels is not None:
            common["label_classes"] = list(generator.label_classes)
            common["labels_checksum"] = generator.labels_meta["checksum"]
        start = time.perf_counter()
        written: dict[int, str] = {}
        attempts: dict[int, int] = {}
        withheld: list[int] = []
        nfe = 0
        # closed on an error too: a bar left open is redrawn at exit, after the error line
        with tqdm(total=len(indices), unit="sample", desc="generate", dynamic_ncols=True,
                  disable=not (progress and context.is_main)) as bar:
            for first in range(0, len(indices), batch_size):
                pending = indices[first:first + batch_size]
                while pending:
                    seeds = [sample_seed(seed, i, attempts.get(i, 0)) for i in pending]
                    condition = tuple(torch.stack([conditions[i][part] for i in pending]) for part in (0, 1)) \
                        if len(generator.schema) else None  # (B, K) values and present flags
                    volumes, label_maps, nfe = generator.sample_pairs(seeds, condition, settings, spatial)
                    redraw = []
                    for k, (index, stream, volume) in enumerate(zip(pending, seeds, volumes)):
                        attempt = attempts.get(index, 0)
                        if reference is not None and reference.is_memorized(volume):
                            if attempt < max_redraws:
                                attempts[index] = attempt + 1
                                redraw.append(index)
                            else:
                                withheld.append(index)
                            continue
                        sidecar = {"covariates": requested[index], **common, "nfe": nfe, "index": index,
                                   "sample_seed": stream, "attempt": attempt}
                        if cohort is not None:
                            sidecar["cohort_row"] = rows[index]
                        if label_maps is not None:
                            sidecar["labels"] = labels_name(names[index])
                        path = write_sample(out, index, volume, generator.affine, sidecar, overwrite=overwrite,
                                            name=names[index])
                        if label_maps is not None:
                            write_labels(out, names[index], label_maps[k], generator.affine, overwrite=overwrite)
                        written[index] = path.name
                        bar.update(1)
                    pending = redraw
        seconds = time.perf_counter() - start

        shares = distributed.all_gather_objects({"written": written, "attempts": attempts, "withheld": withheld,
                                                 "nfe": nfe, "seconds": seconds})
        written = {i: name for share in shares for i, name in share["written"].items()}
        attempts = {i: a for share in shares for i, a in share["attempts"].items()}
        withheld = sorted(i for share in shares for i in share["withheld"])
        result = GenerateResult(
            out=out, paths=[out / written[i] for i in sorted(written)], nfe=max(s["nfe"] for s in shares),
            seconds=max(s["seconds"] for s in shares), redraws=sum(attempts.values()), withheld=withheld,
            montage=out / "montage.png" if written else None, record=out / "generate.json",
        )
        if context.is_main:
            if withheld:
                warnings.warn(f"samples {withheld} were still near copies of training subjects after {max_redraws} "
                              "redraws and were not written; the model may be memorizing its training set", stacklevel=2)
            if result.montage is not None:
                shown = result.paths[:MONTAGE_SAMPLES]
                batch_montage([load_volume(p)[0] for p in shown], result.montage,
                              titles=[p.name.split(".")[0] for p in shown])
            record = {
                "model": str(generator.path), "model_id": generator.model_id, "model_checksum": generator.model_checksum,
                "autoencoder_checksum": generator.autoencoder_checksum, "stage": generator.stage,
                "labels": None if generator.labels is None else {
                    "model": generator.labels_meta["path"], "checksum": generator.labels_meta["checksum"],
                    "classes": list(generator.label_classes)},
                "n": n, "seed": seed, **settings, "nfe": result.nfe,
                "covariates": "per sample: the cohort's rows (see each sidecar)" if cohort is not None else requested[0],
                "batch_size": batch_size, "device": str(context.device), "world_size": context.world_size,
                "privacy_filter": None if reference is None else {
                    "data": str(Path(privacy_filter).resolve()), "threshold": reference.threshold,
                    "threshold_from": reference.heldout_reference,
                    "training_subjects": len(reference.subjects), "max_redraws": max_redraws},
                "redraws": result.redraws, "redrawn": {str(i): a for i, a in sorted(attempts.items()) if a},
                "withheld": withheld, "samples": [p.name for p in result.paths], "seconds": round(result.seconds, 3),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mriflow_version": __version__,
            }
            ckpt.write_text_atomic(result.record, json.dumps(record, indent=2))
        distributed.barrier()  # every process returns once the montage and record exist
        return result
    finally:
        if not joined_group:
            distributed.teardown()


def requested_covariates(schema: CovariateSchema, request: Mapping[str, Any], values: torch.Tensor,
                         present: torch.Tensor) -> dict[str, float | str | None]:
    """The request as the model reads it: {name: number | category | None (absent)} for every covariate."""
    out: dict[str, float | str | None] = {}
    for k, covariate in enumerate(schema.covariates):
        if not bool(present[k]):
            out[covariate.name] = None
        elif covariate.kind == "continuous":
            out[covariate.name] = float(request[covariate.name])
        else:
            out[covariate.name] = covariate.decode(float(values[k]))
    return out


def read_cohort(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a cohort CSV, one sample each: a column per covariate of the model (empty = absent) and
    optionally an id column (`id`, `subject` or `sample`) that names the sample's files."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--covariates {path}: no such file; give a CSV with one row per sample "
                                "(columns: the model's covariates, e.g. age,sex, and optionally id)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"--covariates {path}: not a readable CSV ({error})") from None
    if table.empty:
        raise ValueError(f"--covariates {path}: no rows; give one row per sample to draw")
    table.columns = [str(c).strip() for c in table.columns]
    rows = []
    for record in table.to_dict("records"):
        rows.append({k: None if v.strip() == "" else parse_value(v.strip()) for k, v in record.items()})
    return rows


def cohort_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """File names of a cohort's samples: the id column's values when there is one, else sample_XXXXX."""
    column = next((c for c in ID_COLUMNS if c in rows[0]), None)
    if column is None:
        return [sample_name(i) for i in range(len(rows))]
    names = [str(row[column]) if row[column] is not None else "" for row in rows]
    for i, name in enumerate(names):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name.endswith((".nii", ".gz", ".json", "_labels")):
            raise ValueError(f"cohort row {i + 1}: {column} {name!r} cannot name a file; use letters, digits, "
                             "'.', '_' and '-' (and no .nii/.json/_labels ending: _labels names label maps)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"cohort: {column} {', '.join(repeated[:5])} appear(s) more than once; ids must be unique")
    if any(name in ("generate", "montage") for name in names):
        raise ValueError(f"cohort: {column} 'generate' and 'montage' are taken by the run's own files")
    return names


def refuse_existing(out: Path, n: int, names: Sequence[str] | None = None, with_labels: bool = False) -> None:
    """Refuse, before anything is written, an output folder that already holds the samples to write (and their label
    maps, `with_labels`) or a run record."""
    suffixes = (".nii.gz", ".json", "_labels.nii.gz") if with_labels else (".nii.gz", ".json")
    names = [f"{name}{suffix}" for name in (names or [sample_name(i) for i in range(n)]) for suffix in suffixes]
    existing = [name for name in names + ["generate.json", "montage.png"] if (out / name).exists()]
    if existing:
        shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
        raise FileExistsError(f"{out}: {shown} already exist(s); choose another output folder (existing "
                              "samples are never overwritten)")


def privacy_reference(data_dir: str | Path, generator: Generator):
    """MemorizationReference of prepared folder `data_dir`, refused unless its volumes lie on the model's grid."""
    import nibabel as nib

    from mriflow.evaluate.memorization import MemorizationReference

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    train = manifest[manifest["split"] == "train"]
    if train.empty:
        raise ValueError(f"{data_dir}: the privacy filter needs the training split of the model's data; none found")
    image = nib.load(str(data_dir / train["image"].iloc[0]))
    if tuple(image.shape) != generator.image_shape or not np.allclose(image.affine, generator.affine, atol=AFFINE_TOLERANCE):
        raise ValueError(
            f"{data_dir}: its volumes are {tuple(image.shape)} with affine {np.round(image.affine, 3).tolist()}, but the "
            f"model generates {generator.image_shape} with affine {np.round(generator.affine, 3).tolist()}; pass the "
            "prepared folder the model was trained on (the same --preset grid)"
        )
    # Held-out subjects through the model's own autoencoder set the threshold: smoothness-matched to the samples.
    def reconstructed(volume: np.ndarray) -> np.ndarray:
        return generator.reconstruct(torch.from_numpy(np.asarray(volume, np.float32))[None, None])[0, 0].numpy()

    return MemorizationReference.from_prepared(data_dir, heldout_transform=reconstructed)


def export_generator(run: str | Path, out: str | Path, weights_dtype: str = "float16") -> Path:
    """Copy a generator run's latest checkpoint and its autoencoder into out/flow and out/autoencoder.

    Only model.safetensors and checkpoint.json travel (no train_state), weights cast to
    `weights_dtype`; the generator's meta["autoencoder"] then points at "../autoencoder"
    with the new sha256. Every file must stay <= 16 MB, else nothing is left behind.
    This is how the shipped models (mriflow/weights/<name>) are made. Returns `out`.
    """
    weights, meta = ckpt.load_checkpoint(run)
    directory = Path(meta.pop("path"))
    if meta.get("stage") not in FAMILIES:
        raise ValueError(f"{directory}: this is a {meta.get('stage')!r} checkpoint, not a generator (flow or diffusion)")
    autoencoder_dir = autoencoder_folder(meta, directory)
    out = Path(out)
    targets = [out / GENERATOR_DIR, out / AUTOENCODER_DIR]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); export into an empty folder")

    try:
        autoencoder_weights, autoencoder_meta = ckpt.load_checkpoint(autoencoder_dir)
        autoencoder_meta.pop("path")
        autoencoder_meta["exported_from"] = {"path": str(autoencoder_dir), "model_sha256": meta["autoencoder"]["model_sha256"]}
        ckpt.save_checkpoint(targets[1], autoencoder_weights, autoencoder_meta, weights_dtype=weights_dtype)
        exported = {
            **meta,
            "model_id": meta.get("model_id") or f"{ckpt.run_folder(directory).name}-step{meta.get('step', 0)}",
            "autoencoder": {**meta["autoencoder"], "path": f"../{AUTOENCODER_DIR}",
                            "model_sha256": ckpt.sha256(targets[1] / ckpt.MODEL_FILE)},
            "exported_from": {"path": str(directory), "model_sha256": ckpt.sha256(directory / ckpt.MODEL_FILE)},
        }
        ckpt.save_checkpoint(targets[0], weights, exported, weights_dtype=weights_dtype)
        too_large = [f"{f} ({f.stat().st_size / 1e6:.1f} MB)" for t in targets for f in sorted(t.iterdir())
                     if f.stat().st_size > ckpt.MAX_TRAVELLING_BYTES]
        if too_large:
            raise ValueError(f"{', '.join(too_large)} over the {ckpt.MAX_TRAVELLING_BYTES / 1e6:.0f} MB limit for a file "
                             "that ships; export as float16/bfloat16 or train a smaller model")
    except BaseException:
        for target in targets:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return out


def export_labels(run: str | Path, model_dir: str | Path, weights_dtype: str = "float16") -> Path:
    """Copy a label decoder run's latest checkpoint into an exported model's folder as `model_dir/labels`, so that
    `generate` with that model writes label maps by default. The decoder must have been trained on the model's
    autoencoder: the weights in model_dir/autoencoder or those they were exported from (same SHA-256). Returns
    the new folder."""
    weights, meta = ckpt.load_checkpoint(run)
    directory = Path(meta.pop("path"))
    if meta.get("stage") != "labels":
        raise ValueError(f"{directory}: this is a {meta.get('stage')!r} checkpoint, not a label decoder (`mriflow train labels`)")
    model_dir = Path(model_dir)
    autoencoder = model_dir / AUTOENCODER_DIR
    if not (autoencoder / ckpt.META_FILE).is_file():
        raise FileNotFoundError(f"{model_dir}: no {AUTOENCODER_DIR}/ folder; export the generator first (export_generator)")
    target = model_dir / LABELS_DIR
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it first to replace the label decoder")
    _, autoencoder_meta = ckpt.load_checkpoint(autoencoder)
    shipped = ckpt.sha256(autoencoder / ckpt.MODEL_FILE)
    accepted = {shipped, autoencoder_meta.get("exported_from", {}).get("model_sha256")}
    if meta["autoencoder"]["model_sha256"] not in accepted:
        raise ValueError(f"{directory} was trained on the latents of {meta['autoencoder']['path']}, not on {autoencoder} "
                         "(or the weights it was exported from); train it with that autoencoder")
    exported = {**meta, "autoencoder": {**meta["autoencoder"], "path": f"../{AUTOENCODER_DIR}", "model_sha256": shipped},
                "exported_from": {"path": str(directory), "model_sha256": ckpt.sha256(directory / ckpt.MODEL_FILE)}}
    try:
        ckpt.save_checkpoint(target, weights, exported, weights_dtype=weights_dtype)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target
