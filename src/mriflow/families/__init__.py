"""Generative families that plug into training and `generate`: one module each, one line here.

A family (mriflow.families.base.Family) says how a latent generator learns (`loss`) and samples
(`sample`), with its training config and its solvers; the network, the latents, the training
loop, checkpoints and the files `generate` writes are shared. To add one: write
mriflow/families/<name>.py with a Family subclass and its config, presets/<name>-<preset>.yaml,
and register it below. A family that trains networks beside the generator (the GAN's critic)
returns them from `extra_networks` and their losses from `phase_loss` (families/base.py).

    flow       rectified flow, ODE solvers (families/flow.py)
    diffusion  DDPM/DDIM baseline (families/diffusion.py)
    slices     2D flow over axial image slices, no autoencoder: space "image" (families/slices.py)
    gan        R3GAN-style GAN, one network evaluation (families/gan.py)

    >>> family = get_family("flow").from_config(meta["config"])
    >>> latents, nfe = family.sample(net, (4, *latent_shape), covariates, family.default_sampling(), "cpu")
"""

from __future__ import annotations

from mriflow.families.base import Family
from mriflow.families.diffusion import Diffusion
from mriflow.families.flow import RectifiedFlow
from mriflow.families.slices import SliceFlow
from mriflow.families.gan import GAN

FAMILIES: dict[str, type[Family]] = {
    RectifiedFlow.name: RectifiedFlow,
    Diffusion.name: Diffusion,
    SliceFlow.name: SliceFlow,
    GAN.name: GAN,
}


def get_family(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise ValueError(f"unknown generative family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
