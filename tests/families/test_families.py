"""Generative families plug in: the shipped ones through the registry, and a new one by one file and one line."""

from __future__ import annotations

import json

import pytest

from mriflow import families
from mriflow.families import FAMILIES, get_family
from mriflow.families.diffusion import Diffusion
from mriflow.families.flow import RectifiedFlow
from mriflow.families.gan import GAN
from mriflow.models.velocity import VelocityNetConfig
from mriflow.train.loop import LoopConfig

from conftest import tiny_config, write_prepared
from toy_family import OneStep, OneStepConfig  # noqa: E402

SHAPE = (16, 20, 16)


def test_the_registry_names_the_shipped_families_and_refuses_others():
    assert {"flow": RectifiedFlow, "diffusion": Diffusion, "gan": GAN}.items() <= FAMILIES.items()
    assert get_family("flow") is RectifiedFlow
    with pytest.raises(ValueError, match=f"unknown generative family 'vae'; known: {', '.join(FAMILIES)}$"):
        get_family("vae")
    flow = RectifiedFlow.from_config({"sampling": {"steps": 4}})
    assert flow.default_sampling() == {"solver": "heun", "steps": 4, "guidance": 1.0, "time_shift": 1.0}
    with pytest.raises(ValueError, match="unknown field"):
        RectifiedFlow.from_config({"objectiv": {}})


def test_a_new_family_is_one_file_and_one_registry_line_and_trains_and_generates(tmp_path, monkeypatch, capsys):
    from mriflow.cli import main
    from mriflow.generate import generate
    from mriflow.train.autoencoder import train_autoencoder
    from mriflow.train.generator import train_generator

    monkeypatch.setitem(families.FAMILIES, OneStep.name, OneStep)  # the one registry line
    data = write_prepared(tmp_path / "data", splits=("train",) * 6, shape=SHAPE)  # 6 ages: continuous
    train_autoencoder(data, tmp_path / "ae", config=tiny_config(max_steps=1, adversarial_start=10))
    config = OneStepConfig(
        model=VelocityNetConfig(in_channels=2, channels=(8, 16), attention_levels=(False, False), num_res_blocks=1,
                                num_head_channels=8, norm_num_groups=4),
        loop=LoopConfig(max_steps=2, batch_size=2, warmup_steps=1, log_every=1, montage_every=2, checkpoint_every=2,
                        device="cpu"))
    result = train_generator("onestep", data, tmp_path / "ae", tmp_path / "run", condition=["age"], config=config)
    assert result["step"] == 2 and (tmp_path / "run" / "montages" / "step-00000002.png").is_file()

    written = generate(tmp_path / "run", tmp_path / "samples", n=3, covariates={"age": 30}, device="cpu", progress=False)
    assert len(written.paths) == 3 and written.nfe == 1
    sidecar = json.loads((tmp_path / "samples" / "sample_00002.json").read_text())
    assert sidecar["stage"] == "onestep" and sidecar["solver"] == "one_step" and sidecar["covariates"] == {"age": 30.0}
    with pytest.raises(ValueError, match="solver 'heun' does not apply to this onestep model.*samples a flow model"):
        generate(tmp_path / "run", tmp_path / "other", n=1, solver="heun", device="cpu", progress=False)

    # and the command line knows it: `mriflow train onestep` exists, its help the family's summary
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "onestep" in capsys.readouterr().out


class CountingPath:
    """A family's path, counting the calls its loss and sampler make to it."""

    def __init__(self, path):
        self.path, self.calls = path, {}

    def __getattr__(self, name):
        value = getattr(self.path, name)
        if not callable(value):
            return value

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return value(*args, **kwargs)
        return counted


@pytest.mark.parametrize("name,sampled_through", [("flow", {"time_grid"}), ("diffusion", {"sampling_timesteps", "convert"})])
def test_both_families_learn_and_sample_through_their_path(name, sampled_through):
    import torch

    from mriflow.flow.diffusion import VPDiffusionPath
    from mriflow.flow.path import LinearPath
    from mriflow.models.velocity import VelocityNet

    family = get_family(name).from_config({"model": {"time_scale": 1000.0 if name == "flow" else 1.0},
                                           **({"diffusion": {"prediction": "epsilon"}} if name == "diffusion" else {})})
    assert isinstance(family.path, LinearPath if name == "flow" else VPDiffusionPath)
    counting = CountingPath(family.path)
    family.path = counting
    if name == "flow":
        assert family.objective.path is counting.path  # the objective and the sampler share one path
        family.objective.path = counting
    else:
        assert family.path.prediction == "epsilon"  # read from the checkpoint's config
    torch.manual_seed(0)
    net = VelocityNet(VelocityNetConfig(in_channels=1, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                                        num_head_channels=8, norm_num_groups=4, time_scale=family.config.model.time_scale))
    family.loss(net, torch.randn(2, 1, 4, 4, 4), None, None)
    assert {"sample_xt", "target"} <= set(counting.calls)
    learned = dict(counting.calls)
    family.sample(net, (1, 1, 4, 4, 4), None, {"solver": family.solvers[0], "steps": 2, "guidance": 1.0}, "cpu")
    assert sampled_through <= {call for call, count in counting.calls.items() if count > learned.get(call, 0)}
