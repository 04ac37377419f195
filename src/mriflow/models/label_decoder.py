"""A label decoder: the tissue segmentation of a latent, so every generated volume comes with its label map.

Image and labels are generated together: the latent generator draws one latent z, the autoencoder's
decoder paints the image from it and this decoder, a second head on the same latent, paints the
labels. It has the autoencoder decoder's body (MONAI's AutoencoderKL `Decoder`, same levels, same
cheap first level) with one output channel per class instead of one intensity::

    z (B, C, d, h, w), unscaled as the autoencoder decodes it
      -> conv1x1 -> Decoder(out_channels = patch_size^3 * K) -> [depth-to-space]  ->  logits (B, K, D, H, W)

Why a second decoder rather than label channels through the whole autoencoder and generator: the
trained autoencoder, its latent cache and every generator trained on it stay as they are (no stage
writes into another's files), the label decoder trains in minutes on the cached posteriors of the
prepared label maps, and any generator of that autoencoder (flow, diffusion, a later family) gets
labels without retraining. It starts from the image decoder's weights (`from_autoencoder`), so it
begins from the features that paint the image it must segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets.autoencoderkl import Decoder
from monai.networks.utils import pixelshuffle
from torch import nn

from mriflow.data.labels import TISSUE_CLASSES, class_indices
from mriflow.models.autoencoder import AutoencoderConfig, _conv1x1


@dataclass(frozen=True)
class LabelDecoderConfig:
    """The body (the autoencoder's model config, as a dict of AutoencoderConfig fields) and the classes."""

    autoencoder: dict
    classes: tuple[str, ...] = TISSUE_CLASSES

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError(f"label decoder: need at least two classes, got {list(self.classes)}")


class LabelDecoder(nn.Module):
    """Latent -> class logits on the image grid; see the module docstring."""

    def __init__(self, config: LabelDecoderConfig):
        super().__init__()
        self.config = config
        body = AutoencoderConfig(**{**config.autoencoder, "channels": tuple(config.autoencoder["channels"]),
                                    "num_res_blocks": tuple(config.autoencoder["num_res_blocks"]),
                                    "attention_levels": tuple(config.autoencoder["attention_levels"])})
        self.body = body
        self.post_quant_conv = _conv1x1(body.latent_channels)
        self.decoder = Decoder(
            spatial_dims=3, channels=body.channels, in_channels=body.latent_channels,
            out_channels=body.patch_size**3 * len(config.classes), num_res_blocks=body.num_res_blocks,
            norm_num_groups=body.norm_num_groups, norm_eps=1e-6, attention_levels=body.attention_levels,
            with_nonlocal_attn=body.latent_attention, include_fc=True, use_flash_attention=True,
        )

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config.classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, d, h, w) -> logits (B, K, D, H, W)."""
        h = self.decoder(self.post_quant_conv(z))
        if self.body.patch_size > 1:
            h = pixelshuffle(h, 3, self.body.patch_size)
        return h

    @torch.no_grad()
    def segment(self, z: torch.Tensor) -> torch.Tensor:
        """z -> class indices (B, D, H, W), uint8."""
        return class_indices(self(z))

    @classmethod
    def from_autoencoder(cls, autoencoder: nn.Module, classes: tuple[str, ...] = TISSUE_CLASSES) -> "LabelDecoder":
        """A label decoder with the body of `autoencoder` (an `Autoencoder`), initialised from its decoder's weights:
        every tensor but the output convolution's, which has K times the channels and starts as K copies of the
        image's output weights, so each class starts from the image's last features."""
        from dataclasses import asdict

        config = asdict(autoencoder.config)
        decoder = cls(LabelDecoderConfig(autoencoder=config, classes=tuple(classes)))
        own = decoder.state_dict()
        source = {f"decoder.{k}": v for k, v in autoencoder.decoder.state_dict().items()}
        source.update({f"post_quant_conv.{k}": v for k, v in autoencoder.post_quant_conv.state_dict().items()})
        for name, tensor in source.items():
            if name in own and own[name].shape == tensor.shape:
                own[name] = tensor.clone()
            elif name in own and own[name].shape[0] == tensor.shape[0] * len(classes):
                # output conv: pixelshuffle reads channel c * p^3 + offset, so repeat per class block
                own[name] = tensor.repeat(len(classes), *([1] * (tensor.ndim - 1))).clone()
        decoder.load_state_dict(own)
        return decoder
