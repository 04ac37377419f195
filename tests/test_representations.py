"""The fixed representations (mriflow.representations): the Haar packet is PyWavelets' Haar transform, exactly
invertible, band-normalised by its training statistics, and recorded so that a checkpoint rebuilds it."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from mriflow.representations import HaarPacket, haar_merge, haar_split, make_representation, representation_from_dict


def volumes(batch=2, shape=(8, 12, 8), seed=0) -> torch.Tensor:
    return torch.rand(batch, 1, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_one_level_is_pywavelets_haar_transform_band_for_band():
    x = volumes()
    bands = haar_split(x)  # (B, 8, 4, 6, 4)
    reference = pywt.dwtn(x[0, 0].numpy(), "haar")  # keys 'aaa' … 'ddd': a = low pass, d = high pass, per axis
    for k, key in enumerate(sorted(reference)):
        np.testing.assert_allclose(bands[0, k].numpy(), reference[key], atol=1e-12)


def test_two_levels_are_the_wavelet_packet_of_pywavelets():
    x = volumes(batch=1)
    bands = HaarPacket(levels=2).transform(x)  # (1, 64, 2, 3, 2), before normalisation, of 2x − 1
    level1 = pywt.dwtn(2 * x[0, 0].numpy() - 1, "haar")
    for j, outer in enumerate(sorted(level1)):
        level2 = pywt.dwtn(level1[outer], "haar")
        for k, inner in enumerate(sorted(level2)):
            np.testing.assert_allclose(bands[0, 8 * j + k].numpy(), level2[inner], atol=1e-12)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_decode_inverts_encode(levels):
    x = volumes(shape=(8, 16, 8))
    representation = HaarPacket(levels).fit(x)
    bands = representation.encode(x.float())
    assert bands.shape == (2, 8**levels, *(n // 2**levels for n in (8, 16, 8)))
    assert (representation.decode(bands) - x.float()).abs().max() < 2e-6
    assert (haar_merge(haar_split(x)) - x).abs().max() < 1e-14


def test_fitted_bands_have_zero_mean_and_unit_variance_and_a_constant_band_keeps_std_one():
    x = volumes(batch=4, shape=(8, 8, 8))
    representation = HaarPacket(2).fit([x[:2], x[2:]])  # statistics accumulated over batches
    bands = representation.encode(x.float()).double()
    np.testing.assert_allclose(bands.mean(dim=(0, 2, 3, 4)).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(bands.std(dim=(0, 2, 3, 4), unbiased=False).numpy(), 1, atol=1e-4)
    flat = HaarPacket(1).fit(torch.full((1, 1, 4, 4, 4), 0.5))
    assert flat.band_std.tolist() == [1.0] * 8  # every band constant: nothing to divide by


def test_the_record_rebuilds_the_same_representation_and_bad_records_are_refused():
    x = volumes()
    representation = HaarPacket(2).fit(x)
    record = representation.to_dict()
    rebuilt = representation_from_dict(record)
    assert rebuilt.name == "haar2" and torch.equal(rebuilt.encode(x.float()), representation.encode(x.float()))
    with pytest.raises(ValueError, match="representation 'vq' is unknown"):
        representation_from_dict({"kind": "vq"}, "run/checkpoint.json")
    with pytest.raises(ValueError, match="lacks or mangles"):
        representation_from_dict({"kind": "haar", "levels": 2}, "run/checkpoint.json")
    with pytest.raises(ValueError, match="64 values each"):
        HaarPacket(2, band_mean=[0.0] * 8, band_std=[1.0] * 8)


def test_grids_that_do_not_divide_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match=r"80 x 96 x 81 must divide by 4"):
        HaarPacket(2).latent_shape((80, 96, 81))
    assert HaarPacket(2).latent_shape((80, 96, 80)) == (64, 20, 24, 20)
    with pytest.raises(ValueError, match="choose one of haar1, haar2, haar3"):
        make_representation("haar9")
    with pytest.raises(ValueError, match="1, 2 or 3 levels"):
        HaarPacket(levels=4)


def smooth_volumes(batch=3, shape=(16, 16, 16), seed=1) -> torch.Tensor:
    """Blobs with a little texture: the coarse band carries most of the energy, as in brains."""
    grid = torch.stack(torch.meshgrid(*(torch.linspace(-1, 1, n, dtype=torch.float64) for n in shape), indexing="ij"))
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 3, 1, 1, 1, generator=generator, dtype=torch.float64) * 0.6 - 0.3
    blobs = torch.exp(-((grid[None] - centres) ** 2).sum(1, keepdim=True) / 0.3)
    return (0.8 * blobs + 0.05 * torch.rand(blobs.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)


@pytest.mark.parametrize("equalisation", [0.0, 0.5, 1.0])
def test_band_equalisation_scales_each_band_to_its_natural_share_of_the_coarsest_and_still_inverts(equalisation):
    x = smooth_volumes()
    raw = HaarPacket(2).transform(x).std(dim=(0, 2, 3, 4), unbiased=False)  # each band's sd before scaling
    assert raw[0] > 20 * raw.min()  # the coarse band dominates: what equalisation decides about
    representation = make_representation("haar2", equalisation).fit(x)
    bands = representation.encode(x.float()).double()
    sd = bands.std(dim=(0, 2, 3, 4), unbiased=False)
    np.testing.assert_allclose(sd.numpy(), ((raw / raw[0]) ** (1.0 - equalisation)).numpy(), rtol=1e-4)
    np.testing.assert_allclose(bands.mean(dim=(0, 2, 3, 4)).numpy(), 0, atol=1e-5)
    assert (representation.decode(bands.float()) - x.float()).abs().max() < 2e-6
    rebuilt = representation_from_dict(representation.to_dict())
    assert rebuilt.equalisation == equalisation and torch.equal(rebuilt.encode(x.float()), bands.float())


def test_records_before_band_equalisation_read_as_unit_bands_and_bad_values_are_refused():
    record = HaarPacket(2).fit(volumes()).to_dict()
    del record["equalisation"]  # what checkpoints written before 2026-12-07 hold
    assert representation_from_dict(record).equalisation == 1.0
    assert "normalised by their training mean and sd" in HaarPacket(2).to_dict()["description"]
    assert "the coarsest scaled to unit sd" in HaarPacket(2, equalisation=0.0).to_dict()["description"]
    with pytest.raises(ValueError, match=r"band equalisation must lie in \[0, 1\], got 1.5"):
        make_representation("haar2", 1.5)
