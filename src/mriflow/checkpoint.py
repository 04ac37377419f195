"""Checkpoints: safetensors weights plus one JSON file, written atomically; no pickled objects.

A checkpoint is a folder::

    model.safetensors        inference weights (the EMA networks), flat names such as
                             "autoencoder.encoder.blocks.0.conv.weight"; float32, or float16/bfloat16
                             to keep a file that travels under 16 MB. Its safetensors header
                             holds the model config as JSON, so the file describes itself.
    train_state.safetensors  everything needed to resume: raw networks, EMA copies, optimizer
                             moments, random-generator states (optional; never needed to use a model)
    checkpoint.json          config, step, preparation record (prepare.json), versions, latent scale ...

A training run keeps its checkpoints in ``RUN/checkpoints/step-XXXXXXXX/``; the folder is
written under a temporary name and renamed, so a crash never leaves a half checkpoint under
a real name (the next run of the loop removes the temporary one), and the latest complete one
is simply the highest step.

    >>> save_checkpoint("run/checkpoints/step-00000100", {"autoencoder.weight": w}, {"step": 100, "config": {...}})
    >>> weights, meta = load_checkpoint("run")            # a run folder resolves to its latest checkpoint
    >>> model, meta = load_autoencoder("run")              # builds the model from meta["config"], strictly
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mriflow.utils.files import TEMPORARY_PREFIX, permissions, sha256, write_text_atomic  # noqa: F401  (part of this module's interface)

FORMAT = "mriflow-checkpoint/1"
MODEL_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
META_FILE = "checkpoint.json"
CHECKPOINTS_DIR = "checkpoints"
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_TRAVELLING_BYTES = 16_000_000  # a weight file that ships with a release or travels stays under 16 MB


class CheckpointMismatchError(ValueError):
    """The config stored with a checkpoint does not build a model that matches its weights."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file cannot be parsed: cut short (a copy, download or write that stopped) or overwritten."""


def versions() -> dict[str, str]:
    """Versions of the software that wrote a file, for the record."""
    import monai
    import numpy
    import safetensors

    from mriflow import __version__

    return {
        "mriflow": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "safetensors": getattr(safetensors, "__version__", "unknown"),
        "python": platform.python_version(),
    }


def save_checkpoint(
    directory: str | Path,
    weights: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    train_state: Mapping[str, torch.Tensor] | None = None,
    weights_dtype: str = "float32",
) -> Path:
    """Write a checkpoint folder atomically (temporary folder, then rename).

    `weights` (flat names) go to model.safetensors, floating-point tensors cast to
    `weights_dtype` ("float32" | "float16" | "bfloat16"); `train_state` (optional) to
    train_state.safetensors in full precision; `meta` (JSON-serialisable) to checkpoint.json,
    completed with "format", "weights_dtype" and "versions". An existing folder of the same
    name is replaced only after the new one is complete.
    """
    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weights_dtype!r}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, **dict(meta), "weights_dtype": weights_dtype}
    meta.setdefault("versions", versions())
    header = {"format": FORMAT, "config": json.dumps(meta.get("config", {}), sort_keys=True)}
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f"{TEMPORARY_PREFIX}{directory.name}-"))
    try:
        cast = WEIGHT_DTYPES[weights_dtype]
        with _writing(directory / MODEL_FILE):
            save_file(
                {k: _plain(v.to(cast) if v.is_floating_point() else v) for k, v in weights.items()},
                str(staging / MODEL_FILE),
                metadata=header,
            )
            canonical_header(staging / MODEL_FILE)
        if train_state is not None:
            with _writing(directory / TRAIN_STATE_FILE):
                save_file({k: _plain(v) for k, v in train_state.items()}, str(staging / TRAIN_STATE_FILE))
        meta["checksums"] = {file.name: sha256(file) for file in (staging / MODEL_FILE, staging / TRAIN_STATE_FILE)
                             if file.is_file()}  # verified on every load: a changed weight file is refused
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default))
        size = (staging / MODEL_FILE).stat().st_size
        if size > MAX_TRAVELLING_BYTES:
            print(f"{directory / MODEL_FILE}: {size / 1e6:.1f} MB, over the {MAX_TRAVELLING_BYTES / 1e6:.0f} MB limit for "
                  "weights that travel; save it as float16 (loop.weights_dtype) or use fewer channels")
        for file in staging.iterdir():
            file.chmod(permissions(0o666))
        staging.chmod(permissions(0o777))  # mkdtemp makes 0700; a checkpoint is as readable as any other output
        _replace_folder(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder resolved to its latest complete checkpoint."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(
            f"{path}: no checkpoint found (expected {META_FILE} here or {CHECKPOINTS_DIR}/step-*/ below); "
            "pass a training run folder or one of its checkpoint folders"
        )
    return latest


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in RUN/checkpoints/, or None."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob("step-*") if (p / META_FILE).is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def remove_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Clear what a kill during a write leaves in a run; returns the paths removed.

    A staging folder of save_checkpoint (RUN/checkpoints/.tmp-*) or a temporary file of
    write_text_atomic (RUN/.tmp-*) is never complete: removed. A checkpoint moved aside to be
    replaced (.old-NAME-PID) is complete: put back as NAME when NAME is missing, else removed.
    Call it only while no other process writes into the run (rank 0, before training starts).
    """
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINTS_DIR
    removed = []
    for path in sorted(folder.glob(".old-*")):
        original = folder / path.name[len(".old-"):].rsplit("-", 1)[0]
        if not original.exists():
            os.replace(path, original)
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in sorted([*folder.glob(f"{TEMPORARY_PREFIX}*"), *run_dir.glob(f"{TEMPORARY_PREFIX}*")]):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def run_folder(checkpoint: str | Path) -> Path:
    """The training run a checkpoint folder belongs to (the folder itself when it is not in RUN/checkpoints/)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else checkpoint


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(inference weights, meta) of a checkpoint folder or of a run's latest checkpoint."""
    directory = resolve_checkpoint(path)
    meta = _read_meta(directory / META_FILE)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / META_FILE}: format {meta.get('format')!r} is not {FORMAT!r}")
    meta["path"] = str(directory)
    verify_checksum(directory / MODEL_FILE, meta)
    with _parsing(directory / MODEL_FILE):
        return load_file(str(directory / MODEL_FILE)), meta


def load_train_state(path: str | Path) -> dict[str, torch.Tensor]:
    directory = resolve_checkpoint(path)
    file = directory / TRAIN_STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; this checkpoint holds inference weights only and cannot be resumed")
    verify_checksum(file, _read_meta(directory / META_FILE))
    with _parsing(file):
        return load_file(str(file))


def verify_checksum(file: Path, meta: Mapping[str, Any]) -> None:
    """Refuse a weight file whose SHA-256 differs from the one its checkpoint.json recorded when it was saved (a file
    changed, damaged or swapped since); a checkpoint written before checksums were recorded is read as it is."""
    recorded = (meta.get("checksums") or {}).get(file.name)
    if recorded is None:
        return
    actual = sha256(file)
    if actual != recorded:
        raise DamagedCheckpointError(
            f"{file}: damaged or changed since it was saved (SHA-256 {actual[:12]}…, {file.parent / META_FILE} recorded "
            f"{recorded[:12]}…); copy the checkpoint folder again from where it came from, or use another checkpoint")


def canonical_header(file: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys (padded with spaces to 8 bytes, as the format
    allows), so the same tensors and metadata always give the same bytes and SHA-256: the writer orders the
    metadata by hash, which differs between processes."""
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    file.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + length:])


def weights_config(path: str | Path) -> dict[str, Any]:
    """The config stored in the safetensors header of model.safetensors (what the weights were made with)."""
    file = Path(path) / MODEL_FILE
    with _parsing(file):
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
        return json.loads(header.get("config", "{}"))


def update_meta(path: str | Path, values: Mapping[str, Any]) -> dict[str, Any]:
    """Add or replace keys of checkpoint.json atomically; returns the new meta."""
    directory = resolve_checkpoint(path)
    file = directory / META_FILE
    meta = _read_meta(file)
    meta.update(values)
    write_text_atomic(file, json.dumps(meta, indent=2, sort_keys=True, default=_json_default))
    return meta


def load_weights_into(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], prefix: str, where: str) -> None:
    """Load `weights[prefix + key]` into `module`, refusing any missing, unexpected or mis-shaped tensor.

    The message names every differing tensor with both shapes, so a config edit that changes
    an architecture (e.g. latent_channels) is caught before a silently wrong model is used.
    """
    own = module.state_dict()
    theirs = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    problems = [f"tensor {prefix}{k} is missing from the weights" for k in own if k not in theirs]
    problems += [f"tensor {prefix}{k} is in the weights but not in the model" for k in theirs if k not in own]
    problems += [
        f"tensor {prefix}{k}: weights have shape {tuple(theirs[k].shape)}, config builds {tuple(v.shape)}"
        for k, v in own.items() if k in theirs and theirs[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise CheckpointMismatchError(f"{where}: the config does not match the weights: {shown}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in theirs.items()})


def config_differences(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Field-by-field differences between two nested config dicts, as 'field: a != b' lines."""
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        out = []
        for key in sorted(set(expected) | set(actual), key=str):
            name = f"{where}.{key}" if where else str(key)
            if key not in expected or key not in actual:
                out.append(f"{name}: only in {'the weights' if key in actual else 'the checkpoint config'}")
            else:
                out += config_differences(expected[key], actual[key], name)
        return out
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        expected, actual = list(expected), list(actual)
    return [] if expected == actual else [f"{where}: {expected!r} in the checkpoint config, {actual!r} in the weights"]


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu"):
    """(Autoencoder in eval mode, meta) from a checkpoint folder or a run's latest checkpoint.

    The model is built from ``meta["config"]["model"]``. It is refused, with the differing
    fields and tensors named, when that config differs from the one stored in the weights
    file's header or builds tensors of other shapes than the weights hold.
    """
    from mriflow.models.autoencoder import Autoencoder, AutoencoderConfig
    from mriflow.config import from_dict

    weights, meta = load_checkpoint(path)
    directory = Path(meta["path"])
    if meta.get("stage") != "autoencoder":
        raise ValueError(f"{directory}: this is a {meta.get('stage')!r} checkpoint, not an autoencoder one")
    model_config = meta["config"]["model"]
    stored = weights_config(directory).get("model")
    if stored is not None:
        differences = config_differences(model_config, stored, "model")
        if differences:
            raise CheckpointMismatchError(
                f"{directory / META_FILE}: the model config differs from the one the weights were saved with: "
                + "; ".join(differences) + ". Restore the config or retrain."
            )
    model = Autoencoder(from_dict(AutoencoderConfig, model_config, "model"))
    load_weights_into(model, weights, "autoencoder.", str(directory / MODEL_FILE))
    return model.to(device).eval(), meta


def load_label_decoder(path: str | Path, device: str | torch.device = "cpu"):
    """(LabelDecoder in eval mode, meta) from a label-stage checkpoint folder or run (`mriflow train labels`).
    meta["autoencoder"] names the autoencoder whose latents it segments (path and sha256)."""
    from mriflow.models.label_decoder import LabelDecoder, LabelDecoderConfig

    weights, meta = load_checkpoint(path)
    directory = Path(meta["path"])
    if meta.get("stage") != "labels":
        raise ValueError(f"{directory}: this is a {meta.get('stage')!r} checkpoint, not a label decoder "
                         "(`mriflow train labels`)")
    model = meta["config"]["model"]
    model = LabelDecoder(LabelDecoderConfig(autoencoder=dict(model["autoencoder"]), classes=tuple(model["classes"])))
    load_weights_into(model, weights, "labels.", str(directory / MODEL_FILE))
    return model.to(device).eval(), meta


def _read_meta(file: Path) -> dict[str, Any]:
    with _parsing(file):
        return json.loads(file.read_text())


@contextlib.contextmanager
def _parsing(file: Path) -> Iterator[None]:
    """Name `file` when it cannot be parsed; the parsers' own messages name no file."""
    try:
        yield
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedCheckpointError(
            f"{file}: damaged or incomplete ({error}); copy the checkpoint folder again from where it came from, "
            "or use another checkpoint (a run keeps its recent ones in RUN/checkpoints/)"
        ) from None


@contextlib.contextmanager
def _writing(file: Path) -> Iterator[None]:
    """An operating system's refusal while safetensors writes `file` (its error is a SafetensorError whose text holds
    "Os { code: 28, ... }") as the OSError it is, naming the file: one line with advice at the command line."""
    try:
        yield
    except SafetensorError as error:
        match = re.search(r"code: (\d+)", str(error))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(file)) from None
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or os.strerror(error.errno or 0), str(file)) from None


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors needs contiguous CPU tensors that share no memory with each other.
    return tensor.detach().to("cpu").contiguous().clone()


def _replace_folder(staging: Path, directory: Path) -> None:
    if not directory.exists():
        os.replace(staging, directory)
        return
    # A folder cannot be renamed over a non-empty one: move the old one aside first.
    old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
    os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"checkpoint meta: {type(value).__name__} is not JSON-serialisable")
