"""mriflow.train.autoencoder: what the autoencoder stage adds to the loop (random crops, a learning rate given
to train_autoencoder); the loop itself, run through this stage, is tested in test_loop.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_config, write_prepared
from mriflow import checkpoint as ckpt
from mriflow.train.autoencoder import train_autoencoder


def test_autoencoder_trains_on_crops_and_refuses_crops_its_factor_does_not_divide(tmp_path):
    from mriflow.models.autoencoder import Autoencoder

    config = dataclasses.replace(tiny_config(max_steps=2, adversarial_start=1), crop_size=(16, 16, 16))
    result = train_autoencoder(write_prepared(tmp_path / "data"), tmp_path / "run", config=config)
    assert result["step"] == 2
    _, meta = ckpt.load_checkpoint(tmp_path / "run")
    assert meta["image_shape"] == [16, 20, 16] and meta["latent_shape"] == [2, 4, 5, 4]  # whole volumes, not crops
    assert meta["config"]["crop_size"] == [16, 16, 16]
    model = Autoencoder(config.model)
    assert model.reconstruct(torch.rand(1, 1, 16, 20, 16)).shape == (1, 1, 16, 20, 16)  # applied to whole volumes
    with pytest.raises(ValueError, match="divisible by the autoencoder's downsampling factor 4"):
        dataclasses.replace(config, crop_size=(16, 18, 16))


def test_the_learning_rate_can_be_given_and_changed_on_resume(tmp_path):
    data = write_prepared(tmp_path / "data")
    train_autoencoder(data, tmp_path / "run", config=tiny_config(max_steps=4), stop_at_step=1, lr=2e-4)
    assert ckpt.load_checkpoint(tmp_path / "run")[1]["config"]["loop"]["lr"] == 2e-4
    train_autoencoder(data, tmp_path / "run", resume=True, lr=1e-4)
    assert ckpt.load_checkpoint(tmp_path / "run")[1]["config"]["loop"]["lr"] == 1e-4
