"""The network of the generators: v(x, t, c) for the flow, ε or v for the diffusion baseline.

MONAI's DiffusionModelUNet (ResNet blocks, self-attention at the coarse levels,
sinusoidal time embedding) with the covariate embedding added to its time
embedding. One class serves both stages; only `time_scale` differs (the flow's
t ∈ [0, 1] is multiplied by 1000 so its sinusoidal features span the same range
as the diffusion timesteps 0…999). `spatial_dims` is 3 for the latent generators and 2 for the
slice model (mriflow.families.slices: axial image slices, the slice position as a spatial channel).

    >>> config = VelocityNetConfig(in_channels=4).with_schema(schema)
    >>> velocity_net = VelocityNet(config)
    >>> v = velocity_net(x_t, t, covariates, covariates_present)   # x_t (B, 4, D, H, W), t (B,)
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mriflow.models.conditioning import CovariateEmbedding
from mriflow.utils.text import counted

# fp16 weights of at most this many parameters fit the 16 MB limit on one weight file.
MAX_PARAMETERS = 8_000_000
BACKBONES = ("unet", "dit")


@dataclass(frozen=True)
class VelocityNetConfig:
    """Architecture of VelocityNet. The default has 6.9 M parameters (13.8 MB in fp16)."""

    in_channels: int = 4
    channels: tuple[int, ...] = (32, 64, 96)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 2
    num_head_channels: int = 32
    norm_num_groups: int = 16
    time_scale: float = 1000.0  # 1000 for the flow's t in [0, 1]; 1 for diffusion timesteps
    covariate_names: tuple[str, ...] = ()
    covariate_kinds: tuple[str, ...] = ()
    covariate_categories: tuple[int, ...] = ()  # number of categories; 0 for a continuous covariate
    covariate_drop_prob: float = 0.15
    spatial_channels: int = 0  # channels of a spatial condition on the latent grid (e.g. tissue fractions of a label
                               # map), concatenated to x: the generator then draws a scan that matches it
    backbone: str = "unet"  # "unet" (MONAI DiffusionModelUNet) | "dit" (mriflow.models.dit, a 3D diffusion transformer)
    dit_patch_size: int = 2  # DiT only: latent patch side; tokens = latent voxels / patch^3
    dit_hidden: int = 128
    dit_depth: int = 6
    dit_heads: int = 4
    spatial_dims: int = 3  # 3: volumes (B, C, D, H, W); 2: slices (B, C, H, W) (the U-Net only; the slice model)
    flip_channel: bool = False  # non-leaky left-right flip augmentation: one more input channel, 1 where the training
                                # volume was flipped, 0 otherwise and always 0 when sampling (`flipped` of forward)
    align_block: int = 0  # with align_channels: the U-Net down block whose features (before its downsampling) a
    align_channels: int = 0  # projection head maps to a teacher's align_channels (mriflow.train.alignment); 0: none

    def with_schema(self, schema) -> "VelocityNetConfig":
        """This config conditioned on the covariates of a mriflow.data.dataset.CovariateSchema."""
        return dataclasses.replace(
            self,
            covariate_names=tuple(schema.names),
            covariate_kinds=tuple(c.kind for c in schema.covariates),
            covariate_categories=tuple(len(c.categories) if c.kind == "categorical" else 0 for c in schema.covariates),
        )


class VelocityNet(nn.Module):
    """f(x (B, C, D, H, W), t (B,) or scalar, covariates (B, K), covariates_present (B, K)) -> (B, C, D, H, W);
    x (B, C, H, W) with spatial_dims = 2.

    Any spatial size works: the input is zero-padded at the far end of each spatial axis to a
    multiple of 2^(levels − 1), and the output is cropped back. With covariates None
    (or K = 0) every covariate is absent.
    """

    def __init__(self, config: VelocityNetConfig = VelocityNetConfig()):
        super().__init__()
        if importlib.util.find_spec("einops") is None:
            raise ImportError("VelocityNet needs einops for MONAI's attention blocks: pip install einops")
        from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

        lengths = {len(config.covariate_names), len(config.covariate_kinds), len(config.covariate_categories)}
        if len(lengths) != 1:
            raise ValueError("covariate_names, covariate_kinds and covariate_categories must have the same length")
        if config.backbone == "unet" and len(config.attention_levels) != len(config.channels):
            raise ValueError(
                f"attention_levels has {len(config.attention_levels)} entries but channels has {len(config.channels)}"
            )
        bad = [c for c in config.channels if c % config.norm_num_groups]
        if bad and config.backbone == "unet":
            raise ValueError(f"channels {bad} are not multiples of norm_num_groups={config.norm_num_groups}")
        if config.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {', '.join(BACKBONES)}, got {config.backbone!r}")
        if config.spatial_dims not in (2, 3) or (config.spatial_dims == 2 and config.backbone != "unet"):
            raise ValueError(f"model.spatial_dims must be 3, or 2 with the unet backbone; got {config.spatial_dims} "
                             f"with {config.backbone!r}")
        self.config = config
        self.num_covariates = len(config.covariate_names)
        self.input_channels = config.in_channels + config.spatial_channels + int(config.flip_channel)
        if config.backbone == "dit":
            if config.align_channels:
                raise ValueError("model.align_channels: feature alignment is built for the unet backbone only")
            from mriflow.models.dit import DiT

            self.dit = DiT(self.input_channels, config.in_channels, config.dit_patch_size,
                           config.dit_hidden, config.dit_depth, config.dit_heads)
            if self.num_covariates:
                self.conditioning = CovariateEmbedding(config.covariate_kinds, config.covariate_categories,
                                                       config.dit_hidden, config.covariate_drop_prob)
            return
        embedding_dim = 4 * config.channels[0]  # DiffusionModelUNet's time-embedding width
        self.unet = DiffusionModelUNet(
            spatial_dims=config.spatial_dims,
            in_channels=self.input_channels,
            out_channels=config.in_channels,
            num_res_blocks=config.num_res_blocks,
            channels=tuple(config.channels),
            attention_levels=tuple(config.attention_levels),
            norm_num_groups=config.norm_num_groups,
            num_head_channels=config.num_head_channels,
            # The UNet adds class_embedding(class_labels) to its time embedding; with the
            # lookup replaced by the identity, class_labels carries our covariate embedding.
            num_class_embeds=1 if self.num_covariates else None,
        )
        if self.num_covariates:
            self.unet.class_embedding = nn.Identity()
            self.conditioning = CovariateEmbedding(
                config.covariate_kinds, config.covariate_categories, embedding_dim, config.covariate_drop_prob
            )
        self.multiple = 2 ** (len(config.channels) - 1)
        if config.align_channels:
            if not 0 <= config.align_block < len(config.channels):
                raise ValueError(f"model.align_block {config.align_block}: the U-Net has down blocks 0 to "
                                 f"{len(config.channels) - 1}")
            width = config.channels[config.align_block]
            conv = nn.Conv3d if config.spatial_dims == 3 else nn.Conv2d
            self.align_head = nn.Sequential(conv(width, 2 * width, 1), nn.SiLU(), conv(2 * width, config.align_channels, 1))
            block = self.unet.down_blocks[config.align_block]
            if getattr(block, "downsampler", None) is not None:
                block.downsampler.register_forward_pre_hook(_keep_input)
            else:
                block.register_forward_hook(_keep_output)

    def take_aligned(self) -> torch.Tensor:
        """The aligned block's features of the last training forward (B, channels[align_block], ...), then forgotten."""
        block = self.unet.down_blocks[self.config.align_block] if self.config.align_channels else None
        tapped = block.downsampler if getattr(block, "downsampler", None) is not None else block
        features = getattr(tapped, "_aligned", None)
        if features is None:
            raise RuntimeError("no aligned features: call the network in training mode first (model.align_channels)")
        tapped._aligned = None
        return features

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        covariates: torch.Tensor | None = None,
        covariates_present: torch.Tensor | None = None,
        spatial: torch.Tensor | None = None,
        flipped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.ndim != 2 + self.config.spatial_dims or x.shape[1] != self.config.in_channels:
            axes = "D, H, W" if self.config.spatial_dims == 3 else "H, W"
            raise ValueError(f"expected x of shape (B, {self.config.in_channels}, {axes}), got {tuple(x.shape)}")
        if self.config.spatial_channels:
            expected = (x.shape[0], self.config.spatial_channels, *x.shape[2:])
            if spatial is None or tuple(spatial.shape) != expected:
                got = None if spatial is None else tuple(spatial.shape)
                raise ValueError(f"this network is conditioned on a spatial map: expected spatial of shape {expected}, got {got}")
            x = torch.cat([x, spatial.to(x.dtype)], 1)
        if self.config.flip_channel:  # (B,) flags as a constant channel; None: not flipped (sampling)
            flags = x.new_zeros(x.shape[0]) if flipped is None else flipped.to(x.dtype).reshape(-1)
            x = torch.cat([x, flags.reshape(-1, 1, *([1] * (x.ndim - 2))).expand(-1, 1, *x.shape[2:])], 1)
        elif flipped is not None:
            raise ValueError("this network was not trained with the flip flag (model.flip_channel); pass no `flipped`")
        batch, spatial = x.shape[0], x.shape[2:]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(batch) if t.ndim == 0 else t  # (B,)
        if covariates is not None and covariates.shape[-1] != self.num_covariates:
            raise ValueError(
                f"got {counted(covariates.shape[-1], 'covariate')}; this network is conditioned on "
                f"{self.num_covariates} ({', '.join(self.config.covariate_names) or 'none'})"
            )
        condition = None
        if self.num_covariates:
            if covariates is None:
                covariates = x.new_zeros(batch, self.num_covariates)
                covariates_present = torch.zeros(batch, self.num_covariates, dtype=torch.bool, device=x.device)
            elif covariates_present is None:
                covariates_present = torch.ones_like(covariates, dtype=torch.bool)
            condition = self.conditioning(covariates, covariates_present)  # (B, 4·channels[0] or dit_hidden)
        if self.config.backbone == "dit":
            return self.dit(x, t * self.config.time_scale, condition)
        pad = [(-size) % self.multiple for size in spatial]
        x = F.pad(x, [side for amount in reversed(pad) for side in (0, amount)])  # F.pad lists the last axis first
        out = self.unet(x, t * self.config.time_scale, class_labels=condition)
        return out[(slice(None), slice(None), *(slice(0, size) for size in spatial))]


def _keep_input(module: nn.Module, args) -> None:
    """Forward pre-hook of the aligned block's downsampler: keep its input while training (sampling keeps nothing).
    Kept on the hooked module itself, so a copy of the network (its EMA) keeps its own."""
    module._aligned = args[0] if module.training else None


def _keep_output(module: nn.Module, _args, output) -> None:
    module._aligned = output[0] if module.training else None


class SpatiallyConditioned(nn.Module):
    """A network with its spatial condition bound: f(x, t, c, present) = net(x, t, c, present, spatial), so every
    sampler, guidance and loss that calls net(x, t, c, present) works unchanged. `spatial` (B, S, d, h, w) is
    repeated when x holds a multiple of its batch (classifier-free guidance evaluates 2B at once)."""

    def __init__(self, net: nn.Module, spatial: torch.Tensor):
        super().__init__()
        self.net = net
        self.spatial = spatial

    def forward(self, x, t, covariates=None, covariates_present=None):
        spatial = self.spatial.to(x.device)
        if x.shape[0] != spatial.shape[0]:
            if x.shape[0] % spatial.shape[0]:
                raise ValueError(f"a batch of {x.shape[0]} latents for {spatial.shape[0]} spatial conditions")
            spatial = spatial.repeat(x.shape[0] // spatial.shape[0], *([1] * (spatial.ndim - 1)))
        return self.net(x, t, covariates, covariates_present, spatial=spatial)


class FlipConditioned(nn.Module):
    """A network trained with the flip flag (model.flip_channel) with each training item's flag bound: f(x, t, c, present)
    = net(x, t, c, present, flipped=flipped), so the family's loss calls it like any network. Sampling uses the bare
    network, whose flag is then 0: the model draws unflipped brains and learns from flipped ones without drawing them
    (non-leaky augmentation, Karras et al. 2022)."""

    def __init__(self, net: nn.Module, flipped: torch.Tensor):
        super().__init__()
        self.net = net
        self.flipped = flipped

    def forward(self, x, t, covariates=None, covariates_present=None, **kwargs):
        return self.net(x, t, covariates, covariates_present, flipped=self.flipped, **kwargs)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
