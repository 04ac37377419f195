"""The 2D slice model: its network, its position conditioning, what it learns, training, resume and generation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from mriflow import checkpoint as ckpt
from mriflow.config import Grid, LoopConfig
from mriflow.data.io import template_affine
from mriflow.families import FAMILIES
from mriflow.families.flow import FlowSamplingConfig
from mriflow.families.slices import SliceFlow, SliceTrainingConfig, slice_positions, with_positions
from mriflow.models.velocity import VelocityNet, VelocityNetConfig
from mriflow.utils.seeding import sample_seed

from conftest import montage_panels, read_log, wake, write_prepared_with_sex

SHAPE = (16, 20, 16)  # write_prepared's volumes: 16 axial slices of 16 x 20
NET = dict(in_channels=1, spatial_dims=2, spatial_channels=1, channels=(8, 16), attention_levels=(False, True),
           num_res_blocks=1, num_head_channels=8, norm_num_groups=4)


def tiny_config(max_steps=4, **loop) -> SliceTrainingConfig:
    return SliceTrainingConfig(
        model=VelocityNetConfig(**NET), sampling=FlowSamplingConfig(steps=2),
        loop=LoopConfig(**{"max_steps": max_steps, "batch_size": 8, "warmup_steps": 2, "log_every": 1,
                           "montage_every": max_steps, "checkpoint_every": 2, "device": "cpu", **loop}))


def tiny_family(**model) -> tuple[SliceFlow, VelocityNet]:
    config = SliceTrainingConfig(model=VelocityNetConfig(**{**NET, **model}))
    torch.manual_seed(0)
    return SliceFlow(config), wake(VelocityNet(config.model).eval())


def test_the_velocity_net_is_two_dimensional_with_spatial_dims_2_and_takes_any_size():
    net = wake(VelocityNet(VelocityNetConfig(**{**NET, "spatial_channels": 0})).eval())
    for size in ((16, 20), (13, 17), (7, 5)):
        x = torch.randn(3, 1, *size)
        assert net(x, torch.rand(3)).shape == x.shape
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 1, H, W\)"):
        net(torch.randn(1, 1, 8, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="spatial_dims must be 3, or 2 with the unet backbone"):
        VelocityNet(VelocityNetConfig(**{**NET, "backbone": "dit"}))
    with pytest.raises(ValueError, match="spatial_dims 2, in_channels 1, spatial_channels 1"):
        SliceTrainingConfig(model=VelocityNetConfig(**{**NET, "spatial_channels": 0}))


def test_the_slice_position_reaches_the_network_and_guidance_keeps_it():
    family, net = tiny_family(covariate_names=("age",), covariate_kinds=("continuous",), covariate_categories=(0,))
    x, t = torch.randn(1, 1, 16, 20).expand(2, -1, -1, -1), torch.full((2,), 0.5)
    out = with_positions(net, torch.tensor([0.0, 1.0]), (16, 20))(x, t)
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # same slice, noise and time: only the position differs
    # guidance doubles the batch (conditional + unconditional): the positions follow, the covariates alone are dropped
    covariates = (torch.tensor([1.0]), torch.tensor([True]))
    settings = {"solver": "euler", "steps": 1, "guidance": 2.0}
    guided, nfe = family.sample(net, (1, 1, 16, 20, 4), covariates, settings, "cpu")
    assert guided.shape == (1, 1, 16, 20, 4) and nfe == 1
    assert np.isclose(slice_positions(5)[[0, 2, 4]].numpy(), [0.0, 0.5, 1.0]).all()
    with pytest.raises(ValueError, match="one position per slice"):
        family.loss(net, torch.randn(2, 1, 16, 20), None, None)
    with pytest.raises(ValueError, match="samples with euler, heun"):
        family.sample(net, (1, 1, 16, 20, 4), None, {**settings, "solver": "dopri5"}, "cpu")


def test_volume_i_is_the_same_whatever_the_batch_and_each_slice_has_its_own_noise():
    family, net = tiny_family(covariate_names=("age",), covariate_kinds=("continuous",), covariate_categories=(0,))
    settings = {"solver": "heun", "steps": 2, "guidance": 1.0}
    seeds = [sample_seed(3, i) for i in range(3)]
    covariates = (torch.tensor([[-1.0], [0.0], [1.0]]), torch.ones(3, 1, dtype=torch.bool))
    together, nfe = family.sample(net, (3, 1, *SHAPE), covariates, settings, "cpu", seeds)
    assert together.shape == (3, 1, *SHAPE) and nfe == 4  # heun: 2 evaluations per step, each one batch of 16 slices
    for i in range(3):
        alone, _ = family.sample(net, (1, 1, *SHAPE), (covariates[0][i], covariates[1][i]), settings, "cpu", seeds[i:i + 1])
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0)
    assert not torch.allclose(together[0, ..., 0], together[0, ..., 1], atol=1e-3)  # neighbouring slices differ
    assert not torch.allclose(together[0], together[1], atol=1e-3)


def test_a_tiny_slice_model_learns_to_draw_the_intensity_profile_along_the_slice_axis():
    """Phantom volumes whose disc brightens from the bottom slice to the top: only the position can say which slice
    is which, so sampled slices follow the profile only if the network reads it."""
    family, net = tiny_family(attention_levels=(False, False))
    net.train()
    depth, size = 8, 12
    grid = np.stack(np.meshgrid(np.arange(size) - 5.5, np.arange(size) - 5.5, indexing="ij"))
    disc = torch.from_numpy((grid**2).sum(0) <= 16)
    positions = slice_positions(depth)
    slices = (-1.0 + disc * 2 * positions[:, None, None])[:, None]  # (D, 1, 12, 12): the disc at 2p − 1, outside −1
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):
        pick = torch.randint(0, depth, (16,), generator=generator)
        loss = family.loss(net, slices[pick], None, None, positions=positions[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    volumes, _ = family.sample(net, (2, 1, size, size, depth), None, {"solver": "heun", "steps": 8, "guidance": 1.0}, "cpu")
    profiles = volumes[:, 0][:, disc].mean(1)  # (2, D): the disc's mean intensity per slice
    for profile in profiles.numpy():
        assert np.corrcoef(profile, positions.numpy())[0, 1] > 0.95
        assert profile[-1] - profile[0] > 1.0  # the data go from −1 to 1


@pytest.fixture
def prepared(tmp_path):
    data = write_prepared_with_sex(tmp_path / "data", shape=SHAPE)
    return data


def test_train_slices_resumes_exactly_and_writes_the_image_space_contract(prepared, tmp_path):
    from mriflow.train.slices import SliceDataset, train_slices
    from mriflow.data.dataset import PreparedDataset

    slices = SliceDataset(PreparedDataset(prepared, "train", covariates=["age"]))
    item = slices[SHAPE[2] + 3]  # subject 1, slice 3
    assert len(slices) == 6 * SHAPE[2] and item["image"].shape == (1, *SHAPE[:2])
    assert float(item["position"]) == pytest.approx(3 / (SHAPE[2] - 1)) and item["image"].min() >= -1

    # 6 subjects x 16 slices, batch 8: 12 steps per epoch; 14 steps cross an epoch boundary
    config = tiny_config(max_steps=14)
    train_slices(prepared, tmp_path / "whole", condition=["age", "sex"], config=config)
    train_slices(prepared, tmp_path / "split", condition=["age", "sex"], config=config, stop_at_step=6)
    train_slices(prepared, tmp_path / "split", resume=True)
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert len({row["loss"] for row in whole}) == 14 and [r["loss"] for r in whole] == [r["loss"] for r in split]
    weights_whole, meta = ckpt.load_checkpoint(tmp_path / "whole")
    weights_split, _ = ckpt.load_checkpoint(tmp_path / "split")
    assert all(torch.equal(weights_whole[k], weights_split[k]) for k in weights_whole)

    assert meta["stage"] == "slices" and meta["space"] == "image" and "autoencoder" not in meta
    assert meta["image_shape"] == list(SHAPE) and np.allclose(meta["affine"], template_affine(Grid("test", 4.0, SHAPE)))
    assert meta["config"]["model"]["covariate_names"] == ["age", "sex"] and meta["data"]["train_slices"] == 96
    # the montage: a real volume beside one drawn slice by slice, in three planes
    assert len(montage_panels(tmp_path / "whole" / "montages" / "step-00000014.png")) == 2
    with pytest.raises(ValueError, match="drop --condition to resume"):
        train_slices(prepared, tmp_path / "split", condition=["age"], resume=True)


def test_mriflow_train_slices_needs_no_autoencoder_and_generate_writes_volumes_on_the_template_grid(prepared, tmp_path):
    from mriflow.cli import main
    from mriflow.generate import export_generator, generate, load_generator, privacy_reference
    from mriflow.train.generator import train_generator

    assert FAMILIES["slices"] is SliceFlow
    run = tmp_path / "run"
    assert main(["train", "slices", str(prepared), "--out", str(run), "--condition", "age,sex", "--max-steps", "1",
                 "--threads", "1"]) == 0
    _, meta = ckpt.load_checkpoint(run)
    assert meta["preset"] == "tiny" and meta["config"]["model"]["channels"] == [32, 64, 96]
    with pytest.raises(ValueError, match="works in image space, without an autoencoder"):
        train_generator("slices", prepared, None, tmp_path / "other")

    assert main(["generate", "--model", str(run), "--out", str(tmp_path / "samples"), "--num-samples", "2",
                 "--age", "40", "--sex", "F", "--steps", "2", "--threads", "1"]) == 0
    image = nib.load(str(tmp_path / "samples" / "sample_00001.nii.gz"))
    assert image.shape == SHAPE and np.allclose(image.affine, meta["affine"])
    volume = np.asarray(image.dataobj)
    assert volume.min() >= 0 and volume.max() <= 1 and volume.std() > 0
    sidecar = json.loads((tmp_path / "samples" / "sample_00001.json").read_text())
    assert sidecar["stage"] == "slices" and sidecar["space"] == "image" and sidecar["autoencoder_checksum"] is None
    assert sidecar["covariates"] == {"age": 40.0, "sex": "F"} and sidecar["nfe"] == 4 and "labels" not in sidecar
    record = json.loads((tmp_path / "samples" / "generate.json").read_text())
    assert record["labels"] is None and record["space"] == "image"
    assert not list((tmp_path / "samples").glob("*_labels.nii.gz"))

    generator = load_generator(run, "cpu")
    assert generator.autoencoder is None and generator.latent_shape == (1, *SHAPE)
    with pytest.raises(ValueError, match="nothing to reconstruct"):
        generator.reconstruct(torch.zeros(1, 1, *SHAPE))
    with pytest.raises(ValueError, match="works in image space"):
        load_generator(run, "cpu", labels=run)
    # the privacy filter measures samples against the held-out volumes as they are: there is no decoder to match
    assert privacy_reference(prepared, generator).heldout_reference == "held-out volumes"

    exported = export_generator(run, tmp_path / "release")
    assert sorted(p.name for p in exported.iterdir()) == ["flow"]
    written = generate(exported, tmp_path / "again", n=1, covariates={"age": 40, "sex": "F"}, steps=2, device="cpu",
                       progress=False)
    again = np.asarray(nib.load(str(written.paths[0])).dataobj)
    first = np.asarray(nib.load(str(tmp_path / "samples" / "sample_00000.nii.gz")).dataobj)
    np.testing.assert_allclose(again, first, atol=2e-3)  # fp16 weights, the same sample 0
