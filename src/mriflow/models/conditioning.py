"""Covariate conditioning: one embedding per covariate, summed and added to the time embedding.

    e(c) = Σ_k  present_k ? embed_k(c_k) : null_k

A continuous covariate (standardised value) goes through a small MLP, a categorical
one (category index) through nn.Embedding; each has its own learned null embedding.
During training each covariate is dropped to its null embedding independently with
probability p (default 0.15), so one network learns every conditional and the
unconditional model that classifier-free guidance needs. At sampling any subset
can be given; an absent covariate (present = False) always uses its null embedding.

    >>> embedding = CovariateEmbedding.from_schema(schema, embedding_dim=128)
    >>> values, present = resolve_request(schema, {"age": 45, "sex": "F"})
    >>> e = embedding(values[None], present[None])   # (1, 128)
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn

KINDS = ("continuous", "categorical")


def drop_covariates(present: torch.Tensor, drop_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """present (B, K) with each entry independently set to False with probability drop_prob."""
    keep = torch.rand(present.shape, generator=generator, device=present.device) >= drop_prob
    return present & keep


class CovariateEmbedding(nn.Module):
    """(values (B, K) float, present (B, K) bool) -> embedding (B, embedding_dim).

    kinds[k] is "continuous" or "categorical"; num_categories[k] is the number of
    categories of a categorical covariate (ignored for continuous ones).
    """

    def __init__(
        self, kinds: Sequence[str], num_categories: Sequence[int], embedding_dim: int, drop_prob: float = 0.15
    ):
        super().__init__()
        if len(kinds) != len(num_categories):
            raise ValueError(f"kinds ({len(kinds)}) and num_categories ({len(num_categories)}) must have the same length")
        for kind, count in zip(kinds, num_categories):
            if kind not in KINDS:
                raise ValueError(f"covariate kind must be one of {', '.join(KINDS)}; got {kind!r}")
            if kind == "categorical" and count < 1:
                raise ValueError(f"a categorical covariate needs at least one category; got num_categories={count}")
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.kinds = tuple(kinds)
        self.drop_prob = drop_prob
        self.embedders = nn.ModuleList(
            nn.Embedding(count, embedding_dim)
            if kind == "categorical"
            else nn.Sequential(nn.Linear(1, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
            for kind, count in zip(kinds, num_categories)
        )
        self.null = nn.Parameter(torch.zeros(len(kinds), embedding_dim))  # (K, E)
        nn.init.normal_(self.null, std=0.02)

    @classmethod
    def from_schema(cls, schema, embedding_dim: int, drop_prob: float = 0.15) -> "CovariateEmbedding":
        """Build from a mriflow.data.dataset.CovariateSchema."""
        kinds = [c.kind for c in schema.covariates]
        counts = [len(c.categories) if c.kind == "categorical" else 0 for c in schema.covariates]
        return cls(kinds, counts, embedding_dim, drop_prob)

    def forward(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        if values.shape != present.shape or values.ndim != 2 or values.shape[1] != len(self.kinds):
            raise ValueError(
                f"covariates must be (B, {len(self.kinds)}) with a matching present mask; "
                f"got values {tuple(values.shape)}, present {tuple(present.shape)}"
            )
        present = present.bool()
        if self.training and self.drop_prob > 0:
            present = drop_covariates(present, self.drop_prob)
        total = 0
        for k, (kind, embedder) in enumerate(zip(self.kinds, self.embedders)):
            # absent entries may hold any placeholder (even NaN); 0 keeps the lookup valid and the gradients finite
            value = torch.where(present[:, k], values[:, k], torch.zeros_like(values[:, k]))  # (B,)
            if kind == "categorical":
                index = value.round().long()
                if bool(((index < 0) | (index >= embedder.num_embeddings)).any()):
                    raise ValueError(f"covariate {k}: category index outside [0, {embedder.num_embeddings - 1}]")
                embedded = embedder(index)  # (B, E)
            else:
                embedded = embedder(value[:, None].to(self.null.dtype))  # (B, E)
            total = total + torch.where(present[:, k : k + 1], embedded, self.null[k].expand_as(embedded))
        return total


def parse_value(text: str) -> float | str:
    """A covariate value typed by a user (an option or a CSV cell): a finite number, else the text itself,
    so 'nan' or 'inf' reach `resolve_request` as text and are refused there for a continuous covariate."""
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def resolve_request(schema, request: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a user's covariate request {name: value} -> (values (K,), present (K,)).

    Unknown names and unknown categories raise ValueError listing the valid ones, as does a
    continuous value that is not a finite number (NaN included); a continuous value outside
    the training range [minimum, maximum] is encoded but warned about (the model has never
    seen it). Names left out, or given as None, are absent.
    """
    unknown = sorted(set(request) - set(schema.names))
    if unknown:
        raise ValueError(
            f"unknown covariate(s) {', '.join(map(repr, unknown))}; "
            f"this model knows: {', '.join(schema.names) or 'none (it is unconditional)'}"
        )
    values, present = schema.encode(request)
    for k, covariate in enumerate(schema.covariates):
        value = request.get(covariate.name)
        if value is None:
            continue
        low, high = covariate.minimum, covariate.maximum
        trained = not (math.isnan(low) or math.isnan(high))
        if not bool(present[k]):
            if covariate.kind == "categorical":
                raise ValueError(
                    f"covariate {covariate.name!r}: unknown category {value!r}; "
                    f"valid categories: {', '.join(covariate.categories)}"
                )
            # NaN too: it is not "absent" (leaving the name out is), so --age nan is refused, not drawn unconditionally.
            raise ValueError(f"covariate {covariate.name!r}: {value} is not a finite number; give one"
                             + (f" (trained on {low:g} to {high:g})" if trained else "") + " or leave it out")
        if covariate.kind == "continuous":
            number = float(value)
            if not bool(torch.isfinite(values[k])):  # finite as a float64, not once standardised in float32
                raise ValueError(f"covariate {covariate.name!r} = {number:g} is too large to encode; give a value"
                                 + (f" near its training range ({low:g} to {high:g})" if trained else " of its scale"))
            if trained and not low <= number <= high:
                warnings.warn(
                    f"covariate {covariate.name!r} = {number:g} is outside the training range [{low:g}, {high:g}]; "
                    "the model extrapolates there",
                    stacklevel=2,
                )
    return values, present
