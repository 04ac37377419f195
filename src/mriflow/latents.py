"""Latent cache: each subject's posterior mean and log-variance under a trained autoencoder.

`encode_dataset` encodes every split of a prepared folder once and stores, in
``<run>/latents/<data name>-<hash of prepare.json or manifest.csv>/``::

    <split>.safetensors   "mean" and, for KL, "logvar": (N, C, d, h, w) float32, rows in index order
    index.json            subjects per split, latent shape, kind, latent scale, the checkpoint encoded with

The cache holds the distribution q(z|x) = N(mean, exp(logvar)), not one sampled z, so the
flow stage can draw fresh samples every epoch. The latent scale factor

    latent_scale = 1 / std(z),  Var(z) = Var(mean) + E[exp(logvar)]   (over all training-split elements)

is computed from the cache's own training split and stored in its index.json; an autoencoder
whose checkpoint already records one (older runs, the shipped models) keeps it. Encoding only
reads the autoencoder's files: no stage writes into an earlier stage's output. Each generator
records the scale it was trained with in its own checkpoint, so `generate` never needs a cache. For VQ the cached latent is the continuous pre-quantisation latent and the
log-variance is the constant VQ_LOGVAR (no noise).

    >>> encode_dataset("prepared/", "runs/ae")
    >>> latents = LatentDataset("prepared/", "runs/ae", split="train", covariates=["age", "sex"])
    >>> item = latents[0]                        # latent_mean, latent_logvar, covariates, covariates_present, subject
    >>> z = latents.sample(item["latent_mean"], item["latent_logvar"])   # scaled: (mean + exp(logvar/2) eps) * scale
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mriflow import checkpoint as ckpt
from mriflow.utils.files import DamagedFileError, atomic_path, read_json

VQ_LOGVAR = -30.0  # the floor of the KL log-variance: exp(-15) ~ 3e-7, i.e. deterministic


def latent_cache_dir(data_dir: str | Path, autoencoder_run: str | Path) -> Path:
    """Where the latents of prepared folder `data_dir` under autoencoder run `autoencoder_run` live: in the run, or
    beside the data for an exported or shipped autoencoder (a checkpoint folder outside a run)."""
    data_dir = Path(data_dir)
    record = data_dir / "prepare.json"
    source = record if record.is_file() else data_dir / "manifest.csv"
    if not source.is_file():
        raise FileNotFoundError(f"{data_dir} is not a prepared dataset (no prepare.json or manifest.csv)")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:10]
    checkpoint = ckpt.resolve_checkpoint(autoencoder_run)
    run = ckpt.run_folder(checkpoint)
    if run == checkpoint:
        # a checkpoint folder outside a run: an exported or shipped model, which may be read-only or inside the
        # installed package; its cache lives with the data instead, named by the weights it was encoded with
        weights = ckpt.sha256(checkpoint / ckpt.MODEL_FILE)[:12]
        return data_dir / "latents" / f"autoencoder-{weights}-{digest}"
    return run / "latents" / f"{data_dir.resolve().name}-{digest}"


def read_cache_index(cache: Path) -> dict[str, Any]:
    """index.json of latent cache `cache`; DamagedFileError (a ValueError) names it when it cannot be read."""
    index = read_json(cache / "index.json", advice=_rebuild_advice(cache))
    if not isinstance(index, dict):
        raise DamagedFileError(f"{cache / 'index.json'}: damaged or incomplete (not a JSON object); {_rebuild_advice(cache)}")
    return index


def damaged_splits(cache: Path, index: dict[str, Any]) -> list[str]:
    """The splits of `index` whose file is missing or cannot be opened (cut short by a kill or a full disk)."""
    damaged = []
    for split in index.get("splits", {}):
        try:
            with safe_open(str(cache / f"{split}.safetensors"), framework="pt"):
                pass  # opening checks that the header is whole and that the file holds all the data it declares
        except (SafetensorError, OSError):
            damaged.append(split)
    return damaged


def _rebuild_advice(cache: Path) -> str:
    return (f"the cache is made from the data again: delete the folder {cache}, then run `mriflow encode DATA "
            "--autoencoder RUN` (training a generator on DATA encodes it too)")


def encode_dataset(
    data_dir: str | Path,
    autoencoder_run: str | Path,
    splits: Sequence[str] | None = None,
    batch_size: int = 4,
    device: str = "auto",
) -> Path:
    """Encode every subject of `splits` (default: all in the manifest) and cache mean/log-variance; returns the cache folder."""
    from mriflow.data.dataset import PreparedDataset, read_manifest
    from mriflow.distributed import resolve_device

    device = resolve_device(device)
    model, meta = ckpt.load_autoencoder(autoencoder_run, device)
    checkpoint_dir = Path(meta["path"])
    cache = latent_cache_dir(data_dir, checkpoint_dir)
    available = sorted(read_manifest(data_dir)["split"].dropna().unique())
    splits = list(splits or available)
    model_sha256 = ckpt.sha256(checkpoint_dir / ckpt.MODEL_FILE)
    index: dict[str, Any] = {
        "data": str(Path(data_dir).resolve()),
        "kind": model.config.kind,
        "checkpoint": {"path": str(checkpoint_dir), "step": meta.get("step"), "model_sha256": model_sha256},
        "splits": {},
    }
    cache.mkdir(parents=True, exist_ok=True)
    try:  # keep other splits encoded by the same weights; drop stale and damaged ones (it is only a cache)
        previous = read_cache_index(cache) if (cache / "index.json").is_file() else {}
    except DamagedFileError:
        previous = {}
    if previous.get("checkpoint", {}).get("model_sha256") == model_sha256:
        damaged = damaged_splits(cache, previous)
        index["splits"] = {k: v for k, v in previous["splits"].items() if k not in splits and k not in damaged}
    for file in cache.glob("*.safetensors"):
        if file.stem not in index["splits"] and file.stem not in splits:
            file.unlink()
    statistics = None
    for split in splits:
        dataset = PreparedDataset(data_dir, split)
        means, logvars, subjects = [], [], []
        with torch.no_grad():
            for start in tqdm(range(0, len(dataset), batch_size), desc=f"encode {split}", unit="batch"):
                items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                images = torch.stack([item["image"] for item in items]).to(device)  # (B, 1, D, H, W)
                latent = model.encode(images)
                means.append(latent.mean.float().cpu())
                if latent.logvar is not None:
                    logvars.append(latent.logvar.float().cpu())
                subjects += [item["subject"] for item in items]
        tensors = {"mean": torch.cat(means).contiguous()}  # (N, C, d, h, w)
        if logvars:
            tensors["logvar"] = torch.cat(logvars).contiguous()
        with atomic_path(cache / f"{split}.safetensors") as temporary:
            save_file(tensors, str(temporary))
        index["splits"][split] = subjects
        index["latent_shape"] = list(tensors["mean"].shape[1:])
        if split == "train":
            statistics = latent_statistics(tensors["mean"], tensors.get("logvar"))

    if "latent_scale" in meta:
        scale = float(meta["latent_scale"])  # recorded in the autoencoder's checkpoint (older runs, shipped models)
    elif statistics is not None:
        scale = 1.0 / statistics["std"]  # this cache's training split
    else:
        scale = previous.get("latent_scale") if index["splits"].get("train") else None
    index["latent_scale"] = scale  # None: no training split encoded yet, so no scale to train a generator with
    index["latent_statistics"] = statistics
    ckpt.write_text_atomic(cache / "index.json", json.dumps(index, indent=2))
    return cache


def latent_statistics(mean: torch.Tensor, logvar: torch.Tensor | None) -> dict[str, float]:
    """Mean and std of z ~ N(mean, exp(logvar)) pooled over all elements: Var(z) = Var(mean) + E[exp(logvar)]."""
    mean = mean.double()
    variance = mean.var(unbiased=False)
    if logvar is not None:
        variance = variance + torch.exp(logvar.double()).mean()
    return {"mean": float(mean.mean()), "std": float(math.sqrt(float(variance)))}


class LatentDataset(Dataset):
    """Cached latents of one split with the subjects' encoded covariates.

    Item: {"latent_mean": (C, d, h, w), "latent_logvar": (C, d, h, w), "covariates": (K,) float32,
    "covariates_present": (K,) bool, "subject": str}. Covariates are encoded as by PreparedDataset
    (schema fitted on the training split unless `schema` is given). `scale` is the autoencoder's
    latent scale factor.
    """

    def __init__(
        self,
        data_dir: str | Path,
        autoencoder_run: str | Path,
        split: str = "train",
        covariates: Sequence[str] | None = None,
        schema=None,
    ):
        from mriflow.data.dataset import PreparedDataset

        self.cache = latent_cache_dir(data_dir, autoencoder_run)
        index_file = self.cache / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.cache}: no cached latents; run `mriflow encode {data_dir} --autoencoder {autoencoder_run}`")
        self.index = read_cache_index(self.cache)
        checkpoint_dir = ckpt.resolve_checkpoint(autoencoder_run)
        if ckpt.sha256(checkpoint_dir / ckpt.MODEL_FILE) != self.index["checkpoint"]["model_sha256"]:
            raise ValueError(
                f"{self.cache}: latents were encoded with {self.index['checkpoint']['path']} (step "
                f"{self.index['checkpoint']['step']}), not with {checkpoint_dir}; run `mriflow encode` again"
            )
        if split not in self.index["splits"]:
            raise ValueError(f"{self.cache}: split {split!r} was not encoded; encoded: {', '.join(self.index['splits'])}")
        if self.index.get("latent_scale") is None:
            raise ValueError(f"{self.cache}: no latent scale (the training split was not encoded); run `mriflow encode "
                             f"{data_dir} --autoencoder {autoencoder_run}` with the train split")
        self.scale = float(self.index["latent_scale"])
        self.kind = self.index["kind"]
        file = self.cache / f"{split}.safetensors"
        try:
            tensors = load_file(str(file))
        except SafetensorError as error:  # its own message names no file
            raise DamagedFileError(f"{file}: damaged or incomplete latent cache ({error}); "
                                   f"{_rebuild_advice(self.cache)}") from None
        self.mean = tensors["mean"]  # (N, C, d, h, w)
        self.logvar = tensors.get("logvar")
        prepared = PreparedDataset(data_dir, split, covariates=covariates, schema=schema)
        self.schema = prepared.schema
        rows = {str(row["subject"]): row for row in prepared.rows.to_dict("records")}
        self.subjects = list(self.index["splits"][split])
        missing = [s for s in self.subjects if s not in rows]
        if missing:
            raise ValueError(f"{self.cache}: subjects {missing[:3]} are no longer in {data_dir}/manifest.csv; encode again")
        self.rows = [rows[s] for s in self.subjects]

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, index: int) -> dict[str, Any]:
        mean = self.mean[index]
        logvar = self.logvar[index] if self.logvar is not None else torch.full_like(mean, VQ_LOGVAR)
        values, present = self.schema.encode(self.rows[index])
        return {"latent_mean": mean, "latent_logvar": logvar, "covariates": values,
                "covariates_present": present, "subject": self.subjects[index]}

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z * scale with z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): a scaled latent for the flow."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return (mean + torch.exp(0.5 * logvar) * noise) * self.scale
