"""Decoder refinement (`mriflow train autoencoder --refine-decoder RUN`): the decoder of an existing autoencoder
trained further, or a new one (`--decoder-channels`, `--decoder-attention off`: lighter and faster) started from the
source's decoder blocks that fit it (warm_start_decoder) and from scratch elsewhere, with the encoder frozen
so that the latents stay bit for bit the source's and every generator trained on them decodes through the new decoder
(`mriflow export --autoencoder`). `--distill W` makes the new decoder learn the source decoder's output too.
Split from mriflow.train.autoencoder, which runs it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mriflow import checkpoint as ckpt
from mriflow.config import from_dict
from mriflow.train.autoencoder import AutoencoderStage, AutoencoderTrainingConfig, encoder_modules, load_config

REFINE_STEPS = 2000


def refinement(source_run: str | Path, max_steps: int | None, lr: float | None,
                decoder: Mapping[str, Any] | None = None, distill: float = 0.0
                ) -> tuple[dict[str, Any], AutoencoderTrainingConfig, str | None]:
    """(record of the source, the refinement's config, the source's preset) for `refine_decoder`. `decoder`: a new
    decoder's sizes (model fields decoder_channels, decoder_num_res_blocks, decoder_latent_attention): it starts
    from the source's blocks that fit it (`load_source`), elsewhere from scratch, at its preset's learning rate, the
    critics from half-way (it must reconstruct before it is judged).
    `distill` > 0: it also learns the source decoder's output for the same latent at this weight, without critics (the
    source's sharpness is in that target already)."""
    directory = ckpt.resolve_checkpoint(source_run)  # a clear error when it is neither a run nor a checkpoint
    _, saved = ckpt.load_checkpoint(directory)
    if saved.get("stage") != "autoencoder":
        raise ValueError(f"--refine-decoder {source_run}: a {saved.get('stage')!r} checkpoint, not an autoencoder's")
    config = from_dict(AutoencoderTrainingConfig, saved["config"], str(directory))
    if config.model.kind != "kl":
        raise ValueError(f"--refine-decoder {source_run}: a {config.model.kind} autoencoder; only kl ones can be refined "
                         "(a VQ codebook moves with its running averages while the decoder trains, and the latents with it)")
    steps = max_steps or REFINE_STEPS
    try:
        model = dataclasses.replace(config.model, **dict(decoder or {}))
    except (TypeError, ValueError) as error:
        raise ValueError(f"--refine-decoder {source_run}: {error}") from None
    fresh = model.decoder_levels != config.model.decoder_levels  # another architecture: warm where it fits
    config = dataclasses.replace(
        config,
        model=model,
        decoder_only=True,
        # a refined decoder already reconstructs: critics from step 0; a new one learns to first; a distilled one
        # learns its source's output, critics and all
        loss=dataclasses.replace(config.loss, adversarial_start=steps // 2 if fresh else 0, distill_weight=distill,
                                 **({"volume_critic": False, "slice_critic": False} if distill > 0 else {})),
        loop=dataclasses.replace(config.loop, max_steps=steps, lr=lr or (fresh_lr(saved, config) if fresh else config.loop.lr / 5),
                                 warmup_steps=min(config.loop.warmup_steps, 100),
                                 max_minutes=0.0),  # not the source's wall budget (--max-minutes sets one)
    )
    record = {"path": str(directory.resolve()), "model_sha256": ckpt.sha256(directory / ckpt.MODEL_FILE),
              "step": saved.get("step"), **({"new_decoder": True} if fresh else {})}
    return record, config, saved.get("preset")


def fresh_lr(saved: Mapping[str, Any], config: AutoencoderTrainingConfig) -> float:
    """A new decoder's learning rate: its preset's (a refined source ran at a fifth of it), else the source's."""
    try:
        return load_config(saved["preset"]).loop.lr if saved.get("preset") else config.loop.lr
    except (FileNotFoundError, ValueError):
        return config.loop.lr


def load_source(stage: AutoencoderStage, directory: Path, decoder_too: bool = True) -> dict[str, int] | None:
    """The source's exported (EMA) autoencoder weights, and its critics when its training state holds them; without
    `decoder_too` the encoder side and the latent convolutions, and of the decoder what fits a new one
    (warm_start_decoder: {"copied", "of"} tensors, returned)."""
    weights, _ = ckpt.load_checkpoint(directory)
    autoencoder = stage.networks["autoencoder"]
    warm = None
    if decoder_too:
        ckpt.load_weights_into(autoencoder, weights, "autoencoder.", str(directory / ckpt.MODEL_FILE))
    else:
        for name, module in {**encoder_modules(autoencoder), "post_quant_conv": autoencoder.post_quant_conv}.items():
            ckpt.load_weights_into(module, weights, f"autoencoder.{name}.", str(directory / ckpt.MODEL_FILE))
        warm = warm_start_decoder(autoencoder.decoder, weights)
    if (directory / ckpt.TRAIN_STATE_FILE).is_file():
        state = ckpt.load_train_state(directory)
        for name in stage.critics:
            prefix = f"network.{name}."
            if any(key.startswith(prefix) for key in state):
                ckpt.load_weights_into(stage.networks[name], state, prefix, str(directory / ckpt.TRAIN_STATE_FILE))
    return warm


LATENT_ATTENTION_BLOCKS = (1, 2, 3)  # MONAI's Decoder with_nonlocal_attn: residual, attention, residual after conv_in


def warm_start_decoder(decoder: nn.Module, weights: Mapping[str, torch.Tensor],
                       prefix: str = "autoencoder.decoder.blocks.") -> dict[str, int]:
    """Copy into a new MONAI decoder each block of the source decoder's (`weights`) whose tensors it has by the same
    names and shapes, pairing blocks in order once either side's latent attention section is set aside: a decoder
    without latent attention but the source's channels starts as the source's decoder less that section, one with
    other channels from scratch. {"copied": tensors copied, "of": the new decoder's tensors}."""
    source: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            source.setdefault(int(index), {})[rest] = value

    def attention_at_two(keys) -> bool:
        return any(key.startswith("attn.") for key in keys)

    target = {index: block for index, block in enumerate(decoder.blocks) if block.state_dict()}
    skip_source = LATENT_ATTENTION_BLOCKS if attention_at_two(source.get(2, {})) else ()
    skip_target = LATENT_ATTENTION_BLOCKS if attention_at_two(target[2].state_dict() if 2 in target else {}) else ()
    if skip_source and skip_target:  # both have it: pair it too
        skip_source = skip_target = ()
    pairs = zip([i for i in sorted(target) if i not in skip_target], [i for i in sorted(source) if i not in skip_source])
    copied = 0
    for new_index, old_index in pairs:
        block, tensors = target[new_index], source[old_index]
        own = block.state_dict()
        if set(own) == set(tensors) and all(own[k].shape == tensors[k].shape for k in own):
            block.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
            copied += len(own)
    return {"copied": copied, "of": len(decoder.state_dict())}
