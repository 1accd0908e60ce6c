"""conv-mcVAE: shapes for several level/attention settings, attention heads, and a few training steps."""
import pandas as pd
import pytest
import torch

from modules.conditioning import ConditionSchema
from modules.config import ConditionSpec, build_dataclass, to_dict
from modules.conv_mcvae import ConvMCVAE, ConvMCVAERunConfig, SelfAttention, check_conv_mcvae_config
from modules.errors import UserError

FRAME = pd.DataFrame({"style": ["ROAD", "MTB", "ROAD", "BMX"], "teeth": [50.0, 32.0, None, 28.0]})
SPECS = [ConditionSpec("style", "categorical"), ConditionSpec("teeth", "numerical")]


def build(image_size=32, channels=1, speed=None, **model):
    raw = {"model_type": "conv_mcvae", **({"speed": speed} if speed is not None else {}),
           "data": {"images_path": ".", "csv_path": "c.csv", "id_column": "id", "image_size": image_size,
                    "channels": channels, "conditions": [{"name": "style", "kind": "categorical"},
                                                         {"name": "teeth", "kind": "numerical"}]},
           "model": {"start_channels": 8, "image_embedding_dim": 8, "attention_heads": 2, "attention_head_dim": 8,
                     "dropout": 0.1, **model}}
    cfg = build_dataclass(ConvMCVAERunConfig, raw, source="test")
    check_conv_mcvae_config(cfg, "test")
    schema = ConditionSchema.fit(SPECS, FRAME)
    return ConvMCVAE(config=to_dict(cfg), schema=schema.state_dict()), schema


@pytest.mark.parametrize("size,channels,levels,attention", [(32, 1, 2, []), (32, 3, 3, [1, 2]), (64, 1, 3, [2]),
                                                            (16, 1, 4, [0, 3])])
def test_shapes(size, channels, levels, attention):
    torch.manual_seed(0)
    model, schema = build(size, channels, levels=levels, attention_levels=attention, blocks_per_level=1)
    images = torch.rand(4, channels, size, size) * 2 - 1
    conditions = model.mask(*schema.encode(FRAME), 0.3, torch.Generator().manual_seed(0))
    reconstruction, mu, logvar = model(images, conditions, torch.Generator().manual_seed(1))
    assert reconstruction.shape == images.shape
    assert mu.shape == logvar.shape == (4, 4, size // 2 ** levels, size // 2 ** levels) == (4, *model.latent_shape)
    out = model.loss(images, reconstruction, mu, logvar)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    generated = model.generate(model.masking.mask_all(3))
    assert generated.shape == (3, channels, size, size)


def test_attention_is_standard_multi_head_and_deterministic_in_eval():
    torch.manual_seed(0)
    attention = SelfAttention(16, heads=2, head_dim=8, dropout=0.5).eval()
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(attention(x), attention(x))  # no dropout at eval time
    # the same computation written out with torch's reference MultiheadAttention weights layout
    b, c, h, w = x.shape
    qkv = attention.qkv(attention.norm(x)).flatten(2)  # (B, 3·heads·d, HW)
    q, k, v = qkv.reshape(b, 3, 2, 8, h * w).unbind(1)  # (B, heads, d, HW)
    weights = torch.softmax(q.transpose(-1, -2) @ k / 8 ** 0.5, dim=-1)  # (B, heads, HW, HW)
    heads = (weights @ v.transpose(-1, -2)).transpose(-1, -2).reshape(b, 16, h, w)
    assert torch.allclose(attention(x), x + attention.out(heads), atol=1e-5)
    # a position's output depends on that sample only (heads and positions are not mixed across the batch)
    y = x.clone()
    y[1] += 1
    assert torch.allclose(attention(x)[0], attention(y)[0])


def test_conditions_change_the_generated_images():
    torch.manual_seed(0)
    model, schema = build(32, levels=2, attention_levels=[])
    model.eval()
    cat, num = schema.encode(FRAME)
    z = torch.randn(1, *model.latent_shape).expand(4, -1, -1, -1)
    images = model.generate(model.mask(cat, num, 0.0), z=z)
    assert not torch.allclose(images[0], images[1])  # ROAD vs MTB from the same z


def train_steps(model, schema, key: str, steps: int = 40) -> list[float]:
    """`steps` Adam steps on 4 binary 16 px images; the `key` term of the loss after each."""
    images = (torch.rand(4, 1, 16, 16) > 0.5).float() * 2 - 1
    cat, num = schema.encode(FRAME)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        out = model._step((images, cat, num), 0.1, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out[key].item())
    return losses


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model, schema = build(16, levels=2, attention_levels=[1], dropout=0.0)
    losses = train_steps(model, schema, "reconstruction")
    assert losses[-1] < 0.7 * losses[0]


def test_config_checks():
    with pytest.raises(UserError, match="data.image_size must be a multiple of 2\\^levels = 32"):
        build(48, levels=5)
    with pytest.raises(UserError, match="model.attention_levels must be levels in \\[0, 1\\]"):
        build(32, levels=2, attention_levels=[3])


GENERATIVE = dict(reconstruction="gaussian_nll", decoder_sigma=0.2, kl_weight=0.5, prior="conditional",
                  decoder_conditions="every_level", encoder_conditions=True)


@pytest.mark.parametrize("options", [GENERATIVE, {**GENERATIVE, "decoder_sigma": None},
                                     {**GENERATIVE, "decoder_conditions": "film", "condition_layout": "spatial"}])
def test_the_generative_options_train_and_generate(options):
    torch.manual_seed(0)
    model, schema = build(16, levels=2, attention_levels=[1], dropout=0.0, **options)
    losses = train_steps(model, schema, "loss")
    assert losses[-1] < losses[0] - 0.3 * abs(losses[0])
    assert model.generate(model.masking.mask_all(3)).shape == (3, 1, 16, 16)
    # a learned σ moves; a fixed one is a buffer at its value
    if options["decoder_sigma"] is None:
        assert isinstance(model.log_sigma, torch.nn.Parameter) and model.log_sigma.item() != pytest.approx(-2.302585)
    else:
        assert not isinstance(model.log_sigma, torch.nn.Parameter)
        assert model.log_sigma.exp().item() == pytest.approx(0.2)


def test_gaussian_nll_loss_is_half_the_negative_elbo_with_the_conditional_prior():
    torch.manual_seed(0)
    model, _ = build(16, levels=2, attention_levels=[], **GENERATIVE)
    images, reconstruction = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16)
    mu, logvar = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    prior = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    out = model.loss(images, reconstruction, mu, logvar, prior)
    sigma = 0.2
    nll = (0.5 * ((images - reconstruction) / sigma) ** 2 + torch.log(torch.tensor(sigma))).flatten(1).sum(1).mean()
    var, prior_var = logvar.exp(), prior[1].exp()
    kl = (0.5 * (prior[1] - logvar + (var + (mu - prior[0]) ** 2) / prior_var - 1)).flatten(1).sum(1).mean()
    assert out["reconstruction"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert out["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * (nll + kl).item(), rel=1e-5)


def test_generation_draws_z_from_the_conditional_prior_and_every_level_sees_the_conditions():
    torch.manual_seed(0)
    model, schema = build(16, levels=2, attention_levels=[], **GENERATIVE)
    model.eval()
    torch.nn.init.normal_(model.prior_net[-1].weight, std=0.5)  # a prior that depends on c
    cat, num = schema.encode(FRAME)
    conditions = model.mask(cat, num, 0.0)
    eps = torch.randn(4, *model.latent_shape)
    c = model.embed(conditions)
    mu, logvar = model.prior(c)
    assert mu.shape == logvar.shape == (4, *model.latent_shape)
    expected = model.decode(mu + eps * torch.exp(0.5 * logvar), c)
    assert torch.allclose(model.generate(conditions, z=eps), expected, atol=1e-6)
    # the decoder's level inputs get a condition term: zeroing the per-level maps changes the output
    z = torch.randn(4, *model.latent_shape)
    before = model.decode(z, c)
    with torch.no_grad():
        for layer in model.level_conditions:
            layer.weight.zero_()
            layer.bias.zero_()
    assert not torch.allclose(before, model.decode(z, c))


def test_the_encoder_sees_the_conditions_only_when_asked():
    torch.manual_seed(0)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    for encoder_conditions in (False, True):
        model, schema = build(16, levels=2, attention_levels=[], encoder_conditions=encoder_conditions)
        model.eval()
        cat, num = schema.encode(FRAME)
        known, masked = model.embed(model.mask(cat, num, 0.0)), model.embed(model.masking.mask_all(4))
        differs = not torch.allclose(model.encode(images, known)[0], model.encode(images, masked)[0])
        assert differs == encoder_conditions


def test_channels_last_is_the_same_model_in_another_memory_layout():
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    outputs = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model, schema = build(16, levels=2, attention_levels=[1], dropout=0.0, speed={"channels_last": channels_last},
                              **GENERATIVE)
        model.eval()
        conv = model.from_latent.weight  # (out, in > 1, 3, 3): the layouts differ
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        conditions = model.mask(*schema.encode(FRAME), 0.3, torch.Generator().manual_seed(0))
        reconstruction, mu, _ = model(images, conditions, torch.Generator().manual_seed(1))
        generated = model.generate(conditions, z=torch.zeros(4, *model.latent_shape))
        assert generated.is_contiguous()  # NCHW out, whatever the layout inside
        outputs[channels_last] = (reconstruction, mu, generated)
    for a, b in zip(outputs[False], outputs[True]):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name,size,latent", [("conv_mcvae_biked_small", 64, (4, 8, 8)), ("conv_mcvae_biked", 256, (4, 8, 8)),
                                              ("conv_mcvae_biked_paper", 256, (4, 8, 8))])
def test_shipped_configs_load_and_build(name, size, latent):
    from modules.config import config_path, read_yaml

    path = config_path(name, None)
    cfg = build_dataclass(ConvMCVAERunConfig, read_yaml(path), source=str(path))
    check_conv_mcvae_config(cfg, str(path))
    assert cfg.data.image_size == size
    generative = name != "conv_mcvae_biked_paper"  # the paper's objective is kept to reproduce its tables
    assert (cfg.model.reconstruction == "gaussian_nll") == generative
    assert (cfg.model.prior == "conditional") == generative
    frame = pd.DataFrame({c.name: ["a", "b"] if c.kind == "categorical" and not c.categories else
                          ([c.categories[0], c.categories[-1]] if c.kind == "categorical" else [1.0, 2.0])
                          for c in cfg.data.conditions})
    schema = ConditionSchema.fit(cfg.data.conditions, frame, fixed_vocabularies=cfg.data.vocabularies)
    model = ConvMCVAE(config=to_dict(cfg), schema=schema.state_dict())
    assert model.latent_shape == latent


def test_the_ablation_configs_of_results_still_load():
    """RESULTS.md points at them as the way to reproduce its rows: they must not rot as options change."""
    from pathlib import Path

    from modules.config import read_yaml

    paths = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "configs").rglob("*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        cfg = build_dataclass(ConvMCVAERunConfig, read_yaml(path), source=str(path))
        check_conv_mcvae_config(cfg, str(path))
        assert cfg.data.image_size == 64


def test_a_spatial_condition_map_varies_over_the_grid_and_film_starts_as_the_plain_decoder():
    torch.manual_seed(0)
    model, schema = build(16, levels=2, attention_levels=[], **{**GENERATIVE, "decoder_conditions": "film",
                                                                 "condition_layout": "spatial"})
    model.eval()
    c = model.embed(model.mask(*schema.encode(FRAME), 0.0))
    grid = model._condition_grid(model.condition_map(c), 4)
    assert grid.shape == (4, 10, 4, 4) and not torch.allclose(grid[:, :, 0, 0], grid[:, :, 3, 3])
    fine = model._condition_grid(model.condition_map(c), 8)  # nearest upsampling to a decoder level
    assert torch.equal(fine[:, :, ::2, ::2], grid) and torch.equal(fine[:, :, 1::2, 1::2], grid)
    # γ = β = 0 at the start: the same images as a decoder without modulation
    z = torch.randn(4, *model.latent_shape)
    modulated = model.decode(z, c)
    model.cfg.model.decoder_conditions = "latent"
    parts = model.level_conditions
    model.level_conditions = None
    assert torch.allclose(modulated, model.decode(z, c), atol=1e-6)
    model.level_conditions = parts


def test_the_broadcast_condition_shortcut_is_the_1x1_conv_of_the_broadcast_grid():
    """Broadcast conditions skip the grid: each level's 1×1 conv is applied to the vector. The decoder must give
    what the conv over the materialised grid gives."""
    torch.manual_seed(0)
    model, schema = build(16, levels=2, attention_levels=[], dropout=0.0, **GENERATIVE)
    model.eval()
    with torch.no_grad():
        for conv in model.level_conditions:
            conv.bias.normal_()
    c = model.embed(model.mask(*schema.encode(FRAME), 0.0))
    z = torch.randn(4, *model.latent_shape)
    mapped = model.condition_map(c)
    h = model.from_latent(torch.cat([z, model._condition_grid(mapped, z.shape[-1])], dim=1))
    for conv, level in zip(model.level_conditions, model.up):
        h = level(h + conv(model._condition_grid(mapped, h.shape[-1])))
    assert torch.allclose(model.decode(z, c), model.head(h), atol=1e-5)


def test_a_stride_2_stem_runs_the_encoder_at_the_decoder_sizes_for_a_fraction_of_the_flops():
    from torch.utils.flop_counter import FlopCounterMode

    sizes, flops = {}, {}
    for stride in (1, 2):
        torch.manual_seed(0)
        model, schema = build(32, levels=3, attention_levels=[], stem_stride=stride)
        images = torch.rand(2, 1, 32, 32) * 2 - 1
        seen = []
        hooks = [level[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])) for level in model.down]
        c = model.embed(model.mask(*schema.encode(FRAME.head(2)), 0.0))
        with FlopCounterMode(display=False) as counter:
            mu, logvar = model.encode(images, c)
        for hook in hooks:
            hook.remove()
        assert mu.shape == logvar.shape == (2, *model.latent_shape) == (2, 4, 4, 4)
        sizes[stride], flops[stride] = seen, counter.get_total_flops()
    assert sizes[1] == [32, 16, 8]  # the paper's: level i at size / 2^i
    assert sizes[2] == [16, 8, 4]  # the decoder's levels run at 4, 8, 16 before the last upsampling
    assert flops[2] < 0.35 * flops[1]


def test_the_critic_options_are_checked():
    with pytest.raises(UserError, match="model.critic_weight must be ≥ 0"):
        build(16, levels=2, attention_levels=[], critic_weight=-1.0)
    with pytest.raises(UserError, match="model.critic_balance must be in \\[0, 1\\]"):
        build(16, levels=2, attention_levels=[], critic_balance=1.5)
    with pytest.raises(UserError, match="model.critic_batch must be ≥ 1"):
        build(16, levels=2, attention_levels=[], critic_weight=1.0, critic_batch=0)
    with pytest.raises(UserError, match="model.stem_stride"):
        build(16, levels=2, attention_levels=[], stem_stride=3)
