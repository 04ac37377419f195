"""The GAN family: R3GAN's losses and penalties by hand, its critic's conditioning, and the family end to end
through `mriflow train gan` and `mriflow generate` (critic kept out of the inference weights, exact resume)."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from mriflow import checkpoint as ckpt
from mriflow.config import LoopConfig, from_dict
from mriflow.families.gan import GAN, GanObjectiveConfig, GanTrainingConfig, critic_loss, generator_loss, gradient_penalty
from mriflow.models.critic import CriticConfig, LatentCritic
from mriflow.models.velocity import VelocityNet, VelocityNetConfig

from conftest import read_log, tiny_config, wake, write_prepared

SHAPE = (16, 20, 16)  # write_prepared's volumes


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


class HalfSquare(nn.Module):
    """An analytic critic: D(x) = a · ‖x‖² / 2 per sample, so ∇_x D = a x and ‖∇_x D‖² = a² ‖x‖²."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, covariates=None, present=None):
        return self.a * x.square().flatten(1).sum(1) / 2


class Constant(nn.Module):
    """A generator that draws the same latent whatever the noise: G(ε, t, c) = fake."""

    def __init__(self, fake: torch.Tensor):
        super().__init__()
        self.fake = nn.Parameter(fake.clone())

    def forward(self, noise, t, covariates=None, present=None):
        return self.fake + 0 * noise


def test_the_relativistic_losses_and_the_penalties_are_the_hand_computed_values():
    real, fake = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(critic_loss(real, fake), torch.tensor([softplus(-1.0), softplus(2.0)]))
    assert torch.allclose(generator_loss(real, fake), torch.tensor([softplus(1.0), softplus(-2.0)]))

    # R1/R2 of D(x) = a ‖x‖² / 2: a² ‖x‖² per sample, and differentiable in a (create_graph): d/da = 2 a ‖x‖²
    critic, x = HalfSquare(3.0), torch.tensor([[1.0, 2.0], [0.0, -1.0]]).requires_grad_(True)
    penalty = gradient_penalty(critic(x), x)
    assert torch.allclose(penalty, torch.tensor([9.0 * 5, 9.0 * 1]))
    penalty.sum().backward()
    assert torch.isclose(critic.a.grad, torch.tensor(2 * 3.0 * 6))

    # the family pairs real i with fake i, weighs R1 + R2 by γ/2, and its critic phase uses the G phase's fakes
    gamma, a = 0.4, 0.5
    family = GAN(GanTrainingConfig(objective=GanObjectiveConfig(gamma=gamma, covariate_drop_prob=0.0)))
    real = torch.tensor([[[[[1.0]]]], [[[[2.0]]]]])  # (2, 1, 1, 1, 1)
    fake = torch.tensor([[[[[0.0]]]], [[[[3.0]]]]])
    networks = {"velocity": Constant(fake), "critic": HalfSquare(a)}
    d_real, d_fake = [a * 1 / 2, a * 4 / 2], [0.0, a * 9 / 2]
    g_loss, g_metrics = family.phase_loss("velocity", networks, real, None, None)
    assert math.isclose(g_loss.item(), sum(softplus(r - f) for r, f in zip(d_real, d_fake)) / 2, rel_tol=1e-6)
    assert set(g_metrics) == {"generator_loss"}
    d_loss, d_metrics = family.phase_loss("critic", networks, real, None, None)
    expected = [softplus(f - r) + gamma / 2 * (a**2 * r_sq + a**2 * f_sq)
                for r, f, r_sq, f_sq in zip(d_real, d_fake, [1.0, 4.0], [0.0, 9.0])]
    assert math.isclose(d_loss.item(), sum(expected) / 2, rel_tol=1e-6)
    assert math.isclose(d_metrics["r1"].item(), a**2 * (1 + 4) / 2, rel_tol=1e-6)
    assert math.isclose(d_metrics["r2"].item(), a**2 * (0 + 9) / 2, rel_tol=1e-6)
    with pytest.raises(RuntimeError, match="needs the generator phase's fakes"):
        family.phase_loss("critic", networks, real, None, None)  # each G phase's fakes serve one critic phase


def test_the_critic_judges_latents_against_their_covariates_and_their_group():
    torch.manual_seed(0)
    critic = wake(LatentCritic(CriticConfig(channels=(16, 32)), (2, 4, 5, 4), ("continuous", "categorical"), (0, 2)))
    z = torch.randn(1, 2, 4, 5, 4).expand(3, -1, -1, -1, -1)
    covariates = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [-1.0, 1.0]])  # age apart, then sex apart
    logits = critic(z, covariates, torch.ones(3, 2, dtype=torch.bool))
    assert logits.shape == (3,) and logits[0] != logits[1] and logits[0] != logits[2]
    absent = critic(z[:1], covariates[:1], torch.zeros(1, 2, dtype=torch.bool))
    assert absent != logits[0] and torch.equal(absent, critic(z[:1]))  # absent = the null embeddings
    # the minibatch-std channel: a logit depends on the other samples of its group (here pairs), on no others
    batch, rows = torch.randn(4, 2, 4, 5, 4), covariates[[0, 1, 2, 0]]
    kinds = (("continuous", "categorical"), (0, 2))
    grouped = wake(LatentCritic(CriticConfig(channels=(16, 32), minibatch_std_group=2), (2, 4, 5, 4), *kinds))
    changed = batch.clone()
    changed[1] += 1.0
    before, after = grouped(batch, rows), grouped(changed, rows)
    assert before[0] != after[0] and torch.equal(before[2:], after[2:])
    independent = wake(LatentCritic(CriticConfig(channels=(16, 32), minibatch_std_group=0), (2, 4, 5, 4), *kinds))
    assert torch.allclose(independent(batch, rows), torch.cat([independent(batch[i:i + 1], rows[i:i + 1])
                                                              for i in range(4)]), atol=1e-6)
    # an unconditional critic has no embedding and ignores covariates
    plain = LatentCritic(CriticConfig(channels=(16,)), (2, 4, 5, 4))
    assert plain.conditioning is None and torch.equal(plain(z, covariates), plain(z))
    with pytest.raises(ValueError, match="not multiples of group_channels=16"):
        CriticConfig(channels=(12,), expansion=1)


def test_the_gan_config_keeps_covariate_dropout_to_itself_and_samples_in_one_step():
    from mriflow.train.generator import load_config

    for preset in ("tiny", "small"):  # the generator is the flow preset's network: matched parameters
        gan, flow = load_config("gan", preset), load_config("flow", preset)
        assert dataclasses.replace(gan.model, covariate_drop_prob=flow.model.covariate_drop_prob) == flow.model
        assert gan.model.covariate_drop_prob == 0 and gan.loop.betas == (0.0, 0.99) and gan.loop.batch_size == 8
    with pytest.raises(ValueError, match="model.covariate_drop_prob must be 0 for a GAN"):
        from_dict(GanTrainingConfig, {"model": {"covariate_drop_prob": 0.15}})
    with pytest.raises(ValueError, match="sampling.steps and sampling.guidance must be 1"):
        from_dict(GanTrainingConfig, {"sampling": {"steps": 4}})
    family = GAN(GanTrainingConfig())
    assert family.default_sampling() == {"solver": "generator", "steps": 1, "guidance": 1.0}
    # MONAI zero-initialises the U-Net's output: a GAN's samples must differ from the start
    torch.manual_seed(0)
    net = VelocityNet(VelocityNetConfig(in_channels=2, channels=(8, 16), attention_levels=(False, True),
                                        num_res_blocks=1, num_head_channels=8, norm_num_groups=4, covariate_drop_prob=0.0))
    assert not net.unet.out[2].conv.weight.any()
    family.init_generator(net)
    assert all(p.any() for p in net.parameters() if p.ndim > 1)
    latents, nfe = family.sample(net.eval(), (2, 2, 4, 5, 4), None, family.default_sampling(), "cpu")
    assert nfe == 1 and not torch.allclose(latents[0], latents[1])
    with pytest.raises(ValueError, match=r"^--guidance 2: a GAN has no classifier-free guidance; leave --guidance out"):
        family.check_sampling({"solver": "generator", "steps": 1, "guidance": 2.0})


def tiny(max_steps: int, **loop) -> GanTrainingConfig:
    model = VelocityNetConfig(in_channels=2, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                              num_head_channels=8, norm_num_groups=4, covariate_drop_prob=0.0)
    loop = LoopConfig(**{"max_steps": max_steps, "batch_size": 2, "lr": 2e-4, "betas": (0.0, 0.99), "warmup_steps": 0,
                         "log_every": 1, "montage_every": 3, "checkpoint_every": 3, "device": "cpu", **loop})
    return GanTrainingConfig(model=model, critic=CriticConfig(channels=(16, 32)), loop=loop)


@pytest.fixture
def prepared(tmp_path):
    """6 training subjects with age and sex, and a 1-step autoencoder of them (2 x 4 x 5 x 4 latents)."""
    from mriflow.train.autoencoder import train_autoencoder

    data = write_prepared(tmp_path / "data", splits=("train",) * 6, shape=SHAPE)
    manifest = pd.read_csv(data / "manifest.csv")
    manifest["sex"] = ["F", "M", "F", "M", "M", "F"]
    manifest.to_csv(data / "manifest.csv", index=False)
    train_autoencoder(data, tmp_path / "ae", config=tiny_config(max_steps=1, adversarial_start=100))
    return data, tmp_path / "ae"


def test_resume_continues_the_generator_and_the_critic_exactly(prepared, tmp_path):
    from mriflow.train.generator import train_generator

    data, autoencoder = prepared
    # 6 subjects, batch 2: 6 steps cross an epoch; noise, posterior draws and the shared covariate dropout all resume
    train_generator("gan", data, autoencoder, tmp_path / "whole", condition=["age", "sex"], config=tiny(6))
    train_generator("gan", data, autoencoder, tmp_path / "split", condition=["age", "sex"], config=tiny(6), stop_at_step=3)
    train_generator("gan", data, autoencoder, tmp_path / "split", resume=True)
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [row["step"] for row in split] == [str(s) for s in range(1, 7)]
    assert len({row["critic_loss"] for row in whole}) == 6  # a curve, not a constant
    columns = ("generator_loss", "critic_loss", "r1", "r2", "real_minus_fake")
    assert [[row[c] for c in columns] for row in whole] == [[row[c] for c in columns] for row in split]
    state_whole, state_split = ckpt.load_train_state(tmp_path / "whole"), ckpt.load_train_state(tmp_path / "split")
    critic_keys = [k for k in state_whole if k.startswith(("network.critic.", "optimizer.critic."))]
    assert critic_keys and all(torch.equal(state_whole[k], state_split[k]) for k in critic_keys)
    weights_whole, _ = ckpt.load_checkpoint(tmp_path / "whole")
    weights_split, _ = ckpt.load_checkpoint(tmp_path / "split")
    assert all(torch.equal(weights_whole[k], weights_split[k]) for k in weights_whole)
    with pytest.raises(ValueError, match="--label-condition: the gan family cannot learn a label-conditioned model"):
        train_generator("gan", data, autoencoder, tmp_path / "labelled", config=tiny(1), label_condition=True)
    assert not (tmp_path / "labelled").exists()


def test_mriflow_train_gan_then_generate_writes_samples_from_the_generator_alone(tmp_path, capsys):
    from mriflow.cli import main

    data = write_prepared(tmp_path / "data", splits=("train",) * 8, shape=SHAPE)  # the preset's batch of 8
    manifest = pd.read_csv(data / "manifest.csv")
    manifest["sex"] = ["F", "M"] * 4
    manifest.to_csv(data / "manifest.csv", index=False)
    ae, run = tmp_path / "ae", tmp_path / "gan"
    assert main(["train", "autoencoder", str(data), "--out", str(ae), "--max-steps", "1"]) == 0
    assert main(["train", "gan", str(data), "--autoencoder", str(ae), "--out", str(run), "--condition", "age,sex",
                 "--max-steps", "2"]) == 0  # the gan-tiny preset
    assert "critic_loss" in read_log(run)[-1] and (run / "montages" / "step-00000002.png").is_file()

    weights, meta = ckpt.load_checkpoint(run)
    assert meta["stage"] == "gan" and meta["preset"] == "tiny" and meta["config"]["critic"]["channels"]
    assert weights and all(key.startswith("velocity.") for key in weights)  # the EMA generator, no critic
    state = ckpt.load_train_state(run)
    assert any(k.startswith("network.critic.") for k in state) and any(k.startswith("optimizer.critic.") for k in state)
    assert not any(k.startswith("ema.critic.") for k in state)

    capsys.readouterr()
    out = tmp_path / "samples"
    assert main(["generate", "--model", str(run), "--out", str(out), "--num-samples", "3", "--age", "40", "--sex", "F",
                 "--device", "cpu"]) == 0
    assert "NFE 1 per sample" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("sample_*.nii.gz")) == [f"sample_0000{i}.nii.gz" for i in range(3)]
    sidecar = json.loads((out / "sample_00002.json").read_text())
    assert sidecar["stage"] == "gan" and sidecar["solver"] == "generator" and sidecar["nfe"] == 1
    assert sidecar["covariates"] == {"age": 40.0, "sex": "F"} and sidecar["guidance"] == 1.0
    assert json.loads((out / "generate.json").read_text())["nfe"] == 1 and (out / "montage.png").is_file()

    # guidance means nothing to a GAN: refused in one line, before anything is written
    assert main(["generate", "--model", str(run), "--out", str(tmp_path / "guided"), "--guidance", "2",
                 "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "--guidance 2: a GAN has no classifier-free guidance" in error and error.count("\n") == 1
    assert not (tmp_path / "guided").exists()
