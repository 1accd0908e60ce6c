"""SHAP values of the conditions on the designs an mcVAE generates (experiments/shap_study.ipynb).

The explained function maps a *condition feature matrix* to generated designs in their original units:
one column per condition, categorical conditions as vocabulary codes (the column's mask token = masked),
numerical conditions min-max normalised to [0, 1] (`MASKED` = masked). The latent is fixed: z = 0 (the prior's
mean) or the mean of the designs decoded from `z_draws` seeded draws z ~ N(0, I), so the only inputs are the
conditions and SHAP attributes every generated coordinate to them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch

MASKED = -1.0  # a masked numerical condition in the feature matrix (outside the normalised range [0, 1])


def condition_features(model, cat: torch.Tensor, num: torch.Tensor) -> pd.DataFrame:
    """The feature matrix (conditions in the schema's order) of encoded conditions, as the data module stores them
    (categorical codes with mask tokens, normalised numbers with NaN for missing)."""
    schema = model.schema
    columns, c, k = {}, 0, 0
    for cond in schema.conditions:
        if cond.kind == "categorical":
            columns[cond.name] = cat[:, c].cpu().numpy().astype(float)
            c += 1
        else:
            values = num[:, k].cpu().numpy().astype(float)
            columns[cond.name] = np.where(np.isnan(values), MASKED, values)
            k += 1
    return pd.DataFrame(columns)


def masked_row(model) -> pd.DataFrame:
    """One feature row with every condition masked (the unconditional request)."""
    schema, tokens = model.schema, iter(model.schema.mask_tokens())
    return pd.DataFrame([{c.name: float(next(tokens)) if c.kind == "categorical" else MASKED
                          for c in schema.conditions}])


class GeneratedDesign:
    """f(features) → generated design columns (original units), for SHAP; `columns` picks the outputs."""

    def __init__(self, model, columns: Optional[list[str]] = None, *, z_draws: int = 0, seed: int = 0,
                 batch_size: int = 65536):
        self.model = model.eval()
        self.schema = model.schema
        self.all_columns = list(model.scaler.columns)
        self.columns = list(columns) if columns else self.all_columns
        unknown = [c for c in self.columns if c not in self.all_columns]
        if unknown:
            raise ValueError(f"unknown design column {unknown[0]!r}; the model generates {', '.join(self.all_columns)}")
        self.index = [self.all_columns.index(c) for c in self.columns]
        latent = model.cfg.model.latent_dim
        if z_draws > 0:
            self.z = torch.randn((z_draws, latent), generator=torch.Generator().manual_seed(seed))
        else:
            self.z = torch.zeros((1, latent))
        self.batch_size = batch_size
        self.cat_idx = [i for i, c in enumerate(self.schema.conditions) if c.kind == "categorical"]
        self.num_idx = [i for i, c in enumerate(self.schema.conditions) if c.kind == "numerical"]
        self.tokens = torch.tensor(self.schema.mask_tokens())

    @torch.no_grad()
    def __call__(self, features) -> np.ndarray:
        x = torch.tensor(np.asarray(features, dtype=np.float64), dtype=torch.float32)
        out = []
        for start in range(0, len(x), self.batch_size):
            out.append(self._designs(x[start:start + self.batch_size]))
        return np.concatenate(out, axis=0) if out else np.empty((0, len(self.columns)))

    def _designs(self, x: torch.Tensor) -> np.ndarray:
        model = self.model
        cat = x[:, self.cat_idx].round().long()
        cat = torch.where((cat < 0) | (cat > self.tokens), self.tokens.expand_as(cat), cat)
        num = x[:, self.num_idx]
        masked = model.masking.apply(cat, num, torch.zeros_like(cat, dtype=torch.bool), num < 0)
        k, n = len(self.z), len(x)
        repeated = type(masked)(masked.categorical.repeat(k, 1), masked.numerical.repeat(k, 1),
                                masked.numerical_mask.repeat(k, 1))
        z = self.z.repeat_interleave(n, dim=0)
        generated = model.generate(repeated, z=z)  # normalised designs (EMA weights; through p(z | c) if learned)
        scaler = model.scaler
        designs = (generated.cpu().double().numpy() * scaler.span + scaler.minimum)[:, self.index]  # = scaler.inverse
        return designs.reshape(k, n, -1).mean(axis=0)


def explain(model, background: pd.DataFrame, explain_rows: pd.DataFrame, columns: Optional[list[str]] = None, *,
            z_draws: int = 0, seed: int = 0, algorithm: str = "exact"):
    """A `shap.Explanation` of shape (rows, conditions, columns): the SHAP values of each condition on each
    generated coordinate, with an Independent masker over `background` (absent conditions take its values)."""
    import shap

    f = GeneratedDesign(model, columns, z_draws=z_draws, seed=seed)
    masker = shap.maskers.Independent(background.to_numpy(dtype=float), max_samples=len(background))
    explainer = shap.Explainer(f, masker, algorithm=algorithm, feature_names=list(background.columns),
                               output_names=f.columns, seed=seed)
    explanation = explainer(explain_rows.to_numpy(dtype=float))
    explanation.output_names = f.columns
    return explanation


def mean_abs_table(explanation, columns: list[str]) -> pd.DataFrame:
    """Mean |SHAP| (units of the design columns) per condition (rows) and generated coordinate (columns)."""
    values = np.abs(np.asarray(explanation.values)).mean(axis=0)  # (conditions, columns)
    return pd.DataFrame(values, index=list(explanation.feature_names), columns=list(columns))


def additivity_error(explanation, f: GeneratedDesign, rows: pd.DataFrame) -> float:
    """max |base value + Σ SHAP − f(x)|: SHAP values add up to the explained output (≈ 0 for exact SHAP)."""
    total = np.asarray(explanation.base_values) + np.asarray(explanation.values).sum(axis=1)
    return float(np.abs(total - f(rows.to_numpy(dtype=float))).max())
