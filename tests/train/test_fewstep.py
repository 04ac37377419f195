"""Few-step students (mriflow.train.fewstep): the teacher's pairs are its own samples, a student learns them, loads,
generates and exports as any flow, and refuses what it cannot do in one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MODEL_SCHEMA, save_tiny_autoencoder, save_tiny_generator
from mriflow import checkpoint as ckpt
from mriflow.cli import main
from mriflow.export import export_generator
from mriflow.generate import generate
from mriflow.generator import load_generator
from mriflow.models.conditioning import resolve_request
from mriflow.train import fewstep
from mriflow.train.fewstep import (TeacherPairs, draw_pairs, grid_positions, random_requests, stored_indices,
                                   train_fewstep)
from mriflow.utils.seeding import sample_seed


@pytest.fixture
def teacher(tmp_path):
    run = save_tiny_generator(tmp_path / "teacher", save_tiny_autoencoder(tmp_path / "autoencoder"))
    return load_generator(run, device="cpu", labels=False)


def test_the_pairs_keep_the_grid_points_of_one_two_and_four_steps():
    assert stored_indices(8) == [0, 2, 4, 6, 8]
    assert stored_indices(2) == [0, 1, 2]
    assert stored_indices(3) == [0, 3]
    times = [0.0, 0.5, 1.0]
    assert grid_positions(times, 2, 1.0) == [0, 1, 2] and grid_positions(times, 1, 1.0) == [0, 2]
    with pytest.raises(ValueError, match="--steps"):
        grid_positions(times, 4, 1.0)


def test_random_covariates_cover_the_schema_and_depend_on_seed_and_index_alone():
    requests = random_requests(MODEL_SCHEMA, 400, seed=1)
    assert requests == random_requests(MODEL_SCHEMA, 400, seed=1)
    assert requests[:10] == random_requests(MODEL_SCHEMA, 10, seed=1) and requests != random_requests(MODEL_SCHEMA, 400, 2)
    ages = [r["age"] for r in requests if "age" in r]
    assert 20.0 <= min(ages) < 30.0 and 70.0 < max(ages) <= 80.0
    assert {r["sex"] for r in requests if "sex" in r} == {"F", "M"}
    absent = sum("age" not in r for r in requests) / len(requests)
    assert 0.04 < absent < 0.2  # ABSENT_PROBABILITY 0.1: the teacher's unconditional model is learned too


def test_pairs_are_the_teacher_samples_and_an_interrupted_draw_continues(teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(fewstep, "SHARD", 3)
    folder = tmp_path / "pairs"
    index = draw_pairs(teacher, folder, count=4, seed=5, batch_size=2)
    assert [s["count"] for s in index["shards"]] == [3, 1] and index["indices"] == [0, 1, 2]
    pairs = TeacherPairs(folder)
    assert pairs.trajectory.shape == (4, 3, *teacher.latent_shape)
    # the last point is what generate draws for sample i of seed 5 with these covariates; the first its noise
    values, present = pairs.values[:4], pairs.present[:4]
    latents, nfe = teacher.draw_latents([sample_seed(5, i) for i in range(4)], (values, present),
                                        teacher.sampling_settings())
    assert nfe == 4 and torch.allclose(latents, pairs.trajectory[:, -1], atol=1e-5)
    request = random_requests(teacher.schema, 4, seed=5)[2]
    assert torch.equal(pairs.values[2], resolve_request(teacher.schema, request)[0])

    (folder / "shard-00001.safetensors").unlink()  # as if stopped before its last shard
    again = draw_pairs(teacher, folder, count=7, seed=5, batch_size=2)
    assert [s["count"] for s in again["shards"]] == [3, 3, 1]
    assert torch.allclose(TeacherPairs(folder).trajectory[:4], pairs.trajectory, atol=1e-5)  # pair 3 in another batch
    with pytest.raises(ValueError, match="another teacher or seed"):
        draw_pairs(teacher, folder, count=7, seed=6)


@pytest.mark.parametrize("method, steps", [("distill", 1), ("reflow", 1), ("distill", 2)])
def test_a_student_learns_its_pairs_and_samples_as_any_flow(teacher, tmp_path, method, steps):
    run = tmp_path / "student"
    result = train_fewstep(teacher, run, method=method, steps=steps, pairs=10, validation_pairs=2,
                           loop_overrides={"max_steps": 40, "batch_size": 4, "lr": 3e-3, "checkpoint_every": 20,
                                           "device": "cpu"})
    assert result["step"] == 40 and result["best"]["validation"]["val_latent_mse"] >= 0

    # on its training pairs the student's steps land nearer the teacher's samples than the teacher's own one step
    pairs = TeacherPairs(run / "pairs", range(8))
    student = load_generator(run, device="cpu", labels=False)
    settings = student.sampling_settings()
    assert (settings["solver"], settings["steps"], settings["guidance"]) == ("euler", steps, 1.0)
    seeds = [sample_seed(0, i) for i in range(8)]
    condition = (pairs.values[:8], pairs.present[:8])
    mine, nfe = student.draw_latents(seeds, condition, settings)
    theirs, _ = teacher.draw_latents(seeds, condition, {**teacher.sampling_settings(), "solver": "euler", "steps": 1})
    error = lambda x: float((x - pairs.trajectory[:8, -1]).square().mean())  # noqa: E731
    assert nfe == steps and error(mine) < 0.7 * error(theirs)

    meta = json.loads((ckpt.latest_checkpoint(run) / ckpt.META_FILE).read_text())
    assert meta["config"]["fewstep"] == {"method": method, "steps": steps, "teacher_guidance": 1.0}
    assert meta["fewstep_teacher"]["model_sha256"] == teacher.model_checksum.removeprefix("sha256:")
    assert meta["config"]["model"]["covariate_drop_prob"] == 0.0

    # generate and export as any flow; guidance is refused (the teacher's is in the student's samples)
    out = generate(run, out=tmp_path / "samples", n=2, covariates={"age": 60}, device="cpu", progress=False, labels=False)
    sidecar = json.loads((tmp_path / "samples" / "sample_00000.json").read_text())
    assert sidecar["solver"] == "euler" and sidecar["steps"] == steps and len(out.paths) == 2
    with pytest.raises(ValueError, match="few-step model learned its teacher's samples at guidance 1"):
        generate(run, out=tmp_path / "guided", n=1, guidance=2.0, device="cpu", progress=False, labels=False)
    assert not (tmp_path / "guided").exists()
    exported = export_generator(run, tmp_path / "model")
    assert load_generator(exported, device="cpu", labels=False).sampling_settings()["steps"] == steps


def test_the_cli_trains_a_student_and_refuses_a_grid_the_pairs_do_not_hold(teacher, tmp_path, capsys):
    run = tmp_path / "student"
    assert main(["train", "fewstep", str(teacher.path), "--out", str(run), "--method", "distill", "--steps", "1",
                 "--pairs", "4", "--max-steps", "2", "--batch-size", "2", "--device", "cpu"]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    assert main(["train", "fewstep", str(teacher.path), "--out", str(tmp_path / "other"), "--steps", "3",
                 "--pairs", "4", "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--steps" in error[0] and "Traceback" not in error[0]
    # a resume keeps the run's method and steps, and refuses another teacher
    assert main(["train", "fewstep", "4mm", "--out", str(run), "--resume", "--device", "cpu"]) == 2
    assert "another teacher" in capsys.readouterr().err
    # a resume keeps the run's 4 pairs (the default --pairs 512 draws none) and its schedule
    assert main(["train", "fewstep", str(teacher.path), "--out", str(run), "--resume", "--device", "cpu"]) == 0
    index = json.loads((run / "pairs" / "index.json").read_text())
    assert sum(s["count"] for s in index["shards"]) == 4


def test_under_torchrun_rank_zero_draws_the_pairs_and_both_processes_train(teacher, tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from mriflow.generator import load_generator\n"
        "from mriflow.train.fewstep import train_fewstep\n"
        "teacher = load_generator(sys.argv[1], device='cpu', labels=False)\n"
        "result = train_fewstep(teacher, sys.argv[2], method='reflow', steps=1, pairs=6, validation_pairs=2,\n"
        "                       loop_overrides={'max_steps': 2, 'batch_size': 2, 'device': 'cpu'})\n"
        "assert result['step'] == 2 and torch.distributed.is_initialized() is False\n")
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                str(script), str(teacher.path), str(tmp_path / "student")],
                               capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    index = json.loads((tmp_path / "student" / "pairs" / "index.json").read_text())
    assert sum(s["count"] for s in index["shards"]) == 6  # drawn once, not once per process
    meta = json.loads((ckpt.latest_checkpoint(tmp_path / "student") / ckpt.META_FILE).read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2
