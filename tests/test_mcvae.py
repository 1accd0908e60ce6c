import math

import pandas as pd
import pytest
import torch

from modules.errors import UserError
from modules.mcvae import ConditionedMLP, gaussian_nll, kl_divergence
from modules.registry import MCVAE_SPEC
from modules.training import common_parser, load_run_config


def build(biked_slice, name: str):
    args = common_parser("t").parse_args(["--cfg_name", name, "--csv_path", str(biked_slice)])
    cfg, _ = load_run_config(args, MCVAE_SPEC.config_cls)
    torch.manual_seed(0)
    return MCVAE_SPEC.build(cfg)


@pytest.fixture
def built(biked_slice):
    """The paper's mcVAE (configs/mcvae_biked_paper.yaml)."""
    return build(biked_slice, "mcvae_biked_paper")


@pytest.fixture
def generative(biked_slice):
    """The generative default (configs/mcvae_biked.yaml): Gaussian decoder, conditional prior, c at every layer."""
    return build(biked_slice, "mcvae_biked")


def test_forward_shapes_and_architecture(built):
    dm, model = built
    design, cat, num = (t[:16] for t in dm.tensors["train"])
    conditions = model.mask(cat, num, 0.2, torch.Generator().manual_seed(0))
    reconstruction, mu, logvar = model(design, conditions, torch.Generator().manual_seed(1))
    assert reconstruction.shape == (16, 26) and mu.shape == logvar.shape == (16, 10)
    assert model.embedding.out_dim == 8 * 5
    assert model.decoder[0][0].in_features == 10 + 40  # decoder input = [z, condition embedding]
    assert model.encoder[0].in_features == 26  # the encoder sees the design only
    assert [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)] == [64, 128, 64, 32]


def test_loss_reductions(built):
    _, model = built
    x = torch.rand(4, 26)
    x_hat = x + 0.1
    mu, logvar = torch.full((4, 10), 0.5), torch.zeros(4, 10)
    kl = 0.5 * 0.25 * 10  # per design: -0.5·Σ(1 + 0 - 0.25 - 1)
    assert torch.allclose(kl_divergence(mu, logvar), torch.full((4,), kl))
    expected_rec = {"sse": 4 * 26 * 0.01, "sse_per_design": 26 * 0.01, "mse": 0.01}
    for mode, rec in expected_rec.items():
        model.cfg.model.reconstruction = mode
        out = model.loss(x, x_hat, mu, logvar)
        assert out["reconstruction"].item() == pytest.approx(rec, rel=1e-5)
        assert out["kl"].item() == pytest.approx(kl)
        assert out["loss"].item() == pytest.approx(0.3 * rec + 0.7 * kl, rel=1e-5)


def test_training_step_is_a_function_of_seed_and_step(built):
    dm, model = built
    batch = tuple(t[:32] for t in dm.tensors["train"])
    a = model._step(batch, 0.5, model.step_generator(0))["loss"]
    b = model._step(batch, 0.5, model.step_generator(0))["loss"]
    c = model._step(batch, 0.5, model.step_generator(1))["loss"]
    assert a.item() == b.item() and a.item() != c.item()


def test_sample_api(built):
    dm, model = built
    designs = model.sample({"BikeStyle": "ROAD", "Teeth on chainring": 48}, n=5, seed=0)
    assert list(designs.columns) == dm.scaler.columns + ["BikeStyle", "Teeth on chainring"]
    assert len(designs) == 5
    same = model.sample({"BikeStyle": "ROAD", "Teeth on chainring": 48}, n=5, seed=0)
    pd.testing.assert_frame_equal(designs, same)
    assert len(model.sample(None, n=2, seed=0)) == 2  # unconditional
    with pytest.raises(UserError, match="no category 'CARGO-X'"):
        model.sample({"BikeStyle": "CARGO-X"}, n=1)
    with pytest.raises(UserError, match="unknown condition 'wheels'"):
        model.sample({"wheels": 2}, n=1)


def test_all_masked_conditions_give_the_unconditional_decoder_input(built):
    _, model = built
    model.eval()
    z = torch.randn(3, 10)
    all_masked = model.generate(model.masking.mask_all(3), z=z)
    via_api, _ = model.conditions_from({}, 3)
    assert torch.equal(model.generate(via_api, z=z), all_masked)


def test_ema_tracks_the_generative_path(biked_slice):
    args = common_parser("t").parse_args(["--cfg_name", "mcvae_biked_paper", "--csv_path", str(biked_slice)])
    cfg, _ = load_run_config(args, MCVAE_SPEC.config_cls)
    cfg.model.ema_decay = 0.5
    _, model = MCVAE_SPEC.build(cfg)
    live = model.decoder[1].weight
    before = model.ema.shadow["decoder"][1].weight.clone()
    with torch.no_grad():
        live.add_(1.0)
    assert model.ema.current_decay() == pytest.approx(0.1)  # warm-up: (1 + 0) / (10 + 0)
    model.ema.update(model.generative_modules().parameters())
    assert torch.allclose(model.ema.shadow["decoder"][1].weight, before + 0.9)
    for _ in range(100):
        model.ema.update(model.generative_modules().parameters())
    assert model.ema.current_decay() == 0.5 and int(model.ema.updates) == 101
    assert not model.ema.shadow["decoder"][1].weight.requires_grad
    assert any(k.startswith("ema.shadow.decoder") for k in model.state_dict())  # saved in checkpoints


# --------------------------------------------------------------------------- the generative default


def test_generative_default_architecture(generative):
    dm, model = generative
    assert isinstance(model.decoder, ConditionedMLP) and model.prior_net is not None
    assert [layer.in_features for layer in model.decoder.layers] == [10, 32, 64, 128, 64]
    assert model.decoder.condition.in_features == 40 and model.decoder.widths == [32, 64, 128, 64, 26]
    assert model.encoder[0].in_features == 26  # the encoder still sees the design only
    assert set(model.ema.shadow) == {"embedding", "decoder", "prior_net"}  # the prior is averaged too
    design, cat, num = (t[:16] for t in dm.tensors["train"])
    reconstruction, mu, logvar = model(design, model.mask(cat, num, 0.2, torch.Generator().manual_seed(0)))
    assert reconstruction.shape == (16, 26) and mu.shape == logvar.shape == (16, 10)


def test_conditioned_mlp_is_a_linear_over_h_and_c():
    torch.manual_seed(0)
    net = ConditionedMLP([3, 5, 2], condition_dim=4, activation=torch.nn.Tanh)
    h, c = torch.randn(6, 3), torch.randn(6, 4)
    v1, v2 = net.condition.weight.split([5, 2])
    b1, b2 = net.condition.bias.split([5, 2])
    first = torch.tanh(torch.cat([h, c], 1) @ torch.cat([net.layers[0].weight, v1], 1).T + b1)
    expected = torch.cat([first, c], 1) @ torch.cat([net.layers[1].weight, v2], 1).T + b2
    assert torch.allclose(net(h, c), expected, atol=1e-6)


def test_gaussian_nll_and_the_kl_to_a_learned_prior(generative):
    _, model = generative
    x = torch.rand(4, 26)
    x_hat = x + 0.1
    sigma = model.cfg.model.decoder_sigma
    nll = 26 * (0.5 * (0.1 / sigma) ** 2 + math.log(sigma))
    assert torch.allclose(gaussian_nll(x, x_hat, model.log_sigma), torch.full((4,), nll), rtol=1e-5)
    # q = N(0, 1), p = N(0.5, 4) per latent dim: ½ [log 4 − 0 + (1 + 0.25) / 4 − 1]
    mu, logvar = torch.zeros(4, 10), torch.zeros(4, 10)
    prior = (torch.full((4, 10), 0.5), torch.full((4, 10), math.log(4.0)))
    kl = 10 * 0.5 * (math.log(4.0) + 1.25 / 4 - 1)
    assert torch.allclose(kl_divergence(mu, logvar, prior), torch.full((4,), kl), rtol=1e-5)
    out = model.loss(x, x_hat, mu, logvar, prior)
    assert out["reconstruction"].item() == pytest.approx(nll, rel=1e-5) and out["kl"].item() == pytest.approx(kl)
    assert out["loss"].item() == pytest.approx(0.5 * nll + 0.5 * kl, rel=1e-5)  # kl_weight 0.5: ½·(−ELBO)


def test_generation_samples_the_conditional_prior_at_the_temperature(generative):
    dm, model = generative
    model.eval()
    with torch.no_grad():
        for p in model.ema.shadow["prior_net"].parameters():  # a prior that is not N(0, I)
            p.normal_(0, 0.3)
    _, cat, num = (t[:5] for t in dm.tensors["test"])
    conditions = model.masking.apply(cat, num, torch.zeros_like(cat, dtype=torch.bool), torch.zeros_like(num, dtype=torch.bool))
    eps = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    c = model.embed(conditions, averaged=True)
    mu, logvar = model.prior(c, averaged=True)
    for tau in (1.0, 0.5, 0.0):
        model.cfg.model.temperature = tau
        expected = model.decode(mu + tau * eps * torch.exp(0.5 * logvar), c, averaged=True)
        assert torch.allclose(model.generate(conditions, z=eps), expected, atol=1e-6)
    # τ = 0: the prior mean, one design per set of conditions whatever the noise
    assert torch.allclose(model.generate(conditions, z=eps), model.generate(conditions, z=-eps), atol=1e-6)
    # all conditions masked: the same prior (the marginal) for every design
    every = model.embed(model.masking.mask_all(3), averaged=True)
    prior_mu, _ = model.prior(every, averaged=True)
    assert torch.allclose(prior_mu, prior_mu[:1].expand(3, -1))


def test_generative_default_samples_differ_and_the_paper_config_does_not(tmp_path):
    """40 epochs on BIKED show it: the paper's setting learns to ignore z (its samples for one set of conditions
    nearly coincide), the default samples z from p(z | c) and its designs differ."""
    from tests.conftest import BIKED, write_config
    from modules.training import train_main

    spreads = {}
    for name, run in (("mcvae_biked_paper", "paper"), ("mcvae_biked", "default")):
        config = write_config(tmp_path, name, data={"csv_path": str(BIKED)},
                              trainer={"max_epochs": 40, "check_val_every_n_epoch": 40, "checkpoint_every_n_epochs": 40})
        assert train_main(["--config", str(config), "--logdir", str(tmp_path / "logs"), "--name", run, "--no_eval"],
                          MCVAE_SPEC) == 0
        ckpt = next((tmp_path / "logs").glob(f"{run}_*/checkpoints/last.ckpt"))
        _, model = MCVAE_SPEC.load(ckpt, with_data=False)
        designs = model.sample({"BikeStyle": "ROAD", "Fork type": 0}, n=20, seed=0)[model.scaler.columns]
        spreads[run] = float(model.scaler.transform(designs).std(dim=0).mean())
    assert spreads["default"] > 0.02 and spreads["default"] > 3 * spreads["paper"], spreads
