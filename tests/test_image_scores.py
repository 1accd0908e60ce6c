"""The sample-based errors of image models: the parametric models' implementation (modules.evaluation) on pixels."""
import pytest
import torch

from modules import evaluation
from modules.config import EvaluationConfig
from modules.image_data import to_model_range
from tests.test_conv_mcvae import FRAME, build


def _energy(samples, target):
    """Gneiting & Raftery's energy score written out: mean ‖x_i − y‖ − ½ mean_{i≠j} ‖x_i − x_j‖."""
    k = len(samples)
    accuracy = sum(float((x - target).norm()) for x in samples) / k
    spread = sum(float((samples[i] - samples[j]).norm()) for i in range(k) for j in range(k) if i != j)
    return accuracy - 0.5 * spread / (k * (k - 1))


@pytest.mark.parametrize("chunk_elements", [1 << 24, 256 * 3])  # all targets at once / one target per chunk
def test_sample_based_errors_of_images_written_out(monkeypatch, chunk_elements):
    monkeypatch.setattr(evaluation, "SAMPLE_CHUNK_ELEMENTS", chunk_elements)
    model, schema = build(16, levels=2, attention_levels=[])
    cat, num = schema.encode(FRAME)
    target = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    train = torch.randint(0, 256, (6, 1, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    calls = []

    def generate(conditions, z=None, generator=None):  # sample i of every target is the constant 0.1·i
        calls.append(len(conditions))
        k = 3
        return (0.1 * (torch.arange(len(conditions)) % k)).float()[:, None, None, None].expand(-1, 1, 16, 16)

    monkeypatch.setattr(model, "generate", generate)
    cfg = EvaluationConfig(sparsity_levels=[0.0, 0.5], samples_per_design=3, sample_seed=5)
    to_range = lambda x: to_model_range(x, "minus_one_one")  # noqa: E731
    seen = []
    table = evaluation.sample_based_per_sparsity(model, target, cat, num, cfg, train=train, name="mse",
                                                 per_feature=True, to_space=to_range,
                                                 on_samples=lambda level, s: seen.append((level, tuple(s.shape))))
    assert seen == [(0.0, (4, 3, 1, 16, 16)), (0.5, (4, 3, 1, 16, 16))]
    assert sum(calls) == 2 * 4 * 3 and (len(calls) == 2 if chunk_elements > 4 * 3 * 256 else len(calls) == 8)
    samples = [torch.full((1, 16, 16), 0.1 * i) for i in range(3)]
    expected_es = sum(_energy(samples, y) for y in target) / 4
    mean_of_k = sum(float((0.1 - y).pow(2).mean()) for y in target) / 4  # the mean of 0, 0.1, 0.2
    best_of_k = sum(min(float((s - y).pow(2).mean()) for s in samples) for y in target) / 4
    train_mean = to_range(train).double().mean(0).float()
    picks = torch.randint(6, (4, 3), generator=torch.Generator().manual_seed(6))  # level 0.0's draw
    train_sample_es = sum(_energy([to_range(train[j])[0] for j in picks[i]], target[i]) for i in range(4)) / 4
    row = table.iloc[0]
    assert row["energy_score"] == pytest.approx(expected_es, rel=1e-5)
    assert row["mse_mean_of_k"] == pytest.approx(mean_of_k, rel=1e-5)
    assert row["mse_best_of_k"] == pytest.approx(best_of_k, rel=1e-5)
    assert row["train_mean_mse"] == pytest.approx(float((train_mean - target).pow(2).mean()), rel=1e-5)
    assert row["train_mean_energy_score"] == pytest.approx(
        sum(float((train_mean - y).norm()) for y in target) / 4, rel=1e-5)
    assert row["train_sample_energy_score"] == pytest.approx(train_sample_es, rel=1e-5)
    assert list(table["sparsity"]) == [0.0, 0.5, "mean"]


def test_a_collapsed_model_loses_the_energy_score_to_one_that_spreads_like_the_data(monkeypatch):
    """Targets drawn from ±1 per image: a model returning the mean (0) has the least expected error of a point, but
    loses the energy score and best-of-k to one sampling ±1 — the reason the sample-based errors stand beside the single-z table."""
    model, schema = build(16, levels=2, attention_levels=[])
    cat, num = schema.encode(FRAME)
    target = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None, None, None].expand(4, 1, 16, 16)
    train = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    cfg = EvaluationConfig(sparsity_levels=[0.0], samples_per_design=8)
    scores = {}
    for name, generate in {
        "collapsed": lambda conditions, z=None, generator=None: torch.zeros(len(conditions), 1, 16, 16),
        "spread": lambda conditions, z=None, generator=None: (
            torch.randint(0, 2, (len(conditions), 1, 1, 1), generator=generator).float() * 2 - 1).expand(-1, 1, 16, 16),
    }.items():
        monkeypatch.setattr(model, "generate", generate)
        scores[name] = evaluation.sample_based_per_sparsity(
            model, target, cat, num, cfg, train=train, name="mse", per_feature=True,
            to_space=lambda x: to_model_range(x, "minus_one_one")).iloc[0]
    assert scores["collapsed"]["mse_mean_of_k"] == pytest.approx(1.0)  # the conditional mean's error: the least
    assert scores["spread"]["energy_score"] < scores["collapsed"]["energy_score"] - 2
    assert scores["spread"]["mse_best_of_k"] < 0.01 < scores["collapsed"]["mse_best_of_k"]
