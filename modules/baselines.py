"""Model-free baselines that every evaluation table shows beside the model, on the same split and the same masks.

- `train_mean`: the mean training design, whatever the conditions (a point predictor).
- `conditional_forest`: a random forest that regresses the design on the (masked) conditions (a point predictor).
  A masked categorical is its own category and a masked numerical is missing, exactly what the model gets. It is
  fitted once on the training designs, each repeated at every evaluation sparsity with its own random masks, so
  one forest answers any subset of conditions, like the model. Its predictions are cached by what it is fitted
  on and asked (modules/fit_cache.py): the second run on a split fits nothing.
- `train_sample`: k random training designs, conditions ignored (the right spread, no conditioning).
- For adherence: the majority class (categorical) and the training mean (numerical).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from modules import fit_cache
from modules.conditioning import MaskedConditions
from modules.progress import bar

FOREST_TREES = 100
FOREST_TREES_PER_STEP = 25  # a divisor of FOREST_TREES
FOREST_MIN_LEAF = 3


def condition_features(categorical: np.ndarray, numerical: np.ndarray, numerical_mask: np.ndarray,
                       vocabulary_sizes: Sequence[int]) -> np.ndarray:
    """One-hot codes of every categorical column (its mask token as one more category) and the numerical values,
    NaN where masked or missing (the forest's trees route missing values on their own)."""
    columns = []
    for j, size in enumerate(vocabulary_sizes):
        one_hot = np.zeros((len(categorical), size + 1), dtype=np.float32)
        one_hot[np.arange(len(categorical)), categorical[:, j]] = 1.0
        columns.append(one_hot)
    values = np.where(numerical_mask | np.isnan(numerical), np.nan, numerical).astype(np.float32)
    return np.concatenate(columns + [values], axis=1) if columns or values.size else np.zeros((len(categorical), 0))


def _features(model, conditions: MaskedConditions) -> np.ndarray:
    return condition_features(conditions.categorical.cpu().numpy(), conditions.numerical.cpu().numpy(),
                              conditions.numerical_mask.cpu().numpy(), model.schema.mask_tokens())


class ConditionalForest:
    """A random forest from masked conditions to the design (normalised), fitted on augmented training rows."""

    def __init__(self, model, design: torch.Tensor, cat: torch.Tensor, num: torch.Tensor, levels: Sequence[float],
                 *, seed: int = 0):
        generator = torch.Generator(device=cat.device).manual_seed(int(seed) + 5_000)
        features, targets = [], []
        for level in levels:  # every training design once per evaluation sparsity, with fresh masks
            cat_mask, num_mask = model.masking.random_masks(cat, num, level, generator)
            features.append(_features(model, model.masking.apply(cat, num, cat_mask, num_mask)))
            targets.append(design.cpu().numpy())
        self._features, self._targets = np.concatenate(features), np.concatenate(targets)
        self._seed = int(seed)
        # what the forest is fitted on: its predictions are cached under it (modules/fit_cache.py)
        self.key = fit_cache.fingerprint(self._features, self._targets, trees=FOREST_TREES, min_leaf=FOREST_MIN_LEAF,
                                         max_features=0.5, seed=self._seed)
        self._forest = None
        self.model = model

    @property
    def forest(self):
        """The fitted `RandomForestRegressor`, fitted on first use (a cached prediction needs none)."""
        if self._forest is None:
            from sklearn.ensemble import RandomForestRegressor

            # grown FOREST_TREES_PER_STEP trees at a time for the progress bar; warm starts draw the trees' seeds
            # as one fit would, so the forest is the same
            forest = RandomForestRegressor(n_estimators=0, min_samples_leaf=FOREST_MIN_LEAF, max_features=0.5,
                                           n_jobs=-1, random_state=self._seed, warm_start=True)
            for trees in bar(range(FOREST_TREES_PER_STEP, FOREST_TREES + 1, FOREST_TREES_PER_STEP),
                             desc="conditional forest", unit="step"):
                forest.set_params(n_estimators=trees).fit(self._features, self._targets)
            self._forest = forest.set_params(n_jobs=1)  # predicting on one core sums the trees in a fixed order
        return self._forest

    def predict(self, conditions: MaskedConditions) -> torch.Tensor:
        query = _features(self.model, conditions)
        prediction = fit_cache.cached("conditional_forest_prediction", fit_cache.fingerprint(query, forest=self.key),
                                      lambda: np.asarray(self.forest.predict(query), dtype=np.float32))
        return torch.from_numpy(prediction).reshape(len(conditions), -1)


def majority_scores(kind: str, train_values: np.ndarray, test_values: np.ndarray) -> float:
    """The adherence a predictor reaches without looking at the design: the accuracy of the most frequent training
    category (categorical) or the R² of the training mean (numerical, ≤ 0 on other data) on the test values."""
    if len(test_values) == 0 or len(train_values) == 0:
        return float("nan")
    if kind == "categorical":
        values, counts = np.unique(train_values, return_counts=True)
        return float(np.mean(test_values == values[np.argmax(counts)]))
    if len(test_values) < 2:
        return float("nan")
    residual = np.sum((test_values - np.mean(train_values)) ** 2)
    total = np.sum((test_values - np.mean(test_values)) ** 2)
    return float(1.0 - residual / total) if total > 0 else float("nan")


def informative(kind: str, real: float, majority: float, n: int) -> bool:
    """Does the real-design score clear the majority baseline by more than its sampling noise?

    Categorical: real − majority > 2 standard errors of a proportion at the majority rate over the n scored test
    designs (and at least 0.01). Numerical: R²(real) − R²(mean) > 0.05. A condition that fails carries no signal
    in the design (or the predictor cannot find it), so its adherence shows nothing either way.
    """
    if not (np.isfinite(real) and np.isfinite(majority)) or n < 2:
        return False
    if kind == "categorical":
        margin = max(0.01, 2.0 * float(np.sqrt(majority * (1.0 - majority) / n)))
        return real - majority > margin
    return real - majority > 0.05
