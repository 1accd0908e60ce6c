"""A conditional prior with a low-rank covariance: p(z | c) = N(μ_p(c), diag σ_p²(c) + V Vᵀ), V learned and shared.

A diagonal p(z | c) draws every latent position on its own. In the conv-mcVAE, whose latent is an 8×8 grid, that
put the front wheel of one bike beside the frame of another: measured, z drawn from the posteriors of training
images with the same conditions decoded better images than z drawn from the diagonal prior (benchmarks/RESULTS.md,
"conv-mcVAE ablation 5"). V Vᵀ lets the positions of one sample move together.

The KL to a diagonal posterior is closed-form through the Woodbury identity and the matrix determinant lemma with
the r × r matrix M = I + Vᵀ D⁻¹ V (D = diag σ_p²); sampling is z = μ_p + L ε with L L ᵀ = D + V Vᵀ (Cholesky), so
one standard normal ε of the latent's shape still names one sample (the paper's shared-z protocol).
"""
from __future__ import annotations

import torch
from torch import nn


class LowRankFactor(nn.Module):
    """V of the prior covariance, (latent elements, rank). Not zero at the start: the KL is even in V, so its
    gradient vanishes at V = 0."""

    def __init__(self, elements: int, rank: int, *, init_std: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(elements, rank) * init_std)


def low_rank_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor, prior_logvar: torch.Tensor,
                factor: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag s) ‖ N(μ_p, diag d + V Vᵀ)) per sample; inputs (B, n) but `factor` V (n, r).

    = ½ [tr(Σ⁻¹ S) + δᵀ Σ⁻¹ δ − n + log |Σ| − Σ log s], δ = μ_p − μ, Σ⁻¹ = D⁻¹ − D⁻¹ V M⁻¹ Vᵀ D⁻¹,
    log |Σ| = log |M| + Σ log d, M = I + Vᵀ D⁻¹ V."""
    d, s, delta = prior_logvar.exp(), logvar.exp(), prior_mu - mu
    scaled = factor[None] / d[..., None]  # D⁻¹ V: (B, n, r)
    rank = factor.shape[1]
    m = torch.eye(rank, dtype=mu.dtype, device=mu.device) + factor.t()[None] @ scaled
    chol = torch.linalg.cholesky(m)
    logdet = prior_logvar.sum(1) + 2 * torch.diagonal(chol, dim1=1, dim2=2).log().sum(1)
    # tr(M⁻¹ Vᵀ D⁻¹ S D⁻¹ V) = ‖L⁻¹ (S^½ D⁻¹ V)ᵀ‖²
    x = torch.linalg.solve_triangular(chol, (scaled * s.sqrt()[..., None]).transpose(1, 2), upper=False)
    trace = (s / d).sum(1) - x.pow(2).sum((1, 2))
    u = torch.linalg.solve_triangular(chol, (scaled * delta[..., None]).sum(1)[..., None], upper=False)
    mahalanobis = (delta.pow(2) / d).sum(1) - u.pow(2).sum((1, 2))
    return 0.5 * (trace + mahalanobis - mu.shape[1] + logdet - logvar.sum(1))


def low_rank_sample(eps: torch.Tensor, prior_mu: torch.Tensor, prior_logvar: torch.Tensor,
                    factor: torch.Tensor) -> torch.Tensor:
    """μ_p + L ε with L L ᵀ = diag σ_p² + V Vᵀ (lower Cholesky), in the shape of ε; prior_mu / prior_logvar in it too."""
    flat = eps.flatten(1)
    cov = torch.diag_embed(prior_logvar.flatten(1).exp()) + factor @ factor.t()
    z = prior_mu.flatten(1) + (torch.linalg.cholesky(cov) @ flat[..., None]).squeeze(-1)
    return z.reshape(eps.shape)
