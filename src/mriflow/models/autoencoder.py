"""3D autoencoders for brain MRI: a KL-regularised VAE and a VQ-VAE behind one interface.

Both kinds share one convolutional body, MONAI's AutoencoderKL encoder and decoder
(`monai.networks.nets.autoencoderkl.Encoder/Decoder`: per level `num_res_blocks` residual
blocks with GroupNorm + SiLU, stride-2 convolutions between levels, optional attention),
and differ only in the bottleneck::

    x in [0, 1], (B, 1, D, H, W)  ->  2x - 1  ->  [space-to-depth by patch_size]  ->  encoder  ->  h
    KL:  mean = conv1x1(h),  logvar = clamp(conv1x1(h), -30, 20),  z = mean + exp(logvar / 2) * eps
    VQ:  z_e = conv1x1(h) (pre-quantisation latent), z_q = nearest codebook vector of z_e, with the
         straight-through estimator z_e + (z_q - z_e).detach(), an EMA-updated codebook and the
         commitment loss beta * ||z_e - sg(z_q)||^2 (MONAI's EMAQuantizer)
    decode(z) -> decoder -> [depth-to-space] -> (y + 1) / 2

What MONAI lacks and is written here: the cheap first level (``patch_size`` 2 folds each
2x2x2 block of voxels into 8 channels before the first convolution and unfolds the output,
so no convolution runs at full resolution: 5-7x the CPU throughput of a full-resolution
first level at 4 mm), the VQ bottleneck on the AutoencoderKL body, per-block gradient
checkpointing (MONAI checkpoints only the whole encoder/decoder), and the one interface:

    >>> model = Autoencoder(AutoencoderConfig(kind="kl", channels=(32, 64), latent_channels=4, patch_size=2))
    >>> latent = model.encode(x)                    # LatentDistribution(mean, logvar); VQ: logvar is None
    >>> image = model.decode(latent.sample())       # (B, 1, D, H, W), nominally [0, 1], not clamped
    >>> model.reconstruct(x)                        # decode(encode(x).mean)

The downsampling factor per axis is ``patch_size * 2 ** (len(channels) - 1)`` (2, 4 or 8).
For latent flow training with VQ, the continuous pre-quantisation latent z_e is used;
`decode` quantises it first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.vector_quantizer import EMAQuantizer
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from monai.networks.utils import pixelshuffle, pixelunshuffle
from torch import nn
from torch.utils.checkpoint import checkpoint

KINDS = ("kl", "vq")
DOWNSAMPLING_FACTORS = (2, 4, 8)
LOGVAR_RANGE = (-30.0, 20.0)
DECODER_UPSAMPLING = ("interpolate", "deconv")


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of the autoencoder; stored in every checkpoint and rebuilt from it."""

    kind: str = "kl"  # "kl" (diagonal Gaussian posterior) | "vq" (EMA codebook)
    patch_size: int = 1  # 1 or 2: space-to-depth before the first convolution (cheap first level)
    channels: tuple[int, ...] = (32, 64, 128)  # per level; a stride-2 step between consecutive levels
    num_res_blocks: tuple[int, ...] = (1, 2, 2)
    attention_levels: tuple[bool, ...] = (False, False, False)
    latent_attention: bool = True  # non-local attention block at the deepest level (encoder and decoder)
    latent_channels: int = 4
    norm_num_groups: int = 8
    num_embeddings: int = 512  # VQ codebook size
    commitment_cost: float = 0.25  # VQ beta
    codebook_decay: float = 0.99  # VQ EMA decay of the codebook
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (1 mm)
    # A decoder of its own size (empty / None: the encoder's): a lighter decoder trained for the same encoder, so the
    # same latents decode faster (`mriflow train autoencoder --refine-decoder RUN --decoder-channels 16,32`)
    decoder_channels: tuple[int, ...] = ()
    decoder_num_res_blocks: tuple[int, ...] = ()
    decoder_latent_attention: bool | None = None
    # How the decoder goes up a level: "interpolate" (nearest x2, then a 3^3 convolution at the finer level: MONAI's
    # default) or "deconv" (a stride-2 transposed 2^3 convolution: 1/27 of its multiply-adds; at 2 mm that convolution
    # was 44 % of the decoder's). A decoder's own choice, like its channels: a refined decoder learns it afresh.
    decoder_upsample: str = "interpolate"

    def __post_init__(self) -> None:
        levels = len(self.channels)
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.patch_size not in (1, 2):
            raise ValueError(f"model.patch_size must be 1 or 2, got {self.patch_size}")
        if levels < 1 or len(self.num_res_blocks) != levels or len(self.attention_levels) != levels:
            raise ValueError(
                f"model.channels, model.num_res_blocks and model.attention_levels need one entry per level; "
                f"got {len(self.channels)}, {len(self.num_res_blocks)} and {len(self.attention_levels)}"
            )
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"model.channels {self.channels} must all be multiples of norm_num_groups={self.norm_num_groups}")
        if self.downsampling_factor not in DOWNSAMPLING_FACTORS:
            raise ValueError(
                f"model: patch_size * 2**(len(channels) - 1) = {self.downsampling_factor}; it must be one of "
                f"{DOWNSAMPLING_FACTORS} (add or remove a level in model.channels)"
            )
        if self.latent_channels < 1:
            raise ValueError(f"model.latent_channels must be >= 1, got {self.latent_channels}")
        if len(self.decoder_levels[0]) != levels or len(self.decoder_levels[1]) != levels:
            raise ValueError(f"model.decoder_channels and model.decoder_num_res_blocks need one entry per level ({levels}, "
                             f"as model.channels) or none; got {len(self.decoder_channels)} and "
                             f"{len(self.decoder_num_res_blocks)}")
        if self.decoder_upsample not in DECODER_UPSAMPLING:
            raise ValueError(f"model.decoder_upsample must be one of {', '.join(DECODER_UPSAMPLING)}, "
                             f"got {self.decoder_upsample!r}")
        if any(c < 1 or c % self.norm_num_groups for c in self.decoder_levels[0]):
            raise ValueError(f"model.decoder_channels {self.decoder_channels} must all be positive multiples of "
                             f"norm_num_groups={self.norm_num_groups}")

    @property
    def decoder_levels(self) -> tuple[tuple[int, ...], tuple[int, ...], bool, str]:
        """(channels, residual blocks per level, latent attention, upsampling) of the decoder: its own, else the
        encoder's."""
        return (tuple(self.decoder_channels) or tuple(self.channels),
                tuple(self.decoder_num_res_blocks) or tuple(self.num_res_blocks),
                self.latent_attention if self.decoder_latent_attention is None else self.decoder_latent_attention,
                self.decoder_upsample)

    @property
    def downsampling_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channels) - 1)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        """(C, d, h, w) of the latent of an image of spatial shape (D, H, W)."""
        factor = self.downsampling_factor
        if any(n % factor for n in image_shape):
            raise ValueError(
                f"image shape {tuple(image_shape)} is not divisible by the autoencoder's downsampling factor {factor}; "
                "choose a factor that divides every axis (4mm grid 40x48x40: 2, 4 or 8)"
            )
        return (self.latent_channels, *(n // factor for n in image_shape))


class LatentDistribution(NamedTuple):
    """Diagonal Gaussian q(z|x) = N(mean, exp(logvar)); for VQ, `mean` is the pre-quantisation latent and logvar None."""

    mean: torch.Tensor  # (B, C, d, h, w)
    logvar: torch.Tensor | None

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I); the mean itself when deterministic."""
        if self.logvar is None:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise


class AutoencoderOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, 1, D, H, W), nominally [0, 1]
    latent: LatentDistribution
    quantization_loss: torch.Tensor  # VQ commitment loss; 0 for KL
    codebook_indices: torch.Tensor | None  # VQ code of each latent position, (B, d, h, w)
    sample: torch.Tensor | None = None  # the latent the reconstruction was decoded from (sampled, quantised)


class Autoencoder(nn.Module):
    """KL or VQ autoencoder; see the module docstring for the architecture and the formulas."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        inner_channels = config.patch_size**3  # channels after space-to-depth
        levels = dict(
            spatial_dims=3,
            channels=config.channels,
            num_res_blocks=config.num_res_blocks,
            norm_num_groups=config.norm_num_groups,
            norm_eps=1e-6,
            attention_levels=config.attention_levels,
            with_nonlocal_attn=config.latent_attention,
            include_fc=True,
            use_flash_attention=True,  # PyTorch's scaled_dot_product_attention: same weights, less memory
        )
        self.encoder = Encoder(in_channels=inner_channels, out_channels=config.latent_channels, **levels)
        decoder_channels, decoder_blocks, decoder_attention, decoder_upsample = config.decoder_levels
        self.decoder = Decoder(in_channels=config.latent_channels, out_channels=inner_channels,
                               **{**levels, "channels": decoder_channels, "num_res_blocks": decoder_blocks,
                                  "with_nonlocal_attn": decoder_attention,
                                  "use_convtranspose": decoder_upsample == "deconv"})
        if config.kind == "kl":
            self.quant_conv_mean = _conv1x1(config.latent_channels)
            self.quant_conv_logvar = _conv1x1(config.latent_channels)
            self.quantizer = None
        else:
            self.quant_conv_mean = _conv1x1(config.latent_channels)
            self.quant_conv_logvar = None
            self.quantizer = EMAQuantizer(
                spatial_dims=3,
                num_embeddings=config.num_embeddings,
                embedding_dim=config.latent_channels,
                commitment_cost=config.commitment_cost,
                decay=config.codebook_decay,
                embedding_init="kaiming_uniform",
                ddp_sync=True,  # codebook statistics are summed over processes under DDP
            )
        self.post_quant_conv = _conv1x1(config.latent_channels)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output convolution (where the adaptive adversarial weight is measured)."""
        return self.decoder.blocks[-1].conv.weight

    def encode(self, x: torch.Tensor) -> LatentDistribution:
        """x (B, 1, D, H, W) in [0, 1] -> q(z|x): (mean, logvar) for KL, (pre-quantisation latent, None) for VQ."""
        h = 2.0 * x - 1.0
        if self.config.patch_size > 1:
            h = pixelunshuffle(h, 3, self.config.patch_size)  # (B, p^3, D/p, H/p, W/p)
        h = self._run(self.encoder.blocks, h)
        mean = self.quant_conv_mean(h)  # (B, C, d, h, w)
        if self.quant_conv_logvar is None:
            return LatentDistribution(mean, None)
        logvar = torch.clamp(self.quant_conv_logvar(h), *LOGVAR_RANGE)
        return LatentDistribution(mean, logvar)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(z_q with straight-through gradient, commitment loss, codes) for VQ; (z, 0, None) for KL."""
        if self.quantizer is None:
            return z, z.new_zeros(()), None
        quantized, loss, indices = self.quantizer(z)
        return quantized, loss, indices

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, d, h, w) -> image (B, 1, D, H, W), nominally [0, 1]; VQ latents are quantised first."""
        z, _, _ = self.quantize(z)
        return self._decode_quantized(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x).mean): the deterministic reconstruction, not clamped."""
        return self.decode(self.encode(x).mean)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> AutoencoderOutput:
        """The training pass: encode, sample (KL) or quantise (VQ), decode."""
        latent = self.encode(x)
        z = latent.sample() if sample_posterior else latent.mean
        z, quantization_loss, indices = self.quantize(z)
        return AutoencoderOutput(self._decode_quantized(z), latent, quantization_loss, indices, z)

    def _decode_quantized(self, z: torch.Tensor) -> torch.Tensor:
        h = self._run(self.decoder.blocks, self.post_quant_conv(z))
        if self.config.patch_size > 1:
            h = pixelshuffle(h, 3, self.config.patch_size)  # (B, 1, D, H, W)
        return 0.5 * (h + 1.0)

    def _run(self, blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.config.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return h


def _conv1x1(channels: int) -> Convolution:
    return Convolution(spatial_dims=3, in_channels=channels, out_channels=channels, strides=1, kernel_size=1,
                       padding=0, conv_only=True)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
