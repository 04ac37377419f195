"""mriflow.evaluate.other_networks: FD rows of other feature networks beside the main backbone's figures."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation_helpers import write_evaluation_set, write_fakes
from mriflow.evaluate.generation import evaluate_generation
from mriflow.evaluate.other_networks import parse_other_backbone


def test_other_networks_add_fd_rows_that_see_broken_volumes(tmp_path):
    prepared = write_evaluation_set(tmp_path / "prepared")
    rng = np.random.default_rng(0)
    noisy = write_fakes(tmp_path / "noisy", prepared, [f"sub{i:02d}" for i in range(10, 18)],
                        lambda v: np.clip(v + rng.normal(0, 0.15, v.shape), 0, 1).astype(np.float32))
    result = evaluate_generation(prepared, noisy, tmp_path / "report", backbone="intensity", n=6, bootstrap=3,
                                 progress=False, also_backbones=[("deepbet", None)])
    (name, row), = result["other_networks"].items()
    assert name.startswith("deepbet") and len(row["weights_sha256"]) == 64 and row["feature_dim"] > 0
    assert row["real_vs_generated"]["mean"] > row["real_vs_real"]["mean"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Fréchet distance with other networks" in report and row["weights_sha256"][:12] in report


def test_an_other_network_is_named_or_refused_in_one_line(tmp_path):
    assert parse_other_backbone("deepbet") == ("deepbet", None)
    weights = tmp_path / "resnet_10.pth"
    weights.write_bytes(b"x")
    assert parse_other_backbone(f"medicalnet-resnet10={weights}") == ("medicalnet-resnet10", str(weights))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        parse_other_backbone("radimagenet-resnet50=/nowhere/weights.pt")
    with pytest.raises(ValueError, match="NAME=WEIGHTS"):
        parse_other_backbone("=weights.pt")
