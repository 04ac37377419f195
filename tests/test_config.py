"""Typed configs are loaded with dacite: every shipped preset and stored checkpoint config loads to
the same values it holds, and a bad key or value is refused in one line that names it."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

from mriflow.config import LoopConfig, from_dict, load_preset, to_dict
from mriflow.families import FAMILIES
from mriflow.models.label_decoder import LabelDecoderConfig
from mriflow.train.anatomy import AnatomyTrainingConfig
from mriflow.train.autoencoder import AutoencoderTrainingConfig
from mriflow.train.labels import LabelTrainingConfig

CONFIGS = {"autoencoder": AutoencoderTrainingConfig, "labels": LabelTrainingConfig, "anatomy": AnatomyTrainingConfig,
           **{name: family.Config for name, family in FAMILIES.items()}}
PACKAGE = Path(str(resources.files("mriflow")))
PRESETS = sorted(p for p in (PACKAGE / "presets").glob("*.yaml") if p.name.split("-")[0] in CONFIGS)
STORED = sorted((PACKAGE / "weights").glob("*/*/checkpoint.json"))


def holds(loaded: dict, written: dict) -> bool:
    """Every key written (at any depth) has the same value in the loaded config; keys left out,
    or added to the config after the file was written, take their defaults."""
    return all(holds(loaded[key], value) if isinstance(value, dict) else loaded.get(key, object()) == value
               for key, value in written.items())


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_to_the_values_it_holds(path):
    stage, preset = path.stem.split("-", 1)
    config = from_dict(CONFIGS[stage], load_preset(stage, preset), path.name)
    assert holds(to_dict(config), yaml.safe_load(path.read_text()))
    assert from_dict(CONFIGS[stage], to_dict(config)) == config


@pytest.mark.parametrize("path", STORED, ids=lambda p: p.parent.parent.name + "/" + p.parent.name)
def test_the_shipped_models_stored_configs_load_unchanged(path):
    meta = json.loads(path.read_text())
    written = dict(meta["config"])
    if meta["stage"] == "labels":  # a label decoder stores its network's config beside the training one
        model = written.pop("model")
        assert to_dict(LabelDecoderConfig(**model)) == model
    config = from_dict(CONFIGS[meta["stage"]], written, str(path))
    assert holds(to_dict(config), written)


def test_shipped_configs_were_found():
    assert len(PRESETS) >= 16 and len(STORED) >= 3


def test_lists_become_tuples_and_nested_sections_dataclasses():
    config = from_dict(FAMILIES["flow"].Config, {"loop": {"betas": [0.8, 0.9]}, "model": {"channels": [8, 16]}})
    assert config.loop == LoopConfig(betas=(0.8, 0.9)) and config.model.channels == (8, 16)


def test_an_unknown_key_is_refused_with_its_place_and_the_valid_fields():
    with pytest.raises(ValueError, match=r"^flow-x\.yaml\.loop: unknown field\(s\) lr_max, seeds; valid fields are max_steps, "):
        from_dict(FAMILIES["flow"].Config, {"loop": {"lr_max": 1.0, "seeds": 2}}, "flow-x.yaml")
    with pytest.raises(ValueError, match=r"^config: unknown field\(s\) loops; valid fields are "):
        from_dict(FAMILIES["flow"].Config, {"loops": {}})


@pytest.mark.parametrize("values, key", [({"loop": {"lr": "1e-4"}}, "loop.lr"), ({"loop": {"max_steps": 2.5}}, "loop.max_steps"),
                                         ({"loop": {"amp": "yes"}}, "loop.amp"), ({"model": None}, "model")])
def test_a_value_of_the_wrong_type_is_refused_in_one_line_naming_the_key(values, key):
    # e.g. PyYAML reads 1e-4 (no dot) as a string; it used to reach the optimizer as one
    with pytest.raises(ValueError) as error:
        from_dict(FAMILIES["flow"].Config, values, "flow-x.yaml")
    message = str(error.value)
    assert message.startswith("flow-x.yaml: ") and f'"{key}"' in message and "\n" not in message
