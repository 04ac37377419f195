"""mriflow.train.autoencoder: what the autoencoder stage adds to the loop (random crops, a learning rate given
to train_autoencoder); the loop itself, run through this stage, is tested in test_loop.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import read_log, save_tiny_generator, tiny_config, write_prepared
from mriflow import checkpoint as ckpt
from mriflow.train.autoencoder import train_autoencoder


def test_autoencoder_trains_on_crops_and_refuses_crops_its_factor_does_not_divide(tmp_path):
    from mriflow.models.autoencoder import Autoencoder

    config = dataclasses.replace(tiny_config(max_steps=2, adversarial_start=1), crop_size=(16, 16, 16))
    result = train_autoencoder(write_prepared(tmp_path / "data"), tmp_path / "run", config=config)
    assert result["step"] == 2
    _, meta = ckpt.load_checkpoint(tmp_path / "run")
    assert meta["image_shape"] == [16, 20, 16] and meta["latent_shape"] == [2, 4, 5, 4]  # whole volumes, not crops
    assert meta["config"]["crop_size"] == [16, 16, 16]
    model = Autoencoder(config.model)
    assert model.reconstruct(torch.rand(1, 1, 16, 20, 16)).shape == (1, 1, 16, 20, 16)  # applied to whole volumes
    with pytest.raises(ValueError, match="divisible by the autoencoder's downsampling factor 4"):
        dataclasses.replace(config, crop_size=(16, 18, 16))


def test_the_learning_rate_can_be_given_and_changed_on_resume(tmp_path):
    data = write_prepared(tmp_path / "data")
    train_autoencoder(data, tmp_path / "run", config=tiny_config(max_steps=4), stop_at_step=1, lr=2e-4)
    assert ckpt.load_checkpoint(tmp_path / "run")[1]["config"]["loop"]["lr"] == 2e-4
    train_autoencoder(data, tmp_path / "run", resume=True, lr=1e-4)
    assert ckpt.load_checkpoint(tmp_path / "run")[1]["config"]["loop"]["lr"] == 1e-4


def test_refining_the_decoder_keeps_every_encoder_tensor_and_survives_an_interruption(tmp_path):
    from mriflow.train.autoencoder import encoder_state

    data = write_prepared(tmp_path / "data")
    train_autoencoder(data, tmp_path / "source", config=tiny_config(max_steps=3, adversarial_start=1))
    source, _ = ckpt.load_autoencoder(tmp_path / "source")
    first = train_autoencoder(data, tmp_path / "refined", refine_decoder=tmp_path / "source", max_steps=4, stop_at_step=2)
    assert first["step"] == 2
    result = train_autoencoder(data, tmp_path / "refined", resume=True)  # an interruption changes nothing
    assert result["step"] == 4
    refined, meta = ckpt.load_autoencoder(tmp_path / "refined")
    source_dir = ckpt.resolve_checkpoint(tmp_path / "source")
    assert meta["decoder_refined_from"]["model_sha256"] == ckpt.sha256(source_dir / ckpt.MODEL_FILE)
    assert meta["config"]["decoder_only"] is True and meta["config"]["loss"]["adversarial_start"] == 0
    assert meta["config"]["loop"]["lr"] == pytest.approx(tiny_config().loop.lr / 5)
    theirs, mine = encoder_state(source), encoder_state(refined)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    decoders = [dict(model.decoder.state_dict()) for model in (source, refined)]
    assert any(not torch.equal(decoders[0][k], decoders[1][k]) for k in decoders[0] if decoders[0][k].is_floating_point())
    x = torch.rand(1, 1, 16, 20, 16)
    torch.testing.assert_close(refined.encode(x).mean, source.encode(x).mean, rtol=0, atol=0)  # the same latents
    assert "critic_loss" in read_log(tmp_path / "refined")[0]  # the critics learn from the first step
    assert read_log(tmp_path / "refined")[0]["critic_loss"] != ""

    with pytest.raises(ValueError, match="drop --kind"):
        train_autoencoder(data, tmp_path / "other", refine_decoder=tmp_path / "source", kind="vq")
    train_autoencoder(data, tmp_path / "vq", config=tiny_config(max_steps=1, kind="vq"))
    with pytest.raises(ValueError, match="only kl ones can be refined"):
        train_autoencoder(data, tmp_path / "other", refine_decoder=tmp_path / "vq")
    assert not (tmp_path / "other").exists()


def test_a_lighter_decoder_learns_the_same_latents_from_scratch_and_ships_with_the_generator(tmp_path, capsys):
    """`--refine-decoder RUN --decoder-channels ...`: a new, smaller decoder for RUN's encoder (the decoder is what a
    one-evaluation sampler spends its time in), trained from scratch; a generator of RUN's latents exports with it."""
    from mriflow.cli import main
    from mriflow.export import export_generator
    from mriflow.generate import load_generator
    from mriflow.train.autoencoder import encoder_state

    data = write_prepared(tmp_path / "data")
    train_autoencoder(data, tmp_path / "source", config=tiny_config(max_steps=3, adversarial_start=1, max_minutes=30.0))
    assert main(["train", "autoencoder", str(data), "--refine-decoder", str(tmp_path / "source"), "--out",
                 str(tmp_path / "light"), "--decoder-channels", "4,8", "--decoder-res-blocks", "1,1",
                 "--max-steps", "4"]) == 0
    source, _ = ckpt.load_autoencoder(tmp_path / "source")
    light, meta = ckpt.load_autoencoder(tmp_path / "light")
    model = meta["config"]["model"]
    assert model["decoder_channels"] == [4, 8] and model["decoder_num_res_blocks"] == [1, 1]
    assert model["decoder_latent_attention"] is False and meta["decoder_refined_from"]["new_decoder"] is True
    assert meta["decoder_refined_from"]["decoder_warm_start"]["of"] > 0  # the run says how much started as the source
    assert meta["config"]["loss"]["adversarial_start"] == 2  # critics from half-way
    assert meta["config"]["loop"]["lr"] == pytest.approx(tiny_config().loop.lr)  # from scratch: the full rate
    assert meta["config"]["loop"]["max_minutes"] == 0  # the source's wall budget (its legs) is not inherited
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(light.decoder) < count(source.decoder) / 3
    theirs, mine = encoder_state(source), encoder_state(light)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    x = torch.rand(1, 1, 16, 20, 16)
    with torch.no_grad():
        torch.testing.assert_close(light.encode(x).mean, source.encode(x).mean, rtol=0, atol=0)
        assert light.reconstruct(x).shape == x.shape

    run = save_tiny_generator(tmp_path / "flow", ckpt.resolve_checkpoint(tmp_path / "source"))
    release = export_generator(run, tmp_path / "release", autoencoder=tmp_path / "light")
    exported = load_generator(release, "cpu")
    assert exported.autoencoder.config.decoder_levels == ((4, 8), (1, 1), False, "interpolate")
    assert exported.sample([1], None, exported.sampling_settings())[0].shape == (1, 16, 20, 16)

    # distilled: it learns the source decoder's output for the same latent too, without critics
    assert main(["train", "autoencoder", str(data), "--refine-decoder", str(tmp_path / "source"), "--out",
                 str(tmp_path / "distilled"), "--decoder-channels", "4,8", "--distill", "1", "--max-steps", "3"]) == 0
    _, meta = ckpt.load_autoencoder(tmp_path / "distilled")
    loss = meta["config"]["loss"]
    assert loss["distill_weight"] == 1.0 and not loss["volume_critic"] and not loss["slice_critic"]
    rows = read_log(tmp_path / "distilled")
    assert all(float(row["distill"]) > 0 for row in rows) and all(row["critic_loss"] == "" for row in rows)

    capsys.readouterr()
    assert main(["train", "autoencoder", str(data), "--out", str(tmp_path / "plain"), "--distill", "1"]) == 2
    assert "pass --refine-decoder RUN" in capsys.readouterr().err and not (tmp_path / "plain").exists()
    assert main(["train", "autoencoder", str(data), "--out", str(tmp_path / "alone"), "--decoder-channels", "4,8"]) == 2
    assert "pass --refine-decoder RUN" in capsys.readouterr().err and not (tmp_path / "alone").exists()
    assert main(["train", "autoencoder", str(data), "--refine-decoder", str(tmp_path / "source"), "--out",
                 str(tmp_path / "odd"), "--decoder-channels", "6,8"]) == 2
    error = capsys.readouterr().err
    assert "multiples of norm_num_groups=4" in error and error.count("\n") == 1 and not (tmp_path / "odd").exists()
    assert main(["train", "autoencoder", str(data), "--refine-decoder", str(tmp_path / "source"), "--out",
                 str(tmp_path / "up"), "--decoder-upsample", "deconv"]) == 2
    assert "pass --decoder-channels too" in capsys.readouterr().err and not (tmp_path / "up").exists()


def test_a_decoder_without_latent_attention_starts_as_the_sources_less_that_section():
    """warm_start_decoder: the shipped decoder minus its latent attention keeps every other block's tensors; a decoder
    of other channels takes nothing that does not fit."""
    from mriflow.models.autoencoder import Autoencoder
    from mriflow.train.refinement import warm_start_decoder

    model = dataclasses.replace(tiny_config().model, latent_attention=True)
    source = Autoencoder(model)
    weights = {f"autoencoder.{k}": v for k, v in source.state_dict().items()}
    plain = Autoencoder(dataclasses.replace(model, decoder_latent_attention=False))
    warm = warm_start_decoder(plain.decoder, weights)
    assert warm == {"copied": len(plain.decoder.state_dict()), "of": len(plain.decoder.state_dict())}
    old_blocks, new_blocks = source.decoder.blocks, plain.decoder.blocks
    assert len(old_blocks) == len(new_blocks) + 3
    torch.testing.assert_close(new_blocks[0].state_dict(), old_blocks[0].state_dict())
    for new, old in zip(new_blocks[1:], old_blocks[4:]):  # after the residual-attention-residual section
        torch.testing.assert_close(new.state_dict(), old.state_dict())
    same = Autoencoder(model)
    assert warm_start_decoder(same.decoder, weights)["copied"] == len(same.decoder.state_dict())  # attention kept too
    torch.testing.assert_close(same.decoder.state_dict(), source.decoder.state_dict())
    other = Autoencoder(dataclasses.replace(model, decoder_channels=(4, 8), decoder_latent_attention=False))
    before = {k: v.clone() for k, v in other.decoder.state_dict().items()}
    warm = warm_start_decoder(other.decoder, weights)
    assert warm["copied"] < warm["of"]
    changed = [k for k, v in other.decoder.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == warm["copied"]  # only what fitted was touched


def test_a_deconvolution_decoder_starts_as_the_source_but_for_its_upsampling_and_costs_less():
    """decoder_upsample="deconv": MONAI's transposed stride-2 convolution instead of nearest x2 + a 3^3 convolution at
    the finer level. A refined decoder of the source's channels keeps every other block's tensors, decodes the same
    shapes, and spends fewer multiply-adds (the upsampling convolution ran at the finer level)."""
    from mriflow.models.autoencoder import Autoencoder
    from mriflow.train.refinement import warm_start_decoder

    model = dataclasses.replace(tiny_config().model, latent_attention=False)
    source = Autoencoder(model)
    weights = {f"autoencoder.{k}": v for k, v in source.state_dict().items()}
    deconv = Autoencoder(dataclasses.replace(model, decoder_upsample="deconv"))
    assert any(isinstance(m, torch.nn.ConvTranspose3d) for m in deconv.decoder.modules())
    assert not any(isinstance(m, torch.nn.ConvTranspose3d) for m in source.decoder.modules())
    warm = warm_start_decoder(deconv.decoder, weights)
    upsampling = [b for b in deconv.decoder.blocks if any(isinstance(m, torch.nn.ConvTranspose3d) for m in b.modules())]
    assert len(upsampling) == len(model.channels) - 1
    assert warm["copied"] == warm["of"] - sum(len(b.state_dict()) for b in upsampling)  # all but the new upsampling
    z = torch.randn(2, model.latent_channels, 4, 5, 4)
    with torch.no_grad():
        assert deconv.decode(z).shape == source.decode(z).shape

    def multiply_adds(decoder) -> int:
        total = 0

        def count(module, _, output):
            nonlocal total
            if isinstance(module, torch.nn.Conv3d):  # per output element: input channels x kernel
                per_output = module.weight[0].numel()
            else:  # transposed: input channels x the kernel taps that land on it (kernel / stride per dimension)
                per_output = module.weight[:, 0].numel() // math.prod(module.stride)
            total += output[0].numel() * per_output
        hooks = [m.register_forward_hook(count) for m in decoder.modules()
                 if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
        with torch.no_grad():
            decoder(z)
        for hook in hooks:
            hook.remove()
        return total

    assert multiply_adds(deconv.decoder) < 0.8 * multiply_adds(source.decoder)
    with pytest.raises(ValueError, match="decoder_upsample must be one of interpolate, deconv"):
        dataclasses.replace(model, decoder_upsample="bilinear")
