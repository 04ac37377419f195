"""Training data over a prepared folder: volumes, brain masks and encoded covariates.

A prepared folder (written by `mriflow prepare`) holds ``manifest.csv`` with one row
per subject: ``subject, image, mask, labels, split`` and one column per covariate.

Covariates are described by a :class:`CovariateSchema` built on the *training*
split: a continuous covariate is standardised, ``(x - mean) / std``; a categorical
one becomes its category index. A missing value encodes as 0 with ``present``
False, so the conditioning network can substitute its null embedding.

    >>> dataset = PreparedDataset("prepared/", split="train", covariates=["age", "sex"], augment=True)
    >>> item = dataset[0]
    >>> item["image"].shape, item["covariates"], item["covariates_present"]
    (torch.Size([1, 40, 48, 40]), tensor([-0.31, 1.]), tensor([True, True]))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mriflow.data.io import load_volume
from mriflow.utils.files import read_json

if TYPE_CHECKING:  # pandas is imported where it is used: `generate` starts without it
    import pandas as pd

MANIFEST_COLUMNS = ("subject", "image", "mask", "labels", "split")
# A numeric column with at most this many distinct values is treated as categorical
# (e.g. a 0/1 diagnosis flag); everything else numeric is continuous.
MAX_NUMERIC_CATEGORIES = 5


@dataclass
class Covariate:
    """One covariate: its kind and the training statistics needed to encode it."""

    name: str
    kind: str  # "continuous" | "categorical"
    mean: float = 0.0
    std: float = 1.0
    minimum: float = math.nan
    maximum: float = math.nan
    categories: list[str] = field(default_factory=list)

    def encode(self, value: Any) -> tuple[float, bool]:
        """(encoded value, present); missing or unknown values are (0.0, False)."""
        if _is_missing(value):
            return 0.0, False
        if self.kind == "continuous":
            try:
                number = float(value)
            except (TypeError, ValueError):
                return 0.0, False
            if not math.isfinite(number):
                return 0.0, False
            return (number - self.mean) / self.std, True
        key = _category_key(value)
        if key not in self.categories:
            return 0.0, False
        return float(self.categories.index(key)), True

    def decode(self, encoded: float) -> float | str:
        if self.kind == "continuous":
            return encoded * self.std + self.mean
        return self.categories[int(round(encoded))]


class CovariateSchema:
    """An ordered set of covariates, with the statistics of the split it was fitted on."""

    def __init__(self, covariates: Sequence[Covariate]):
        self.covariates = list(covariates)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.covariates]

    def __len__(self) -> int:
        return len(self.covariates)

    def __getitem__(self, name: str) -> Covariate:
        for covariate in self.covariates:
            if covariate.name == name:
                return covariate
        raise KeyError(f"unknown covariate {name!r}; known covariates: {', '.join(self.names) or 'none'}")

    @classmethod
    def fit(cls, table: pd.DataFrame, names: Sequence[str], kinds: Mapping[str, str] | None = None) -> "CovariateSchema":
        """Fit on `table` (normally the training rows of the manifest).

        A column is categorical when it is non-numeric, or numeric with at most
        MAX_NUMERIC_CATEGORIES distinct values; `kinds` overrides the guess.
        """
        import pandas as pd  # here: half a second of start-up that `generate` does not need

        kinds = dict(kinds or {})
        covariates = []
        for name in names:
            if name not in table.columns:
                valid = [c for c in table.columns if c not in MANIFEST_COLUMNS]
                raise ValueError(f"covariate {name!r} is not in the manifest; available: {', '.join(valid) or 'none'}")
            column = table[name]
            present = column[~column.map(_is_missing)]
            if present.empty:
                raise ValueError(f"covariate {name!r} has no values in the split used to fit the schema")
            numeric = pd.to_numeric(present, errors="coerce")
            kind = kinds.get(name)
            if kind is None:
                is_numeric = numeric.notna().all()
                kind = "continuous" if is_numeric and numeric.nunique() > MAX_NUMERIC_CATEGORIES else "categorical"
            if kind == "continuous":
                values = numeric.dropna().to_numpy(dtype=np.float64)
                std = float(values.std()) if len(values) > 1 else 1.0
                covariates.append(
                    Covariate(name, kind, float(values.mean()), std if std > 0 else 1.0, float(values.min()), float(values.max()))
                )
            elif kind == "categorical":
                categories = sorted({_category_key(v) for v in present})
                covariates.append(Covariate(name, kind, categories=categories))
            else:
                raise ValueError(f"covariate {name!r}: kind must be 'continuous' or 'categorical', got {kind!r}")
        return cls(covariates)

    def encode(self, values: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode one subject's covariates -> (values (K,) float32, present (K,) bool)."""
        encoded = [c.encode(values.get(c.name)) for c in self.covariates]
        return (
            torch.tensor([v for v, _ in encoded], dtype=torch.float32),
            torch.tensor([p for _, p in encoded], dtype=torch.bool),
        )

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-ready: an undefined range (a categorical covariate's) is written as null, not NaN."""
        return {"covariates": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(c).items()}
                               for c in self.covariates]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CovariateSchema":
        undefined = ("minimum", "maximum")
        return cls([Covariate(**{k: math.nan if v is None and k in undefined else v for k, v in c.items()})
                    for c in data["covariates"]])


def read_manifest(root: str | Path) -> pd.DataFrame:
    """Read ``manifest.csv`` of a prepared folder, with a clear message when it is not one."""
    import pandas as pd  # here: half a second of start-up that `generate` does not need

    root = Path(root)
    path = root / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a prepared dataset (no manifest.csv); run `mriflow prepare` first")
    try:
        table = pd.read_csv(path, dtype={"subject": str, "labels": str}, keep_default_na=True)
    except (ValueError, UnicodeDecodeError) as error:  # pandas' parser and decoding errors name no file
        raise ValueError(f"{path}: not a readable manifest ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                         "prepare the folder again with `mriflow prepare`") from None
    missing = [c for c in ("subject", "image", "mask", "split") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; was it written by `mriflow prepare`?")
    return table


def read_preparation(root: str | Path) -> dict[str, Any]:
    """``prepare.json`` of a prepared folder, how it was prepared ({} when it has none, e.g. a hand-made folder)."""
    path = Path(root) / "prepare.json"
    if not path.is_file():
        return {}
    return read_json(path, advice=f"it records how {root} was prepared: restore it, or prepare the dataset again "
                                  f"(mriflow prepare IMAGES --out {root} --force)")


def covariate_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in MANIFEST_COLUMNS]


class PreparedDataset(Dataset):
    """Volumes of one split of a prepared folder, with optional light augmentation.

    The schema is fitted on the training split unless one is given (a trained
    model passes the schema it was trained with, so encodings stay identical).
    Augmentation (training only): left-right flip (p = 0.5) and a random
    intensity scale in [0.9, 1.1] and shift in [-0.05, 0.05] applied inside the
    brain, clipped back to [0, 1]. With `crop_size` (D, H, W), each item is a random
    crop of that size (uniform position, torch's RNG like the augmentation), for
    fully convolutional networks trained on crops and applied to whole volumes.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        covariates: Sequence[str] | None = None,
        augment: bool = False,
        schema: CovariateSchema | None = None,
        crop_size: Sequence[int] | None = None,
    ):
        self.root = Path(root)
        self.crop_size = tuple(int(n) for n in crop_size) if crop_size else None
        if self.crop_size is not None and (len(self.crop_size) != 3 or min(self.crop_size) < 1):
            raise ValueError(f"crop_size must be three positive sizes (D, H, W), got {crop_size}")
        manifest = read_manifest(self.root)
        if split is not None:
            splits = sorted(manifest["split"].dropna().unique())
            if split not in splits:
                raise ValueError(f"{self.root}: split {split!r} not found; available splits: {', '.join(splits)}")
        if schema is None:
            names = list(covariates or [])
            schema = CovariateSchema.fit(manifest[manifest["split"] == "train"], names) if names else CovariateSchema([])
        elif covariates is not None and list(covariates) != schema.names:
            raise ValueError(f"covariates {list(covariates)} differ from the given schema's {schema.names}")
        self.schema = schema
        self.rows = (manifest if split is None else manifest[manifest["split"] == split]).reset_index(drop=True)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows.iloc[index]
        image, _ = load_volume(self.root / row["image"])
        mask, _ = load_volume(self.root / row["mask"])
        for name, volume in (("image", image), ("mask", mask)):
            if not np.isfinite(volume).all():  # training on it would end in a NaN loss that names no file
                raise ValueError(f"{self.root / row[name]}: holds NaN or infinite values; prepare this subject again "
                                 "(mriflow prepare --force) or remove its row from manifest.csv")
        if self.augment:
            image, mask = self._augment(image, mask)
        if self.crop_size is not None:
            image, mask = self._crop(image, mask, self.root / row["image"])
        values, present = self.schema.encode(row.to_dict())
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image))[None],  # (1, D, H, W)
            "mask": torch.from_numpy(np.ascontiguousarray(mask))[None],  # (1, D, H, W)
            "covariates": values,
            "covariates_present": present,
            "subject": str(row["subject"]),
        }

    def _augment(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # torch's RNG, not numpy's: DataLoader seeds it per worker and the training
        # loop saves and restores it, so augmentation is reproducible across resumes.
        flip, scale, shift = torch.rand(3).tolist()
        if flip < 0.5:  # axis 0 is left-right in RAS
            image, mask = image[::-1], mask[::-1]
        scale = 0.9 + 0.2 * scale
        shift = -0.05 + 0.1 * shift
        brain = mask > 0
        image = image.copy()
        image[brain] = np.clip(image[brain] * scale + shift, 0.0, 1.0)
        return image, mask


    def _crop(self, image: np.ndarray, mask: np.ndarray, where: Path) -> tuple[np.ndarray, np.ndarray]:
        if any(c > n for c, n in zip(self.crop_size, image.shape)):
            raise ValueError(f"crop_size {self.crop_size} is larger than the volume {image.shape} of {where}; "
                             "choose a crop that fits the grid")
        corner = [int(torch.randint(0, n - c + 1, ()).item()) for c, n in zip(self.crop_size, image.shape)]
        box = tuple(slice(start, start + c) for start, c in zip(corner, self.crop_size))
        return image[box], mask[box]


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "na", "n/a", "none")


def _category_key(value: Any) -> str:
    """Categories are compared as strings; 1.0 and 1 are the same category."""
    if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()
