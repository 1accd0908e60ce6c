"""The energy score and the sample-based errors: a hand-computed case, the collapsed-model and point-predictor
identities, weights, and the property that makes the score worth reporting (it is lowest for the true law)."""
import math

import pytest
import torch

from modules.scoring import energy_score, sample_errors, squared_errors


def test_energy_score_hand_computed():
    # y = (0, 0); samples (1, 0), (-1, 0), (0, 2)
    # E‖X - y‖ = (1 + 1 + 2) / 3; pairs: 2, √5, √5 → mean over the 6 ordered pairs (2 + 2√5) / 3
    samples = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]])
    target = torch.zeros(1, 2)
    expected = 4 / 3 - 0.5 * (2 + 2 * math.sqrt(5)) / 3
    assert energy_score(samples, target).item() == pytest.approx(expected, abs=1e-12)
    errors = sample_errors(samples, target)
    assert errors["sse_mean_of_k"].item() == pytest.approx((0 ** 2) + (2 / 3) ** 2)  # mean sample (0, 2/3)
    assert errors["sse_best_of_k"].item() == pytest.approx(1.0)
    assert squared_errors(samples, target).tolist() == [[1.0, 1.0, 4.0]]


def test_weights_scale_each_feature_like_its_squared_error():
    g = torch.Generator().manual_seed(0)
    samples, target = torch.randn(5, 4, 3, generator=g), torch.randn(5, 3, generator=g)
    w = torch.tensor([4.0, 1.0, 0.25])
    scaled = energy_score(samples * w.sqrt(), target * w.sqrt())
    assert torch.allclose(energy_score(samples, target, w), scaled, atol=1e-12)
    assert torch.allclose(squared_errors(samples, target, w), ((samples - target[:, None]) ** 2 * w).sum(-1).double())


def test_collapsed_model_scores_its_single_sample_error():
    # k copies of one design: no spread, ES = ‖x - y‖, and mean-of-k = best-of-k = the single-sample SSE
    g = torch.Generator().manual_seed(1)
    design, target = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g)
    samples = design[:, None].expand(7, 16, 6)
    errors = sample_errors(samples, target)
    distance = (design - target).norm(dim=1).double()
    sse = (design - target).pow(2).sum(dim=1).double()
    assert torch.allclose(errors["energy_score"], distance, atol=1e-12)
    assert torch.allclose(errors["sse_mean_of_k"], sse, atol=1e-10)
    assert torch.allclose(errors["sse_best_of_k"], sse, atol=1e-10)


def test_point_predictor_energy_score_is_its_distance():
    g = torch.Generator().manual_seed(2)
    prediction, target = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    assert torch.allclose(energy_score(prediction[:, None], target), (prediction - target).norm(dim=1).double())


def test_energy_score_is_lowest_for_the_true_distribution_and_sse_is_not():
    # targets y ~ N(0, I_5); a model of the right law beats the mean (a point predictor) and wrong spreads on
    # the energy score, while the single-sample squared error prefers the point predictor (≈ tr Σ vs 2·tr Σ)
    g = torch.Generator().manual_seed(3)
    n, k, d = 4000, 16, 5
    target = torch.randn(n, d, generator=g)
    scores = {}
    for name, scale in (("true", 1.0), ("too narrow", 0.5), ("too wide", 2.0)):
        scores[name] = energy_score(scale * torch.randn(n, k, d, generator=g), target).mean().item()
    scores["mean"] = energy_score(torch.zeros(n, 1, d), target).mean().item()
    assert scores["true"] < min(scores["too narrow"], scores["too wide"], scores["mean"])
    single_true = squared_errors(torch.randn(n, 1, d, generator=g), target).mean().item()
    single_mean = squared_errors(torch.zeros(n, 1, d), target).mean().item()
    assert single_true == pytest.approx(2 * d, rel=0.05) and single_mean == pytest.approx(d, rel=0.05)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(N, k, \*feature\)"):
        energy_score(torch.zeros(3, 2, 4), torch.zeros(2, 4))
