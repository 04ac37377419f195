"""What a generator run trains on and with which config: posterior samples of an autoencoder's latents or the images in
a fixed representation (with the held-out volumes its validation reads), and the run's config on a fresh start, a
resume or a warm start. Split from mriflow.train.generator, whose `train_generator` reads top to bottom with these.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from mriflow import checkpoint as ckpt
from mriflow.config import from_dict, load_preset
from mriflow.data.dataset import CovariateSchema, PreparedDataset, covariate_columns, read_manifest, read_preparation
from mriflow.families import get_family
from mriflow.latents import LatentDataset
from mriflow.representations import make_representation


def load_config(stage: str, preset: str = "tiny", max_steps: int | None = None) -> Any:
    """The training config (Family.Config) of preset `<stage>-<preset>.yaml` of a generative family ("flow",
    "diffusion", "gan", ...), with the step count replaced when given."""
    config_class = get_family(stage).Config
    config = from_dict(config_class, load_preset(stage, preset), f"{stage}-{preset}.yaml")
    return _override(config, max_steps)


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


class RepresentationSamples(Dataset):
    """The training split's volumes in a fixed representation (mriflow.representations), for a generator without an
    autoencoder: {"latent" (C, d, h, w), "covariates" (K,), "covariates_present" (K,), "flipped" ()}.

    The volumes are read once and held in memory as float16 (2 mm: 120 subjects, 141 MB); each item is encoded when
    it is read (a Haar packet of one 2 mm volume takes milliseconds). With `flip`, an item is mirrored left-right with
    probability 1/2 (torch's generator, which the loop seeds per (seed, epoch, item), so a resume draws the same) and
    says so in "flipped", which the network takes as a condition (model.flip_channel): non-leaky augmentation.
    """

    def __init__(self, volumes: PreparedDataset, representation: Any, flip: bool = False):
        if len(volumes) == 0:
            raise ValueError(f"{volumes.root}: no training subjects in the train split")
        items = [volumes[i] for i in range(len(volumes))]
        self.volumes = torch.stack([item["image"] for item in items]).half()  # (N, 1, D, H, W) in [0, 1]
        self.covariates = torch.stack([item["covariates"] for item in items])
        self.present = torch.stack([item["covariates_present"] for item in items])
        self.subjects = [item["subject"] for item in items]
        self.representation = representation
        self.flip = flip
        self.spatial: torch.Tensor | None = None  # (N, S, d, h, w): each subject's spatial condition, if any

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        volume = self.volumes[index].float()  # (1, D, H, W)
        flipped = bool(self.flip and torch.rand(()).item() < 0.5)
        if flipped:
            volume = volume.flip(1)  # axis 0 of the RAS grid is left-right
        item = {"latent": self.representation.encode(volume[None])[0], "covariates": self.covariates[index],
                "covariates_present": self.present[index], "flipped": torch.tensor(flipped)}
        if self.spatial is not None:
            item["spatial"] = self.spatial[index].flip(1) if flipped else self.spatial[index]
        return item


def run_config(stage: str, config_class: type, data_dir: Path, out: Path, resume: bool, condition: Sequence[str] | None,
               preset: str | None, max_steps: int | None, config: Any | None, max_minutes: float | None,
               lr: float | None, loop_overrides: Mapping[str, Any] | None = None, from_checkpoint: Path | None = None
               ) -> tuple[Any, list[str], CovariateSchema | None, str | None, dict | None]:
    """The config of a generator run (latent or image space) and what a resume keeps: (config, covariate names, the
    run's schema or None, preset, the resumed checkpoint's meta or None). Resuming takes the run's own config and
    schema and refuses another stage or other covariates; a new run takes `config` or the preset (default "tiny") and
    checks the covariates against the manifest. `max_steps`, `max_minutes`, `lr` and `loop_overrides` (other loop
    fields by name, e.g. max_cpu_minutes, checkpoint_minutes) replace the loop's in both. `from_checkpoint` (a warm
    start) is read as the resumed checkpoint when `out` has none."""
    latest = ckpt.latest_checkpoint(out) if resume else None
    latest = latest if latest is not None else from_checkpoint
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
        if preset is not None and preset != saved.get("preset"):
            raise ValueError(f"--preset {preset}: {latest} was trained with "
                             f"{'preset ' + repr(saved.get('preset')) if saved.get('preset') else 'a given config'}; "
                             "drop --preset to continue it, or start a new run (another --out)")
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
    if loop_overrides:
        config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, **loop_overrides))
    return config, names, schema, preset, saved


def representation_name(given: str | None, config: Any, saved: dict | None, autoencoder: str | Path | None,
                         out: Path) -> str:
    """The fixed representation a generator run learns ("" for an autoencoder's latents): the resumed run's, else
    `given`, else the config's (a preset's); refusing another one on resume, both an autoencoder and a representation,
    or neither."""
    if saved is not None:
        recorded = saved.get("representation")
        name = f"haar{recorded['levels']}" if recorded else ""
        if given and given != name:
            raise ValueError(f"--representation {given}: {out} learns {name or 'the latents of an autoencoder'}; "
                             "drop --representation to resume")
    else:
        name = given or getattr(config, "representation", "") or ""
        if name:
            make_representation(name)  # refuses an unknown name before anything is made
    if name and autoencoder is not None:
        raise ValueError(f"--autoencoder with the representation {name}: a generator learns an autoencoder's latents or "
                         "the images behind a fixed transform, not both; drop --autoencoder (or choose a latent preset)")
    if not name and autoencoder is None:
        raise ValueError("pass --autoencoder RUN (learn its latents) or --representation haar2 (learn the images behind "
                         "a fixed wavelet transform, no autoencoder)")
    return name


def band_scaling(given: float | None, config: Any, saved: dict | None, warm: bool, representation: str,
                 out: Path) -> tuple[Any, bool]:
    """(the config with `given` as its band_equalisation where it applies, whether a warm start moves to another
    band scaling). --band-equalisation: in [0, 1], image-space runs only; a new run takes it, a warm start may change
    it (the bands are then refitted, the weights carry over), a resume must keep the run's."""
    if given is None:
        return config, False
    if not 0.0 <= given <= 1.0:
        raise ValueError(f"--band-equalisation {given:g}: choose a value from 0 (natural band energies) to 1 (every "
                         "band at unit sd)")
    if not representation:
        raise ValueError("--band-equalisation scales the bands of an image-space run (--representation haar2); an "
                         "autoencoder's latents have no bands: drop it")
    recorded = None if saved is None else float((saved.get("representation") or {}).get("equalisation", 1.0))
    if recorded is not None and given != recorded and not warm:
        raise ValueError(f"--band-equalisation {given:g}: {out} was trained with band equalisation {recorded:g}; drop "
                         "--band-equalisation to resume")
    if recorded is not None and given == recorded:
        return config, False
    return dataclasses.replace(config, band_equalisation=given), recorded is not None


def validation_volumes(data_dir: Path, schema: CovariateSchema, representation: Any) -> RepresentationSamples | None:
    """The val split's volumes in `representation` for GeneratorStage.validate, or None without a val split."""
    splits = set(read_manifest(data_dir)["split"].dropna())
    if "val" not in splits:
        return None
    return RepresentationSamples(PreparedDataset(data_dir, "val", schema=schema), representation)


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


def geometry(data_dir: Path) -> tuple[dict[str, Any], list[int], list[list[float]]]:
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



def subjects_digest(subjects: Sequence[str]) -> str:
    """SHA-256 of the sorted training subject ids: which data a run learns from, whatever folder it is in."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(map(str, subjects))).encode()).hexdigest()


def check_same_subjects(saved: Mapping[str, Any] | None, subjects: Sequence[str], data_dir: Path, where: str) -> None:
    """Refuse to continue a run (resume or warm start) on other training subjects than it learned from: the
    checkpoint's data record would switch without a word. A run saved before the record is continued as it is."""
    recorded = ((saved or {}).get("data") or {}).get("subjects_sha256")
    if recorded is not None and recorded != subjects_digest(subjects):
        raise ValueError(f"{data_dir}: its {len(subjects)} training subjects are not the ones {where} learned from "
                         f"({saved['data'].get('train_subjects')} subjects of {saved['data'].get('dir')}); continue it "
                         "on that data, or start a new run (another --out)")
