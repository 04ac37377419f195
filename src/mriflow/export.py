"""Exporting a trained generator (and a label decoder) into a folder that travels: out/flow,
out/autoencoder and out/labels, fp16 weights, no training state, every file <= 16 MB. This is
how the shipped models (mriflow/weights/<name>) are made.

    >>> export_generator("runs/flow", "release/")   # release/flow + release/autoencoder, fp16, <= 16 MB each
    >>> export_labels("runs/labels", "release/")    # release/labels
    >>> export_generator("runs/flow", "release/", autoencoder="runs/ae-dec")  # with a refined decoder
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from mriflow import checkpoint as ckpt
from mriflow.config import to_dict
from mriflow.families import FAMILIES
from mriflow.generator import AUTOENCODER_DIR, GENERATOR_DIR, LABELS_DIR, autoencoder_folder, latent_sources
from mriflow.utils.text import verb


def export_generator(run: str | Path, out: str | Path, weights_dtype: str = "float16",
                     autoencoder: str | Path | None = None, ema: str = "main",
                     sampling: Mapping[str, Any] | None = None) -> Path:
    """Copy a generator run's latest checkpoint and its autoencoder into out/flow and out/autoencoder.

    `ema`: "main" ships the inference weights (the loop's EMA, loop.ema_decay); "long" the longer EMA the run kept
    beside it (loop.ema_long_decay, from the checkpoint's training state), when its validation figures
    (validation.csv's *_ema_long columns) say it is the better one: the EMA length chosen after training.

    `autoencoder`: ship this one instead of the generator's own, which it must refine: trained with
    `refine_decoder` from the generator's autoencoder, with the same encoder tensor for tensor (so the
    same latents); anything else is refused.

    `sampling`: the exported model's default sampler instead of the run's (e.g. {"solver": "euler", "steps": 1} for a
    few-step student measured best at one step); keys of the family's sampling config, checked as a run's config is.

    Only model.safetensors and checkpoint.json travel (no train_state), weights cast to
    `weights_dtype`; the generator's meta["autoencoder"] then points at "../autoencoder"
    with the new sha256. An image-space generator (the slice model) has no autoencoder: out/flow alone.
    Every file must stay <= 16 MB, else nothing is left behind.
    This is how the shipped models (mriflow/weights/<name>) are made. Returns `out`.
    """
    weights, meta = ckpt.load_checkpoint(run)
    directory = Path(meta.pop("path"))
    if meta.get("stage") not in FAMILIES:
        raise ValueError(f"{directory}: this is a {meta.get('stage')!r} checkpoint, not a generator ({', '.join(FAMILIES)})")
    if ema not in ("main", "long"):
        raise ValueError(f"ema must be 'main' or 'long', got {ema!r}")
    if ema == "long":
        weights = long_ema_weights(directory)
        meta["ema"] = {"kind": "long", "decay": meta["config"]["loop"].get("ema_long_decay")}
    if sampling:
        meta["config"] = default_sampler(meta, directory, sampling)
    image_space = FAMILIES[meta["stage"]].space == "image" or "representation" in meta  # no autoencoder to ship
    autoencoder_dir = None if image_space else autoencoder_folder(meta, directory)
    if autoencoder is not None:
        if image_space:
            raise ValueError(f"{directory}: an image-space {meta['stage']} model has no autoencoder to replace")
        autoencoder_dir = refined_autoencoder(autoencoder, autoencoder_dir)
    out = Path(out)
    targets = [out / GENERATOR_DIR] + ([] if image_space else [out / AUTOENCODER_DIR])
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} already {verb(len(existing), 'exists', 'exist')}; export into an "
                              "empty folder")

    try:
        exported = {
            **meta,
            "model_id": (meta.get("model_id") or f"{ckpt.run_folder(directory).name}-step{meta.get('step', 0)}")
                        + ("-ema-long" if ema == "long" else ""),
            "exported_from": {"path": str(directory), "model_sha256": ckpt.sha256(directory / ckpt.MODEL_FILE)},
        }
        if not image_space:
            autoencoder_weights, autoencoder_meta = ckpt.load_checkpoint(autoencoder_dir)
            if autoencoder is not None:  # the same flow decodes to other volumes: the id says through which decoder
                exported["model_id"] += f"+{ckpt.run_folder(autoencoder_dir).name}-step{autoencoder_meta.get('step', 0)}"
            autoencoder_meta.pop("path")
            autoencoder_meta["exported_from"] = {"path": str(autoencoder_dir),
                                                 "model_sha256": ckpt.sha256(autoencoder_dir / ckpt.MODEL_FILE)}
            ckpt.save_checkpoint(targets[1], autoencoder_weights, travelling_meta(autoencoder_meta),
                                 weights_dtype=weights_dtype)
            exported["autoencoder"] = {**meta["autoencoder"], "path": f"../{AUTOENCODER_DIR}",
                                       "model_sha256": ckpt.sha256(targets[1] / ckpt.MODEL_FILE)}
        ckpt.save_checkpoint(targets[0], weights, travelling_meta(exported), weights_dtype=weights_dtype)
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


def default_sampler(meta: Mapping[str, Any], directory: Path, sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's config with `sampling` merged into its sampler defaults, refused in one line when a key is
    not the family's or a value is invalid (the family's own check included: a few-step student keeps guidance 1)."""
    family_class = FAMILIES[meta["stage"]]
    current = dict(meta["config"].get("sampling") or {})
    known = to_dict(family_class.Config().sampling)
    unknown = sorted(set(sampling) - set(known))
    if unknown:
        raise ValueError(f"{directory}: a {meta['stage']} model's sampler has no {', '.join(unknown)}; "
                         f"its settings: {', '.join(sorted(known))}")
    config = {**meta["config"], "sampling": {**current, **sampling}}
    family = family_class.from_config(config, f"{directory} with the exported sampler")
    family.check_sampling(family.default_sampling())
    return config


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
    shipped = ckpt.sha256(autoencoder / ckpt.MODEL_FILE)
    if meta["autoencoder"]["model_sha256"] not in latent_sources(autoencoder):
        raise ValueError(f"{directory} was trained on the latents of {meta['autoencoder']['path']}, not on {autoencoder} "
                         "(or the weights it was exported from); train it with that autoencoder")
    exported = {**meta, "autoencoder": {**meta["autoencoder"], "path": f"../{AUTOENCODER_DIR}", "model_sha256": shipped},
                "exported_from": {"path": str(directory), "model_sha256": ckpt.sha256(directory / ckpt.MODEL_FILE)}}
    try:
        ckpt.save_checkpoint(target, weights, travelling_meta(exported), weights_dtype=weights_dtype)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def travelling_meta(meta: dict) -> dict:
    """A checkpoint's meta as it ships: without the training state's records (optimizer groups, random states)
    and with the data's preparation record summarised: the subjects' ids instead of their per-subject
    records, the inputs' checksums as one SHA-256 (of their canonical JSON), so a file that travels stays
    a few kB rather than about 350 kB, and the same inputs can still be recognised."""
    out = {k: v for k, v in meta.items() if k not in ("optimizer", "rng")}
    preparation = dict(out.get("preparation") or {})
    if isinstance(preparation.get("subjects"), dict):
        preparation["subjects"] = sorted(preparation["subjects"])
    inputs = preparation.get("inputs")
    if isinstance(inputs, dict) and isinstance(inputs.get("checksums"), dict):
        canonical = json.dumps(inputs["checksums"], sort_keys=True).encode()
        preparation["inputs"] = {**{k: v for k, v in inputs.items() if k != "checksums"},
                                 "checksums_sha256": hashlib.sha256(canonical).hexdigest(),
                                 "files": len(inputs["checksums"])}
    if preparation:
        out["preparation"] = preparation
    return out


def refined_autoencoder(candidate: str | Path, original: Path) -> Path:
    """The checkpoint folder of `candidate` when it is a decoder refinement of the autoencoder checkpoint `original`:
    its record names `original`'s weights (SHA-256) and its encoder tensors equal `original`'s; else ValueError."""
    from mriflow.train.autoencoder import encoder_state

    directory = ckpt.resolve_checkpoint(candidate)
    model, meta = ckpt.load_autoencoder(directory)
    source = meta.get("decoder_refined_from", {})
    expected = ckpt.sha256(original / ckpt.MODEL_FILE)
    if source.get("model_sha256") != expected:
        raise ValueError(f"--autoencoder {candidate}: not a decoder refinement of the generator's autoencoder {original} "
                         "(train it with `mriflow train autoencoder --refine-decoder` from that run); a generator only "
                         "decodes through an autoencoder with its own encoder")
    mine, theirs = encoder_state(model), encoder_state(ckpt.load_autoencoder(original)[0])
    differing = [key for key in theirs if key not in mine or not torch.equal(mine[key], theirs[key])]
    if differing or mine.keys() != theirs.keys():
        raise ValueError(f"--autoencoder {candidate}: its encoder differs from {original}'s "
                         f"({', '.join(differing[:3]) or 'other tensors'}); its latents are not the generator's")
    return directory


def long_ema_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The longer EMA's weights of a checkpoint (its training state's "ema.<network>@long." tensors) under the names
    model.safetensors uses ("<network>."); refused when the run kept none."""
    state = ckpt.load_train_state(directory)
    weights = {f"{key[len('ema.'):].split('@long.', 1)[0]}.{key.split('@long.', 1)[1]}": value
               for key, value in state.items() if key.startswith("ema.") and "@long." in key}
    if not weights:
        raise ValueError(f"{directory}: this run kept no longer EMA (loop.ema_long_decay was 0); export its main EMA")
    return weights
