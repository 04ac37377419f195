from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from mriflow import checkpoint as ckpt
from mriflow.config import Grid, from_dict, to_dict
from mriflow.data.dataset import PreparedDataset
from mriflow.data.io import template_affine
from mriflow.flow.sampling import sample_latents
from mriflow.latents import encode_dataset, latent_cache_dir
from mriflow.models.velocity import VelocityNet, VelocityNetConfig, num_parameters
from mriflow.train.autoencoder import train_autoencoder
from mriflow.families.diffusion import DiffusionSamplingConfig, DiffusionTrainingConfig
from mriflow.families.flow import FlowSamplingConfig, FlowTrainingConfig
from mriflow.train.generator import PRESETS, latents_are_current, load_config, train_diffusion, train_flow, train_generator
from mriflow.train.generator_data import subjects_digest
from mriflow.train.loop import LoopConfig
from conftest import montage_panels, read_log, tiny_config, write_prepared_with_sex

SHAPE = (16, 20, 16)  # write_prepared's volumes; the tiny autoencoder makes latents of 2 x 4 x 5 x 4


@pytest.fixture
def prepared(tmp_path):
    """A prepared folder (6 training subjects with age and sex, 1 validation) and a 1-step autoencoder of it."""
    data = write_prepared_with_sex(tmp_path / "data", shape=SHAPE)
    train_autoencoder(data, tmp_path / "ae", config=tiny_config(max_steps=1, adversarial_start=100))
    return data, tmp_path / "ae"


def tiny(stage="flow", max_steps=3, **loop):
    model = VelocityNetConfig(in_channels=2, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                              num_head_channels=8, norm_num_groups=4)
    loop = LoopConfig(**{"max_steps": max_steps, "batch_size": 2, "warmup_steps": 2, "log_every": 1, "montage_every": 3,
                         "checkpoint_every": 3, "device": "cpu", **loop})
    if stage == "flow":
        return FlowTrainingConfig(model=model, loop=loop)
    return DiffusionTrainingConfig(model=dataclasses.replace(model, time_scale=1.0), loop=loop)


def check_contract(run, stage, data, autoencoder):
    """The checkpoint meta that mriflow.generate reads; returns (meta, the rebuilt EMA network)."""
    weights, meta = ckpt.load_checkpoint(run)
    assert meta["stage"] == stage and meta["preset"] is None  # a given config, no preset
    checkpoint_dir = ckpt.resolve_checkpoint(autoencoder).resolve()
    index = json.loads((latent_cache_dir(data, checkpoint_dir) / "index.json").read_text())
    assert meta["autoencoder"] == {"path": str(checkpoint_dir), "model_sha256": ckpt.sha256(checkpoint_dir / ckpt.MODEL_FILE),
                                   "latent_scale": index["latent_scale"], "step": 1}
    assert meta["latent_shape"] == [2, 4, 5, 4] and meta["image_shape"] == list(SHAPE)
    # prepare.json of write_prepared has no "affine": it comes from the first volume's header
    assert np.allclose(meta["affine"], template_affine(Grid("test", 4.0, SHAPE)))
    assert meta["grid"] == "test" and meta["preparation"]["recipe"] == ["phantom"]
    assert meta["data"] == {"dir": str(data.resolve()), "name": "data", "train_subjects": 6,
                            "subjects_sha256": subjects_digest([f"sub{i:02d}" for i in range(6)])}
    # the model config rebuilds the network, and the EMA weights under "velocity." load into it strictly
    net = VelocityNet(from_dict(VelocityNetConfig, meta["config"]["model"]))
    assert all(key.startswith("velocity.") for key in weights)
    ckpt.load_weights_into(net, weights, "velocity.", str(run))
    assert meta["parameters"] == num_parameters(net)
    rows = montage_panels(run / "montages" / "step-00000003.png")
    assert len(rows) == 2  # the real latent decoded, a sample with its covariates; three planes each
    assert all(panel.std() > 0.01 for row in rows for panel in row)  # decoded volumes, not blank panels
    return meta, net


def test_presets_load_and_the_diffusion_presets_mirror_the_flow_ones():
    for preset in PRESETS:
        flow, diffusion = load_config("flow", preset), load_config("diffusion", preset)
        assert flow.model.time_scale == 1000.0 and diffusion.model.time_scale == 1.0
        assert dataclasses.replace(diffusion.model, time_scale=1000.0) == flow.model and diffusion.loop == flow.loop
        assert flow.sampling.time_shift == flow.objective.time_shift  # sampling grid = training times
        bytes_per_weight = 2 if flow.loop.weights_dtype in ("float16", "bfloat16") else 4
        assert num_parameters(VelocityNet(flow.model)) * bytes_per_weight < ckpt.MAX_TRAVELLING_BYTES
    assert load_config("flow", "tiny", max_steps=7).loop.max_steps == 7
    # the default samplers generate.py falls back on
    assert to_dict(FlowSamplingConfig()) == {"solver": "heun", "steps": 8, "guidance": 1.0, "time_shift": 1.0}
    assert to_dict(DiffusionSamplingConfig()) == {"solver": "ddim", "steps": 50, "guidance": 1.0}


def test_configs_refuse_unknown_fields_and_bad_values():
    with pytest.raises(ValueError, match=r"objective: unknown field\(s\) los; valid fields are loss"):
        from_dict(FlowTrainingConfig, {"objective": {"los": "l1"}})
    with pytest.raises(ValueError, match="unknown field.*diffusion.*valid fields are model, objective"):
        from_dict(FlowTrainingConfig, {"diffusion": {}})
    with pytest.raises(ValueError, match="objective.loss must be one of l2, l1"):
        from_dict(FlowTrainingConfig, {"objective": {"loss": "l3"}})
    with pytest.raises(ValueError, match="sampling.solver must be one of ddpm, ddim"):
        from_dict(DiffusionTrainingConfig, {"sampling": {"solver": "heun"}})
    with pytest.raises(ValueError, match="model.time_scale must be 1.0 for diffusion"):
        from_dict(DiffusionTrainingConfig, {"model": {"time_scale": 1000.0}})
    with pytest.raises(ValueError, match="unknown flow preset 'huge'; available: base, large, small, tiny"):
        load_config("flow", "huge")


def test_an_unknown_covariate_is_refused_before_anything_is_encoded(prepared, tmp_path):
    data, autoencoder = prepared
    with pytest.raises(ValueError, match=r"unknown covariate\(s\) 'height'.* has: age, sex"):
        train_flow(data, autoencoder, tmp_path / "flow", condition=["age", "height"], config=tiny())
    assert not latent_cache_dir(data, autoencoder).exists() and not (tmp_path / "flow").exists()


def test_a_conditional_flow_run_encodes_its_latents_and_writes_the_checkpoint_contract(prepared, tmp_path):
    data, autoencoder = prepared
    assert not latents_are_current(data, autoencoder)
    result = train_flow(data, autoencoder, tmp_path / "flow", condition=["age", "sex"], config=tiny())
    assert latents_are_current(data, autoencoder)  # encoded when training started
    assert result["step"] == 3 and result["checkpoint"].endswith("step-00000003")
    assert [row["step"] for row in read_log(tmp_path / "flow")] == ["1", "2", "3"]
    assert all(np.isfinite(float(row["loss"])) and float(row["loss"]) > 0 for row in read_log(tmp_path / "flow"))

    meta, net = check_contract(tmp_path / "flow", "flow", data, autoencoder)
    model = meta["config"]["model"]
    assert model["covariate_names"] == ["age", "sex"] and model["covariate_kinds"] == ["continuous", "categorical"]
    assert model["covariate_categories"] == [0, 2] and model["time_scale"] == 1000.0
    assert meta["config"]["objective"]["time_distribution"] == "logit_normal"
    assert meta["config"]["sampling"] == {"solver": "heun", "steps": 8, "guidance": 1.0, "time_shift": 1.0}
    # the schema is the one fitted on the training split
    fitted = PreparedDataset(data, "train", covariates=["age", "sex"]).schema.to_dict()
    assert json.dumps(meta["schema"], sort_keys=True) == json.dumps(fitted, sort_keys=True)  # NaN ranges of categories
    assert meta["schema"]["covariates"][1]["categories"] == ["F", "M"]
    values, present = torch.tensor([0.5, 1.0]), torch.tensor([True, True])
    latents, _ = sample_latents(net, (2, *meta["latent_shape"]), (values, present), steps=2)
    assert latents.shape == (2, 2, 4, 5, 4) and torch.isfinite(latents).all()


def test_stale_latents_are_encoded_again_and_an_unconditional_run_has_an_empty_schema(prepared, tmp_path):
    data, autoencoder = prepared
    encode_dataset(data, autoencoder, device="cpu")
    train_autoencoder(data, autoencoder, resume=True, max_steps=2)  # new weights: the cache is stale
    assert not latents_are_current(data, autoencoder)
    train_flow(data, autoencoder, tmp_path / "flow", config=tiny(max_steps=1))
    assert latents_are_current(data, autoencoder)
    _, meta = ckpt.load_checkpoint(tmp_path / "flow")
    assert meta["schema"] == {"covariates": []} and meta["config"]["model"]["covariate_names"] == []
    assert meta["autoencoder"]["step"] == 2


@pytest.mark.parametrize("stage", ["flow", "diffusion"])
def test_resume_continues_with_the_same_loss_curve_as_an_uninterrupted_run(prepared, tmp_path, stage):
    data, autoencoder = prepared
    train, other = (train_flow, train_diffusion) if stage == "flow" else (train_diffusion, train_flow)
    # 6 subjects, batch 2: the 6 steps cross an epoch boundary; posterior draws, noise, times and
    # covariate dropout must all come back from the checkpoint.
    config = tiny(stage, max_steps=6)
    train(data, autoencoder, tmp_path / "whole", condition=["age", "sex"], config=config)
    train(data, autoencoder, tmp_path / "split", condition=["age", "sex"], config=config, stop_at_step=3)
    assert len(read_log(tmp_path / "split")) == 3
    train(data, autoencoder, tmp_path / "split", resume=True)

    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [row["step"] for row in split] == [str(s) for s in range(1, 7)]
    assert len({row["loss"] for row in whole}) == 6  # a curve, not a constant
    assert [row["loss"] for row in whole] == [row["loss"] for row in split]
    weights_whole, _ = ckpt.load_checkpoint(tmp_path / "whole")
    weights_split, _ = ckpt.load_checkpoint(tmp_path / "split")
    assert all(torch.equal(weights_whole[k], weights_split[k]) for k in weights_whole)
    with pytest.raises(ValueError, match="drop --condition to resume"):
        train(data, autoencoder, tmp_path / "split", condition=["age"], resume=True, max_steps=8)
    with pytest.raises(ValueError, match=f"holds a '{stage}' run, not a"):
        other(data, autoencoder, tmp_path / "split", resume=True, max_steps=8)
    with pytest.raises(ValueError, match="--preset small: .* was trained with a given config; drop --preset"):
        train(data, autoencoder, tmp_path / "split", resume=True, max_steps=8, preset="small")


def test_a_run_is_not_continued_on_other_training_subjects(tmp_path):
    """Issue 25.9: a resume took another prepared folder and its checkpoint's data record switched without a word."""
    data = write_prepared_with_sex(tmp_path / "data", shape=SHAPE)
    train_flow(data, None, tmp_path / "run", condition=["age", "sex"], config=tiny_wavelet(max_steps=4), stop_at_step=2)
    other = write_prepared_with_sex(tmp_path / "other", shape=SHAPE)
    manifest = other / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("sub05", "sub99"))  # one training subject differs
    (other / "images" / "sub05.nii.gz").rename(other / "images" / "sub99.nii.gz")
    (other / "masks" / "sub05.nii.gz").rename(other / "masks" / "sub99.nii.gz")
    with pytest.raises(ValueError, match="its 6 training subjects are not the ones .* learned from"):
        train_flow(other, None, tmp_path / "run", resume=True)
    moved = tmp_path / "moved"
    data.rename(moved)  # the same subjects in another folder (a new machine): continued
    assert train_flow(moved, None, tmp_path / "run", resume=True)["step"] == 4


def test_a_conditional_diffusion_run_writes_the_checkpoint_contract(prepared, tmp_path):
    data, autoencoder = prepared
    train_diffusion(data, autoencoder, tmp_path / "diffusion", condition=["sex"], config=tiny("diffusion"))
    meta, net = check_contract(tmp_path / "diffusion", "diffusion", data, autoencoder)
    assert meta["config"]["model"]["covariate_names"] == ["sex"] and meta["config"]["model"]["time_scale"] == 1.0
    assert meta["config"]["diffusion"]["prediction"] == "v" and meta["config"]["diffusion"]["schedule"] == "scaled_linear_beta"
    assert meta["config"]["sampling"] == {"solver": "ddim", "steps": 50, "guidance": 1.0}
    assert "objective" not in meta["config"] and [c["name"] for c in meta["schema"]["covariates"]] == ["sex"]
    assert all(np.isfinite(float(row["loss"])) for row in read_log(tmp_path / "diffusion"))


def test_a_damaged_latent_cache_is_encoded_again_and_a_damaged_prepare_json_named(prepared, tmp_path):
    data, autoencoder = prepared
    cache = encode_dataset(data, autoencoder, device="cpu")
    assert latents_are_current(data, autoencoder)
    weights = cache / "train.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short: training must encode it again, not read it
    assert not latents_are_current(data, autoencoder)
    (cache / "index.json").write_text('{"splits": ')
    assert not latents_are_current(data, autoencoder)
    record = data / "prepare.json"
    record.write_text('{"preset": ')
    with pytest.raises(ValueError, match=rf"{record}: damaged or incomplete JSON .*mriflow prepare"):
        train_flow(data, autoencoder, tmp_path / "flow", config=tiny(max_steps=1))


# ---- a generator of the images behind a fixed representation, without an autoencoder (issue 24) ----


def tiny_wavelet(max_steps=3, **loop):
    """A flow on the 2-level Haar packet of write_prepared's 16 x 20 x 16 volumes (64 bands of 4 x 5 x 4), x-prediction,
    flip flag on: the wavelet preset in miniature."""
    model = VelocityNetConfig(in_channels=64, channels=(16, 16), attention_levels=(False, True), num_res_blocks=1,
                              num_head_channels=8, norm_num_groups=4, flip_channel=True)
    loop = LoopConfig(**{"max_steps": max_steps, "batch_size": 2, "warmup_steps": 2, "log_every": 1, "montage_every": 3,
                         "checkpoint_every": 3, "device": "cpu", **loop})
    from mriflow.families.flow import FlowObjectiveConfig

    return FlowTrainingConfig(model=model, loop=loop, representation="haar2",
                              objective=FlowObjectiveConfig(prediction="data", time_mean=-0.8, time_std=0.8))


def test_a_representation_run_learns_the_images_without_an_autoencoder_and_resumes_exactly(tmp_path):
    data = write_prepared_with_sex(tmp_path / "data", shape=SHAPE)
    config = tiny_wavelet(max_steps=6)
    train_flow(data, None, tmp_path / "whole", condition=["age", "sex"], config=config)
    train_flow(data, None, tmp_path / "split", condition=["age", "sex"], config=config, stop_at_step=3)
    train_flow(data, None, tmp_path / "split", resume=True)
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert len({row["loss"] for row in whole}) == 6 and [r["loss"] for r in whole] == [r["loss"] for r in split]
    assert all(float(row["cpu_seconds"]) > 0 for row in whole)
    weights, meta = ckpt.load_checkpoint(tmp_path / "whole")
    weights_split, _ = ckpt.load_checkpoint(tmp_path / "split")
    assert all(torch.equal(weights[k], weights_split[k]) for k in weights)

    assert "autoencoder" not in meta and meta["space"] == "image" and meta["latent_shape"] == [64, 4, 5, 4]
    record = meta["representation"]
    assert record["kind"] == "haar" and record["levels"] == 2 and len(record["band_std"]) == 64
    # the bands were normalised on the training split: the low-pass band's mean is the volumes' mean in [−1, 1], x 8
    images = PreparedDataset(data, "train")
    volumes = torch.stack([images[i]["image"] for i in range(len(images))]).double()
    assert record["band_mean"][0] == pytest.approx(float((2 * volumes - 1).mean() * 8), rel=1e-4)
    assert meta["data"]["train_subjects"] == 6 and meta["config"]["model"]["flip_channel"]
    validation = (tmp_path / "whole" / "validation.csv").read_text().splitlines()
    assert validation[0].startswith("step,val_x_mse,val_x_mse_t0.3") and len(validation) == 3  # steps 3 and 6
    rows = montage_panels(tmp_path / "whole" / "montages" / "step-00000003.png")
    assert len(rows) == 2 and all(panel.std() > 0.01 for row in rows for panel in row)


def test_a_representation_run_generates_exports_and_names_its_representation(tmp_path):
    from mriflow.export import export_generator
    from mriflow.generate import generate, load_generator

    data = write_prepared_with_sex(tmp_path / "data", shape=SHAPE)
    train_flow(data, None, tmp_path / "run", condition=["age", "sex"], config=tiny_wavelet())
    generator = load_generator(tmp_path / "run", "cpu")
    assert generator.representation_name == "haar2" and generator.space == "image" and generator.autoencoder is None
    volumes, nfe = generator.sample([0, 1], None, generator.sampling_settings(steps=3))
    assert volumes.shape == (2, *SHAPE) and volumes.min() >= 0 and volumes.max() <= 1 and nfe == 5  # heun 2 + 2, one jump
    with pytest.raises(ValueError, match="has no autoencoder"):
        generator.reconstruct(torch.zeros(1, 1, *SHAPE))

    exported = export_generator(tmp_path / "run", tmp_path / "release")
    assert sorted(p.name for p in exported.iterdir()) == ["flow"]  # nothing else travels: the transform is its record
    result = generate(exported, tmp_path / "samples", n=2, steps=2, covariates={"age": 40, "sex": "F"}, device="cpu",
                      progress=False)
    sidecar = json.loads(result.paths[0].with_name("sample_00000.json").read_text())
    assert sidecar["representation"] == "haar2" and sidecar["space"] == "image"
    assert "exactly 0" in sidecar["background"] and sidecar["autoencoder_checksum"] is None


def test_a_run_with_natural_band_energies_records_them_and_draws_through_them(tmp_path):
    """band_equalisation 0: the bands keep their energies beside the coarsest; the checkpoint records it, and the
    loaded generator decodes with the same divisors (one for every band: the coarsest band's sd)."""
    from mriflow.generate import load_generator

    data = write_prepared_with_sex(tmp_path / "data", shape=SHAPE)
    config = dataclasses.replace(tiny_wavelet(), band_equalisation=0.0)
    train_flow(data, None, tmp_path / "run", condition=["age", "sex"], config=config)
    _, meta = ckpt.load_checkpoint(tmp_path / "run")
    record = meta["representation"]
    assert record["equalisation"] == 0.0 and meta["config"]["band_equalisation"] == 0.0
    assert len(set(record["band_std"])) == 1  # every band divided by the coarsest band's sd
    generator = load_generator(tmp_path / "run", "cpu")
    assert generator.representation.equalisation == 0.0
    volumes, _ = generator.sample([0, 1], None, generator.sampling_settings(steps=2))
    assert volumes.shape == (2, *SHAPE) and volumes.min() >= 0 and volumes.max() <= 1
    # what --band-equalisation refuses: another value on resume, a value outside [0, 1], latents (no bands)
    with pytest.raises(ValueError, match="trained with band equalisation 0; drop --band-equalisation to resume"):
        train_generator("flow", data, None, tmp_path / "run", resume=True, max_steps=4, band_equalisation=1.0)
    with pytest.raises(ValueError, match=r"--band-equalisation 2: choose a value from 0"):
        train_generator("flow", data, None, tmp_path / "other", config=tiny_wavelet(), band_equalisation=2.0)
    with pytest.raises(ValueError, match="an autoencoder's latents have no bands"):
        train_generator("flow", data, tmp_path / "run", tmp_path / "other", config=dataclasses.replace(
            tiny_wavelet(), representation=""), band_equalisation=0.5)
    train_generator("flow", data, None, tmp_path / "run", resume=True, max_steps=4, band_equalisation=0.0)  # the same


def test_a_warm_start_may_move_to_another_band_scaling_and_refits_the_bands(tmp_path):
    """A long run trained with unit-sd bands can go on at another band equalisation: the network's weights carry
    over, the bands are refitted on the training split at the new scaling, and the record says what changed."""
    data = write_prepared_with_sex(tmp_path / "data", shape=SHAPE)
    train_flow(data, None, tmp_path / "first", condition=["age", "sex"], config=tiny_wavelet(max_steps=8), stop_at_step=3)
    _, first = ckpt.load_checkpoint(tmp_path / "first")
    result = train_generator("flow", data, None, tmp_path / "second", warm_start=tmp_path / "first", stop_at_step=4,
                             band_equalisation=0.5)
    assert result["step"] == 4
    _, meta = ckpt.load_checkpoint(tmp_path / "second")
    old, new = first["representation"], meta["representation"]
    assert old["equalisation"] == 1.0 and new["equalisation"] == 0.5 and meta["config"]["band_equalisation"] == 0.5
    assert meta["warm_start"]["band_equalisation"] == {"from": 1.0, "to": 0.5}
    raw = np.asarray(old["band_std"])  # unit-sd bands divide by each band's own sd
    np.testing.assert_allclose(new["band_std"], np.sqrt(raw[0] * raw), rtol=1e-5)
    np.testing.assert_allclose(new["band_mean"], old["band_mean"], rtol=1e-5, atol=1e-6)
    # resuming it keeps 0.5; asking for yet another scaling on resume is refused
    with pytest.raises(ValueError, match="trained with band equalisation 0.5; drop --band-equalisation to resume"):
        train_generator("flow", data, None, tmp_path / "second", resume=True, band_equalisation=1.0)


def test_a_representation_run_refuses_an_autoencoder_beside_it_or_neither(prepared, tmp_path):
    data, autoencoder = prepared
    with pytest.raises(ValueError, match="not both; drop --autoencoder"):
        train_flow(data, autoencoder, tmp_path / "both", config=tiny_wavelet())
    with pytest.raises(ValueError, match=r"pass --autoencoder RUN .* or --representation haar2"):
        train_flow(data, None, tmp_path / "neither", config=tiny())
    from mriflow.train.generator import train_generator

    train_flow(data, None, tmp_path / "run", config=tiny_wavelet(max_steps=1))
    with pytest.raises(ValueError, match="learns haar2; drop --representation to resume"):
        train_generator("flow", data, None, tmp_path / "run", resume=True, max_steps=2, representation="haar1")


def test_a_run_whose_folder_is_gone_restarts_warm_from_its_exported_weights(tmp_path):
    """What the CPU long-run queue does on a new machine: the exported fp16 weights carry the step, config,
    covariates and representation; the new run continues the schedule from there with fresh optimizer moments."""
    from mriflow.export import export_generator

    data = write_prepared_with_sex(tmp_path / "data", shape=SHAPE)
    train_flow(data, None, tmp_path / "first", condition=["age", "sex"], config=tiny_wavelet(max_steps=8), stop_at_step=3)
    export_generator(tmp_path / "first", tmp_path / "exported")
    from mriflow.train.generator import train_generator

    result = train_generator("flow", data, None, tmp_path / "second", warm_start=tmp_path / "exported" / "flow",
                             stop_at_step=5)
    rows = read_log(tmp_path / "second")
    assert result["step"] == 5 and [row["step"] for row in rows] == ["4", "5"]
    weights, meta = ckpt.load_checkpoint(tmp_path / "second")
    _, first = ckpt.load_checkpoint(tmp_path / "first")
    assert meta["warm_start"]["step"] == 3 and meta["representation"] == first["representation"]
    assert meta["config"]["model"]["covariate_names"] == ["age", "sex"]
    # the learning rate warms up again from the warm start's step: 1/2 then 2/2 of the schedule's (warmup_steps 2)
    schedule = [float(first_row["lr"]) for first_row in read_log(tmp_path / "first")]
    assert float(rows[0]["lr"]) < float(rows[1]["lr"]) and schedule
    train_generator("flow", data, None, tmp_path / "second", resume=True, warm_start=tmp_path / "exported" / "flow")
    _, resumed = ckpt.load_checkpoint(tmp_path / "second")
    assert resumed["step"] == 8 and resumed["warm_start"] == meta["warm_start"]


def test_a_longer_ema_is_validated_beside_the_main_one_and_can_be_exported_instead(tmp_path):
    """Issue 24.2: the EMA length chosen after training: the run keeps a second, longer EMA, validates both, resumes
    both exactly, and export_generator(..., ema="long") ships it."""
    from mriflow.export import export_generator

    data = write_prepared_with_sex(tmp_path / "data", shape=SHAPE)
    config = tiny_wavelet(max_steps=6, ema_decay=0.2, ema_long_decay=0.9)  # apart after the warm-up (step 2)
    train_flow(data, None, tmp_path / "whole", condition=["age", "sex"], config=config)
    train_flow(data, None, tmp_path / "split", condition=["age", "sex"], config=config, stop_at_step=3)
    train_flow(data, None, tmp_path / "split", resume=True)
    header = (tmp_path / "whole" / "validation.csv").read_text().splitlines()[0].split(",")
    assert "val_x_mse" in header and "val_x_mse_ema_long" in header and header[1] == "val_x_mse"
    whole, split = ckpt.load_train_state(tmp_path / "whole"), ckpt.load_train_state(tmp_path / "split")
    assert any(key.startswith("ema.velocity@long.") for key in whole)
    assert all(torch.equal(whole[k], split[k]) for k in whole if k.startswith("ema."))
    main = export_generator(tmp_path / "whole", tmp_path / "main")
    long = export_generator(tmp_path / "whole", tmp_path / "long", ema="long")
    main_weights, _ = ckpt.load_checkpoint(main / "flow")
    long_weights, long_meta = ckpt.load_checkpoint(long / "flow")
    assert set(main_weights) == set(long_weights)
    assert any(not torch.equal(main_weights[k], long_weights[k]) for k in main_weights)
    assert long_meta["ema"] == {"kind": "long", "decay": 0.9} and long_meta["model_id"].endswith("-ema-long")
    train_flow(data, None, tmp_path / "plain", config=tiny_wavelet(max_steps=1))
    with pytest.raises(ValueError, match="kept no longer EMA"):
        export_generator(tmp_path / "plain", tmp_path / "plain-long", ema="long")
