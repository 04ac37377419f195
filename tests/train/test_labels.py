"""The label stage: a label decoder trained through the shared loop on the latents of prepared label maps,
and generate writing image + label pairs from it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import PHANTOM_REGIONS, read_log, tiny_config, write_labelled
from mriflow import checkpoint as ckpt
from mriflow.config import LoopConfig
from mriflow.data.io import load_volume, save_volume
from mriflow.data.labels import TISSUE_CLASSES, tissue_lookup, tissue_map
from mriflow.generate import export_generator, export_labels, generate, load_generator
from mriflow.train.autoencoder import train_autoencoder
from mriflow.families.flow import FlowTrainingConfig
from mriflow.models.velocity import VelocityNetConfig
from mriflow.train.generator import train_flow
from mriflow.train.labels import LabelTrainingConfig, read_label_map, train_labels

REGIONS = PHANTOM_REGIONS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prepared phantom folder with labels, a tiny autoencoder, its label decoder and a flow on its latents."""
    root = tmp_path_factory.mktemp("labelled")
    torch.set_num_threads(1)
    data = write_labelled(root / "data")
    train_autoencoder(data, root / "ae", config=tiny_config(max_steps=4, adversarial_start=100))
    loop = LoopConfig(max_steps=60, batch_size=2, lr=3e-3, warmup_steps=5, log_every=5, montage_every=30,
                      checkpoint_every=30, ema_decay=0.5, device="cpu")
    result = train_labels(data, root / "ae", root / "labels", config=LabelTrainingConfig(loop=loop),
                          regions=data / "regions.csv")
    model = VelocityNetConfig(in_channels=2, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                              num_head_channels=8, norm_num_groups=4)
    flow = FlowTrainingConfig(model=model, loop=LoopConfig(max_steps=2, batch_size=2, device="cpu", checkpoint_every=2,
                                                           montage_every=100))
    train_flow(data, root / "ae", root / "flow", config=flow)
    return {"root": root, "data": data, "result": result}


def test_region_names_map_the_label_maps_to_tissue_classes(tmp_path):
    REGIONS.to_csv(tmp_path / "regions.csv", index=False)
    label_map = read_label_map(tmp_path / "regions.csv")
    # plus DLMUSE's two unnamed labels (46 CSF, 69 optic chiasm), which every DLMUSE map may hold
    assert label_map == {"4": "ventricles", "23": "grey_matter", "40": "white_matter", "35": "brainstem",
                         "46": "csf", "69": "white_matter"}
    lookup = tissue_lookup(label_map)
    assert tissue_map(np.array([0, 4, 23, 40, 35]), lookup).tolist() == [0, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        tissue_map(np.array([0, 7]), lookup, "sub01.nii.gz")
    with pytest.raises(FileNotFoundError, match="--regions"):
        read_label_map(tmp_path / "absent.csv")


def test_the_label_stage_trains_through_the_loop_and_learns_the_label_maps(trained):
    log = read_log(trained["root"] / "labels")
    assert {"loss", "dice"} <= set(log[0])
    first, last = float(log[0]["dice"]), float(log[-1]["dice"])
    assert last > first + 0.2 and last > 0.6, (first, last)
    _, meta = ckpt.load_checkpoint(trained["result"]["checkpoint"])
    assert meta["stage"] == "labels" and meta["classes"] == list(TISSUE_CLASSES)
    assert meta["label_map"]["4"] == "ventricles"
    assert meta["autoencoder"]["model_sha256"] == ckpt.sha256(ckpt.resolve_checkpoint(trained["root"] / "ae") / ckpt.MODEL_FILE)
    assert list((trained["root"] / "labels" / "montages").iterdir())


def test_generate_writes_aligned_image_and_label_pairs(trained, tmp_path):
    root = trained["root"]
    result = generate(root / "flow", tmp_path / "out", n=3, labels=root / "labels",
                      device="cpu", progress=False)
    for path in result.paths:
        name = path.name.removesuffix(".nii.gz")
        labels_file = path.with_name(f"{name}_labels.nii.gz")
        image, labels = nib.load(str(path)), nib.load(str(labels_file))
        assert labels.get_data_dtype() == np.uint8 and labels.shape == image.shape
        np.testing.assert_array_equal(labels.affine, image.affine)
        np.testing.assert_array_equal(labels.get_qform(), image.get_qform())
        values = np.asarray(labels.dataobj)
        assert values.max() < len(TISSUE_CLASSES) and (values > 0).any()
        sidecar = json.loads(path.with_name(f"{name}.json").read_text())
        assert sidecar["labels"] == labels_file.name and sidecar["label_classes"] == list(TISSUE_CLASSES)
    record = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert record["labels"]["classes"] == list(TISSUE_CLASSES)
    assert record["samples"] == [p.name for p in result.paths]  # the label maps are not counted as samples

    # the same seeds without the decoder: the very same images, and no label maps
    plain = generate(root / "flow", tmp_path / "plain", n=3, device="cpu", progress=False)
    for a, b in zip(result.paths, plain.paths):
        np.testing.assert_array_equal(load_volume(a)[0], load_volume(b)[0])
    assert not list((tmp_path / "plain").glob("*_labels.nii.gz"))  # no anatomy network for this grid either
    with pytest.raises(FileNotFoundError, match="--labels anatomy: mriflow ships no anatomy network for the grid"):
        load_generator(root / "flow", "cpu", labels="anatomy")


def test_the_labels_of_an_exported_model_travel_with_it_and_are_its_default(trained, tmp_path):
    root = trained["root"]
    model = export_generator(root / "flow", tmp_path / "model")
    export_labels(root / "labels", model)
    assert load_generator(model, "cpu").labels is not None
    assert load_generator(model, "cpu", labels=False).labels is None
    result = generate(model, tmp_path / "out", n=1, device="cpu", progress=False)
    assert result.paths[0].with_name("sample_00000_labels.nii.gz").is_file()
    with pytest.raises(FileExistsError, match="already exists"):
        export_labels(root / "labels", model)


def test_the_label_decoder_travels_with_a_refined_decoder_of_its_autoencoder(trained, tmp_path):
    root = trained["root"]
    train_autoencoder(trained["data"], tmp_path / "refined", refine_decoder=root / "ae", max_steps=1)
    model = export_generator(root / "flow", tmp_path / "model", autoencoder=tmp_path / "refined")
    # the same encoder, so the same latents the labels were trained on: accepted as a run and exported beside it
    assert load_generator(model, "cpu", labels=root / "labels").labels_meta["source"] == "decoder"
    export_labels(root / "labels", model)
    result = generate(model, tmp_path / "out", n=1, device="cpu", progress=False)
    assert result.paths[0].with_name("sample_00000_labels.nii.gz").is_file()


def test_a_label_decoder_of_another_autoencoder_is_refused(trained, tmp_path):
    root = trained["root"]
    other = tmp_path / "other"
    train_autoencoder(trained["data"], other, config=tiny_config(max_steps=1, adversarial_start=100))
    loop = LoopConfig(max_steps=1, batch_size=2, device="cpu", checkpoint_every=1, montage_every=10)
    train_labels(trained["data"], other, tmp_path / "labels", config=LabelTrainingConfig(loop=loop),
                 regions=trained["data"] / "regions.csv")
    with pytest.raises(ValueError, match="not on the generator's autoencoder"):
        load_generator(root / "flow", "cpu", labels=tmp_path / "labels")
    with pytest.raises(ValueError, match="not on"):
        export_labels(tmp_path / "labels", export_generator(root / "flow", tmp_path / "model"))


@pytest.fixture(scope="module")
def label_conditioned(trained):
    """A flow conditioned on the tissue maps of the phantoms (tiny, 2 steps)."""
    root = trained["root"]
    model = VelocityNetConfig(in_channels=2, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                              num_head_channels=8, norm_num_groups=4)
    flow = FlowTrainingConfig(model=model, loop=LoopConfig(max_steps=2, batch_size=2, device="cpu", checkpoint_every=2,
                                                           montage_every=1))
    train_flow(trained["data"], root / "ae", root / "flow-labels", config=flow, label_condition=True,
               regions=trained["data"] / "regions.csv")
    return root / "flow-labels"


def test_a_label_conditioned_flow_records_its_condition_and_draws_for_a_given_map(trained, label_conditioned, tmp_path):
    _, meta = ckpt.load_checkpoint(label_conditioned)
    assert meta["config"]["model"]["spatial_channels"] == len(TISSUE_CLASSES)
    assert meta["spatial_condition"]["factor"] == 4 and meta["spatial_condition"]["label_map"]["40"] == "white_matter"
    data = trained["data"]
    # a prepared subject's DLMUSE map, and the same map as tissue classes (what a _labels file holds)
    dlmuse = data / "labels" / "sub04.nii.gz"
    generator = load_generator(label_conditioned, "cpu")
    fractions = generator.label_condition(dlmuse)
    assert fractions.shape == (1, len(TISSUE_CLASSES), 4, 5, 4)
    torch.testing.assert_close(fractions.sum(1), torch.ones(1, 4, 5, 4))
    volume, affine = load_volume(dlmuse)
    tissue = tissue_map(volume, tissue_lookup(meta["spatial_condition"]["label_map"]))
    save_volume(tmp_path / "tissue.nii.gz", tissue, affine, dtype=np.uint8)
    torch.testing.assert_close(generator.label_condition(tmp_path / "tissue.nii.gz"), fractions)

    a = generate(label_conditioned, tmp_path / "a", n=2, label_map=dlmuse, device="cpu", progress=False, labels=False)
    b = generate(label_conditioned, tmp_path / "b", n=2, label_map=tmp_path / "tissue.nii.gz", device="cpu",
                 progress=False, labels=False)
    for x, y in zip(a.paths, b.paths):  # the same anatomy given two ways: the same scans
        np.testing.assert_array_equal(load_volume(x)[0], load_volume(y)[0])
    sidecar = json.loads((tmp_path / "a" / "sample_00000.json").read_text())
    assert sidecar["label_map"]["path"] == str(dlmuse.resolve())
    # another anatomy, same seeds: other scans (the condition reaches the network)
    empty = tmp_path / "empty.nii.gz"
    save_volume(empty, np.zeros_like(tissue), affine, dtype=np.uint8)
    c = generate(label_conditioned, tmp_path / "c", n=2, label_map=empty, device="cpu", progress=False, labels=False)
    assert not np.array_equal(load_volume(a.paths[0])[0], load_volume(c.paths[0])[0])


def test_label_maps_are_refused_where_they_do_not_fit(trained, label_conditioned, tmp_path):
    with pytest.raises(ValueError, match="pass --label-map"):
        generate(label_conditioned, tmp_path / "a", n=1, device="cpu", progress=False, labels=False)
    with pytest.raises(FileNotFoundError, match="--label-map .*absent.nii.gz: no such file"):
        generate(label_conditioned, tmp_path / "a", n=1, device="cpu", progress=False, labels=False,
                 label_map=tmp_path / "absent.nii.gz")
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="not conditioned on label maps"):
        generate(trained["root"] / "flow", tmp_path / "b", n=1, device="cpu", progress=False,
                 label_map=trained["data"] / "labels" / "sub00.nii.gz")
    small = tmp_path / "small.nii.gz"
    save_volume(small, np.zeros((8, 8, 8), np.uint8), np.eye(4), dtype=np.uint8)
    with pytest.raises(ValueError, match="model's grid"):
        generate(label_conditioned, tmp_path / "c", n=1, device="cpu", progress=False, labels=False, label_map=small)
    assert not (tmp_path / "c").exists()
