"""mriflow from Python: load a model, draw brains as nibabel images, write them, evaluate a folder (issue 26.2).

The command line is built on the same functions (mriflow.generate.generate, mriflow.edit.edit_scan,
mriflow.evaluate.generation.evaluate_generation); this module gives them the shape a notebook user expects, as
MONAI, nibabel and TorchIO do:

    >>> import mriflow
    >>> model = mriflow.load("2mm")                       # a shipped model's name, a run or an exported folder
    >>> brain = model.sample(age=70, sex="M", seed=3)     # one Sample: .image and .labels are nibabel images
    >>> brain.image.shape, brain.covariates
    ((80, 96, 80), {'age': 70.0, 'sex': 'M'})
    >>> brains = model.sample_many(4, age=45, sex="F", progress=lambda done, total: print(done, "of", total))
    >>> brain.save("samples/old-man")                     # samples/old-man.nii.gz, _labels.nii.gz, .json
    >>> model.generate("samples/cohort", n=100, age=60)   # the files `mriflow generate` writes
    >>> report = mriflow.evaluate("data/ixi2", "samples/cohort", "reports/cohort")   # metrics.json as a dict

Sample i of a call with seed s draws from the noise stream sample_seed(s, i), so `sample_many(4, seed=s)[2]` is the
third volume `mriflow generate --seed s --n 4` writes, whatever the batch size (to float rounding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np

Progress = Callable[[int, int], None]  # (samples done, samples in all)


@dataclass
class Sample:
    """One generated brain: `image` (float32 in [0, 1], qform = sform = the template affine) and `labels` (uint8 tissue
    classes, or None) as nibabel images, the covariates it was drawn for and its sidecar record."""

    image: nib.Nifti1Image
    labels: nib.Nifti1Image | None
    covariates: dict[str, Any]
    sidecar: dict[str, Any] = field(default_factory=dict)

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.image.dataobj, dtype=np.float32)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write PATH.nii.gz, PATH_labels.nii.gz (with labels) and PATH.json, as `mriflow generate` names them; an
        existing file is refused unless `overwrite`. Returns the image's path."""
        from mriflow.generate_io import write_labels, write_sample

        path = Path(path)
        name = path.name.removesuffix(".gz").removesuffix(".nii")
        written = write_sample(path.parent, self.sidecar.get("index", 0), self.array, self.image.affine,
                               {**self.sidecar, **({"labels": f"{name}_labels.nii.gz"} if self.labels else {})},
                               overwrite=overwrite, name=name)
        if self.labels is not None:
            write_labels(path.parent, name, np.asarray(self.labels.dataobj), self.image.affine, overwrite=overwrite)
        return written


class Model:
    """A loaded generator (mriflow.generator.Generator underneath: `.generator`), sampled into nibabel images."""

    def __init__(self, generator):
        self.generator = generator

    @property
    def covariates(self) -> list[str]:
        """The covariates it is conditioned on (keyword arguments of `sample`)."""
        return list(self.generator.schema.names)

    @property
    def affine(self) -> np.ndarray:
        return self.generator.affine

    def __repr__(self) -> str:
        return (f"mriflow.Model({self.generator.model_id!r}, grid {'x'.join(map(str, self.generator.image_shape))}, "
                f"covariates {self.covariates}, {self.generator.representation_name})")

    def sample(self, seed: int = 0, solver: str | None = None, steps: int | None = None, guidance: float | None = None,
               **covariates: Any) -> Sample:
        """One brain drawn for `covariates` (e.g. age=70, sex="M"; absent ones unconditional) from seed `seed`."""
        return self.sample_many(1, seed=seed, solver=solver, steps=steps, guidance=guidance, **covariates)[0]

    def sample_many(self, n: int, seed: int = 0, solver: str | None = None, steps: int | None = None,
                    guidance: float | None = None, batch_size: int = 4, progress: Progress | None = None,
                    **covariates: Any) -> list[Sample]:
        """`n` brains for the same covariates, in batches of `batch_size`; `progress(done, n)` after each batch."""
        import torch

        from mriflow import __version__
        from mriflow.data.background import BACKGROUND_RULE
        from mriflow.generate import requested_covariates
        from mriflow.models.conditioning import resolve_request
        from mriflow.utils.seeding import sample_seed

        if n < 1 or batch_size < 1 or seed < 0:
            raise ValueError(f"n and batch_size must be >= 1 and seed >= 0, got n={n}, batch_size={batch_size}, seed={seed}")
        generator = self.generator
        settings = generator.sampling_settings(solver, steps, guidance)
        values, present = resolve_request(generator.schema, covariates)
        requested = requested_covariates(generator.schema, covariates, values, present)
        samples: list[Sample] = []
        for first in range(0, n, batch_size):
            indices = range(first, min(n, first + batch_size))
            condition = (values.expand(len(indices), -1), present.expand(len(indices), -1)) if len(generator.schema) else None
            with torch.no_grad():
                volumes, maps, nfe = generator.sample_pairs([sample_seed(seed, i) for i in indices], condition, settings)
            for k, index in enumerate(indices):
                sidecar = {"covariates": requested, "seed": seed, "sample_seed": sample_seed(seed, index), "index": index,
                           **settings, "nfe": nfe, "model_id": generator.model_id,
                           "model_checksum": generator.model_checksum, "representation": generator.representation_name,
                           "background": BACKGROUND_RULE, "mriflow_version": __version__}
                samples.append(Sample(_image(volumes[k], generator.affine, np.float32),
                                      None if maps is None else _image(maps[k], generator.affine, np.uint8),
                                      dict(requested), sidecar))
            if progress is not None:
                progress(len(samples), n)
        return samples

    def generate(self, out: str | Path, n: int = 8, **options: Any):
        """The files `mriflow generate` writes (volumes, tissue maps, sidecars, montage.png, generate.json) into `out`;
        `options` are mriflow.generate.generate's (covariates=, seed=, solver=, steps=, batch_size=, cohort=,
        privacy_filter=, ...), and any other keyword is a covariate (age=60). Returns its GenerateResult."""
        from mriflow.generate import generate

        known = {"covariates", "solver", "steps", "guidance", "seed", "batch_size", "device", "privacy_filter",
                 "max_redraws", "progress", "overwrite", "cohort", "trust_paths", "labels", "label_map"}
        covariates = {**options.pop("covariates", {}), **{k: options.pop(k) for k in list(options) if k not in known}}
        return generate(self.generator.path, out, n=n, covariates=covariates or None,
                        device=options.pop("device", self.generator.device), **options)

    def edit(self, volume: np.ndarray | nib.Nifti1Image, source: dict[str, Any], targets: Sequence[dict[str, Any]],
             steps: int = 16, solver: str = "heun", guidance: float = 1.0,
             detail: str = "moved") -> list[nib.Nifti1Image]:
        """A real prepared scan drawn again under each target's covariates by inverting the flow (mriflow.edit);
        `detail="moved"` (the default) keeps the scan's own detail, moved with the edit's deformation
        (mriflow.edit.move_detail), "scan" adds the edit's change to the scan (scan + edit − round trip), "model"
        returns the model's drawing."""
        from mriflow.edit import edit_volume

        array = np.asarray(volume.dataobj, np.float32) if isinstance(volume, nib.Nifti1Image) else np.asarray(volume)
        result = edit_volume(self.generator, array, source, targets, steps=steps, solver=solver, guidance=guidance,
                             detail=detail)
        return [_image(edited, self.generator.affine, np.float32) for edited in result.edited]


def load(model: str | Path = "default", device: str = "auto", labels: str | Path | bool | None = None,
         trust_paths: bool = False) -> Model:
    """A model by a shipped name ("default", "2mm", "4mm"), a training run or checkpoint folder, or an exported model
    folder; `labels` as mriflow.generator.load_generator (None: the model's own tissue maps where it has them)."""
    from mriflow.generator import load_generator

    return Model(load_generator(model, device, trust_paths, labels))


def evaluate(real: str | Path, fake: str | Path, out: str | Path, split: str = "test", **options: Any) -> dict:
    """Real against generated volumes (mriflow.evaluate.generation.evaluate_generation): writes out/report.html,
    report.md and metrics.json and returns metrics.json as a dict."""
    from mriflow.evaluate.generation import evaluate_generation

    return evaluate_generation(real, fake, out, split=split, **options)


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a generated volume (PATH.json beside PATH.nii.gz)."""
    path = Path(path)
    name = path.name.removesuffix(".gz").removesuffix(".nii").removesuffix(".json")
    return json.loads((path.parent / f"{name}.json").read_text())


def _image(array: np.ndarray, affine: np.ndarray, dtype) -> nib.Nifti1Image:
    image = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    image.set_qform(affine, code=4)
    image.set_sform(affine, code=4)
    image.header.set_xyzt_units("mm")
    return image
