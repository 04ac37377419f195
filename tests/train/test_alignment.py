"""REPA-style feature alignment (issue 24.2): the teacher's level matches the student's grid, the loss is 1 - cosine,
the U-Net keeps its aligned block's features only while training, and an image-space run trains with it, resumes
exactly and samples as any other."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mriflow import checkpoint as ckpt
from mriflow.evaluate.backbones.anatomy import anatomy_weights_for
from mriflow.families.flow import FlowObjectiveConfig, FlowTrainingConfig
from mriflow.models.velocity import VelocityNet, VelocityNetConfig
from mriflow.train.alignment import AlignmentConfig, AnatomyTeacher, alignment_loss, alignment_teacher, student_size
from mriflow.train.generator import train_flow
from mriflow.train.loop import LoopConfig
from conftest import read_log, write_prepared_with_sex

GRID_4MM = (40, 48, 40)


def test_the_teacher_level_is_the_coarsest_at_least_as_fine_as_the_student():
    weights = anatomy_weights_for(GRID_4MM)  # levels 40 x 48 x 40, 20 x 24 x 20, 10 x 12 x 10, 5 x 6 x 5
    teacher = AnatomyTeacher(weights, (10, 12, 10))
    assert teacher.level == 2 and teacher.channels == 32
    volumes = torch.rand(2, 1, *GRID_4MM)
    assert teacher(volumes).shape == (2, 32, 10, 12, 10)
    pooled = AnatomyTeacher(weights, (7, 8, 7))  # between two levels: the finer one, pooled to the student's grid
    assert pooled.level == 2 and pooled(volumes).shape == (2, 32, 7, 8, 7)
    with pytest.raises(ValueError, match="coarser than the aligned block"):
        AnatomyTeacher(weights, (80, 96, 80))
    with pytest.raises(ValueError, match="takes volumes of shape"):
        teacher(torch.rand(1, 1, 16, 20, 16))
    assert student_size((20, 24, 20), 0) == (20, 24, 20) and student_size((5, 6, 5), 1) == (3, 3, 3)


def test_the_loss_is_one_minus_the_cosine_over_channels_per_voxel():
    target = torch.randn(2, 8, 3, 4, 3)
    assert alignment_loss(target * 3.0, target).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(-target, target).item() == pytest.approx(2.0, abs=1e-6)
    padded = torch.cat([target, torch.randn(2, 8, 1, 4, 3)], dim=2)  # the network's padding: cropped away
    assert alignment_loss(padded, target).item() == pytest.approx(0.0, abs=1e-6)


def test_the_unet_keeps_its_aligned_features_only_while_training():
    config = VelocityNetConfig(in_channels=4, channels=(16, 32), attention_levels=(False, True), num_res_blocks=1,
                               num_head_channels=8, norm_num_groups=4, align_block=0, align_channels=32)
    net = VelocityNet(config).train()
    x = torch.randn(2, 4, 6, 8, 6)
    net(x, torch.rand(2))
    features = net.take_aligned()
    assert features.shape == (2, 16, 6, 8, 6) and net.align_head(features).shape == (2, 32, 6, 8, 6)
    with pytest.raises(RuntimeError, match="no aligned features"):
        net.take_aligned()  # taken once
    net.eval()(x, torch.rand(2))
    with pytest.raises(RuntimeError, match="no aligned features"):
        net.take_aligned()  # sampling keeps nothing
    keys = list(net.state_dict())
    assert any(k.startswith("align_head.") for k in keys) and len(keys) == len(set(keys))
    last = VelocityNet(dataclasses.replace(config, align_block=1)).train()
    last(x, torch.rand(2))
    assert last.take_aligned().shape == (2, 32, 3, 4, 3)  # the last block has no downsampler: its output
    with pytest.raises(ValueError, match="unet backbone only"):
        VelocityNet(dataclasses.replace(config, backbone="dit", dit_hidden=32, dit_heads=2))


def wavelet_with_alignment(weight=0.5, max_steps=4):
    model = VelocityNetConfig(in_channels=64, channels=(16, 16), attention_levels=(False, True), num_res_blocks=1,
                              num_head_channels=8, norm_num_groups=4, flip_channel=True)
    loop = LoopConfig(max_steps=max_steps, batch_size=2, warmup_steps=2, log_every=1, montage_every=100,
                      checkpoint_every=2, device="cpu")
    return FlowTrainingConfig(model=model, loop=loop, representation="haar2", alignment=AlignmentConfig(weight=weight),
                              objective=FlowObjectiveConfig(prediction="data", time_mean=-0.8, time_std=0.8))


def test_an_image_space_run_trains_with_alignment_resumes_exactly_and_samples(tmp_path):
    from mriflow.generate import load_generator

    data = write_prepared_with_sex(tmp_path / "data", shape=GRID_4MM)
    train_flow(data, None, tmp_path / "whole", condition=["age", "sex"], config=wavelet_with_alignment())
    train_flow(data, None, tmp_path / "split", condition=["age", "sex"], config=wavelet_with_alignment(), stop_at_step=2)
    train_flow(data, None, tmp_path / "split", resume=True)
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert all(0.0 < float(row["align"]) <= 2.0 for row in whole)
    assert [(r["loss"], r["align"]) for r in whole] == [(r["loss"], r["align"]) for r in split]
    weights, meta = ckpt.load_checkpoint(tmp_path / "whole")
    assert meta["config"]["model"]["align_channels"] == 32 and meta["config"]["alignment"]["weight"] == 0.5
    assert any(k.startswith("velocity.align_head.") for k in weights)
    generator = load_generator(tmp_path / "whole", "cpu")
    volumes, _ = generator.sample([0], None, generator.sampling_settings(steps=2))
    assert volumes.shape == (1, *GRID_4MM)

    train_flow(data, None, tmp_path / "off", condition=["age", "sex"], config=wavelet_with_alignment(weight=0, max_steps=1))
    _, meta = ckpt.load_checkpoint(tmp_path / "off")
    assert "align" not in read_log(tmp_path / "off")[0] and meta["config"]["model"]["align_channels"] == 0


def test_alignment_is_refused_where_it_cannot_work_in_one_line():
    config = wavelet_with_alignment()
    with pytest.raises(ValueError, match="needs the volumes themselves"):
        alignment_teacher(config, None, GRID_4MM, [4, 5, 6, 5], "cpu")
    dit = dataclasses.replace(config, model=dataclasses.replace(config.model, backbone="dit"))
    with pytest.raises(ValueError, match="unet backbone"):
        alignment_teacher(dit, "haar2", GRID_4MM, [64, 10, 12, 10], "cpu")
    with pytest.raises(ValueError, match="no anatomy network for volumes of shape"):
        alignment_teacher(config, "haar2", (16, 20, 16), [64, 4, 5, 4], "cpu")
    with pytest.raises(ValueError, match="alignment.weight must be >= 0"):
        AlignmentConfig(weight=-1)


def test_align_on_the_command_line_trains_a_new_run_with_it_and_is_refused_on_another_weights_resume(tmp_path, capsys):
    from mriflow.cli import main

    data = write_prepared_with_sex(tmp_path / "data", shape=GRID_4MM)
    run = tmp_path / "run"
    assert main(["train", "flow", str(data), "--preset", "wavelet", "--align", "0.5",
                 "--condition", "age,sex", "--out", str(run), "--max-steps", "1", "--threads", "1"]) == 0
    _, meta = ckpt.load_checkpoint(run)
    assert meta["config"]["alignment"]["weight"] == 0.5 and meta["config"]["model"]["align_channels"] > 0
    assert "align" in read_log(run)[0]
    assert main(["train", "flow", str(data), "--out", str(run), "--resume", "--align", "0.25", "--max-steps", "2"]) == 2
    assert "drop --align to resume" in capsys.readouterr().err
