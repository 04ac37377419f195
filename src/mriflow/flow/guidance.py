"""Classifier-free guidance (Ho & Salimans 2022) in one formula:

    v = v_uncond + w·(v_cond − v_uncond)

w = 1 is the conditional prediction, w = 0 the unconditional one, w > 1 pushes
samples further towards the condition. v_uncond is the same network with every
covariate absent (present = False, so each uses its learned null embedding).
The diffusion baseline combines its ε or v outputs with the same formula.

    >>> velocity = guided_velocity(velocity_net, covariates, covariates_present, scale=2.0)
    >>> x1, nfe = solve(velocity, x0, "heun", num_steps=16)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def guided_velocity(
    net: nn.Module,
    covariates: torch.Tensor | None,
    covariates_present: torch.Tensor | None,
    scale: float = 1.0,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """velocity(x, t) for the solvers: x (B, ...), t a 0-dim tensor or (B,).

    covariates and covariates_present are (B, K) (K may be 0), or None for an
    unconditional model. With w ≠ 1 and some covariate present, the conditional and
    unconditional predictions come from one forward pass over a batch of 2B.
    """
    needs_uncond = scale != 1.0 and covariates_present is not None and bool(covariates_present.any())

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)
        if not needs_uncond:
            return net(x, t, covariates, covariates_present)
        absent = torch.zeros_like(covariates_present)
        both = net(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([covariates, covariates]), torch.cat([covariates_present, absent])
        )
        v_cond, v_uncond = both.chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)  # v = v_uncond + w·(v_cond − v_uncond)

    return velocity
