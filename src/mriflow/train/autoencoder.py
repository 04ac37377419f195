"""Stage 1: train the 3D autoencoder (KL-VAE-GAN or VQ-GAN) on a prepared dataset.

The generator's loss, per micro-batch (x real in [0, 1], x_hat its reconstruction):

    L_G = w_l1 * L1 + w_p * perceptual + (w_kl * KL  |  w_q * commitment)
          + [step >= adversarial_start] * (w_adv * lambda * (L_G,volume + L_G,slices) + w_fm * feature matching)

with lambda the adaptive weight measured at the decoder's last layer (see mriflow.models.losses).
The critics (a 3D patch critic on volumes and a 2D one on random slices) learn only from
`adversarial_start` on, in fp32, from the same batch with x_hat detached.

    >>> train_autoencoder("prepared/", "runs/ae", kind="kl", preset="tiny")
    >>> train_autoencoder("prepared/", "runs/ae", resume=True)              # continue the latest checkpoint
    >>> train_autoencoder("prepared/", "runs/ae-dec", refine_decoder="runs/ae")  # sharper decoder, same latents

`refine_decoder` starts from another run's weights (and its critics when it has them) and trains the
decoder only, with the critics on from the first step: the encoder, and so every latent, stays
bit for bit the source's, so a generator trained on the source's latents decodes through the refined
decoder unchanged (`mriflow.export.export_generator(..., autoencoder=)`). It is how the CPU recipe
buys reconstruction quality without retraining the generator (cf. the fine-tuned decoders of
Stable Diffusion's autoencoder).

Under `torchrun --nproc_per_node N` the same call trains with DDP (batch_size is per process).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mriflow import checkpoint as ckpt
from mriflow.config import from_dict, load_preset, to_dict
from mriflow.models.autoencoder import Autoencoder, AutoencoderConfig
from mriflow.models.discriminators import (
    DiscriminatorConfig,
    random_slices,
    slice_discriminator,
    take_slices,
    volume_discriminator,
)
from mriflow.models.losses import (
    ADVERSARIAL_LOSSES,
    adaptive_weight,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    kl_divergence,
    load_perceptual_network,
)
from mriflow import distributed
from mriflow.train import loop
from mriflow.utils.seeding import seed_everything
from mriflow.distributed import unwrap
from mriflow.train.loop import LoopConfig

PRESETS = ("tiny", "small", "base", "large")


@dataclass(frozen=True)
class AutoencoderLossConfig:
    l1_weight: float = 1.0
    kl_weight: float = 1e-6  # KL is summed over latent elements (see kl_divergence)
    quantization_weight: float = 1.0  # VQ commitment loss
    adversarial: str = "hinge"  # "hinge" | "least_squares"
    adversarial_weight: float = 0.1  # multiplies the adaptive weight lambda
    adversarial_start: int = 5000  # step from which the critics learn and the generator sees them
    adaptive_weight_max: float = 1e4
    volume_critic: bool = True  # 3D patch critic on whole volumes
    slice_critic: bool = True  # 2D patch critic on random slices
    feature_matching_weight: float = 0.0
    perceptual_weight: float = 0.0
    perceptual_weights_file: str = ""  # local MedicalNet weights file; empty or absent -> no perceptual loss
    perceptual_sha256: str = ""  # expected sha256 of that file (checked when given)
    perceptual_depth: int = 10  # MedicalNet ResNet depth: 10, 18, 34 or 50
    critic_lr: float = 2e-4
    critic_betas: tuple[float, float] = (0.5, 0.9)
    critic: DiscriminatorConfig = DiscriminatorConfig()
    # L1 to the output of the refinement source's own decoder for the same latent (a new, lighter decoder learns the
    # one it replaces: a deterministic target, where the real image behind a lossy latent is not); 0: off
    distill_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.distill_weight < 0:
            raise ValueError(f"loss.distill_weight must be >= 0, got {self.distill_weight}")
        if self.adversarial not in ADVERSARIAL_LOSSES:
            raise ValueError(f"loss.adversarial must be one of {', '.join(ADVERSARIAL_LOSSES)}, got {self.adversarial!r}")


@dataclass(frozen=True)
class AutoencoderTrainingConfig:
    model: AutoencoderConfig = AutoencoderConfig()
    loss: AutoencoderLossConfig = AutoencoderLossConfig()
    loop: LoopConfig = LoopConfig()
    augment: bool = True  # left-right flips and intensity jitter (PreparedDataset)
    # Train on random crops of this (D, H, W) instead of whole volumes: the network is fully
    # convolutional, so it is applied to whole volumes afterwards (the CPU recipe for 2 mm).
    crop_size: tuple[int, int, int] | None = None
    # Train the decoder only (the encoder and its latent layers frozen): see `refine_decoder`.
    decoder_only: bool = False

    def __post_init__(self) -> None:
        if self.crop_size is not None:
            factor = self.model.downsampling_factor
            if len(self.crop_size) != 3 or any(n < factor or n % factor for n in self.crop_size):
                raise ValueError(f"crop_size {list(self.crop_size)} must be three sizes divisible by the "
                                 f"autoencoder's downsampling factor {factor}")


def load_config(preset: str = "tiny", kind: str | None = None, max_steps: int | None = None) -> AutoencoderTrainingConfig:
    """The preset `autoencoder-<preset>.yaml`, with the kind and step count replaced when given."""
    config = from_dict(AutoencoderTrainingConfig, load_preset("autoencoder", preset), f"autoencoder-{preset}.yaml")
    return _override(config, kind, max_steps)


class AutoencoderStage:
    """The autoencoder as a `loop.Stage`: phases "generator" then "critic" (see the module docstring)."""

    def __init__(self, config: AutoencoderTrainingConfig, perceptual: nn.Module | None = None,
                 teacher: Autoencoder | None = None):
        self.config = config
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None  # loss.distill_weight
        loss = config.loss
        autoencoder = Autoencoder(config.model)
        if config.decoder_only:
            for module in encoder_modules(autoencoder).values():
                module.requires_grad_(False)  # left out of the optimiser: the latent space cannot move
        self.networks: dict[str, nn.Module] = {"autoencoder": autoencoder}
        if loss.volume_critic:
            self.networks["volume_critic"] = volume_discriminator(loss.critic)
        if loss.slice_critic:
            self.networks["slice_critic"] = slice_discriminator(loss.critic)
        self.critics = [name for name in ("volume_critic", "slice_critic") if name in self.networks]
        trained = [p for p in autoencoder.parameters() if p.requires_grad]
        self.phases: dict[str, list[dict[str, Any]]] = {"generator": [{"params": trained}]}
        if self.critics:
            critic_parameters = [p for name in self.critics for p in self.networks[name].parameters()]
            self.phases["critic"] = [{"params": critic_parameters, "lr": loss.critic_lr, "betas": loss.critic_betas}]
        self.ema_networks = ("autoencoder",)
        regulariser = "kl" if config.model.kind == "kl" else "quantization"
        self.metric_names = (
            "generator_loss", "l1", regulariser, *(("codebook_perplexity",) if regulariser == "quantization" else ()),
            "perceptual", "adversarial", "adaptive_weight", "feature_matching", "critic_loss", "critic_real", "critic_fake",
            *(("distill",) if teacher is not None else ()),
        )
        self.perceptual = perceptual
        self._fake: torch.Tensor | None = None  # the generator phase's reconstruction, for the critic phase
        self._slices: tuple[int, torch.Tensor] | None = None

    def adversarial_active(self, step: int) -> bool:
        return bool(self.critics) and step >= self.config.loss.adversarial_start

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        if phase == "generator":
            return self._generator_loss(batch["image"], step)
        if not self.adversarial_active(step):
            return None
        return self._critic_loss(batch["image"])

    def _generator_loss(self, real: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights = self.config.loss
        output = self.networks["autoencoder"](real)
        fake = output.reconstruction.float()  # (B, 1, D, H, W)
        l1 = F.l1_loss(fake, real)
        reconstruction_loss = weights.l1_weight * l1
        metrics = {"l1": l1.detach()}
        if self.perceptual is not None and weights.perceptual_weight > 0:
            with torch.autocast(real.device.type, enabled=False):
                perceptual = self.perceptual(real, fake)
            reconstruction_loss = reconstruction_loss + weights.perceptual_weight * perceptual
            metrics["perceptual"] = perceptual.detach()
        if self.teacher is not None and weights.distill_weight > 0:
            with torch.no_grad():
                target = self.teacher.decode(output.sample).float()
            distill = F.l1_loss(fake, target)
            reconstruction_loss = reconstruction_loss + weights.distill_weight * distill
            metrics["distill"] = distill.detach()
        if output.latent.logvar is not None:
            kl = kl_divergence(output.latent.mean, output.latent.logvar)
            total = reconstruction_loss + weights.kl_weight * kl
            metrics["kl"] = kl.detach()
        else:
            total = reconstruction_loss + weights.quantization_weight * output.quantization_loss.float()
            metrics["quantization"] = output.quantization_loss.detach()
            metrics["codebook_perplexity"] = _perplexity(output.codebook_indices, self.config.model.num_embeddings)

        if self.adversarial_active(step):
            with torch.autocast(real.device.type, enabled=False):  # critics and their losses in fp32
                self._slices = random_slices(real.shape, weights.critic.num_slices, weights.critic.slice_range)
                adversarial, matching = fake.new_zeros(()), fake.new_zeros(())
                for name in self.critics:
                    critic = unwrap(self.networks[name])  # frozen in this phase: no DDP synchronisation needed
                    fake_features = critic(self._critic_input(name, fake))
                    adversarial = adversarial + generator_loss(weights.adversarial, fake_features[-1])
                    if weights.feature_matching_weight > 0:
                        with torch.no_grad():
                            real_features = critic(self._critic_input(name, real))
                        matching = matching + feature_matching_loss(real_features, fake_features)
                weight = adaptive_weight(reconstruction_loss, adversarial, unwrap(self.networks["autoencoder"]).last_layer,
                                         weights.adaptive_weight_max)
                total = total + weights.adversarial_weight * weight * adversarial
                total = total + weights.feature_matching_weight * matching
            metrics.update(adversarial=adversarial.detach(), adaptive_weight=weight)
            if weights.feature_matching_weight > 0:
                metrics["feature_matching"] = matching.detach()
        self._fake = fake.detach()
        metrics["generator_loss"] = total.detach()
        return total, metrics

    def _critic_loss(self, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kind = self.config.loss.adversarial
        if self._fake is None or self._fake.shape != real.shape:
            raise RuntimeError("the critic phase needs the generator phase's output on the same batch; run it first")
        with torch.autocast(real.device.type, enabled=False):
            total, real_mean, fake_mean = real.new_zeros(()), real.new_zeros(()), real.new_zeros(())
            for name in self.critics:
                critic = self.networks[name]
                real_logits = critic(self._critic_input(name, real))[-1]
                fake_logits = critic(self._critic_input(name, self._fake))[-1]
                total = total + discriminator_loss(kind, real_logits, fake_logits)
                real_mean = real_mean + real_logits.detach().mean() / len(self.critics)
                fake_mean = fake_mean + fake_logits.detach().mean() / len(self.critics)
        return total, {"critic_loss": total.detach(), "critic_real": real_mean, "critic_fake": fake_mean}

    def _critic_input(self, name: str, volume: torch.Tensor) -> torch.Tensor:
        volume = 2.0 * volume.float() - 1.0  # critics see [-1, 1]
        if name == "slice_critic":
            axis, index = self._slices
            return take_slices(volume, axis, index)
        return volume

    @torch.no_grad()
    def montage(self, batch: dict, networks: dict[str, nn.Module]) -> dict[str, np.ndarray]:
        real = batch["image"][:1].float()
        reconstruction = networks["autoencoder"].reconstruct(real).float().clamp(0, 1)
        return {
            "real": real[0, 0].cpu().numpy(),
            "reconstruction": reconstruction[0, 0].cpu().numpy(),
            "|difference| x4": (4 * (reconstruction - real).abs()).clamp(0, 1)[0, 0].cpu().numpy(),
        }


def train_autoencoder(
    data_dir: str | Path,
    out: str | Path,
    kind: str | None = None,
    preset: str | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    config: AutoencoderTrainingConfig | None = None,
    stop_at_step: int | None = None,
    max_minutes: float | None = None,
    lr: float | None = None,
    refine_decoder: str | Path | None = None,
    decoder: Mapping[str, Any] | None = None,
    loop_overrides: Mapping[str, Any] | None = None,
    distill: float = 0.0,
) -> dict[str, Any]:
    """Train an autoencoder on the training split of prepared folder `data_dir` into run folder `out`.

    The config is the preset (default "tiny"), or `config` when given, with `kind` ("kl" | "vq"),
    `max_steps`, `max_minutes` (a wall-clock budget; the run stops with a checkpoint) and `lr` (the peak
    learning rate) replaced when given. With `resume`, the run's own config is used (only `max_steps`,
    `max_minutes` and `lr` may change). `refine_decoder`: an autoencoder run or checkpoint whose decoder
    to train further, its encoder frozen (see mriflow.train.refinement; default REFINE_STEPS steps at a fifth
    of its learning rate). `decoder`: with `refine_decoder`, a new decoder of these sizes for the same encoder
    ({"decoder_channels": (16, 32), "decoder_num_res_blocks": (1, 2), "decoder_latent_attention": False}: a lighter,
    faster one), trained from scratch; `distill` > 0: learning the source decoder's output too (at this weight, critics
    off). `loop_overrides`: loop fields (max_cpu_minutes, checkpoint_minutes) to replace.
    Returns {"step", "metrics", "checkpoint"}.
    """
    from mriflow.data.dataset import PreparedDataset, read_preparation

    data_dir, out = Path(data_dir), Path(out)
    latest = ckpt.latest_checkpoint(out) if resume else None
    source: dict[str, Any] | None = None
    if latest is not None:
        _, saved = ckpt.load_checkpoint(latest)
        config = _override(from_dict(AutoencoderTrainingConfig, saved["config"], str(latest)), None, max_steps)
        if kind is not None and kind != config.model.kind:
            raise ValueError(f"--kind {kind} differs from the run's kind {config.model.kind!r} in {out}; drop --kind to resume")
        preset = saved.get("preset")
        source = saved.get("decoder_refined_from")
    elif refine_decoder is not None:
        if kind is not None or config is not None:
            raise ValueError("--refine-decoder takes the source run's autoencoder and config; drop --kind")
        from mriflow.train.refinement import refinement

        source, config, preset = refinement(refine_decoder, max_steps, lr, decoder, distill)
    else:
        if decoder or distill:
            raise ValueError("--decoder-channels, --decoder-res-blocks and --distill train a decoder for an existing "
                             "encoder: pass --refine-decoder RUN")
        if config is None:
            config = load_config(preset or "tiny", kind, max_steps)
            preset = preset or "tiny"
        else:
            config = _override(config, kind, max_steps)

    if max_minutes is not None:
        config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, max_minutes=max_minutes))
    if lr is not None:
        config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, lr=lr))
    if loop_overrides:
        config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, **{
            key: value for key, value in loop_overrides.items() if value is not None}))
    preparation = read_preparation(data_dir)
    joined_group = torch.distributed.is_initialized()  # a caller's own process group is left alone
    context = distributed.setup(config.loop.device)
    dataset = PreparedDataset(data_dir, "train", augment=config.augment, crop_size=config.crop_size)
    image_shape = tuple(PreparedDataset(data_dir, "train")[0]["image"].shape[1:])
    latent_shape = config.model.latent_shape(image_shape)  # refuses a grid the factor does not divide

    perceptual, perceptual_record = _perceptual(config.loss, context.device)
    seed_everything(config.loop.seed)  # identical initial weights in every process
    teacher = None
    if config.loss.distill_weight > 0:
        if source is None:
            raise ValueError("--distill learns the decoder of the autoencoder being refined: pass --refine-decoder RUN")
        teacher = ckpt.load_autoencoder(Path(source["path"]), context.device)[0]
    stage = AutoencoderStage(config, perceptual, teacher)
    if source is not None and latest is None:
        from mriflow.train.refinement import load_source

        warm = load_source(stage, Path(source["path"]), decoder_too=not source.get("new_decoder"))
        if warm is not None:  # a new decoder: how much of it starts as the source's
            source = {**source, "decoder_warm_start": warm}
    meta = {
        "stage": "autoencoder",
        "preset": preset,
        "config": to_dict(config),
        "preparation": preparation,
        "data": {"dir": str(data_dir.resolve()), "name": data_dir.name, "train_subjects": len(dataset)},
        "image_shape": list(image_shape),
        "latent_shape": list(latent_shape),
        "downsampling_factor": config.model.downsampling_factor,
        "parameters": sum(p.numel() for p in stage.networks["autoencoder"].parameters()),
        "perceptual": perceptual_record,
        **({"decoder_refined_from": source} if source is not None else {}),
    }
    try:
        return loop.train(stage, dataset, config.loop, out, meta, resume=resume, context=context, stop_at_step=stop_at_step)
    finally:
        if not joined_group:
            distributed.teardown()


ENCODER_PARTS = ("encoder", "quant_conv_mean", "quant_conv_logvar", "quantizer")  # what makes the latent


def encoder_modules(autoencoder: Autoencoder) -> dict[str, nn.Module]:
    """The modules that make the latent by name: encoder, latent convolutions and VQ codebook (the decoder is the rest)."""
    return {name: getattr(autoencoder, name) for name in ENCODER_PARTS if getattr(autoencoder, name) is not None}


def encoder_state(autoencoder: Autoencoder) -> dict[str, torch.Tensor]:
    """The encoder side's tensors by name (fp32, CPU): what two autoencoders must share to share latents."""
    return {f"{prefix}.{key}": value.detach().float().cpu()
            for prefix, module in encoder_modules(autoencoder).items() for key, value in module.state_dict().items()}


def _override(config: AutoencoderTrainingConfig, kind: str | None, max_steps: int | None) -> AutoencoderTrainingConfig:
    if kind is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, kind=kind))
    if max_steps is not None:
        config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, max_steps=max_steps))
    return config


def _perceptual(loss: AutoencoderLossConfig, device: torch.device) -> tuple[nn.Module | None, dict[str, Any]]:
    """The perceptual network when its local weights file exists and its weight is > 0; else None (recorded why)."""
    if loss.perceptual_weight <= 0 or not loss.perceptual_weights_file:
        return None, {"active": False, "reason": "no perceptual weights configured"}
    path = Path(loss.perceptual_weights_file).expanduser()
    if not path.is_file():
        print(f"perceptual weights {path} not found; training without the perceptual loss")
        return None, {"active": False, "reason": f"{path} not found"}
    network, digest = load_perceptual_network(path, loss.perceptual_depth, loss.perceptual_sha256)
    return network.to(device), {"active": True, "path": str(path), "sha256": digest, "depth": loss.perceptual_depth}


def _perplexity(indices: torch.Tensor | None, num_embeddings: int) -> torch.Tensor:
    """exp(entropy) of the codebook usage in a batch: how many codes are effectively used."""
    if indices is None:
        return torch.tensor(0.0)
    probabilities = torch.bincount(indices.flatten(), minlength=num_embeddings).float() / indices.numel()
    return torch.exp(-(probabilities * torch.log(probabilities + 1e-10)).sum()).detach()
