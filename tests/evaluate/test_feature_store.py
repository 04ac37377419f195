"""The evaluation's on-disk feature store: rows come back unchanged, and a changed file or network, a damaged entry
or MRIFLOW_CACHE=off mean computing again."""

from __future__ import annotations

import numpy as np
import pytest

from mriflow.data.io import save_volume
from mriflow.evaluate.feature_store import FeatureStore, cache_root
from mriflow.evaluate.generation import FeatureCache


class CountingBackbone:
    """Features = a few statistics of each volume; counts the volumes it was asked about."""

    name = "counting"

    def __init__(self, weights_sha256: str = "a" * 64):
        self.weights_sha256, self.seen = weights_sha256, 0

    def features(self, volumes):
        volumes = np.asarray(volumes)
        self.seen += len(volumes)
        flat = volumes.reshape(len(volumes), -1)
        return np.stack([flat.mean(1), flat.std(1), flat.max(1)], axis=1).astype(np.float32)


@pytest.fixture
def volumes(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = tmp_path / "data" / f"v{i}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        save_volume(path, rng.random((8, 10, 8)).astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
        paths.append(path)
    return paths


def features(paths, backbone):
    cache = FeatureCache(backbone, None, 1.0, store=FeatureStore.for_network("counting features", backbone))
    cache.add(paths, "test")
    return cache


def test_rows_are_kept_between_evaluations_and_come_back_unchanged(volumes, tmp_path, monkeypatch):
    monkeypatch.setenv("MRIFLOW_CACHE", str(tmp_path / "cache"))
    first_network = CountingBackbone()
    first = features(volumes, first_network)
    assert first_network.seen == 5 and first.reused == 0
    again_network = CountingBackbone()
    again = features(volumes, again_network)
    assert again_network.seen == 0 and again.reused == 5
    np.testing.assert_array_equal(first.matrix(volumes), again.matrix(volumes))


def test_a_changed_file_a_changed_network_or_a_damaged_entry_is_computed_again(volumes, tmp_path, monkeypatch):
    monkeypatch.setenv("MRIFLOW_CACHE", str(tmp_path / "cache"))
    features(volumes, CountingBackbone())
    save_volume(volumes[0], np.zeros((8, 10, 8), np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    entry = FeatureStore.for_network("counting features", CountingBackbone())._entry(volumes[1])
    assert entry.is_file()
    entry.write_bytes(entry.read_bytes()[:20])  # cut short
    network = CountingBackbone()
    cache = features(volumes, network)
    assert network.seen == 2  # the rewritten volume and the one whose entry was damaged
    assert cache.matrix(volumes[:1])[0, 0] == 0.0  # the new content's rows, not the old ones
    other_weights = CountingBackbone("b" * 64)
    features(volumes, other_weights)
    assert other_weights.seen == 5


def test_mriflow_cache_off_turns_it_off_and_a_network_without_weights_is_not_stored(volumes, tmp_path, monkeypatch):
    monkeypatch.setenv("MRIFLOW_CACHE", "off")
    assert cache_root() is None and FeatureStore.for_network("x", CountingBackbone()) is None
    monkeypatch.setenv("MRIFLOW_CACHE", str(tmp_path / "cache"))
    assert FeatureStore.for_network("x", CountingBackbone(weights_sha256=None)) is None
    monkeypatch.delenv("MRIFLOW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mriflow"


def test_a_store_that_cannot_be_written_only_costs_time(volumes, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder would be")
    store = FeatureStore(blocker, "x")
    store.put(volumes[0], np.ones(3))
    assert store.get(volumes[0]) is None and store.misses == 1


class CountingPredictor(CountingBackbone):
    name = "counting predictor"

    def predict(self, volumes):
        rows = self.features(volumes)
        return {"age": rows[:, 0] * 100, "sex_prob": rows[:, 1], "grey_ml": rows[:, 2] * 500}


def test_anatomy_predictions_of_real_volumes_come_back_from_the_store_unchanged(volumes, tmp_path, monkeypatch):
    from mriflow.evaluate.fidelity import _predict

    monkeypatch.setenv("MRIFLOW_CACHE", str(tmp_path / "cache"))
    first_network, again_network = CountingPredictor(), CountingPredictor()
    first = _predict(first_network, volumes, FeatureStore.for_network("predictions", first_network))
    again = _predict(again_network, volumes[::-1], FeatureStore.for_network("predictions", again_network))
    assert first_network.seen == 5 and again_network.seen == 0
    assert set(first) == set(again) == {"age", "sex_prob", "grey_ml"}
    for name in first:
        np.testing.assert_array_equal(first[name], again[name][::-1])
    assert _predict(CountingPredictor(), []) == {}


def test_generated_volumes_are_not_kept_in_the_store(volumes, tmp_path, monkeypatch):
    monkeypatch.setenv("MRIFLOW_CACHE", str(tmp_path / "cache"))
    cache = FeatureCache(CountingBackbone(), None, 1.0, store=FeatureStore.for_network("counting features", CountingBackbone()))
    cache.add(volumes[:2], "generated", keep=False)
    assert not list((tmp_path / "cache").rglob("*.npy")) and len(cache.matrix(volumes[:2])) == 2
