"""Network features of volumes kept on disk between evaluations, keyed by the volume file's content.

An evaluation passes every real volume it compares against (the evaluation split, the other real split, the
training split for the privacy audit: about 150 volumes at 2 mm) through the backbone and, for the audit, through the
anatomy network; that is most of its time (400 of 590 s on two busy cores), and it is the same work every time the
same prepared data is scored again: each leg of a long run, each arm of a bake-off, each model a researcher compares.
The store keeps each volume's rows under the SHA-256 of its file and of the network that made them (its name, the
SHA-256 of its weights, the torch version), so a changed file or network is simply a miss, never a stale row.

Where: $MRIFLOW_CACHE/features, else $XDG_CACHE_HOME/mriflow/features, else ~/.cache/mriflow/features.
MRIFLOW_CACHE=off turns it off. Entries are written atomically; one that cannot be read is computed again.

    >>> store = FeatureStore.default("anatomy-2mm|<weights sha256>|torch 2.13.0")
    >>> rows = store.get(path)            # None on a miss
    >>> store.put(path, rows)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from mriflow.utils.files import atomic_path, sha256

OFF = {"off", "0", "no", "false", "none"}


def cache_root() -> Path | None:
    """The folder of mriflow's caches, or None when MRIFLOW_CACHE turns them off."""
    setting = os.environ.get("MRIFLOW_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mriflow"


class FeatureStore:
    """Rows (any float array) of volume files made by one network (`namespace`: what identifies it)."""

    def __init__(self, root: Path, namespace: str):
        self.folder = Path(root) / "features" / hashlib.sha256(namespace.encode()).hexdigest()[:24]
        self.namespace = namespace
        self.hits = self.misses = 0

    @classmethod
    def default(cls, namespace: str) -> "FeatureStore | None":
        root = cache_root()
        return cls(root, namespace) if root is not None else None

    @classmethod
    def for_network(cls, what: str, network) -> "FeatureStore | None":
        """The store of `what` made by `network` (its name, weights and the torch version identify it); None when
        the store is off or the network has no weights file (nothing to save)."""
        import torch

        weights = getattr(network, "weights_sha256", None)
        return cls.default(f"{what}|weights {weights}|torch {torch.__version__}") if weights is not None else None

    def _entry(self, path: Path) -> Path:
        key = sha256(path)  # remembered for the process while the file is unchanged
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, path: Path) -> np.ndarray | None:
        entry = self._entry(path)
        try:
            rows = np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # a miss, or an entry cut short or damaged: computed again
            self.misses += 1
            return None
        self.hits += 1
        return rows

    def put(self, path: Path, rows: np.ndarray) -> None:
        """Keep `rows` for `path`; a store that cannot be written (read-only home, full disk) is skipped silently:
        it only saves time."""
        entry = self._entry(path)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            if not (self.folder / "namespace.txt").exists():
                with atomic_path(self.folder / "namespace.txt") as temporary:
                    temporary.write_text(self.namespace + "\n")
            with atomic_path(entry) as temporary:
                with open(temporary, "wb") as stream:
                    np.save(stream, np.asarray(rows), allow_pickle=False)
        except OSError:
            pass
