"""Generation: a trained generator (a latent family + its autoencoder, or the image-space slice model) -> NIfTI volumes.

`generate` samples a generator (loaded by mriflow.generator) into files: each volume in template
space with its sidecar, a montage and a run record. Sample i of a run with seed s starts from
its own noise stream sample_seed(s, i) (mriflow.utils.seeding), so it is the same whatever
the batch size and the number of processes: under ``torchrun --nproc_per_node N`` process
r writes samples r, r + N, r + 2N, ... A privacy filter redraws a sample that is a near
copy of a training subject from the stream sample_seed(s, i, attempt).

This module is the public entry of generation: loading (mriflow.generator), export
(mriflow.export) and cohorts (mriflow.cohort) are importable from here too.

    >>> result = generate("runs/flow", "samples/", n=8, covariates={"age": 45, "sex": "F"}, seed=0)
    >>> result.paths[0]                     # samples/sample_00000.nii.gz (+ .json), montage.png, generate.json
    >>> generator = load_generator()        # the shipped default model (mriflow/weights/<DEFAULT_MODEL>)
    >>> export_generator("runs/flow", "release/")   # release/flow + release/autoencoder, fp16, <= 16 MB each
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence as SequenceABC
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mriflow import __version__
from mriflow import checkpoint as ckpt
from mriflow.cohort import ID_COLUMNS, cohort_names, read_cohort
from mriflow.data.dataset import CovariateSchema, read_manifest
from mriflow.data.background import BACKGROUND_RULE
from mriflow.data.io import load_volume
from mriflow.export import export_generator, export_labels
from mriflow.generator import (AFFINE_TOLERANCE, AUTOENCODER_DIR, DEFAULT_MODEL, GENERATOR_DIR, LABELS_DIR,
                               REQUIRED_META, Generator, autoencoder_folder, default_model_dir, load_generator,
                               shipped_models)
from mriflow.utils.seeding import sample_seed
from mriflow.generate_io import batch_montage, labels_name, sample_name, write_labels, write_sample
from mriflow.models.conditioning import resolve_request
from mriflow import distributed
from mriflow.utils.files import remove_stale_temporaries
from mriflow.utils.text import counted, verb

__all__ = [
    "generate", "GenerateResult", "requested_covariates", "refuse_existing", "privacy_reference", "MONTAGE_SAMPLES",
    # moved out by concern, importable from here as before
    "Generator", "load_generator", "autoencoder_folder", "shipped_models", "default_model_dir", "DEFAULT_MODEL",
    "REQUIRED_META", "GENERATOR_DIR", "AUTOENCODER_DIR", "LABELS_DIR", "AFFINE_TOLERANCE",
    "export_generator", "export_labels", "read_cohort", "cohort_names", "ID_COLUMNS",
]

MONTAGE_SAMPLES = 8


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
        text = f"{counted(len(self.paths), 'volume')} in {self.out} ({self.seconds:.1f} s, NFE {self.nfe} per sample"
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

    Each sample also gets sample_XXXXX_labels.nii.gz, its tissue map (uint8 class indices, same grid and affine),
    from `labels`: a `mriflow train labels` run (decoded from the same latent as the image), "anatomy" (mriflow's
    anatomy network of the grid segments the decoded image), None (the model's own decoder when it has one, else
    the anatomy network where the grid has one) or False (none); the sidecar names the map, its classes and source.
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
    to a training subject than the held-out subjects, passed through the model's autoencoder (as they are for an
    image-space model, which has none), come (evaluate/memorization.py). An image-space model (the slice model)
    records "space": "image" and autoencoder_checksum null; its tissue maps can only come from the anatomy network.
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
        if spatial is None and generator.spatial_condition is not None:  # before anything is written
            raise ValueError(f"the model {generator.path} draws scans for a given label map; pass --label-map FILE")
        # a cohort's rows one by one; n samples of one request as one request, so memory does not grow with n
        rows = [dict(row) for row in cohort] if cohort is not None else Repeated(dict(covariates or {}), 1)
        requests = [{k: v for k, v in row.items() if k not in ID_COLUMNS} for row in rows]
        conditions = [resolve_request(generator.schema, request) for request in requests]
        requested = [requested_covariates(generator.schema, r, *c) for r, c in zip(requests, conditions)]
        if cohort is None:
            requests, conditions, requested = (Repeated(values[0], n) for values in (requests, conditions, requested))
        names = cohort_names(rows) if cohort is not None else SampleNames(n)
        if context.is_main and out.is_dir():  # before any process of this run writes into `out`
            for leftover in remove_stale_temporaries([out], before=start_time):
                print(f"removed {leftover}: left incomplete by an interrupted run")
        if not overwrite:
            refuse_existing(out, n, names if cohort is not None else None, with_labels=generator.labels is not None)
        reference = privacy_reference(privacy_filter, generator) if privacy_filter is not None else None
        distributed.barrier()  # every process has checked `out` before any writes to it
        out.mkdir(parents=True, exist_ok=True)

        indices = range(context.rank, n, context.world_size)
        common = {"seed": seed, **settings, "model_id": generator.model_id,
                  "model_checksum": generator.model_checksum, "autoencoder_checksum": generator.autoencoder_checksum,
                  "stage": generator.stage, "space": generator.space, "representation": generator.representation_name,
                  "background": BACKGROUND_RULE, "device": str(context.device)}
        if label_map is not None:
            common["label_map"] = {"path": str(Path(label_map).resolve()), "sha256": ckpt.sha256(Path(label_map))}
        if generator.labels is not None:
            common["label_classes"] = list(generator.label_classes)
            common["labels_checksum"] = generator.labels_meta["checksum"]
            common["labels_source"] = generator.labels_meta["source"]
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
                "space": generator.space, "representation": generator.representation_name, "background": BACKGROUND_RULE,
                "labels": None if generator.labels is None else {
                    "model": generator.labels_meta["path"], "checksum": generator.labels_meta["checksum"],
                    "source": generator.labels_meta["source"],
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


def refuse_existing(out: Path, n: int, names: Sequence[str] | None = None, with_labels: bool = False) -> None:
    """Refuse, before anything is written, an output folder that already holds the samples to write (and their label
    maps, `with_labels`) or a run record. Without `names` the samples are sample_00000 … of n, found by reading the
    folder (whatever n is, nothing of size n is built)."""
    suffixes = (".nii.gz", ".json", "_labels.nii.gz") if with_labels else (".nii.gz", ".json")
    if names is not None:
        names = [f"{name}{suffix}" for name in names for suffix in suffixes]
    else:
        pattern = re.compile(r"sample_(\d{5,})(" + "|".join(re.escape(s) for s in suffixes) + ")")
        names = sorted(entry.name for entry in (os.scandir(out) if out.is_dir() else [])
                       if (match := pattern.fullmatch(entry.name)) and int(match.group(1)) < n)
    existing = [name for name in names + ["generate.json", "montage.png"] if (out / name).exists()]
    if existing:
        shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
        raise FileExistsError(f"{out}: {shown} already {verb(len(existing), 'exists', 'exist')}; choose another output "
                              "folder (existing samples are never overwritten)")


class Repeated(SequenceABC):
    """`value` n times as a read-only sequence, without a list of n: the requests of n samples of one request."""

    def __init__(self, value: Any, n: int):
        self.value, self.n = value, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.value] * len(range(*index.indices(self.n)))
        if not -self.n <= index < self.n:
            raise IndexError(index)
        return self.value


class SampleNames(Repeated):
    """sample_00000 … sample_{n-1} as a read-only sequence, without a list of n."""

    def __init__(self, n: int):
        super().__init__(None, n)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [sample_name(i) for i in range(*index.indices(self.n))]
        if not -self.n <= index < self.n:
            raise IndexError(index)
        return sample_name(index % self.n)


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

    # an image-space generator (the slice model) has no decoder to match: the held-out volumes as they are
    return MemorizationReference.from_prepared(data_dir, heldout_transform=None if generator.autoencoder is None else reconstructed)
