"""This brain at 75: a real scan edited by inverting the flow (issue 28).

A rectified flow's ODE is invertible: integrating dx/dt = v(x, t, c) backwards from a subject's own data end x1
(its latent, or its Haar bands) to t = 0 under the covariates c it was scanned with gives a noise x0 that holds
what is particular to that person; integrating forwards again from that x0 under other covariates c' draws the
same person as they would look with c' (older, the other sex). Several targets share one inversion. The round
trip under unchanged covariates comes back to the scan up to the solver's error (and, for a latent model, the
autoencoder's reconstruction), which `edit_volume` returns beside the edits so that a difference map shows the
edit alone: edited − round trip.

    >>> generator = load_generator("2mm")
    >>> result = edit_volume(generator, volume, {"age": 52, "sex": "F"}, [{"age": 75}], steps=16)
    >>> result.edited[0], result.round_trip, result.difference[0]       # (D, H, W) each, in [0, 1]

Only families whose sampler is the flow's ODE can be inverted (mriflow.families.flow and its image-space use);
guidance is 1 (the conditional velocity), since classifier-free guidance breaks the ODE's invertibility.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mriflow.flow.guidance import guided_prediction
from mriflow.flow.path import LinearPath
from mriflow.flow.sampling import evaluating
from mriflow.flow.solvers import FIXED_STEP
from mriflow.generator import Generator
from mriflow.models.conditioning import resolve_request

INVERTIBLE_SOLVERS = ("euler", "heun", "midpoint", "rk4")


@dataclass
class EditResult:
    """The volumes of one edit, each (D, H, W) float32 in [0, 1] with the generator's affine: the scan as the model
    represents it, its round trip under the source covariates, one edited volume per target, and edited − round trip."""

    source: np.ndarray
    round_trip: np.ndarray
    edited: list[np.ndarray]
    difference: list[np.ndarray]
    targets: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)


def check_invertible(generator: Generator, solver: str) -> LinearPath:
    """The generator's linear path, refusing a family that is not a flow (diffusion, GAN, slices) or a solver without a
    fixed grid to run backwards, in one line."""
    path = generator.family.path
    if not isinstance(path, LinearPath) or generator.family.space != "latent":
        raise ValueError(f"the {generator.stage} model {generator.path} cannot be inverted: only a rectified flow "
                         "(`mriflow train flow`, on latents or a representation) has an ODE to run backwards")
    if solver not in INVERTIBLE_SOLVERS:
        raise ValueError(f"--solver {solver}: an edit runs the ODE backwards on a fixed grid; choose one of "
                         f"{', '.join(INVERTIBLE_SOLVERS)}")
    return path


def encode_volume(generator: Generator, volume: np.ndarray) -> torch.Tensor:
    """A volume (D, H, W) in [0, 1] on the model's grid -> its data end x1 (1, C, d, h, w): the Haar bands of an
    image-space model, or the autoencoder's posterior mean (scaled) of a latent one."""
    if tuple(volume.shape) != generator.image_shape:
        raise ValueError(f"the scan's grid {tuple(volume.shape)} is not the model's {generator.image_shape}; prepare it "
                         "with `mriflow prepare` at the model's preset")
    image = torch.as_tensor(np.asarray(volume, np.float32)).clamp(0, 1)[None, None].to(generator.device)
    with torch.no_grad():
        if generator.representation is not None:
            return generator.representation.encode(image)
        if generator.autoencoder is None:
            raise ValueError(f"the {generator.stage} model {generator.path} has nothing to encode a scan with")
        return generator.autoencoder.encode(image).mean * generator.latent_scale


def integrate(generator: Generator, x: torch.Tensor, covariates: tuple[torch.Tensor, torch.Tensor] | None,
              t_steps: torch.Tensor, solver: str) -> torch.Tensor:
    """Integrate the flow's ODE from x at t_steps[0] to t_steps[-1] (either direction) under `covariates`
    (conditional velocity, no guidance)."""
    path = check_invertible(generator, solver)
    values, present = (None, None) if covariates is None else (covariates[0][None], covariates[1][None])
    with evaluating(generator.velocity_net):
        predict = guided_prediction(generator.velocity_net, values, present, 1.0)

        def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return path.convert(predict(x_t, t), x_t, t, path.prediction, "velocity")

        x_end, _ = FIXED_STEP[solver](velocity, x, t_steps.to(x.device))
    return x_end


def edit_volume(generator: Generator, volume: np.ndarray, source: Mapping[str, Any],
                targets: Sequence[Mapping[str, Any]], steps: int = 16, solver: str = "heun") -> EditResult:
    """Invert `volume` under the covariates `source` and draw it again under each of `targets` (a covariate left out of
    a target keeps its source value); see the module docstring."""
    if steps < 1:
        raise ValueError(f"--steps {steps}: at least 1")
    path = check_invertible(generator, solver)
    settings = generator.sampling_settings(solver, steps, 1.0)
    # the whole grid both ways (a data prediction's velocity is read through its clipped divisor up to t = 1 too)
    grid = path.time_grid(steps, settings.get("time_shift", 1.0), dtype=torch.float32)
    x1 = encode_volume(generator, volume)
    wanted = [{**dict(source), **dict(target)} for target in targets]
    conditions = [resolve_request(generator.schema, request) for request in (source, *wanted)]
    x0 = integrate(generator, x1, conditions[0], grid.flip(0), solver)
    drawn = [integrate(generator, x0, condition, grid, solver) for condition in conditions]
    volumes = generator.decode(torch.cat([x1, *drawn]))  # (2 + T, D, H, W): the scan, the round trip, the edits
    edited = list(volumes[2:])
    return EditResult(source=volumes[0], round_trip=volumes[1], edited=edited,
                      difference=[edit - volumes[1] for edit in edited], targets=wanted,
                      settings={"solver": solver, "steps": steps, "guidance": 1.0,
                                "time_shift": settings.get("time_shift", 1.0), "source_covariates": dict(source)})
