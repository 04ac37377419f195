"""The anatomy stage: mriflow's anatomy network trained through the shared loop on phantoms with DLMUSE-like label
maps, selected on the val split, resumed exactly, exported in the backbone's file format."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import read_log, write_labelled
from mriflow import checkpoint as ckpt
from mriflow.config import LoopConfig
from mriflow.data.labels import TISSUE_CLASSES, tissue_lookup
from mriflow.evaluate.backbones import AnatomyBackbone
from mriflow.models.anatomy import read_anatomy_config, save_anatomy_encoder
from mriflow.train.anatomy import (
    AnatomySubjects,
    AnatomyTrainingConfig,
    anatomy_network,
    augment,
    load_config,
    train_anatomy,
)
from mriflow.train.labels import read_label_map

SPLITS = ("train",) * 6 + ("val",) * 2 + ("test",)


def labelled(root):
    """write_labelled's phantoms (16 x 20 x 16) in train / val / test, with a sex for each subject."""
    data = write_labelled(root, splits=SPLITS)
    manifest = pd.read_csv(data / "manifest.csv")
    manifest["sex"] = ["FM"[i % 2] for i in range(len(manifest))]
    manifest.to_csv(data / "manifest.csv", index=False)
    return data


def small_config(**loop) -> AnatomyTrainingConfig:
    """Two encoder levels (the phantoms' 20 is not divisible by 8) and a narrow bottleneck."""
    return AnatomyTrainingConfig(
        loop=LoopConfig(**{"max_steps": 40, "batch_size": 2, "lr": 3e-3, "warmup_steps": 4, "log_every": 5,
                           "montage_every": 20, "checkpoint_every": 10, "ema_decay": 0.9, "device": "cpu", **loop}),
        channels=(8, 16), embedding_dim=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("anatomy")
    torch.set_num_threads(1)
    data = labelled(root / "data")
    result = train_anatomy(data, root / "run", config=small_config(keep_checkpoints=1), regions=data / "regions.csv")
    return {"root": root, "data": data, "result": result}


def test_the_presets_hold_the_recorded_recipes():
    tiny, small = load_config("tiny"), load_config("small")
    # 4 mm: 26 epochs of 120 subjects at batch 4, lr 2e-3; 2 mm: 8 epochs fine-tuned at lr 1e-3 (docs/benchmarks.md)
    assert (tiny.loop.max_steps, tiny.loop.batch_size, tiny.loop.lr) == (26 * 30, 4, 2e-3)
    assert (small.loop.max_steps, small.loop.batch_size, small.loop.lr) == (8 * 30, 4, 1e-3)
    assert tiny.loop.checkpoint_every == small.loop.checkpoint_every == 30  # selected once an epoch
    assert tiny.channels == (8, 16, 32, 64) and tiny.age_weight == tiny.sex_weight == 1.0


def test_augmentation_flips_image_and_tissue_together_and_depends_only_on_its_seed(tmp_path):
    data = labelled(tmp_path / "data")
    subjects = AnatomySubjects(data, "train", tissue_lookup(read_label_map(data / "regions.csv")), augment=True)
    subjects.targets[0, :2] = 1  # a slab on one side: the phantom's tissue map is left-right symmetric
    image, target = subjects.images[0][None], subjects.targets[0][None].long()
    flips = []
    for seed in range(8):
        torch.manual_seed(seed)
        item = subjects[0]
        torch.manual_seed(seed)
        assert torch.equal(subjects[0]["image"], item["image"])  # a function of the seed alone
        flipped = torch.equal(item["target"], target.flip(1))
        assert flipped or torch.equal(item["target"], target)
        # the image went the same way (its bright blob is off-centre; the jitter keeps the intensities' order)
        same, mirrored = (torch.corrcoef(torch.stack([item["image"].flatten(), x.flatten()]))[0, 1]
                          for x in (image, image.flip(1)))
        assert (mirrored > same) == flipped
        assert 0 <= item["image"].min() and item["image"].max() <= 1
        flips.append(flipped)
    assert any(flips) and not all(flips)
    torch.manual_seed(0)
    image_again, _ = augment(image, target)
    assert not torch.equal(image_again, image)  # intensities are jittered inside the brain


def test_the_anatomy_stage_learns_the_tissue_maps_through_the_loop(trained):
    rows = read_log(trained["root"] / "run")
    dice = [float(row["dice"]) for row in rows]
    assert dice[-1] > dice[0] + 0.25 and dice[-1] > 0.4, dice
    assert {"loss", "segmentation", "age", "sex", "dice", "lr"} <= set(rows[0])
    validation = pd.read_csv(trained["root"] / "run" / "validation.csv")
    assert list(validation["step"]) == [10, 20, 30, 40] and validation["dice"].iloc[-1] > validation["dice"].iloc[0]
    best = trained["result"]["best"]
    assert best["step"] == int(validation["step"][validation["loss"].idxmin()])
    assert (trained["root"] / "run" / "montages" / "step-00000040.png").is_file()
    _, meta = ckpt.load_checkpoint(best["checkpoint"])
    assert meta["stage"] == "anatomy" and meta["anatomy"]["label_map"]["4"] == "ventricles"
    assert meta["anatomy"]["target_mean"]["age"] == pytest.approx(np.mean([20 + 7 * i for i in range(6)]), abs=1e-3)


def test_resume_is_exact(tmp_path):
    data = labelled(tmp_path / "data")
    config = small_config(max_steps=6, checkpoint_every=3, log_every=1, montage_every=100)
    train_anatomy(data, tmp_path / "whole", config=config, regions=data / "regions.csv")
    train_anatomy(data, tmp_path / "split", config=config, regions=data / "regions.csv", stop_at_step=3)
    assert len(read_log(tmp_path / "split")) == 3
    train_anatomy(data, tmp_path / "split", resume=True)
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [row["step"] for row in split] == [str(s) for s in range(1, 7)]
    for row_whole, row_split in zip(whole, split):  # 6 subjects at batch 2: an epoch boundary at step 3
        for column in ("loss", "segmentation", "age", "sex", "dice", "lr"):
            assert row_whole[column] == row_split[column], (row_whole["step"], column)
    assert (tmp_path / "whole" / "validation.csv").read_text() == (tmp_path / "split" / "validation.csv").read_text()
    weights_whole, _ = ckpt.load_checkpoint(tmp_path / "whole")
    weights_split, _ = ckpt.load_checkpoint(tmp_path / "split")
    assert all(torch.equal(weights_whole[k], weights_split[k]) for k in weights_whole)


def test_the_exported_network_loads_as_the_anatomy_backbone_and_segments(trained, tmp_path):
    network = anatomy_network(trained["result"]["best"]["checkpoint"])
    path = save_anatomy_encoder(tmp_path / "anatomy.safetensors", network, dtype=torch.float16)
    config, _ = read_anatomy_config(path)
    assert config.channels == (8, 16) and config.shape == (16, 20, 16) and config.classes == TISSUE_CLASSES
    backbone = AnatomyBackbone(path)
    test = AnatomySubjects(trained["data"], "test", tissue_lookup(config.label_map))
    segmentation = backbone.segment(test.images[:, None].numpy())
    assert segmentation.shape == (1, 16, 20, 16)
    for name in ("grey_matter", "white_matter"):  # the phantom's large classes, on a subject it never saw
        index = TISSUE_CLASSES.index(name)
        predicted, true = segmentation[0] == index, test.targets[0] == index
        assert 2 * (predicted & true).sum() / (predicted.sum() + true.sum()) > 0.6, name
    assert np.isfinite(backbone.predict(test.images[:, None].numpy())["age"]).all()


def test_fine_tuning_starts_from_a_weights_file_and_refuses_one_of_another_label_map(trained, tmp_path):
    network = anatomy_network(trained["result"]["checkpoint"])
    path = save_anatomy_encoder(tmp_path / "start.safetensors", network)
    config = small_config(max_steps=1, checkpoint_every=1)
    result = train_anatomy(trained["data"], tmp_path / "tuned", config=config, regions=trained["data"] / "regions.csv",
                           init=path, stop_at_step=1)
    _, meta = ckpt.load_checkpoint(result["checkpoint"])
    assert meta["initialised_from"]["weights"] == str(path)
    other = dataclasses.replace(network.config, label_map={**network.config.label_map, "4": "csf"})
    network.config = other
    save_anatomy_encoder(tmp_path / "other.safetensors", network)
    with pytest.raises(ValueError, match="label_map"):
        train_anatomy(trained["data"], tmp_path / "refused", config=config, regions=trained["data"] / "regions.csv",
                      init=tmp_path / "other.safetensors")


def test_a_prepared_folder_without_a_val_split_is_refused(tmp_path):
    data = write_labelled(tmp_path / "data")
    with pytest.raises(ValueError, match="no 'val' split"):
        train_anatomy(data, tmp_path / "run", config=small_config(), regions=data / "regions.csv")


def test_data_loading_workers_change_nothing(tmp_path):
    # augmentation drawn by (seed, epoch, item), so the device job may load with workers
    data = labelled(tmp_path / "data")
    for workers in (0, 2):
        config = small_config(max_steps=4, checkpoint_every=4, log_every=1, montage_every=100, num_workers=workers)
        train_anatomy(data, tmp_path / f"workers-{workers}", config=config, regions=data / "regions.csv")
    serial, parallel = read_log(tmp_path / "workers-0"), read_log(tmp_path / "workers-2")
    assert [row["loss"] for row in serial] == [row["loss"] for row in parallel]
