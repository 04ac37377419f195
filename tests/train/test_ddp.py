"""Two gloo processes under torchrun on CPU: the same loop, DDP, rank-0-only writing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from mriflow import checkpoint as ckpt
from mriflow.config import to_dict
from mriflow.train.autoencoder import train_autoencoder
from conftest import read_log, tiny_config, write_prepared

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    from mriflow.config import from_dict
    from mriflow.data.dataset import PreparedDataset
    from mriflow import distributed
    from mriflow.train import loop
    from mriflow.utils.seeding import seed_everything
    from mriflow.train.autoencoder import AutoencoderStage, AutoencoderTrainingConfig

    torch.set_num_threads(1)
    data, out, config_file = sys.argv[1:4]
    config = from_dict(AutoencoderTrainingConfig, json.load(open(config_file)))
    context = distributed.setup("cpu")
    assert context.world_size == 2 and torch.distributed.get_backend() == "gloo"
    seed_everything(config.loop.seed)
    stage = AutoencoderStage(config)
    dataset = PreparedDataset(data, "train", augment=config.augment)
    loop.train(stage, dataset, config.loop, out, {"stage": "autoencoder", "config": json.load(open(config_file))},
               context=context)
    weights = distributed.unwrap(stage.networks["autoencoder"]).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, f"{out}/rank{context.rank}.safetensors")
    distributed.teardown()
    """
)


def test_two_processes_train_like_one_process_with_twice_the_batch(tmp_path):
    data = write_prepared(tmp_path / "data", splits=("train",) * 4)
    # VQ is deterministic given the data, so per-process batches of 1 must match one batch of 2
    # until the critics (batch norm, per-process adaptive weight) start at step 3.
    config = tiny_config(max_steps=3, adversarial_start=2, kind="vq", batch_size=1, checkpoint_every=2, keep_checkpoints=3)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(to_dict(config)))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = tmp_path / "ddp"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(data), str(run), str(config_file)],
        capture_output=True, text=True, timeout=120, env=environment,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    # rank 0 alone wrote the run; both processes ended with the same weights
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    rank0, rank1 = load_file(str(run / "rank0.safetensors")), load_file(str(run / "rank1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    _, meta = ckpt.load_checkpoint(run)
    assert meta["world_size"] == 2 and len(meta["rng"]) == 2
    assert float(read_log(run)[-1]["critic_loss"]) > 0  # the adversarial phase ran under DDP

    single = dataclasses.replace(config, loop=dataclasses.replace(config.loop, batch_size=2))
    train_autoencoder(data, tmp_path / "single", config=single)
    ddp_state = ckpt.load_train_state(run / "checkpoints" / "step-00000002")
    single_state = ckpt.load_train_state(tmp_path / "single" / "checkpoints" / "step-00000002")
    # Attention key biases get gradients that are zero up to rounding (softmax ignores them), which
    # Adam turns into full-size steps of arbitrary sign; every other tensor must agree.
    compared = [k for k in single_state if k.startswith("network.autoencoder.") and not k.endswith("to_k.bias")]
    assert len(compared) > 50
    for key in compared:
        assert torch.allclose(ddp_state[key], single_state[key], atol=1e-4), key
    ddp_rows, single_rows = read_log(run), read_log(tmp_path / "single")
    for step in (0, 1):
        assert float(ddp_rows[step]["l1"]) == pytest.approx(float(single_rows[step]["l1"]), rel=1e-4)

