"""A 3D diffusion transformer (DiT; Peebles & Xie, 2023) as the latent generators' backbone.

The latent (plus any spatial condition) is cut into p x p x p patches, each a token; transformer
blocks with adaLN-Zero conditioning (every block's LayerNorms are shifted and scaled, and its
attention and MLP outputs gated, by linear maps of one conditioning vector, zero-initialised so each
block starts as the identity) mix them; a final adaLN layer maps every token back to its patch::

    x (B, C [+ S], d, h, w) -> Conv3d(kernel = stride = p) -> tokens (B, N, H) + 3D sin-cos positions
    c = MLP(sinusoidal(t)) + covariate embedding (learned nulls; dropped for classifier-free guidance)
    N x [ x += gate1 * Attn(LN(x) * (1 + scale1) + shift1);  x += gate2 * MLP(LN(x) * (1 + scale2) + shift2) ]
    LN(x) * (1 + scale) + shift -> Linear -> p^3 C per token -> unpatchify -> (B, C, d, h, w)

Written here because MONAI has no 3D DiT with these conditioning paths; attention is PyTorch's
scaled_dot_product_attention. Positions are fixed 3D sine-cosine features, so any latent size works
(sizes are padded to a multiple of p and cropped back). Chosen with `model.backbone: dit` in a flow or
diffusion preset; `mriflow.models.velocity.VelocityNet` builds it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of timesteps t (B,), as in DDPM/DiT."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(features, (0, dim % 2))


def position_features(grid: tuple[int, int, int], dim: int, device=None) -> torch.Tensor:
    """Fixed 3D sine-cosine position features (d*h*w, dim): a third of the channels per axis."""
    per_axis = (dim // 6) * 2
    axes = []
    for size in grid:
        position = torch.arange(size, device=device, dtype=torch.float32)
        frequencies = 1.0 / 10000 ** (torch.arange(per_axis // 2, device=device, dtype=torch.float32) / (per_axis // 2))
        angles = position[:, None] * frequencies[None]
        axes.append(torch.cat([torch.sin(angles), torch.cos(angles)], 1))  # (size, per_axis)
    d, h, w = grid
    features = torch.cat([axes[0][:, None, None].expand(d, h, w, per_axis),
                          axes[1][None, :, None].expand(d, h, w, per_axis),
                          axes[2][None, None, :].expand(d, h, w, per_axis)], -1).reshape(d * h * w, 3 * per_axis)
    return F.pad(features, (0, dim - 3 * per_axis))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Linear(int(hidden * mlp_ratio), hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.modulation[1].weight)  # adaLN-Zero: the block starts as the identity
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        batch, tokens, hidden = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1)).reshape(batch, tokens, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, hidden / heads)
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, hidden)
        x = x + gate1[:, None] * self.proj(attention)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """(x (B, in_channels, d, h, w), t (B,) already scaled, condition (B, hidden) or None) -> (B, out_channels, d, h, w)."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int = 2, hidden: int = 128, depth: int = 6,
                 heads: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"model.dit_hidden {hidden} must be a multiple of model.dit_heads {heads}")
        self.patch_size, self.hidden, self.out_channels = patch_size, hidden, out_channels
        self.embed = nn.Conv3d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final = nn.Linear(hidden, patch_size**3 * out_channels)
        for layer in (self.final_modulation[1], self.final):  # DiT's zero-initialised output: v = 0 at the start
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        p = self.patch_size
        size = x.shape[2:]
        pad = [(-n) % p for n in size]
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        grid = tuple(n // p for n in x.shape[2:])
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, H)
        tokens = tokens + position_features(grid, self.hidden, x.device).to(tokens.dtype)[None]
        c = self.time(timestep_features(t, self.hidden).to(tokens.dtype))
        if condition is not None:
            c = c + condition
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))  # (B, N, p^3 C)
        b = out.shape[0]
        out = out.reshape(b, *grid, p, p, p, self.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(b, self.out_channels, *(n * p for n in grid))
        return out[:, :, : size[0], : size[1], : size[2]]
