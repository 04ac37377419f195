"""Exporting a trained generator (and a label decoder) into a folder that travels: out/flow,
out/autoencoder and out/labels, fp16 weights, no training state, every file <= 16 MB. This is
how the shipped models (mriflow/weights/<name>) are made.

    >>> export_generator("runs/flow", "release/")   # release/flow + release/autoencoder, fp16, <= 16 MB each
    >>> export_labels("runs/labels", "release/")    # release/labels
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mriflow import checkpoint as ckpt
from mriflow.families import FAMILIES
from mriflow.generator import AUTOENCODER_DIR, GENERATOR_DIR, LABELS_DIR, autoencoder_folder


def export_generator(run: str | Path, out: str | Path, weights_dtype: str = "float16") -> Path:
    """Copy a generator run's latest checkpoint and its autoencoder into out/flow and out/autoencoder.

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
    image_space = FAMILIES[meta["stage"]].space == "image"
    autoencoder_dir = None if image_space else autoencoder_folder(meta, directory)
    out = Path(out)
    targets = [out / GENERATOR_DIR] + ([] if image_space else [out / AUTOENCODER_DIR])
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); export into an empty folder")

    try:
        exported = {
            **meta,
            "model_id": meta.get("model_id") or f"{ckpt.run_folder(directory).name}-step{meta.get('step', 0)}",
            "exported_from": {"path": str(directory), "model_sha256": ckpt.sha256(directory / ckpt.MODEL_FILE)},
        }
        if not image_space:
            autoencoder_weights, autoencoder_meta = ckpt.load_checkpoint(autoencoder_dir)
            autoencoder_meta.pop("path")
            autoencoder_meta["exported_from"] = {"path": str(autoencoder_dir),
                                                 "model_sha256": meta["autoencoder"]["model_sha256"]}
            ckpt.save_checkpoint(targets[1], autoencoder_weights, autoencoder_meta, weights_dtype=weights_dtype)
            exported["autoencoder"] = {**meta["autoencoder"], "path": f"../{AUTOENCODER_DIR}",
                                       "model_sha256": ckpt.sha256(targets[1] / ckpt.MODEL_FILE)}
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
