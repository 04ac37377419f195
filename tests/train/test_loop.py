from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import montage_panels, read_log, shows_a_centred_head, tiny_config, write_prepared
from mriflow import checkpoint as ckpt
from mriflow.train.autoencoder import train_autoencoder
from mriflow.train.loop import LoopConfig, NonFiniteLossError, learning_rate_factor, make_ema, train


def test_learning_rate_warms_up_linearly_then_decays_as_a_cosine():
    factors = [learning_rate_factor(s, warmup_steps=4, max_steps=14, min_ratio=0.1) for s in range(16)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[14] == pytest.approx(0.1) and factors[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


def test_ema_starts_as_a_copy_warms_up_its_decay_and_copies_buffers():
    network = nn.BatchNorm1d(2)
    with torch.no_grad():
        network.weight.fill_(1.0)
    ema = make_ema(network, decay=0.9)
    assert torch.equal(ema.module.weight, network.weight) and not ema.module.weight.requires_grad
    expected = 1.0
    for step, value in enumerate([3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 17.0, 19.0, 21.0], start=1):
        with torch.no_grad():
            network.weight.fill_(value)
            network.running_mean.fill_(value)
        ema.update_parameters(network)
        decay = min(0.9, (1 + step) / (10 + step))  # 2/11 at step 1, 0.9 from step 80 on
        expected = decay * expected + (1 - decay) * value
        torch.testing.assert_close(ema.module.weight, torch.full((2,), expected, dtype=torch.float32))
        assert torch.equal(ema.module.running_mean, network.running_mean)  # buffers copied, not averaged
    assert decay < 0.9


def test_a_longer_ema_is_longer_from_the_first_step_not_only_after_the_shorter_ones_cap():
    """Both warm up as min(decay, 1 - 9 / ((10 + n) stretch)); before the stretch (2026-12-07) a 0.999 and a 0.9998
    EMA were the same average for their first 9 000 updates, so validating both chose nothing."""
    network = nn.Linear(1, 1, bias=False)
    short, long = make_ema(network, 0.999), make_ema(network, 0.9998, stretch=5.0)
    expected_short = expected_long = float(network.weight.detach())
    for step in range(1, 201):
        with torch.no_grad():
            network.weight.fill_(float(step))  # a parameter that keeps moving: the longer average lags further
        short.update_parameters(network)
        long.update_parameters(network)
        d_short, d_long = (1 + step) / (10 + step), 1 - 9 / ((10 + step) * 5.0)
        expected_short = d_short * expected_short + (1 - d_short) * step
        expected_long = d_long * expected_long + (1 - d_long) * step
    assert float(short.module.weight.detach()) == pytest.approx(expected_short, rel=1e-5)
    assert float(long.module.weight.detach()) == pytest.approx(expected_long, rel=1e-5)
    assert float(long.module.weight.detach()) < 0.8 * float(short.module.weight.detach())  # the longer one averages further back
    with pytest.raises(ValueError, match="stretch must be >= 1"):
        make_ema(network, 0.99, stretch=0.5)
    with pytest.raises(ValueError, match=r"ema_long_decay must lie in \[0, 1\)"):
        LoopConfig(ema_long_decay=1.0)


def test_resume_continues_with_the_same_loss_curve_as_an_uninterrupted_run(tmp_path):
    data = write_prepared(tmp_path / "data")
    # 5 subjects, batch 2: the 6 steps cross epoch boundaries; the critics start at step 3, so both
    # optimizers, batch-norm buffers, augmentation and posterior sampling must all be restored.
    train_autoencoder(data, tmp_path / "whole", config=tiny_config())
    train_autoencoder(data, tmp_path / "split", config=tiny_config(), stop_at_step=3)
    assert len(read_log(tmp_path / "split")) == 3
    train_autoencoder(data, tmp_path / "split", resume=True)

    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [row["step"] for row in split] == [str(s) for s in range(1, 7)]
    assert float(whole[-1]["critic_loss"]) > 0  # the adversarial phase did run
    for row_whole, row_split in zip(whole, split):
        for column in ("generator_loss", "l1", "kl", "adversarial", "critic_loss", "lr"):
            assert row_whole[column] == row_split[column], (row_whole["step"], column)
    weights_whole, _ = ckpt.load_checkpoint(tmp_path / "whole")
    weights_split, _ = ckpt.load_checkpoint(tmp_path / "split")
    assert all(torch.equal(weights_whole[k], weights_split[k]) for k in weights_whole)


def test_a_checkpoint_write_cut_short_by_a_kill_is_cleared_when_the_run_resumes(tmp_path):
    data = write_prepared(tmp_path / "data")
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train_autoencoder(data, run, config=tiny_config(), stop_at_step=3)
    # A kill skips save_checkpoint's clean-up: its staging folder stays beside the complete checkpoints.
    shutil.copytree(checkpoints / "step-00000003", checkpoints / ".tmp-step-00000006-k1ll3d")
    (checkpoints / ".tmp-step-00000006-k1ll3d" / ckpt.META_FILE).unlink()
    train_autoencoder(data, run, resume=True)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003", "step-00000006"]


def test_a_run_folder_holds_config_logs_montages_tensorboard_and_checkpoints(tmp_path):
    data = write_prepared(tmp_path / "data")
    config = tiny_config(max_steps=3, kind="vq")
    absent = dataclasses.replace(config.loss, perceptual_weight=1.0, perceptual_weights_file=str(tmp_path / "none.pth"))
    result = train_autoencoder(data, tmp_path / "run", config=dataclasses.replace(config, loss=absent))
    run = tmp_path / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["kind"] == "vq" and config["loop"]["max_steps"] == 3
    rows = read_log(run)
    assert list(rows[0])[:3] == ["step", "generator_loss", "l1"] and "volumes_per_second" in rows[0]
    assert float(rows[-1]["codebook_perplexity"]) >= 1.0
    real, reconstruction, difference = montage_panels(run / "montages" / "step-00000003.png")  # rows of 3 planes
    assert all(shows_a_centred_head(panel) for panel in real)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert result["checkpoint"].endswith("step-00000003")
    _, meta = ckpt.load_checkpoint(run)
    assert meta["preparation"]["recipe"] == ["phantom"] and meta["latent_shape"] == [2, 4, 5, 4]
    assert meta["step"] == 3 and "monai" in meta["versions"] and meta["config"] == config
    assert meta["perceptual"]["active"] is False and "not found" in meta["perceptual"]["reason"]
    model, _ = ckpt.load_autoencoder(run)
    assert model.config.kind == "vq"
    with pytest.raises(FileExistsError, match="pass --resume to continue, or choose another --out$"):
        train_autoencoder(data, run, config=tiny_config(max_steps=3, kind="vq"))


class ToyData(torch.utils.data.Dataset):
    def __init__(self, count=8):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(count, 3, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "y": self.y[index]}


class ToyStage:
    """A flow-like stage: one network, one optimizer; optionally a second phase and a NaN at a given step."""

    def __init__(self, nan_at=None, two_phases=False):
        torch.manual_seed(0)
        self.networks = {"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)}
        self.phases = {"a": [{"params": list(self.networks["a"].parameters())}]}
        if two_phases:
            self.phases["b"] = [{"params": list(self.networks["b"].parameters()), "lr": 0.01}]
        self.ema_networks = ("a",)
        self.metric_names = ("loss",)
        self.nan_at = nan_at

    def loss(self, phase, batch, step):
        if phase == "a":
            prediction = self.networks["a"](batch["x"])[:, 0] + 0.1 * self.networks["b"](batch["x"])[:, 0]
            loss = ((prediction - batch["y"]) ** 2).mean()
            if step == self.nan_at:
                loss = loss * float("nan")
        else:
            loss = ((self.networks["b"](batch["x"]) - 1.0) ** 2).mean()
        return loss, {"loss": loss.detach()}

    def montage(self, batch, networks):
        return None


def toy_loop(**changes):
    return LoopConfig(**{"max_steps": 6, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2,
                         "montage_every": 100, "device": "cpu", "lr": 0.05, **changes})


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 5.*step-00000004.*is kept"):
        train(ToyStage(nan_at=4), ToyData(), toy_loop(), tmp_path, meta={"stage": "toy", "config": {}})
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000004"
    weights, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["step"] == 4 and all(torch.isfinite(w).all() for w in weights.values())
    assert [row["step"] for row in read_log(tmp_path)] == ["1", "2", "3", "4"]


def test_gradient_accumulation_matches_one_larger_batch(tmp_path):
    large = train(ToyStage(), ToyData(), toy_loop(max_steps=4), tmp_path / "large", meta={"config": {}})
    accumulated = train(ToyStage(), ToyData(), toy_loop(max_steps=4, batch_size=2, grad_accumulation=2),
                        tmp_path / "accumulated", meta={"config": {}})
    assert large["metrics"]["loss"] == pytest.approx(accumulated["metrics"]["loss"], rel=1e-5)
    first = ckpt.load_train_state(tmp_path / "large")
    second = ckpt.load_train_state(tmp_path / "accumulated")
    assert torch.allclose(first["network.a.weight"], second["network.a.weight"], atol=1e-6)


def test_a_phase_updates_only_its_own_parameters(tmp_path):
    # Phase "a" depends on network b too; b must learn from its own phase's loss only.
    train(ToyStage(two_phases=True), ToyData(), toy_loop(), tmp_path / "both", meta={"config": {}})
    alone = ToyStage()
    alone.phases = {"b": [{"params": list(alone.networks["b"].parameters()), "lr": 0.01}]}
    alone.loss = lambda phase, batch, step: ToyStage.loss(alone, "b", batch, step)
    train(alone, ToyData(), toy_loop(), tmp_path / "alone", meta={"config": {}})
    both = ckpt.load_train_state(tmp_path / "both")
    only_b = ckpt.load_train_state(tmp_path / "alone")
    assert torch.equal(both["network.b.weight"], only_b["network.b.weight"])
    assert not torch.equal(both["network.a.weight"], only_b["network.a.weight"])
    # model.safetensors holds the EMA copy of "a", which lags the raw network
    weights, _ = ckpt.load_checkpoint(tmp_path / "both")
    assert set(weights) == {"a.weight", "a.bias"}
    assert not torch.equal(weights["a.weight"], both["network.a.weight"])


class ValidatedToyStage(ToyStage):
    """ToyStage with the optional `validate`: scripted figures by call, the first of which the loop minimises."""

    def __init__(self, scores):
        super().__init__()
        self.scores, self.seen = list(scores), []

    def validate(self, networks):
        self.seen.append(networks["a"].training)
        return {"score": self.scores.pop(0), "other": 1.0}


def test_a_validating_stage_is_logged_and_its_best_checkpoint_outlives_pruning_and_a_resume(tmp_path):
    # checkpoints at steps 2, 4, 6, 8; the best validation (step 4) is kept although keep_checkpoints is 1,
    # a later tie does not displace it and a NaN never wins
    stage = ValidatedToyStage([3.0, 1.0, float("nan"), 1.0])
    result = train(stage, ToyData(), toy_loop(max_steps=8, keep_checkpoints=1), tmp_path, meta={"config": {}},
                   stop_at_step=6)
    assert stage.seen == [False] * 3  # validated in eval mode, on the EMA copy
    assert result["best"]["step"] == 4 and result["best"]["validation"] == {"score": 1.0, "other": 1.0}
    assert sorted(p.name for p in (tmp_path / ckpt.CHECKPOINTS_DIR).iterdir()) == ["step-00000004", "step-00000006"]
    resumed = ValidatedToyStage([1.0])
    result = train(resumed, ToyData(), toy_loop(max_steps=8, keep_checkpoints=1), tmp_path, meta={"config": {}},
                   resume=True)
    assert result["best"]["checkpoint"] == str(tmp_path / ckpt.CHECKPOINTS_DIR / "step-00000004")
    assert sorted(p.name for p in (tmp_path / ckpt.CHECKPOINTS_DIR).iterdir()) == ["step-00000004", "step-00000008"]
    assert [row["step"] for row in read_log_file(tmp_path / "validation.csv")] == ["2", "4", "6", "8"]
    _, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["best"]["step"] == 4


def test_a_stage_without_validate_has_no_best(tmp_path):
    result = train(ToyStage(), ToyData(), toy_loop(), tmp_path, meta={"config": {}})
    assert result["best"] is None and not (tmp_path / "validation.csv").exists()


def read_log_file(path):
    import csv

    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


class SignalledToyStage(ToyStage):
    """ToyStage that sends its own process `signal` during step `at` (0-based), as Ctrl+C or a scheduler would."""

    def __init__(self, signal_number, at):
        super().__init__()
        self.signal_number, self.at = signal_number, at

    def loss(self, phase, batch, step):
        import os

        if step == self.at:
            os.kill(os.getpid(), self.signal_number)
        return super().loss(phase, batch, step)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_a_resume_continues_the_same_curve(tmp_path, name):
    import signal

    number = getattr(signal, name)
    before = signal.getsignal(number)
    whole = train(ToyStage(), ToyData(), toy_loop(max_steps=6, checkpoint_every=100), tmp_path / "whole",
                  meta={"config": {}})
    stopped = train(SignalledToyStage(number, at=2), ToyData(), toy_loop(max_steps=6, checkpoint_every=100),
                    tmp_path / "split", meta={"config": {}})
    assert stopped["interrupted"] == name and stopped["step"] == 3  # the step under way (the third) finished
    assert stopped["checkpoint"].endswith("step-00000003") and "interrupted" not in whole
    assert signal.getsignal(number) is before  # the handler is restored after training
    train(ToyStage(), ToyData(), toy_loop(max_steps=6, checkpoint_every=100), tmp_path / "split", meta={"config": {}},
          resume=True)
    assert [row["loss"] for row in read_log(tmp_path / "whole")] == [row["loss"] for row in read_log(tmp_path / "split")]
    weights, _ = ckpt.load_checkpoint(tmp_path / "whole")
    resumed, _ = ckpt.load_checkpoint(tmp_path / "split")
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


def test_the_cpu_budget_stops_the_run_with_a_checkpoint_and_the_log_counts_cpu_seconds(tmp_path):
    class Drawn(ToyStage):
        def montage(self, batch, networks):
            return {"volume": np.linspace(0, 1, 8 * 8 * 8).reshape(8, 8, 8)}

    result = train(Drawn(), ToyData(), toy_loop(max_steps=10_000, checkpoint_every=10_000, max_cpu_minutes=0.002,
                                                log_every=10_000, montage_every=10_000),
                   tmp_path, meta={"config": {}})
    rows = read_log(tmp_path)
    assert 0 < result["step"] < 10_000 and result["checkpoint"].endswith(f"step-{result['step']:08d}")
    # the last step is logged and drawn as a planned last step is, though neither interval reached it
    assert [int(row["step"]) for row in rows] == [result["step"]]
    assert (tmp_path / "montages" / f"step-{result['step']:08d}.png").is_file()
    cpu = [float(row["cpu_seconds"]) for row in rows]
    assert cpu == sorted(cpu) and cpu[-1] >= 0.12  # at least the 0.002-minute budget was spent
