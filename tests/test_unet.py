"""mcLDM UNet, both layouts: shapes for odd configs, dependence on the condition and on t, every skip (level 0's
included), one condition map per level, one attention block per attention level, GroupNorm groups, determinism in
eval mode, bf16 autocast, and the size and FLOPs of the paper's config (on the meta device)."""
import pytest
import torch

from modules.diffusion_components.unet import (ConditionMap, McUNet, PerBlockAttentionUNet, ResBlock, UNetConfig,
                                               build_unet, count_parameters, sinusoidal_embedding,
                                               sinusoidal_frequencies, unet_cost)
from modules.layers import SelfAttention

CONDITION_DIM = 12


def tiny(**overrides) -> UNetConfig:
    cfg = dict(start_channels=8, channel_mult=[1, 2], blocks_per_level=1, attention_levels=[1], attention_heads=2,
               attention_head_dim=4, condition_channels=3, time_embedding_dim=16, positional_dim=8, dropout=0.1)
    return UNetConfig(**{**cfg, **overrides})


def per_block(**overrides) -> UNetConfig:
    return tiny(layout="per_block_attention", norm_groups=8, **overrides)


def build(cfg: UNetConfig, in_channels: int = 4, *, perturb_out: bool = True):
    """A tiny UNet; the zero-initialised convs (output, last conv of each ResBlock, through which t enters) get
    random weights so that the output can depend on the inputs and the tests can fail."""
    torch.manual_seed(0)
    model = build_unet(cfg, in_channels=in_channels, condition_dim=CONDITION_DIM)
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
    (dict(layout="per_block_attention", channel_mult=[1], attention_levels=[]), 4, (5, 7)),  # no downsampling
    (dict(layout="per_block_attention", channel_mult=[1], attention_levels=[0], blocks_per_level=2), 3, (6, 6)),
    (dict(layout="per_block_attention", channel_mult=[1, 2, 3], attention_levels=[], start_channels=5), 4, (12, 20)),
    (dict(layout="per_block_attention", channel_mult=[1, 2, 3], attention_levels=[0, 2], start_channels=6,
          condition_channels=1), 1, (4, 12)),
    (dict(layout="per_block_attention", channel_mult=[2, 2], activation="gelu", positional_dim=7), 4, (10, 6)),
    (dict(channel_mult=[1], attention_levels=[0]), 4, (6, 10)),  # paper: one level halves once
    (dict(channel_mult=[1, 2, 3], attention_levels=[], start_channels=5), 4, (16, 24)),  # odd widths 5, 10, 15
    (dict(channel_mult=[1, 2, 3], attention_levels=[0, 2], start_channels=6, condition_channels=1,
          blocks_per_level=3), 1, (8, 16)),
    (dict(channel_mult=[2, 2], activation="gelu", positional_dim=7, norm_groups=3), 4, (12, 4)),
])
def test_output_shape_equals_input(overrides, channels, size):
    model = build(tiny(**overrides), channels)
    x, t, c = inputs(channels=channels, height=size[0], width=size[1])
    for mode in (model.train(), model.eval()):
        out = mode(x, t.float() if mode.training else t, c)
        assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("layout,bad_size", [("per_block_attention", (8, 10)), ("paper", (8, 12))])
def test_output_starts_at_zero_and_size_is_checked(layout, bad_size):
    model = build(tiny(channel_mult=[1, 1, 1], layout=layout), perturb_out=False)
    x, t, c = inputs(height=8, width=16)
    assert torch.equal(model(x, t, c), torch.zeros_like(x))  # zero-initialised output conv
    with pytest.raises(ValueError, match="multiples of"):
        model(*inputs(height=bad_size[0], width=bad_size[1]))
    with pytest.raises(ValueError, match="attention_levels"):
        build_unet(tiny(attention_levels=[2], layout=layout), in_channels=4, condition_dim=CONDITION_DIM)
    with pytest.raises(ValueError, match="layout"):
        build_unet(tiny(layout="unknown"), in_channels=4, condition_dim=CONDITION_DIM)


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


def test_per_block_layout_condition_enters_every_level():
    cfg = per_block(channel_mult=[1, 2, 2])
    model = build(cfg)
    sites = [model.down[i].inject for i in range(3)] + [model.middle.inject] + [level.inject for level in model.up]
    x, t, c = inputs()
    model(x, t, c).square().sum().backward()
    for site in sites:
        # the last condition_channels input channels of each injection conv are the condition; they get gradient
        assert site.weight.grad[:, -cfg.condition_channels:].abs().sum() > 0


def test_per_block_layout_every_level_has_a_skip_including_level_0():
    model = build(per_block(channel_mult=[1, 2, 2]))
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


@pytest.mark.parametrize("layout", ["paper", "per_block_attention"])
def test_eval_is_deterministic_and_dropout_acts_in_training(layout):
    model = build(tiny(dropout=0.5, layout=layout))
    x, t, c = inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, c), model(x, t, c))
        model.train()
        assert not torch.equal(model(x, t, c), model(x, t, c))


@pytest.mark.parametrize("layout", ["paper", "per_block_attention"])
def test_bf16_autocast_and_channels_last(layout):
    model = build(tiny(channel_mult=[1, 2, 3], attention_levels=[1, 2], start_channels=8, layout=layout)).eval()
    x, t, c = inputs(height=16, width=32)  # not a 1×2 bottleneck, where GroupNorm amplifies rounding
    with torch.no_grad():
        reference = model(x, t, c)
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        # NHWC kernels sum in another order; one-channel GroupNorm groups amplify that
        assert torch.allclose(model(x_cl, t, c), reference, atol=1e-3 * reference.abs().max().item())
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


def test_paper_layout_condition_map_per_level_gets_the_condition():
    cfg = tiny(channel_mult=[1, 2, 2])
    model = build(cfg)
    maps = [m for m in model.modules() if isinstance(m, ConditionMap)]
    assert len(maps) == 2 * 3  # its own map at every down and every up level, none shared
    assert len({id(m.map[0].weight) for m in maps}) == 6
    x, t, c = inputs()
    model(x, t, c).square().sum().backward()
    for m in maps:
        assert m.map[0].weight.grad.abs().sum() > 0
    # the first ResBlock of every level takes [features, skip?, condition]: the last channels are the condition
    for level in model.down:
        assert level.blocks[0].inner[-1].weight.grad[:, -cfg.condition_channels:].abs().sum() > 0
    for level in model.up:
        assert level.blocks[0].inner[-1].weight.grad[:, -cfg.condition_channels:].abs().sum() > 0


def test_paper_layout_every_skip_reaches_the_up_path_level_0_in_the_head():
    model = build(tiny(channel_mult=[1, 2, 2]))
    stored, received = [], []
    for level in model.down:
        level.register_forward_hook(lambda module, args, output: stored.append(output))
    for level in model.up:
        level.register_forward_pre_hook(lambda module, args: received.append(args[1]))
    head_inputs = []
    model.head.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
    x, t, c = inputs()
    model(x, t, c)
    skips = [out[0] for out in stored]  # the features of each down level before its downsampling
    bottleneck_input = stored[-1][1]
    # up level j (deepest first) runs one resolution below down level levels-1-j and gets that resolution's skip
    assert torch.equal(received[0], bottleneck_input)
    for j in range(1, 3):
        assert torch.equal(received[j], skips[3 - j])
    # level 0's skip, which the authors' code drops, enters the head next to the upsampled features
    w0 = model.widths[0]
    assert head_inputs[0].shape[1] == 2 * w0 and torch.equal(head_inputs[0][:, w0:], skips[0])


def test_paper_layout_widths_attention_and_group_norm():
    cfg = UNetConfig(start_channels=64, channel_mult=[1, 2, 4], blocks_per_level=3, attention_levels=[1, 2],
                     attention_heads=2, attention_head_dim=8, condition_channels=10)
    model = build_unet(cfg, in_channels=4, condition_dim=CONDITION_DIM)
    assert model.widths == [64, 128, 256] and model.bottleneck_width == 512
    assert [level.downsample.out_channels for level in model.down] == [128, 256, 512]
    # one attention block after a level's ResBlocks (not after each), at attention levels only; one in the bottleneck
    assert [level.attention is not None for level in model.down] == [False, True, True]
    assert [level.attention is not None for level in model.up] == [True, True, False]
    assert sum(isinstance(m, SelfAttention) for m in model.modules()) == 2 * 2 + 1
    assert all(len(level.blocks) == 3 for level in [*model.down, *model.up])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    after_time = {id(m.outer[0]) for m in model.modules() if isinstance(m, ResBlock)}
    for norm in norms:  # 32 groups, or the largest divisor below it (64 + 10 condition channels → 2 groups)
        c = norm.num_channels
        # after the time bias at least 2 channels per group, else the normalisation removes the bias
        limit = min(32, c // 2) if id(norm) in after_time else 32
        assert norm.num_groups == max(g for g in range(1, limit + 1) if c % g == 0)
    assert any(n.num_channels == 74 and n.num_groups == 2 for n in norms)
    assert sum(n.num_groups == 32 for n in norms) > len(norms) // 2


def test_paper_config_size_and_flops_match_the_authors_unet():
    """The paper's biked config (defaults, 4×64×64 latents, 8 conditions × 5): the authors' mcUnet has 115.76 M
    parameters and costs 60.3 GFLOP per sample a training step (counted on their code with FlopCounterMode); the
    fixed layout adds level 0's skip in the head (one ResBlock at full resolution)."""
    cost = unet_cost(UNetConfig(), latent_shape=(4, 64, 64), condition_dim=8 * 5)
    print(cost)
    assert abs(cost["parameters"] - 115.76e6) / 115.76e6 < 0.01
    assert 60.3 < cost["train_gflop_per_sample"] < 60.3 * 1.08
    assert 2.9 < cost["train_gflop_per_sample"] / cost["forward_gflop_per_sample"] < 3.1
    old = unet_cost(UNetConfig(layout="per_block_attention", channel_mult=[1, 3, 6, 8], norm_groups=8),
                    latent_shape=(4, 64, 64), condition_dim=8 * 5)
    assert 227 < old["train_gflop_per_sample"] < 229  # what the issue measured on the old layout
