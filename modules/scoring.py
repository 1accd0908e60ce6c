"""Sample-based errors and a proper scoring rule for generative models: k samples per target.

A model that returns the conditional mean wins the single-sample squared error: for a draw X of the true
conditional distribution and the target Y (independent given the conditions), E‖X − Y‖² = 2·tr Σ, twice the
error of the conditional mean (tr Σ). The energy score (Gneiting & Raftery 2007, Eq. 22)

    ES(P, y) = E‖X − y‖ − ½·E‖X − X′‖,    X, X′ ~ P independent,

is *strictly proper*: its expectation is lowest for the true conditional distribution, so it punishes a blurred
mean (no spread) and a wrong spread alike. For a point prediction f (k = 1, or k equal samples) it is ‖f − y‖.

Every function takes samples of shape (N, k, *feature) and targets (N, *feature); features are flattened, and
`weights` (per feature) put the squared differences on another scale (the min–max scale of the data file).
"""
from __future__ import annotations

from typing import Optional

import torch


def _flat(samples: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor]):
    if samples.dim() < 2 or samples.shape[0] != target.shape[0] or samples.shape[2:] != target.shape[1:]:
        raise ValueError(f"samples must be (N, k, *feature) and targets (N, *feature); got {tuple(samples.shape)} "
                         f"and {tuple(target.shape)}")
    x = samples.reshape(samples.shape[0], samples.shape[1], -1).double()
    y = target.reshape(target.shape[0], -1).double()
    if weights is not None:  # ‖·‖ under Σ w·d², as the squared errors are measured
        root = weights.reshape(-1).double().to(x.device).sqrt()
        x, y = x * root, y * root
    return x, y


def energy_score(samples: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-target energy score (N,) from k samples each: mean ‖x_i − y‖ − ½·mean_{i≠j} ‖x_i − x_j‖.

    The spread term averages over the k(k − 1) ordered pairs of distinct samples (the "fair" estimator, unbiased
    for the model's own ES); with k = 1 it is 0, the score of a point prediction.
    """
    return _energy(*_flat(samples, target, weights))


def _energy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`energy_score` of flattened, weighted samples x (N, k, D) and targets y (N, D)."""
    k = x.shape[1]
    accuracy = (x - y[:, None]).norm(dim=2).mean(dim=1)
    if k < 2:
        return accuracy
    spread = torch.cdist(x, x).sum(dim=(1, 2)) / (k * (k - 1))
    return accuracy - 0.5 * spread


def squared_errors(samples: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_features w·(x_i − y)² of every sample (N, k)."""
    x, y = _flat(samples, target, weights)
    return (x - y[:, None]).pow(2).sum(dim=2)


def sample_errors(samples: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None, *,
                  per_feature: bool = False) -> dict[str, torch.Tensor]:
    """Per-target (N,) figures from k samples each:

    - `energy_score`: as `energy_score`;
    - `sse_mean_of_k`: the squared error of the mean of the k samples (a point estimate made from the model);
    - `sse_best_of_k`: the squared error of the closest of the k samples (does the model cover the target?).

    `per_feature` divides the squared errors by the number of features (pixel MSE for images).
    """
    x, y = _flat(samples, target, weights)
    scale = 1.0 / x.shape[2] if per_feature else 1.0
    sse = (x - y[:, None]).pow(2).sum(dim=2)
    return {
        "energy_score": _energy(x, y),
        "sse_mean_of_k": (x.mean(dim=1) - y).pow(2).sum(dim=1) * scale,
        "sse_best_of_k": sse.min(dim=1).values * scale,
    }
