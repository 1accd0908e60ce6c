"""mcLDM UNet: shapes for odd configs, dependence on the condition and on t, the level-0 skip, determinism in eval
mode, bf16 autocast, and the parameter count of the paper's config (built only, no forward pass)."""
import pytest
import torch

from modules.diffusion_components.unet import (McUNet, ResBlock, UNetConfig, count_parameters, sinusoidal_embedding,
                                               sinusoidal_frequencies)

CONDITION_DIM = 12


def tiny(**overrides) -> UNetConfig:
    cfg = dict(start_channels=8, channel_mult=[1, 2], blocks_per_level=1, attention_levels=[1], attention_heads=2,
               attention_head_dim=4, condition_channels=3, time_embedding_dim=16, positional_dim=8, dropout=0.1)
    return UNetConfig(**{**cfg, **overrides})


def build(cfg: UNetConfig, in_channels: int = 4, *, perturb_out: bool = True) -> McUNet:
    """A tiny UNet; the zero-initialised convs (output, last conv of each ResBlock, through which t enters) get
    random weights so that the output can depend on the inputs and the tests can fail."""
    torch.manual_seed(0)
    model = McUNet(cfg, in_channels=in_channels, condition_dim=CONDITION_DIM)
    if perturb_out:
        zero_initialised = [model.out[-1]] + [m.outer[-1] for m in model.modules() if isinstance(m, ResBlock)]
        with torch.no_grad():
            for conv in zero_initialised:
                conv.weight.normal_(0, 0.1)
                conv.bias.normal_(0, 0.1)
    return model


def inputs(batch=2, channels=4, height=8, width=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, height, width, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, CONDITION_DIM, generator=g))


@pytest.mark.parametrize("overrides,channels,size", [
    (dict(channel_mult=[1], attention_levels=[]), 4, (5, 7)),  # one level: any size, no downsampling
    (dict(channel_mult=[1], attention_levels=[0], blocks_per_level=2), 3, (6, 6)),
    (dict(channel_mult=[1, 2, 3], attention_levels=[], start_channels=5), 4, (12, 20)),  # odd widths 5, 10, 15
    (dict(channel_mult=[1, 2, 3], attention_levels=[0, 2], start_channels=6, condition_channels=1), 1, (4, 12)),
    (dict(channel_mult=[2, 2], activation="gelu", positional_dim=7), 4, (10, 6)),  # odd positional dim
])
def test_output_shape_equals_input(overrides, channels, size):
    model = build(tiny(**overrides), channels)
    x, t, c = inputs(channels=channels, height=size[0], width=size[1])
    for mode in (model.train(), model.eval()):
        out = mode(x, t.float() if mode.training else t, c)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_output_starts_at_zero_and_size_is_checked():
    model = build(tiny(channel_mult=[1, 1, 1]), perturb_out=False)
    x, t, c = inputs(height=8, width=12)
    assert torch.equal(model(x, t, c), torch.zeros_like(x))  # zero-initialised output conv
    with pytest.raises(ValueError, match="multiples of 2"):
        model(*inputs(height=8, width=10))
    with pytest.raises(ValueError, match="attention_levels"):
        McUNet(tiny(attention_levels=[2]), in_channels=4, condition_dim=CONDITION_DIM)


def test_output_depends_on_condition_and_time():
    model = build(tiny()).eval()
    x, t, c = inputs()
    with torch.no_grad():
        out = model(x, t, c)
        assert not torch.allclose(out, model(x, t, c + torch.randn_like(c)), atol=1e-5)
        assert not torch.allclose(out, model(x, (t + 100) % 1000, c), atol=1e-5)
        # each sample's output depends on its own condition only
        other = c.clone()
        other[1] += 1.0
        changed = model(x, t, other)
        assert torch.allclose(out[0], changed[0], atol=1e-6) and not torch.allclose(out[1], changed[1], atol=1e-5)


def test_condition_enters_every_level():
    cfg = tiny(channel_mult=[1, 2, 2])
    model = build(cfg)
    sites = [model.down[i].inject for i in range(3)] + [model.middle.inject] + [level.inject for level in model.up]
    x, t, c = inputs()
    model(x, t, c).square().sum().backward()
    for site in sites:
        # the last condition_channels input channels of each injection conv are the condition; they get gradient
        assert site.weight.grad[:, -cfg.condition_channels:].abs().sum() > 0


def test_every_level_has_a_skip_including_level_0():
    model = build(tiny(channel_mult=[1, 2, 2]))
    stored, received = [], []
    for level in model.down:
        level.register_forward_hook(lambda module, args, output: stored.append(output[0]))

    def capture(module, args):
        h, skip, c, time = args
        skip = skip.detach().requires_grad_()
        received.append(skip)
        return h, skip, c, time

    for level in model.up:
        level.register_forward_pre_hook(capture)
    x, t, c = inputs()
    model(x, t, c).square().sum().backward()
    assert len(stored) == len(received) == model.levels == 3
    # up level j (deepest first) gets the skip of down level levels-1-j, level 0's skip included
    for skip, down_out in zip(received, reversed(stored)):
        assert torch.equal(skip, down_out)
        assert skip.grad is not None and skip.grad.abs().sum() > 0
    widths = model.widths
    assert model.up[-1].inject.in_channels == widths[1] + widths[0] + model.config.condition_channels


def test_eval_is_deterministic_and_dropout_acts_in_training():
    model = build(tiny(dropout=0.5))
    x, t, c = inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, c), model(x, t, c))
        model.train()
        assert not torch.equal(model(x, t, c), model(x, t, c))


def test_bf16_autocast_and_channels_last():
    model = build(tiny(channel_mult=[1, 2, 3], attention_levels=[1, 2], start_channels=8)).eval()
    x, t, c = inputs(height=8, width=12)
    with torch.no_grad():
        reference = model(x, t, c)
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model(x_cl, t, c), reference, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x_cl, t, c)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(out.float(), reference, atol=0.1 * reference.abs().max().item())


def test_sinusoidal_embedding():
    t = torch.tensor([0, 1, 999])
    features = sinusoidal_embedding(t, 8)
    assert features.shape == (3, 8) and features.dtype == torch.float32
    assert torch.equal(features[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert torch.allclose(features, sinusoidal_embedding(t.float(), 8, sinusoidal_frequencies(8)))
    assert sinusoidal_embedding(t, 7).shape == (3, 7)
    buffers = dict(build(tiny()).named_buffers())
    assert "time_embedding.frequencies" in buffers
    assert "time_embedding.frequencies" not in build(tiny()).state_dict()  # non-persistent


def test_paper_config_parameter_count_build_only():
    """The paper's biked config (defaults, 4×64×64 latents, 8 conditions × 5): about 116 M parameters. Built only."""
    model = McUNet(UNetConfig(), in_channels=4, condition_dim=8 * 5)
    n = count_parameters(model)
    print(f"paper-config McUNet: {n:,} parameters")
    assert 90e6 < n < 140e6
