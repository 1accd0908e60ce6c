"""The low-rank conditional prior: its KL against torch.distributions, its sampler's covariance, and the
conv-mcVAE wired to it (training moves V, generation and the critic draw from it, the EMA averages it)."""
import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, kl_divergence as torch_kl

from modules.errors import UserError
from modules.latent_prior import low_rank_kl, low_rank_sample
from modules.mcvae import kl_divergence
from tests.test_conv_mcvae import FRAME, GENERATIVE, build, train_steps


def test_the_kl_is_torch_distributions_kl_between_the_diagonal_posterior_and_the_low_rank_prior():
    torch.manual_seed(0)
    b, n, r = 4, 12, 3
    mu, logvar, prior_mu, prior_logvar = (torch.randn(b, n, dtype=torch.float64) for _ in range(4))
    factor = torch.randn(n, r, dtype=torch.float64)
    q = LowRankMultivariateNormal(mu, torch.zeros(b, n, 1, dtype=torch.float64), logvar.exp())
    p = LowRankMultivariateNormal(prior_mu, factor.expand(b, n, r), prior_logvar.exp())
    expected = torch_kl(q, p)
    assert torch.allclose(low_rank_kl(mu, logvar, prior_mu, prior_logvar, factor), expected, rtol=1e-10)
    assert torch.allclose(kl_divergence(mu, logvar, (prior_mu, prior_logvar, factor)), expected, rtol=1e-10)
    # V = 0 is the diagonal prior's KL
    zero = torch.zeros(n, r, dtype=torch.float64)
    assert torch.allclose(low_rank_kl(mu, logvar, prior_mu, prior_logvar, zero),
                          kl_divergence(mu, logvar, (prior_mu, prior_logvar)), rtol=1e-10)
    # KL(p ‖ p) = 0 where the posterior is the prior's diagonal and V = 0
    assert torch.allclose(low_rank_kl(mu, logvar, mu, logvar, zero), torch.zeros(b, dtype=torch.float64), atol=1e-12)


def test_the_sampler_is_mean_plus_a_square_root_of_the_covariance():
    torch.manual_seed(1)
    n, r = 10, 2
    prior_mu, prior_logvar = torch.randn(1, n, dtype=torch.float64), torch.randn(1, n, dtype=torch.float64)
    factor = torch.randn(n, r, dtype=torch.float64)
    # ε = the unit vectors: the columns of L, so L Lᵀ must be diag σ² + V Vᵀ exactly
    columns = low_rank_sample(torch.eye(n, dtype=torch.float64), prior_mu.expand(n, n), prior_logvar.expand(n, n),
                              factor) - prior_mu
    assert torch.allclose(columns.t() @ columns, torch.diag(prior_logvar[0].exp()) + factor @ factor.t(), atol=1e-10)
    assert torch.equal(low_rank_sample(torch.zeros(1, n, dtype=torch.float64), prior_mu, prior_logvar, factor),
                       prior_mu)
    # the shape of ε is kept (a latent grid)
    grid = low_rank_sample(torch.randn(3, 2, 5, 1), torch.zeros(3, 2, 5, 1), torch.zeros(3, 2, 5, 1),
                           torch.randn(n, r))
    assert grid.shape == (3, 2, 5, 1)


def test_the_conv_mcvae_trains_and_generates_with_a_low_rank_prior():
    torch.manual_seed(0)
    model, schema = build(16, levels=2, attention_levels=[], dropout=0.0, ema_decay=0.9, prior_rank=3, **GENERATIVE)
    n = model.latent_shape[0] * model.latent_shape[1] * model.latent_shape[2]
    assert model.prior_factor.weight.shape == (n, 3)
    assert "prior_factor" in model.generative_modules()  # averaged by the EMA, saved with the model
    before = model.prior_factor.weight.detach().clone()
    losses = train_steps(model, schema, "loss")
    assert losses[-1] < losses[0] - 0.3 * abs(losses[0])
    assert not torch.allclose(model.prior_factor.weight, before)  # the KL's gradient reaches V
    model.eval()
    torch.nn.init.normal_(model.prior_net[-1].weight, std=0.5)
    cat, num = schema.encode(FRAME)
    conditions = model.mask(cat, num, 0.0)
    eps = torch.randn(4, *model.latent_shape)
    c = model.embed(conditions, averaged=True)
    mu, logvar, factor = model.prior(c, averaged=True)
    assert factor is model.ema.shadow["prior_factor"].weight
    cov = torch.diag_embed(logvar.flatten(1).exp()) + factor @ factor.t()
    z = mu.flatten(1) + (torch.linalg.cholesky(cov) @ eps.flatten(1)[..., None]).squeeze(-1)
    expected = model.decode(z.reshape(eps.shape), c, averaged=True)
    assert torch.allclose(model.generate(conditions, z=eps), expected, atol=1e-5)
    # not the diagonal prior's sample
    diagonal = model.decode(mu + eps * torch.exp(0.5 * logvar), c, averaged=True)
    assert not torch.allclose(model.generate(conditions, z=eps), diagonal, atol=1e-3)


def test_the_rank_is_checked():
    with pytest.raises(UserError, match="model.prior_rank must be ≥ 0"):
        build(16, levels=2, attention_levels=[], **{**GENERATIVE, "prior_rank": -1})
    with pytest.raises(UserError, match="model.prior_rank must be 0 unless model.prior is conditional"):
        build(16, levels=2, attention_levels=[], prior_rank=2)
