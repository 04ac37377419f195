"""generate.py on tiny generator runs built here (VelocityNet + Autoencoder saved to the checkpoint contract)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import (DIFFUSION_SCHEDULE, MODEL_AFFINE, MODEL_IMAGE_SHAPE, montage_panels, save_tiny_autoencoder,
                      save_tiny_generator, write_prepared)
from mriflow import checkpoint as ckpt
from mriflow import generate as generation
from mriflow import generator as generator_module
from mriflow.config import get_grid
from mriflow.data.io import load_volume, template_affine
from mriflow.utils.seeding import sample_seed
from mriflow.families.diffusion import diffusion_path
from mriflow.generate import Generator, export_generator, generate, load_generator
from mriflow.generate_io import SIDECAR_KEYS


FAST = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    autoencoder = save_tiny_autoencoder(root / "autoencoder")
    return {"flow": save_tiny_generator(root / "flow", autoencoder),
            "diffusion": save_tiny_generator(root / "diffusion", autoencoder, "diffusion", relative=False)}


def volumes(out: Path) -> dict[str, np.ndarray]:
    return {p.name: load_volume(p)[0] for p in sorted(out.glob("sample_*.nii.gz"))}


def sidecars(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("sample_*.json"))}


def test_volumes_carry_the_model_geometry_and_a_full_sidecar(runs, tmp_path):
    result = generate(runs["flow"], tmp_path / "out", n=2, covariates={"age": 45, "sex": "F"}, solver="euler",
                      steps=2, guidance=1.5, seed=3, **FAST)
    assert [p.name for p in result.paths] == ["sample_00000.nii.gz", "sample_00001.nii.gz"]
    image = nib.load(str(result.paths[1]))
    assert image.shape == MODEL_IMAGE_SHAPE
    for matrix, code in (image.get_qform(coded=True), image.get_sform(coded=True)):
        np.testing.assert_allclose(matrix, MODEL_AFFINE, atol=1e-5)
        assert int(code) == 4
    data = np.asarray(image.dataobj)
    assert 0.0 <= data.min() and data.max() <= 1.0 and data.std() > 0

    record = json.loads((tmp_path / "out" / "sample_00001.json").read_text())
    for key in SIDECAR_KEYS + ("sample_seed", "index", "stage", "autoencoder_checksum", "device", "attempt"):
        assert key in record, key
    checkpoint = runs["flow"] / "checkpoints" / "step-00000010"
    assert record["covariates"] == {"age": 45.0, "sex": "F"}
    assert record["model_checksum"] == "sha256:" + ckpt.sha256(checkpoint / ckpt.MODEL_FILE)
    assert record["solver"] == "euler" and record["steps"] == 2 and record["nfe"] == 2  # guided: one forward of 2B per step
    assert record["seed"] == 3 and record["index"] == 1 and record["sample_seed"] == sample_seed(3, 1)
    assert record["stage"] == "flow" and record["device"] == "cpu" and record["attempt"] == 0
    assert record["representation"] == "autoencoder latents" and "exactly 0" in record["background"]
    assert (data[nib.load(str(result.paths[1])).get_fdata() == 0] == 0).all()

    run_record = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert run_record["n"] == 2 and run_record["samples"] == ["sample_00000.nii.gz", "sample_00001.nii.gz"]
    assert run_record["redraws"] == 0 and run_record["privacy_filter"] is None
    assert len(montage_panels(tmp_path / "out" / "montage.png")) == 2  # one row of three planes per sample

    # defaults come from the checkpoint; an absent covariate is recorded as None
    generate(runs["flow"], tmp_path / "defaults", n=1, covariates={"sex": "M"}, **FAST)
    record = json.loads((tmp_path / "defaults" / "sample_00000.json").read_text())
    assert record["covariates"] == {"age": None, "sex": "M"}
    assert (record["solver"], record["steps"], record["guidance"], record["time_shift"]) == ("heun", 2, 1.0, 1.0)


@pytest.mark.parametrize("stage, solver", [("flow", "heun"), ("diffusion", "ddpm")])
def test_sample_i_is_the_same_whatever_the_batch_size(runs, tmp_path, stage, solver):
    options = dict(n=3, covariates={"age": 60}, solver=solver, steps=3, seed=5, **FAST)
    generate(runs[stage], tmp_path / "three", batch_size=3, **options)
    generate(runs[stage], tmp_path / "one", batch_size=1, **options)
    generate(runs[stage], tmp_path / "other", batch_size=3, **{**options, "seed": 6})
    three, one, other = volumes(tmp_path / "three"), volumes(tmp_path / "one"), volumes(tmp_path / "other")
    assert len(three) == 3
    for name in three:
        np.testing.assert_allclose(one[name], three[name], atol=1e-5)
        assert not np.allclose(other[name], three[name], atol=1e-3)
    assert not np.allclose(three["sample_00000.nii.gz"], three["sample_00001.nii.gz"], atol=1e-3)
    assert sidecars(tmp_path / "one") == sidecars(tmp_path / "three")


def test_unknown_covariates_and_solvers_of_the_other_family_are_refused(runs, tmp_path):
    with pytest.raises(ValueError, match=r"'height'.*knows: age, sex"):
        generate(runs["flow"], tmp_path / "out", n=1, covariates={"height": 180}, **FAST)
    with pytest.raises(ValueError, match="valid solvers: euler, heun, midpoint, rk4, dopri5"):
        generate(runs["flow"], tmp_path / "out", n=1, solver="ddim", **FAST)
    with pytest.raises(ValueError, match="valid solvers: ddpm, ddim"):
        generate(runs["diffusion"], tmp_path / "out", n=1, solver="heun", **FAST)
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="outside the training range"):
        generate(runs["flow"], tmp_path / "old", n=1, covariates={"age": 95}, solver="euler", steps=1, **FAST)


def test_temporary_files_a_killed_run_left_are_removed_when_the_next_one_starts(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = out / f".tmp-{ended.stdout.strip()}-k1ll3d.nii.gz"  # a sample half written when its run was killed
    leftover.write_bytes(b"half a volume")
    os.utime(leftover, (leftover.stat().st_mtime - 60,) * 2)
    generate(runs["flow"], out, n=1, solver="euler", steps=1, **FAST)
    assert not leftover.exists() and not list(out.glob(".tmp-*"))

def test_an_existing_output_is_refused_and_left_untouched(runs, tmp_path):
    out = tmp_path / "out"
    generate(runs["flow"], out, n=2, solver="euler", steps=1, **FAST)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="sample_00000.nii.gz.*never overwritten"):
        generate(runs["flow"], out, n=3, seed=1, solver="euler", steps=1, **FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing half-written, not even sample 2
    generate(runs["flow"], out, n=1, seed=1, solver="euler", steps=1, overwrite=True, **FAST)
    assert json.loads((out / "sample_00000.json").read_text())["seed"] == 1


def _variant(autoencoder: Path, out: Path, part: str, record: dict | None) -> Path:
    """A copy of the autoencoder checkpoint with `part` ("decoder" or "encoder") changed, and `record` as its
    decoder_refined_from."""
    weights, meta = ckpt.load_checkpoint(autoencoder)
    meta.pop("path")
    changed = {k: v + 0.01 if k.startswith(f"autoencoder.{part}.") and v.is_floating_point() else v
               for k, v in weights.items()}
    return ckpt.save_checkpoint(out, changed, {**meta, **({"decoder_refined_from": record} if record else {})})


def test_what_ships_keeps_the_data_provenance_in_a_few_kilobytes():
    from mriflow.export import travelling_meta

    checksums = {f"/data/IXI{i:03d}_T1.nii.gz": f"{i:064x}" for i in range(3)}
    meta = {"stage": "flow", "rng": [1, 2], "optimizer": {"generator": []},
            "preparation": {"preset": "2mm", "inputs": {"images": "/data", "checksums": checksums},
                            "subjects": {"IXI002": {"seconds": 1.0}, "IXI001": {"seconds": 2.0}}}}
    slim = travelling_meta(meta)
    assert "rng" not in slim and "optimizer" not in slim and slim["stage"] == "flow"
    assert slim["preparation"]["subjects"] == ["IXI001", "IXI002"] and slim["preparation"]["preset"] == "2mm"
    assert slim["preparation"]["inputs"]["files"] == 3 and "checksums" not in slim["preparation"]["inputs"]
    reordered = {"preparation": {"inputs": {"checksums": dict(reversed(list(checksums.items())))}}}
    assert travelling_meta(reordered)["preparation"]["inputs"]["checksums_sha256"] == \
        slim["preparation"]["inputs"]["checksums_sha256"]  # the same inputs, recognised
    checksums["/data/IXI000_T1.nii.gz"] = "f" * 64
    assert travelling_meta(meta)["preparation"]["inputs"]["checksums_sha256"] != \
        slim["preparation"]["inputs"]["checksums_sha256"]
    assert meta["rng"] == [1, 2]  # the caller's meta is left as it was
    for model in generator_module.shipped_models().values():  # and the shipped ones are slim
        for folder in (model / "flow", model / "autoencoder", model / "labels"):
            if folder.is_dir():
                assert (folder / ckpt.META_FILE).stat().st_size < 64_000, folder


def test_a_generator_exports_with_a_refined_decoder_and_refuses_any_other_autoencoder(runs, tmp_path):
    _, meta = ckpt.load_checkpoint(runs["flow"])
    original = ckpt.resolve_checkpoint(Path(meta["path"]) / meta["autoencoder"]["path"])
    record = {"path": str(original), "model_sha256": ckpt.sha256(original / ckpt.MODEL_FILE)}
    refined = _variant(original, tmp_path / "refined", "decoder", record)
    release = export_generator(runs["flow"], tmp_path / "release", autoencoder=refined)
    exported, own = load_generator(release, "cpu"), load_generator(runs["flow"], "cpu")
    assert exported.model_id == f"{own.model_id}+refined-step5" and exported.autoencoder_checksum != own.autoencoder_checksum
    seeds, settings = [sample_seed(0, i) for i in range(2)], own.sampling_settings()
    latents = own.draw_latents(seeds, None, settings)[0]
    torch.testing.assert_close(exported.draw_latents(seeds, None, settings)[0], latents, atol=2e-2, rtol=0)
    refined_model, _ = ckpt.load_autoencoder(refined)
    with torch.no_grad():  # decoded by the refined decoder, not the generator's own
        wanted = refined_model.decode(latents / own.latent_scale).clamp(0, 1)[:, 0].numpy()
    np.testing.assert_allclose(exported.decode(latents), wanted, atol=2e-2)
    assert np.abs(own.decode(latents) - wanted).max() > 5e-2

    other_encoder = _variant(original, tmp_path / "encoder", "encoder", record)
    with pytest.raises(ValueError, match="its encoder differs"):
        export_generator(runs["flow"], tmp_path / "release2", autoencoder=other_encoder)
    unrelated = _variant(original, tmp_path / "unrelated", "decoder", None)
    with pytest.raises(ValueError, match="not a decoder refinement of the generator's autoencoder"):
        export_generator(runs["flow"], tmp_path / "release3", autoencoder=unrelated)
    assert not (tmp_path / "release2").exists() and not (tmp_path / "release3").exists()


def test_exported_model_samples_like_its_run_and_checks_its_autoencoder(runs, tmp_path, monkeypatch):
    release = export_generator(runs["flow"], tmp_path / "release")
    files = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
    assert files == ["autoencoder/checkpoint.json", "autoencoder/model.safetensors",
                     "flow/checkpoint.json", "flow/model.safetensors"]  # no train_state travels
    assert all((release / f).stat().st_size <= ckpt.MAX_TRAVELLING_BYTES for f in files)
    _, meta = ckpt.load_checkpoint(release / "flow")
    assert meta["weights_dtype"] == "float16" and meta["autoencoder"]["path"] == "../autoencoder"

    monkeypatch.setattr(generator_module, "default_model_dir", lambda: release)
    exported, original = load_generator("default", "cpu"), load_generator(runs["flow"], "cpu")
    assert exported.model_id == original.model_id
    seeds = [sample_seed(0, i) for i in range(2)]
    settings = original.sampling_settings()
    np.testing.assert_allclose(exported.sample(seeds, None, settings)[0], original.sample(seeds, None, settings)[0],
                               atol=2e-2)
    with pytest.raises(FileExistsError, match="empty folder"):
        export_generator(runs["flow"], release)

    with open(release / "autoencoder" / ckpt.MODEL_FILE, "r+b") as stream:  # flip one byte of the weights
        stream.seek(-1, os.SEEK_END)
        last = stream.read(1)
        stream.seek(-1, os.SEEK_END)
        stream.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="sha256.*not the autoencoder weights the generator was trained with"):
        load_generator("default", "cpu")

    monkeypatch.setattr(ckpt, "MAX_TRAVELLING_BYTES", 1000)
    with pytest.raises(ValueError, match="16 MB|over the"):
        export_generator(runs["flow"], tmp_path / "too-large")
    assert not any((tmp_path / "too-large").iterdir())


def test_load_generator_names_what_is_wrong(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(generator_module, "default_model_dir", lambda: tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no default model"):
        load_generator()
    with pytest.raises(ValueError, match="'autoencoder' checkpoint, not a generator"):
        load_generator(runs["flow"].parent / "autoencoder", "cpu")


def test_diffusion_path_is_read_from_either_config_form():
    flat = diffusion_path({"diffusion": DIFFUSION_SCHEDULE})
    nested = diffusion_path({"diffusion": {"schedule": {k: v for k, v in DIFFUSION_SCHEDULE.items() if k not in ("prediction", "loss")},
                                               "prediction": "epsilon"}})
    assert flat.prediction == "v" and nested.prediction == "epsilon"
    torch.testing.assert_close(flat.alphas_cumprod, nested.alphas_cumprod)
    with pytest.raises(ValueError, match="prediction"):
        diffusion_path({"diffusion": {"num_train_timesteps": 1000}})


def test_privacy_filter_redraws_a_planted_training_copy(runs, tmp_path, monkeypatch):
    data = write_prepared(tmp_path / "data", splits=("train", "train", "val", "test"))
    copy = load_volume(data / "images" / "sub01.nii.gz")[0]
    planted = sample_seed(0, 1)  # the first draw of sample 1 decodes to a training subject
    sample = Generator.sample_pairs

    def sample_with_a_copy(self, sample_seeds, covariates, settings, spatial=None):
        decoded, labels, nfe = sample(self, sample_seeds, covariates, settings, spatial)
        for row, seed in enumerate(sample_seeds):
            if seed == planted:
                decoded[row] = copy
        return decoded, labels, nfe

    monkeypatch.setattr(Generator, "sample_pairs", sample_with_a_copy)
    options = dict(n=3, solver="euler", steps=1, batch_size=3, privacy_filter=data, **FAST)
    result = generate(runs["flow"], tmp_path / "out", **options)
    assert result.redraws == 1 and result.withheld == [] and len(result.paths) == 3
    records = sidecars(tmp_path / "out")
    assert records["sample_00001.json"]["attempt"] == 1
    assert records["sample_00001.json"]["sample_seed"] == sample_seed(0, 1, attempt=1) != planted
    assert records["sample_00000.json"]["attempt"] == records["sample_00002.json"]["attempt"] == 0
    assert not np.allclose(volumes(tmp_path / "out")["sample_00001.nii.gz"], copy, atol=1e-2)
    run_record = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert run_record["redraws"] == 1 and run_record["redrawn"] == {"1": 1}
    assert run_record["privacy_filter"]["training_subjects"] == 2
    assert run_record["privacy_filter"]["threshold_from"] == "held-out reconstructions"

    with pytest.warns(UserWarning, match=r"samples \[1\]"):  # no redraws left: withheld, not written
        result = generate(runs["flow"], tmp_path / "strict", max_redraws=0, **options)
    assert result.withheld == [1] and not (tmp_path / "strict" / "sample_00001.nii.gz").exists()

    other_grid = write_prepared(tmp_path / "data-2mm", splits=("train", "val"), shape=(16, 24, 16))
    with pytest.raises(ValueError, match="the same --preset grid"):
        generate(runs["flow"], tmp_path / "other", **{**options, "privacy_filter": other_grid})


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from mriflow.generate import generate

    torch.set_num_threads(1)
    run, out = sys.argv[1:3]
    result = generate(run, out, n=5, covariates={"age": 60, "sex": "M"}, solver="euler", steps=2, guidance=2.0,
                      batch_size=2, device="cpu", progress=False)
    assert len(result.paths) == 5, result
    assert torch.distributed.is_initialized() is False  # generate left the group it joined
    """
)


def test_two_processes_write_the_files_of_one(runs, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(runs["flow"]), str(tmp_path / "two")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    generate(runs["flow"], tmp_path / "one", n=5, covariates={"age": 60, "sex": "M"}, solver="euler", steps=2,
             guidance=2.0, batch_size=2, **FAST)
    two, one = volumes(tmp_path / "two"), volumes(tmp_path / "one")
    assert sorted(two) == sorted(one) == [f"sample_{i:05d}.nii.gz" for i in range(5)]
    for name in one:
        np.testing.assert_allclose(two[name], one[name], atol=1e-5)
    assert sidecars(tmp_path / "two") == sidecars(tmp_path / "one")
    record = json.loads((tmp_path / "two" / "generate.json").read_text())
    assert record["world_size"] == 2 and len(record["samples"]) == 5
    assert (tmp_path / "two" / "montage.png").is_file()


@pytest.mark.parametrize("name, grid, parts, labels_source", [
    ("2mm", "2mm", {"flow", "autoencoder"}, "anatomy"),  # tissue maps by the 2 mm anatomy network
    ("2mm-fewstep", "2mm", {"flow", "autoencoder"}, "anatomy"),  # the default, its one-evaluation student
    ("4mm", "4mm", {"flow", "autoencoder", "labels"}, "decoder"),
])
def test_each_shipped_model_generates_brains_with_tissue_maps_on_its_template_grid(tmp_path, name, grid, parts,
                                                                                  labels_source):
    """What `mriflow generate --out samples` relies on, on a fresh machine: the models in the package."""
    release = generation.shipped_models()[name]
    weights = sorted(release.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == parts
    assert all(p.stat().st_size <= ckpt.MAX_TRAVELLING_BYTES for p in weights)
    generator = load_generator(name, "cpu")
    assert generator.stage == "flow" and set(generator.schema.names) == {"age", "sex"}
    assert generator.image_shape == tuple(get_grid(grid).shape)
    np.testing.assert_allclose(generator.affine, template_affine(get_grid(grid)))

    result = generate(name, tmp_path / "samples", n=1, covariates={"age": 45, "sex": "F"}, solver="euler",
                      steps=2, **FAST)
    image = nib.load(str(result.paths[0]))
    np.testing.assert_allclose(image.get_sform(), template_affine(get_grid(grid)))
    volume = np.asarray(image.dataobj)
    assert 0.0 <= volume.min() and volume.max() <= 1.0 and volume.std() > 0.05  # a brain, not a constant
    sidecar = json.loads(result.paths[0].with_name("sample_00000.json").read_text())
    assert sidecar["covariates"] == {"age": 45.0, "sex": "F"} and sidecar["model_checksum"] == generator.model_checksum
    assert sidecar["labels_source"] == labels_source
    # each sample comes with its tissue map, aligned, with brain in it
    labels = nib.load(str(result.paths[0].with_name("sample_00000_labels.nii.gz")))
    np.testing.assert_allclose(labels.get_sform(), image.get_sform())
    tissue = np.asarray(labels.dataobj)
    assert sidecar["labels"] == "sample_00000_labels.nii.gz" and tissue.dtype == np.uint8
    assert set(np.unique(tissue)) >= {0, 3, 4}  # background, grey and white matter at least
    assert (tissue[volume < 0.02] == 0).mean() > 0.95  # no tissue where the image is empty


def test_the_default_is_the_2mm_models_one_evaluation_student(tmp_path):
    """The README's first command: `mriflow generate --out samples` without --model gives 2 mm brains in one network
    evaluation each, by a student of the shipped 16-evaluation model that says so; `--steps` still changes the count."""
    default, teacher = load_generator("default", "cpu"), load_generator("2mm", "cpu")
    assert default.image_shape == teacher.image_shape == tuple(get_grid("2mm").shape)
    assert default.sampling_settings()["steps"] == 1 and default.sampling_settings()["solver"] == "euler"
    assert teacher.sampling_settings()["steps"] == 8  # Heun: 16 evaluations
    assert default.meta["fewstep_teacher"]["model_sha256"] == teacher.model_checksum.removeprefix("sha256:")
    assert default.family.config.fewstep.method == "reflow"  # a velocity field: any number of Euler steps
    # the two share the encoder to the bit (the same latents, which the student learned the teacher's samples in);
    # the default decodes them with its own lighter decoder (the teacher's without the latent attention block)
    mine, theirs = default.autoencoder.state_dict(), teacher.autoencoder.state_dict()
    encoder = [name for name in theirs if not name.startswith(("decoder.", "post_quant_conv."))]  # the decoding side
    assert encoder and all(torch.equal(mine[name], theirs[name]) for name in encoder)
    parameters = lambda model: sum(p.numel() for p in model.decoder.parameters())  # noqa: E731
    assert parameters(default.autoencoder) < 0.7 * parameters(teacher.autoencoder)
    assert default.autoencoder.config.decoder_levels[2] is False and teacher.autoencoder.config.decoder_levels[2]
    result = generate("default", tmp_path / "s", n=2, covariates={"age": 70, "sex": "M"}, **FAST)
    sidecar = json.loads(result.paths[0].with_name("sample_00000.json").read_text())
    assert (sidecar["solver"], sidecar["steps"], sidecar["nfe"]) == ("euler", 1, 1)
    more = generate("default", tmp_path / "m", n=1, covariates={"age": 70, "sex": "M"}, steps=3, **FAST)
    assert json.loads(more.paths[0].with_name("sample_00000.json").read_text())["nfe"] == 3


def test_a_model_without_a_label_decoder_gets_its_tissue_maps_from_the_grids_anatomy_network(tmp_path):
    """On the 4 mm and 2 mm grids every sample comes with a tissue map: the model's decoder's, else the shipped anatomy
    network's segmentation of the sample itself; the sidecar says which."""
    import shutil

    from mriflow.evaluate.backbones import anatomy_weights_for
    from mriflow.evaluate.backbones.anatomy import AnatomyBackbone

    model = tmp_path / "model"
    shutil.copytree(generation.shipped_models()["4mm"], model, ignore=shutil.ignore_patterns("labels"))
    assert not (model / "labels").exists()
    result = generate(model, tmp_path / "samples", n=2, covariates={"age": 60}, solver="euler", steps=2, **FAST)
    volumes = np.stack([load_volume(p)[0] for p in result.paths])
    maps = np.stack([load_volume(p.with_name(p.name.replace(".nii.gz", "_labels.nii.gz")))[0] for p in result.paths])
    segmenter = AnatomyBackbone(anatomy_weights_for(volumes.shape[1:]))
    np.testing.assert_array_equal(maps, segmenter.segment(volumes[:, None]).numpy())  # exactly the network's reading
    assert set(np.unique(maps)) >= {0, 3, 4}
    sidecar = json.loads(result.paths[0].with_name("sample_00000.json").read_text())
    assert sidecar["labels_source"] == "anatomy" and sidecar["labels_checksum"] == "sha256:" + segmenter.weights_sha256
    assert json.loads(result.record.read_text())["labels"]["source"] == "anatomy"

    # asked for by name even where the model has a decoder; --no-labels writes none
    shipped = load_generator("4mm", "cpu", labels="anatomy")
    assert shipped.labels_meta["source"] == "anatomy" and shipped.label_classes[0] == "background"
    assert load_generator("4mm", "cpu").labels_meta["source"] == "decoder"
    plain = generate(model, tmp_path / "plain", n=1, labels=False, solver="euler", steps=2, **FAST)
    assert not list(plain.out.glob("*_labels.nii.gz"))


def test_a_cohort_csv_draws_one_sample_per_row_named_by_its_id(runs, tmp_path):
    from mriflow.cli import main

    cohort = tmp_path / "cohort.csv"
    cohort.write_text("id,age,sex\nyoung-f,25,F\nold-m,75,M\nanyone,,\n")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(runs["flow"]), "--out", str(out), "--covariates", str(cohort),
                 "--solver", "euler", "--steps", "1", "--device", "cpu", "--seed", "4"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["anyone.nii.gz", "old-m.nii.gz", "young-f.nii.gz"]
    old = json.loads((out / "old-m.json").read_text())
    assert old["covariates"] == {"age": 75.0, "sex": "M"} and old["cohort_row"] == {"id": "old-m", "age": 75.0, "sex": "M"}
    assert old["index"] == 1 and old["sample_seed"] == sample_seed(4, 1)
    anyone = json.loads((out / "anyone.json").read_text())
    assert anyone["covariates"] == {"age": None, "sex": None}  # empty cells: unconditional in that covariate
    assert json.loads((out / "generate.json").read_text())["samples"] == ["young-f.nii.gz", "old-m.nii.gz", "anyone.nii.gz"]

    # each row is its own request: the same as drawing that sample alone with those covariates
    alone = generate(runs["flow"], tmp_path / "alone", n=2, covariates={"age": 75, "sex": "M"}, solver="euler", steps=1,
                     seed=4, **FAST)
    np.testing.assert_allclose(load_volume(out / "old-m.nii.gz")[0], load_volume(alone.paths[1])[0], atol=1e-5)

    # without an id column the samples keep their numbered names; a second run into the folder is refused
    (tmp_path / "plain.csv").write_text("age,sex\n30,F\n")
    generate(runs["flow"], tmp_path / "plain", cohort=generation.read_cohort(tmp_path / "plain.csv"), solver="euler",
             steps=1, **FAST)
    assert [p.name for p in (tmp_path / "plain").glob("*.nii.gz")] == ["sample_00000.nii.gz"]
    with pytest.raises(FileExistsError, match="young-f.nii.gz"):
        generate(runs["flow"], out, cohort=generation.read_cohort(cohort), **FAST)


@pytest.mark.parametrize("text, message", [
    ("id,age\na,30\na,40\n", "appear.*more than once"),
    ("id,age\n../x,30\n", "cannot name a file"),
    ("id,height\na,180\n", "'height'.*knows: age, sex"),
    ("id,sex\na,X\n", "unknown category 'X'"),
    ("id,age\n", "no rows"),
    ("id;age\na;30\na;40\n", "appear.*more than once"),  # semicolons are read as prepare reads them (issue 25.9)
])
def test_a_bad_cohort_is_refused_before_anything_is_written(runs, tmp_path, text, message):
    (tmp_path / "cohort.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        generate(runs["flow"], tmp_path / "out", cohort=generation.read_cohort(tmp_path / "cohort.csv"), **FAST)
    assert not (tmp_path / "out").exists()


def test_the_cohort_option_refuses_mixed_requests_and_a_different_count(runs, tmp_path, capsys):
    from mriflow.cli import main

    (tmp_path / "cohort.csv").write_text("age\n30\n40\n")
    base = ["generate", "--model", str(runs["flow"]), "--out", str(tmp_path / "out"), "--covariates",
            str(tmp_path / "cohort.csv")]
    assert main(base + ["--age", "50"]) == 2 and "drop --age/--sex/--covariate" in capsys.readouterr().err
    assert main(base + ["--n", "5"]) == 2 and "--n 5 differs from the 2 rows" in capsys.readouterr().err
    assert main(base[:-1] + [str(tmp_path / "missing.csv")]) == 2 and "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shipped_models_load_by_name_and_default_is_one_of_them(tmp_path, monkeypatch):
    shipped = generation.shipped_models()
    assert "4mm" in shipped and generation.DEFAULT_MODEL in shipped
    assert generation.default_model_dir() == shipped[generation.DEFAULT_MODEL]
    by_name = load_generator("4mm", "cpu")
    assert by_name.image_shape == tuple(get_grid("4mm").shape) and by_name.path == shipped["4mm"] / "flow"
    with pytest.raises(FileNotFoundError, match=r"--model 3mm: no such run.*shipped: default, .*4mm"):
        load_generator("3mm", "cpu")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "4mm").mkdir()  # a folder of the user's with that name wins over the shipped model
    with pytest.raises(FileNotFoundError):
        load_generator("4mm", "cpu")


def test_an_exported_model_reads_its_autoencoder_only_from_its_own_folder_unless_trusted(runs, tmp_path):
    import shutil

    release = export_generator(runs["flow"], tmp_path / "received" / "model")
    shutil.copytree(release / "autoencoder", tmp_path / "elsewhere")  # the same weights, outside the model
    meta_file = release / "flow" / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    for outside in ("../../../elsewhere", str(tmp_path / "elsewhere")):
        meta["autoencoder"]["path"] = outside
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="leads outside the model's folder.*--trust-model-paths"):
            load_generator(release / "flow", "cpu")
        assert load_generator(release / "flow", "cpu", trust_paths=True).model_checksum  # the user said so
    # issue 25.6: without its "exported_from" key a model folder is guarded all the same
    del meta["exported_from"]
    meta["autoencoder"]["path"] = str(tmp_path / "elsewhere")
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="leads outside the model's folder.*--trust-model-paths"):
        load_generator(release / "flow", "cpu")
    meta["autoencoder"]["path"] = "../autoencoder"
    meta_file.write_text(json.dumps(meta))
    assert load_generator(release / "flow", "cpu").path == release / "flow"


class FirstBatchDrawn(Exception):
    """Raised by a stub sampler once generation reaches its first batch."""


def test_a_huge_n_streams_its_requests_instead_of_building_them_first(runs, tmp_path, monkeypatch):
    """Issue 25.2: `generate --n 1000000000` reached 10.8 GB before its first sample (a list of every request). The
    first batch is now reached with memory that does not grow with n."""
    import tracemalloc

    def first_batch(self, seeds, *args, **kwargs):
        raise FirstBatchDrawn(len(seeds))

    monkeypatch.setattr(Generator, "sample_pairs", first_batch)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sample_99999999.json").write_text("{}")  # an index beyond n: not one of this run's files
    tracemalloc.start()
    try:
        with pytest.raises(FirstBatchDrawn):
            generate(runs["flow"], tmp_path / "out", n=10**7, covariates={"age": 50}, batch_size=2, **FAST)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50e6, f"{peak / 1e6:.0f} MB traced before the first batch"  # five lists of 10^7 would be gigabytes
    (tmp_path / "out" / "sample_00042.nii.gz").write_bytes(b"")
    with pytest.raises(FileExistsError, match="sample_00042.nii.gz already exist"):
        generate(runs["flow"], tmp_path / "out", n=10**7, **FAST)


def test_weights_changed_after_export_are_refused(runs, tmp_path):
    """Issue 25.3: bytes flipped in a copy of a model's generator weights generated (rc 0) under the original's name."""
    exported = export_generator(runs["flow"], tmp_path / "model")
    weights = exported / "flow" / ckpt.MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"flow/model.safetensors: damaged or changed since it was saved"):
        generate(exported, tmp_path / "out", n=1, **FAST)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["id;age;sex\nold-m;75;M\n", "id\tage\tsex\nold-m\t75\tM\n", "age\n75\n"])
def test_a_cohort_file_is_read_whatever_its_delimiter(tmp_path, text):
    (tmp_path / "cohort.csv").write_text(text)
    rows = generation.read_cohort(tmp_path / "cohort.csv")
    assert rows[0]["age"] == 75 and len(rows) == 1 and (len(rows[0]) == 1 or rows[0]["sex"] == "M")
