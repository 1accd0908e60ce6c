"""The mcLDM's frozen first stage (a diffusers AutoencoderKL): shapes, channels, determinism, errors; no network."""
import socket

import pytest
import torch

from modules.diffusion_components.first_stage import (TINY_AUTOENCODER_CONFIG, FirstStage, FirstStageConfig,
                                                      check_first_stage_config)
from modules.errors import UserError


def tiny(**overrides) -> FirstStage:
    return FirstStage.from_config(FirstStageConfig(config={**TINY_AUTOENCODER_CONFIG, **overrides}), source="t.yaml")


@pytest.fixture(scope="module")
def first_stage() -> FirstStage:
    return tiny()


@pytest.fixture
def no_network(monkeypatch):
    """Offline Hugging Face settings, and any socket connection fails the test."""
    import diffusers.utils.constants
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MCLDM_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(diffusers.utils.constants, "HF_HUB_OFFLINE", True, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the first stage tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_tiny_config(first_stage):
    assert first_stage.downsample_factor == 2
    assert first_stage.latent_channels == 4
    assert first_stage.latent_shape(32) == (4, 16, 16)
    assert first_stage.latent_shape((16, 24)) == (4, 8, 12)
    assert first_stage.scaling_factor == pytest.approx(0.18215)  # diffusers' default, from the config
    with pytest.raises(UserError, match="multiple"):
        first_stage.latent_shape(15)


def test_encode_decode_shapes_and_channels(first_stage):
    g = torch.Generator().manual_seed(0)
    gray = torch.rand((2, 1, 16, 16), generator=g) * 2 - 1
    z = first_stage.encode(gray)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    torch.testing.assert_close(z, first_stage.encode(gray.repeat(1, 3, 1, 1)))  # gray = its channel repeated
    rgb = first_stage.decode(z, channels=3)
    back = first_stage.decode(z, channels=1)
    assert rgb.shape == (2, 3, 16, 16) and back.shape == (2, 1, 16, 16) and back.dtype == torch.float32
    assert rgb.min() >= -1 and rgb.max() <= 1
    torch.testing.assert_close(back, rgb.mean(dim=1, keepdim=True))  # RGB → gray: the mean
    # a grayscale autoencoder takes RGB images as their mean
    gray_ae = tiny(in_channels=1, out_channels=1)
    color = torch.rand((2, 3, 16, 16), generator=g) * 2 - 1
    torch.testing.assert_close(gray_ae.encode(color), gray_ae.encode(color.mean(dim=1, keepdim=True)))
    assert gray_ae.decode(gray_ae.encode(color), channels=3).shape == (2, 3, 16, 16)
    # batched encoding of uint8 images equals encoding their [-1, 1] values
    raw = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8, generator=g)
    batched = first_stage.encode_batched(raw, batch_size=2, progress=False)
    torch.testing.assert_close(batched, first_stage.encode(raw.float() / 127.5 - 1))
    assert first_stage.decode_batched(batched, channels=1, batch_size=2).shape == (5, 1, 16, 16)


def test_latents_are_the_scaled_posterior_mode(first_stage):
    x = torch.rand((2, 3, 16, 16)) * 2 - 1
    mean = first_stage.autoencoder.encode(x).latent_dist.mean
    torch.testing.assert_close(first_stage.encode(x), mean * 0.18215)
    torch.testing.assert_close(first_stage.encode(x), first_stage.encode(x))  # deterministic
    custom = FirstStage.from_config(FirstStageConfig(config=TINY_AUTOENCODER_CONFIG, scaling_factor=0.5))
    torch.testing.assert_close(custom.encode(x), mean * 0.5)


def test_same_config_same_weights_and_fingerprint(first_stage):
    torch.manual_seed(123)
    before = torch.rand(1)
    again = tiny()
    assert all(torch.equal(a, b) for a, b in zip(first_stage.parameters(), again.parameters()))
    assert again.fingerprint() == first_stage.fingerprint()
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # building did not touch the global RNG
    others = [tiny(latent_channels=8), tiny(layers_per_block=2),
              FirstStage.from_config(FirstStageConfig(config=TINY_AUTOENCODER_CONFIG, dtype="bfloat16")),
              FirstStage.from_config(FirstStageConfig(config=TINY_AUTOENCODER_CONFIG, scaling_factor=1.0))]
    prints = {first_stage.fingerprint(), *(o.fingerprint() for o in others)}
    assert len(prints) == 1 + len(others)
    changed = tiny()  # same config, other weights
    with torch.no_grad():
        changed.autoencoder.decoder.conv_out.bias.add_(1e-3)
    changed._fingerprint = None
    assert changed.fingerprint() != first_stage.fingerprint()
    changed.load_state_dict(first_stage.state_dict())  # loading weights recomputes it
    assert changed.fingerprint() == first_stage.fingerprint()


def test_local_folder_round_trip(first_stage, tmp_path, no_network):
    first_stage.autoencoder.save_pretrained(str(tmp_path / "vae"))
    for cfg in (FirstStageConfig(pretrained=str(tmp_path), subfolder="vae"),
                FirstStageConfig(pretrained=str(tmp_path / "vae"), subfolder=None)):
        loaded = FirstStage.from_config(cfg, source="t.yaml")
        assert loaded.fingerprint() == first_stage.fingerprint()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="first_stage.pretrained = .*empty.*config.json"):  # a folder without weights
        FirstStage.from_config(FirstStageConfig(pretrained=str(tmp_path / "empty"), subfolder=None), source="t.yaml")


@pytest.mark.parametrize("pretrained", ["/nonexistent/dir", "stabilityai/stable-diffusion-2-1"])
def test_missing_weights_name_the_key_and_a_local_copy(pretrained, no_network):
    with pytest.raises(UserError) as err:
        FirstStage.from_config(FirstStageConfig(pretrained=pretrained, subfolder="vae"), source="configs/ldm.yaml")
    message = str(err.value)
    for part in ("configs/ldm.yaml", "first_stage.pretrained", pretrained, "huggingface-cli download",
                 "--local-dir DIR", "pretrained: DIR, subfolder: vae", "train_first_stage.py", "first_stage: {config:"):
        assert part in message, part


def test_nan_latents_raise(monkeypatch):
    fs = tiny()
    nan = torch.full((2, 8, 8, 8), float("nan"))
    monkeypatch.setattr(fs.autoencoder.encoder, "forward", lambda x: nan)
    with pytest.raises(UserError, match="first_stage.dtype: float32"):
        fs.encode(torch.zeros(2, 3, 16, 16))


def test_frozen_and_always_in_eval_mode(first_stage):
    parent = torch.nn.ModuleDict({"first_stage": first_stage, "head": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in first_stage.modules())
    assert not any(p.requires_grad for p in first_stage.parameters())
    assert [p for p in parent.parameters() if p.requires_grad] == list(parent["head"].parameters())


def test_config_errors():
    with pytest.raises(UserError, match="first_stage.config"):
        FirstStage.from_config(FirstStageConfig(config={"no_such_argument": 1}), source="t.yaml")
    with pytest.raises(UserError, match="either pretrained"):
        check_first_stage_config(FirstStageConfig(pretrained=None), "t.yaml")
    with pytest.raises(UserError, match="scaling_factor"):
        check_first_stage_config(FirstStageConfig(scaling_factor=0.0), "t.yaml")
