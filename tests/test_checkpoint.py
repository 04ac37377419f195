from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mriflow import checkpoint as ckpt
from mriflow.config import to_dict
from mriflow.models.autoencoder import Autoencoder, AutoencoderConfig

SMALL = AutoencoderConfig(kind="kl", patch_size=2, channels=(8, 16), num_res_blocks=(1, 1),
                          attention_levels=(False, False), latent_channels=2, norm_num_groups=4)


def save_autoencoder(directory, config=SMALL, weights_dtype="float32"):
    torch.manual_seed(0)
    model = Autoencoder(config)
    weights = {f"autoencoder.{k}": v for k, v in model.state_dict().items()}
    meta = {"stage": "autoencoder", "config": {"model": to_dict(config)}, "step": 7}
    ckpt.save_checkpoint(directory, weights, meta, train_state={"x": torch.arange(3)}, weights_dtype=weights_dtype)
    return model


def test_round_trip_keeps_weights_meta_and_train_state(tmp_path):
    directory = tmp_path / "run" / "checkpoints" / "step-00000007"
    model = save_autoencoder(directory)
    weights, meta = ckpt.load_checkpoint(tmp_path / "run")  # a run folder resolves to its latest checkpoint
    assert meta["step"] == 7 and meta["format"] == ckpt.FORMAT and "torch" in meta["versions"]
    for key, value in model.state_dict().items():
        assert torch.equal(weights[f"autoencoder.{key}"], value)
    assert torch.equal(ckpt.load_train_state(directory)["x"], torch.arange(3))
    assert not list(directory.parent.glob(".tmp-*"))  # no staging folder left behind
    assert directory.stat().st_mode & 0o777 == ckpt.permissions(0o777)  # not mkdtemp's private 0700
    assert (directory / ckpt.META_FILE).stat().st_mode & 0o777 == ckpt.permissions(0o666)

    loaded, _ = ckpt.load_autoencoder(tmp_path / "run")
    x = torch.rand(1, 1, 8, 12, 8)
    assert torch.allclose(loaded.reconstruct(x), model.eval().reconstruct(x))


def test_overwrite_replaces_a_checkpoint_completely(tmp_path):
    directory = tmp_path / "ckpt"
    ckpt.save_checkpoint(directory, {"a": torch.ones(2)}, {"step": 1}, train_state={"s": torch.zeros(1)})
    ckpt.save_checkpoint(directory, {"a": torch.full((2,), 2.0)}, {"step": 2})
    weights, meta = ckpt.load_checkpoint(directory)
    assert meta["step"] == 2 and torch.equal(weights["a"], torch.full((2,), 2.0))
    assert not (directory / ckpt.TRAIN_STATE_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_half_precision_weights_are_smaller_and_load_back(tmp_path):
    save_autoencoder(tmp_path / "full")
    model = save_autoencoder(tmp_path / "half", weights_dtype="float16")
    full = (tmp_path / "full" / ckpt.MODEL_FILE).stat().st_size
    half = (tmp_path / "half" / ckpt.MODEL_FILE).stat().st_size
    assert half < 0.6 * full
    weights, _ = ckpt.load_checkpoint(tmp_path / "half")
    assert weights["autoencoder.post_quant_conv.conv.weight"].dtype == torch.float16
    loaded, _ = ckpt.load_autoencoder(tmp_path / "half")
    assert loaded.post_quant_conv.conv.weight.dtype == torch.float32
    assert torch.allclose(loaded.post_quant_conv.conv.weight, model.post_quant_conv.conv.weight, atol=1e-3)


def test_a_config_that_does_not_match_the_weights_is_refused_naming_the_field(tmp_path):
    save_autoencoder(tmp_path)
    meta_file = tmp_path / ckpt.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"]["latent_channels"] = 3
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"model\.latent_channels: 3 .* 2 in the weights"):
        ckpt.load_autoencoder(tmp_path)


def test_weights_that_do_not_fit_the_config_are_refused_naming_the_tensor(tmp_path):
    model = Autoencoder(SMALL)
    other = Autoencoder(AutoencoderConfig(**{**to_dict(SMALL), "channels": (8, 24)}))
    weights = {f"autoencoder.{k}": v for k, v in other.state_dict().items()}
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"tensor autoencoder\.\S+: weights have shape \(24"):
        ckpt.load_weights_into(model, weights, "autoencoder.", "model.safetensors")
    del weights["autoencoder.post_quant_conv.conv.bias"]
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"post_quant_conv\.conv\.bias is missing"):
        ckpt.load_weights_into(model, weights, "autoencoder.", "model.safetensors")


def test_latest_checkpoint_ignores_incomplete_folders(tmp_path):
    for step in (5, 10):
        ckpt.save_checkpoint(tmp_path / "checkpoints" / f"step-{step:08d}", {"a": torch.ones(1)}, {"step": step})
    (tmp_path / "checkpoints" / "step-00000020").mkdir()  # interrupted before checkpoint.json
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000010"
    assert ckpt.run_folder(ckpt.latest_checkpoint(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-00000020")


def test_update_meta_adds_keys_atomically(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"a": torch.ones(1)}, {"step": 3})
    ckpt.update_meta(tmp_path, {"latent_scale": 0.5})
    _, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["latent_scale"] == 0.5 and meta["step"] == 3


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # as a copy or a download cut short leaves it


def test_a_damaged_checkpoint_file_is_named_with_what_to_do(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"a": torch.ones(100)}, {"step": 1}, train_state={"s": torch.zeros(100)})
    truncate(tmp_path / ckpt.MODEL_FILE)
    truncate(tmp_path / ckpt.TRAIN_STATE_FILE)
    for load, name in ((ckpt.load_checkpoint, ckpt.MODEL_FILE), (ckpt.weights_config, ckpt.MODEL_FILE),
                       (ckpt.load_train_state, ckpt.TRAIN_STATE_FILE)):
        with pytest.raises(ckpt.DamagedCheckpointError, match=rf"{tmp_path / name}: damaged or (incomplete|changed) .*copy"):
            load(tmp_path)
    (tmp_path / ckpt.META_FILE).write_text('{"step": 1,')
    with pytest.raises(ckpt.DamagedCheckpointError, match=rf"{tmp_path / ckpt.META_FILE}: damaged or incomplete"):
        ckpt.load_checkpoint(tmp_path)
    with pytest.raises(ckpt.DamagedCheckpointError, match=rf"{tmp_path / ckpt.META_FILE}"):
        ckpt.update_meta(tmp_path, {"latent_scale": 0.5})


def test_leftovers_of_a_killed_checkpoint_write_are_cleared(tmp_path):
    for step in (5, 10):
        ckpt.save_checkpoint(tmp_path / "checkpoints" / f"step-{step:08d}", {"a": torch.ones(1)}, {"step": step})
    folder = tmp_path / "checkpoints"
    # Killed while writing step 15, and while replacing step 10 (moved aside, the new one not yet in place).
    (folder / ".tmp-step-00000015-abcd").mkdir()
    (folder / ".tmp-step-00000015-abcd" / ckpt.MODEL_FILE).write_bytes(b"half")
    (folder / "step-00000010").rename(folder / ".old-step-00000010-4242")
    (tmp_path / ".tmp-x1y2.csv").write_text("half a log")  # a killed write_text_atomic
    cleared = ckpt.remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in cleared) == [".tmp-step-00000015-abcd", ".tmp-x1y2.csv"]
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000005", "step-00000010"]  # step 10 is put back
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000010"


# --- writes cut short: the old checkpoint stays whole and nothing half-written takes its name -----------


def save_filled(directory, value, step, **kwargs):
    return ckpt.save_checkpoint(directory, {"a": torch.full((1000,), float(value))}, {"step": step},
                                train_state={"s": torch.full((3,), float(value))}, **kwargs)


def assert_holds(directory, value):
    weights, meta = ckpt.load_checkpoint(directory)
    assert torch.equal(weights["a"], torch.full((1000,), float(value))) and meta["step"] == value
    assert torch.equal(ckpt.load_train_state(directory)["s"], torch.full((3,), float(value)))


def test_a_write_that_dies_after_its_files_are_written_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints" / "step-00000010"
    save_filled(directory, 10, 10)
    written, save_file = [], ckpt.save_file

    def dies_after_the_train_state(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        written.append(Path(filename))
        if Path(filename).name == ckpt.TRAIN_STATE_FILE:
            raise KeyboardInterrupt  # Ctrl-C with both temporary files on disk

    monkeypatch.setattr(ckpt, "save_file", dies_after_the_train_state)
    with pytest.raises(KeyboardInterrupt):
        save_filled(directory, 11, 11)
    assert [p.name for p in written] == [ckpt.MODEL_FILE, ckpt.TRAIN_STATE_FILE]
    assert all(p.parent.name.startswith(ckpt.TEMPORARY_PREFIX) for p in written)  # never under the final name
    assert_holds(directory, 10)
    assert [p.name for p in directory.parent.iterdir()] == ["step-00000010"]  # the staging folder is gone


def test_a_write_that_dies_between_moving_the_old_one_aside_and_renaming_the_new_one_loses_neither(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints" / "step-00000010"
    save_filled(directory, 10, 10)
    calls, replace = [], os.replace

    def second_rename_fails(source, target):
        calls.append((Path(source).name, Path(target).name))
        if len(calls) == 2:
            raise OSError("no space left on device")
        replace(source, target)

    monkeypatch.setattr(ckpt.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="no space"):
        save_filled(directory, 11, 11)
    monkeypatch.undo()
    assert calls[0] == ("step-00000010", f".old-step-00000010-{os.getpid()}") and not directory.exists()
    assert ckpt.latest_checkpoint(tmp_path) is None  # nothing half-done is taken for a checkpoint
    ckpt.remove_partial_checkpoints(tmp_path)  # what a resumed run does first
    assert_holds(directory, 10)
    assert [p.name for p in directory.parent.iterdir()] == ["step-00000010"]


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from mriflow import checkpoint as ckpt

    directory, started = Path(sys.argv[1]) / "checkpoints" / "step-00000001", Path(sys.argv[2])
    step = 0
    while True:  # overwrite one checkpoint again and again: nearly all the time is spent inside a write
        value = torch.full((1_000_000,), float(step))
        ckpt.save_checkpoint(directory, {"a": value}, {"step": step}, train_state={"s": value})
        started.touch()
        step += 1
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_process_killed_while_writing_leaves_a_whole_checkpoint_under_the_final_name(tmp_path):
    leftovers = []
    for attempt, delay in enumerate((0.05, 0.3, 0.6)):
        root, started = tmp_path / str(attempt), tmp_path / f"started-{attempt}"
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(started)], stderr=subprocess.PIPE,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        while not started.exists():
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        folder = root / "checkpoints"
        leftovers += [p.name for p in folder.iterdir() if p.name.startswith((ckpt.TEMPORARY_PREFIX, ".old-"))]
        final = folder / "step-00000001"
        if final.exists():  # the old or the new one, whole: never a half-written file under this name
            _, meta = ckpt.load_checkpoint(final)
            assert ckpt.load_train_state(final)["s"].unique().tolist() == [float(meta["step"])]
        ckpt.remove_partial_checkpoints(root)
        weights, meta = ckpt.load_checkpoint(final)
        assert weights["a"].unique().tolist() == [float(meta["step"])] and meta["step"] >= 0
        assert [p.name for p in folder.iterdir()] == ["step-00000001"]
    assert leftovers  # at least one kill did land inside a write


def test_the_same_weights_and_meta_give_the_same_bytes_in_every_process(tmp_path):
    """The safetensors writer orders header metadata by a per-process hash; the checkpoint's model file must not
    depend on it, or a re-export of the same model gets another SHA-256 (the model checksum sidecars record)."""
    import hashlib

    code = ("import sys, torch\nfrom mriflow import checkpoint as ckpt\ntorch.manual_seed(0)\n"
            "weights = {f'net.layer{i}.weight': torch.randn(3, 5) for i in range(5)}\n"
            "ckpt.save_checkpoint(sys.argv[1], weights, {'stage': 'x', 'config': {'b': 1, 'a': {'z': 2}}, 'versions': {}})\n")
    digests = set()
    for i in range(3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"c{i}")], check=True)
        digests.add(hashlib.sha256((tmp_path / f"c{i}" / ckpt.MODEL_FILE).read_bytes()).hexdigest())
    assert len(digests) == 1
    weights, meta = ckpt.load_checkpoint(tmp_path / "c0")
    assert sorted(weights) == [f"net.layer{i}.weight" for i in range(5)] and meta["stage"] == "x"
    assert ckpt.weights_config(tmp_path / "c0") == {"b": 1, "a": {"z": 2}}


def test_weights_changed_after_saving_are_refused_and_a_device_is_not_read(tmp_path):
    """Tamper-evident checkpoints (issue 25.3): the SHA-256 of each weight file is recorded when it is saved and checked
    on every load; a byte flipped in model.safetensors or train_state.safetensors is refused, naming the file."""
    ckpt.save_checkpoint(tmp_path, {"a": torch.ones(100)}, {"step": 1}, train_state={"s": torch.zeros(100)})
    meta = json.loads((tmp_path / ckpt.META_FILE).read_text())
    assert set(meta["checksums"]) == {ckpt.MODEL_FILE, ckpt.TRAIN_STATE_FILE}
    for name, load in ((ckpt.MODEL_FILE, ckpt.load_checkpoint), (ckpt.TRAIN_STATE_FILE, ckpt.load_train_state)):
        file = tmp_path / name
        original = file.read_bytes()
        data = bytearray(original)
        data[-3] ^= 0x40  # one bit of a tensor: the file still parses
        file.write_bytes(bytes(data))
        with pytest.raises(ckpt.DamagedCheckpointError, match=rf"{file}: damaged or changed since it was saved"):
            load(tmp_path)
        file.write_bytes(original)
        load(tmp_path)  # restored: accepted again
    weights = tmp_path / ckpt.MODEL_FILE
    weights.unlink()
    weights.symlink_to("/dev/zero")  # would be read for ever
    with pytest.raises(ValueError, match="not a regular file"):
        ckpt.sha256(weights)
