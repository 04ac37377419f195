"""Classifier-free guidance (Ho & Salimans 2022) in one formula:

    f = f_uncond + w·(f_cond − f_uncond)

f is what the network predicts (its path's `prediction`: the flow's velocity, the diffusion
baseline's ε or v; the formula is the same for each). w = 1 is the conditional prediction,
w = 0 the unconditional one, w > 1 pushes samples further towards the condition. f_uncond is
the same network with every covariate absent (present = False, so each uses its learned null
embedding).

    >>> velocity = guided_prediction(velocity_net, covariates, covariates_present, scale=2.0)
    >>> x1, nfe = solve(velocity, x0, "heun", num_steps=16)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def guided_prediction(
    net: nn.Module,
    covariates: torch.Tensor | None,
    covariates_present: torch.Tensor | None,
    scale: float = 1.0,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """predict(x, t) for the samplers: x (B, ...), t a 0-dim tensor or (B,).

    covariates and covariates_present are (B, K) (K may be 0), or None for an
    unconditional model. With w ≠ 1 and some covariate present, the conditional and
    unconditional predictions come from one forward pass over a batch of 2B.
    """
    needs_uncond = scale != 1.0 and covariates_present is not None and bool(covariates_present.any())

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)
        if not needs_uncond:
            return net(x, t, covariates, covariates_present)
        absent = torch.zeros_like(covariates_present)
        both = net(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([covariates, covariates]), torch.cat([covariates_present, absent])
        )
        f_cond, f_uncond = both.chunk(2)
        return f_uncond + scale * (f_cond - f_uncond)  # f = f_uncond + w·(f_cond − f_uncond)

    return predict
