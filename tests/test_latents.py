from __future__ import annotations

import json

import pytest
import torch

from mriflow import checkpoint as ckpt
from mriflow.data.dataset import PreparedDataset
from mriflow.latents import VQ_LOGVAR, LatentDataset, encode_dataset, latent_cache_dir, latent_statistics
from mriflow.train.autoencoder import train_autoencoder

# The prepared-folder and tiny-config helpers live with the loop tests.
from conftest import tiny_config, write_prepared


@pytest.fixture
def trained(tmp_path):
    data = write_prepared(tmp_path / "data", splits=("train", "train", "train", "val", "test"))
    train_autoencoder(data, tmp_path / "run", config=tiny_config(max_steps=1, adversarial_start=100))
    return data, tmp_path / "run"


def test_encode_caches_mean_and_logvar_and_records_the_scale(trained):
    data, run = trained
    checkpoint = ckpt.latest_checkpoint(run)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    cache = encode_dataset(data, run, device="cpu")
    # encoding only reads the autoencoder: its checkpoint is byte for byte what training wrote
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert cache == latent_cache_dir(data, run) and cache.parent == run / "latents"
    index = json.loads((cache / "index.json").read_text())
    assert index["splits"] == {"test": ["sub04"], "train": ["sub00", "sub01", "sub02"], "val": ["sub03"]}
    assert index["latent_shape"] == [2, 4, 5, 4]

    model, meta = ckpt.load_autoencoder(run)
    latents = LatentDataset(data, run, "train", covariates=["age"])
    item = latents[1]
    with torch.no_grad():
        expected = model.encode(latents_image(data, "sub01"))
    assert torch.allclose(item["latent_mean"], expected.mean[0], atol=1e-5)
    assert torch.allclose(item["latent_logvar"], expected.logvar[0], atol=1e-5)
    assert item["subject"] == "sub01" and item["covariates_present"].tolist() == [True]
    prepared = PreparedDataset(data, "train", covariates=["age"])[1]  # covariates encoded exactly as for images
    assert torch.equal(item["covariates"], prepared["covariates"])

    # The scale is 1/std of the training latents (mean spread plus posterior variance), stored in the cache.
    stats = latent_statistics(latents.mean, latents.logvar)
    assert "latent_scale" not in meta
    assert index["latent_scale"] == pytest.approx(1.0 / stats["std"]) == pytest.approx(latents.scale)
    assert stats["std"] ** 2 == pytest.approx(latents.mean.double().var(unbiased=False).item()
                                              + torch.exp(latents.logvar.double()).mean().item(), rel=1e-6)


def test_samples_are_scaled_draws_from_the_posterior(trained):
    data, run = trained
    encode_dataset(data, run, device="cpu")
    latents = LatentDataset(data, run, "train")
    mean, logvar = torch.zeros(20000), torch.full((20000,), 2 * torch.log(torch.tensor(0.5)).item())
    draws = latents.sample(mean + 1.0, logvar, generator=torch.Generator().manual_seed(0))
    assert draws.mean().item() == pytest.approx(latents.scale, rel=0.02)
    assert draws.std().item() == pytest.approx(0.5 * latents.scale, rel=0.03)


def test_latents_of_another_checkpoint_are_refused(trained):
    data, run = trained
    encode_dataset(data, run, device="cpu")
    train_autoencoder(data, run, resume=True, max_steps=2)  # a newer checkpoint replaces the encoded one
    with pytest.raises(ValueError, match="mriflow encode"):
        LatentDataset(data, run, "train")
    encode_dataset(data, run, splits=["val"], device="cpu")  # the new weights' scale needs their training latents
    with pytest.raises(ValueError, match="no latent scale"):
        LatentDataset(data, run, "val")
    encode_dataset(data, run, splits=["train"], device="cpu")
    assert len(LatentDataset(data, run, "train")) == 3
    encode_dataset(data, run, splits=["val"], device="cpu")  # adds a split, keeps the others and the scale
    assert len(LatentDataset(data, run, "val")) == 1 and len(LatentDataset(data, run, "train")) == 3


def test_vq_latents_are_the_pre_quantisation_latent(tmp_path):
    data = write_prepared(tmp_path / "data", splits=("train", "train", "val"))
    train_autoencoder(data, tmp_path / "run", config=tiny_config(max_steps=1, adversarial_start=100, kind="vq"))
    encode_dataset(data, tmp_path / "run", device="cpu")
    latents = LatentDataset(data, tmp_path / "run", "val")
    model, _ = ckpt.load_autoencoder(tmp_path / "run")
    with torch.no_grad():
        expected = model.encode(latents_image(data, "sub02")).mean[0]
    item = latents[0]
    assert torch.allclose(item["latent_mean"], expected, atol=1e-5)
    assert torch.all(item["latent_logvar"] == VQ_LOGVAR)


def latents_image(data, subject):
    from mriflow.data.io import load_volume

    image, _ = load_volume(data / "images" / f"{subject}.nii.gz")
    return torch.from_numpy(image)[None, None]


def test_a_damaged_latent_cache_is_named_and_encoding_again_replaces_it(trained):
    data, run = trained
    cache = encode_dataset(data, run, device="cpu")
    train_file = cache / "train.safetensors"
    train_file.write_bytes(train_file.read_bytes()[:100])  # cut short by a kill or a full disk
    with pytest.raises(ValueError, match=rf"{train_file}: damaged or incomplete .*delete the folder {cache}"):
        LatentDataset(data, run, "train")
    (cache / "index.json").write_text('{"splits": ')
    with pytest.raises(ValueError, match=rf"{cache / 'index.json'}: damaged or incomplete .*delete the folder {cache}"):
        LatentDataset(data, run, "val")
    encode_dataset(data, run, splits=["val"], device="cpu")  # a cache: what is damaged is dropped, not read
    with pytest.raises(ValueError, match="'train' was not encoded"):
        LatentDataset(data, run, "train")
    encode_dataset(data, run, device="cpu")
    assert len(LatentDataset(data, run, "train")) == 3 and len(LatentDataset(data, run, "val")) == 1


def test_latents_of_an_exported_autoencoder_are_cached_with_the_data_not_in_the_model(trained, tmp_path):
    """A shipped or exported autoencoder (a checkpoint folder outside a run) may be read-only or inside the installed
    package: its cache goes under the data, named by its weights, and its own folder is left as it was."""
    import shutil

    data, run = trained
    exported = tmp_path / "model" / "autoencoder"
    shutil.copytree(ckpt.latest_checkpoint(run), exported)
    before = sorted(p.name for p in exported.iterdir())
    cache = latent_cache_dir(data, exported)
    assert cache.parent == data / "latents" and ckpt.sha256(exported / ckpt.MODEL_FILE)[:12] in cache.name
    encode_dataset(data, exported, device="cpu")
    assert (cache / "index.json").is_file()
    assert sorted(p.name for p in exported.iterdir()) == before
    assert len(LatentDataset(data, exported, "train")) == 3
