"""What writes each generated sample's tissue map: a label decoder of the generator's autoencoder (reads the latent),
else the grid's shipped anatomy network (reads the decoded volume), else nothing. Split from mriflow.generator, which
loads a generator and asks `load_labels` for its tissue maps.

    >>> labels, labels_meta = load_labels(None, checkpoint_dir, meta, device, image_shape, autoencoder_dir)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mriflow import checkpoint as ckpt

LABELS_DIR = "labels"  # the label decoder's folder in an exported model (beside flow/ and autoencoder/)


class AnatomySegmenter:
    """Tissue maps of generated volumes by mriflow's shipped anatomy network of their grid: what a model without a
    label decoder delivers beside each sample (`labels="anatomy"`, or by default). The map segments the image itself,
    where a label decoder's is read from the same latent; classes are the anatomy network's (TISSUE_CLASSES)."""

    def __init__(self, weights: Path, device: torch.device):
        from mriflow.evaluate.backbones.anatomy import AnatomyBackbone

        self.backbone = AnatomyBackbone(weights, device=str(device))
        self.classes = tuple(self.backbone.config.classes)

    def segment_volumes(self, volumes: np.ndarray) -> np.ndarray:
        """Volumes (B, D, H, W) in [0, 1] -> class indices (B, D, H, W) uint8."""
        return self.backbone.segment(np.asarray(volumes, np.float32)[:, None]).numpy().astype(np.uint8)


def _anatomy_segmenter(image_shape: Sequence[int], device: torch.device) -> tuple[AnatomySegmenter | None, dict | None]:
    from mriflow.evaluate.backbones import anatomy_weights_for

    weights = anatomy_weights_for(image_shape)
    if weights is None:
        return None, None
    segmenter = AnatomySegmenter(weights, device)
    return segmenter, {"source": "anatomy", "path": str(weights), "classes": list(segmenter.classes),
                       "checksum": "sha256:" + segmenter.backbone.weights_sha256}


def latent_sources(autoencoder_dir: Path) -> set[str]:
    """The SHA-256s of the autoencoder weights whose latents the autoencoder checkpoint `autoencoder_dir` makes: its
    own, those it was exported from and those whose decoder it refines (same encoder). A label decoder trained on
    any of them reads its latents."""
    _, meta = ckpt.load_checkpoint(autoencoder_dir)
    recorded = (meta.get("exported_from", {}).get("model_sha256"), meta.get("decoder_refined_from", {}).get("model_sha256"))
    return {ckpt.sha256(Path(autoencoder_dir) / ckpt.MODEL_FILE), *filter(None, recorded)}


def load_labels(labels: str | Path | bool | None, directory: Path, meta: Mapping[str, Any], device: torch.device,
                 image_shape: Sequence[int], autoencoder_dir: Path | None,
                 ) -> tuple[torch.nn.Module | AnatomySegmenter | None, dict[str, Any] | None]:
    """What writes each sample's tissue map. `labels`: a label decoder run (refused unless it segments the latents of
    the generator's autoencoder `autoencoder_dir`, see `latent_sources`); "anatomy": the grid's shipped anatomy network on the
    decoded volume; None: the model's own label decoder (labels/ of an exported model), else the grid's anatomy
    network, else none; False: none. An image-space generator has no latents to decode labels from."""
    if labels is False:
        return None, None
    if str(labels) == "anatomy" and not Path(str(labels)).exists():
        segmenter, segmenter_meta = _anatomy_segmenter(image_shape, device)
        if segmenter is None:
            raise FileNotFoundError(f"--labels anatomy: mriflow ships no anatomy network for the grid "
                                    f"{' x '.join(map(str, image_shape))} of {directory}; pass a label decoder run")
        return segmenter, segmenter_meta
    if "autoencoder" not in meta:
        if labels is None:
            return _anatomy_segmenter(image_shape, device)
        raise ValueError(f"--labels: the {meta['stage']} model {directory} works in image space; a label decoder "
                         "reads an autoencoder's latents, which it has none of (use --labels anatomy or drop --labels)")
    if labels is None or labels is True:
        own = directory.parent / LABELS_DIR
        if "exported_from" not in meta or not (own / ckpt.META_FILE).is_file():
            if labels is True:
                raise FileNotFoundError(f"{directory}: this model has no label decoder ({own} is absent); train one with "
                                        "`mriflow train labels DATA --autoencoder AE --out RUN` and pass --labels RUN")
            return _anatomy_segmenter(image_shape, device)
        labels = own
    elif not Path(labels).exists():
        raise FileNotFoundError(f"--labels {labels}: no such label decoder run or checkpoint folder")
    decoder, labels_meta = ckpt.load_label_decoder(labels, device)
    label_dir = Path(labels_meta["path"])
    recorded = labels_meta["autoencoder"]
    if recorded["model_sha256"] not in latent_sources(autoencoder_dir):
        raise ValueError(f"{label_dir}: this label decoder was trained on the latents of {recorded['path']} (sha256 "
                         f"{recorded['model_sha256'][:12]}…), not on the generator's autoencoder (sha256 "
                         f"{meta['autoencoder']['model_sha256'][:12]}…); train one with --autoencoder set to the generator's")
    labels_meta = {**labels_meta, "source": "decoder", "checksum": "sha256:" + ckpt.sha256(label_dir / ckpt.MODEL_FILE)}
    return decoder, labels_meta
