"""The shared conditioning core: condition schema, masking and embedding (used by every model).

A batch of conditions is two tensors:
- `categorical` (B, n_categorical) long: vocabulary codes; a missing value is the column's mask token,
- `numerical` (B, n_numerical) float: min-max normalised to [0, 1]; a missing value is NaN.
`ConditionMasking` turns them into `MaskedConditions`, which `ConditionEmbedding` maps to one vector.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import re
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from modules.config import ConditionSpec
from modules.errors import UserError


# --------------------------------------------------------------------------- schema


_INTEGRAL_FLOAT = re.compile(r"^[+-]?\d+\.0*$")


def canonical_category(value) -> Optional[str]:
    """Category values are compared as strings; integral floats (1.0, or '1.0' as pandas writes an integer column
    that has gaps) become '1'; empty cells and NaN are None (missing)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    text = str(value).strip()
    if _INTEGRAL_FLOAT.match(text):
        return str(int(float(text)))
    return text if text != "" else None


def _listed_categories(values: Sequence, where: str, source: str) -> list[Optional[str]]:
    """Categories written in the config; YAML reads bare yes/no/true/false as booleans, which would not match."""
    for value in values:
        if isinstance(value, bool):
            raise UserError(f"{source}: {where} lists {value!r}, which YAML read as a boolean: quote the category "
                            f"names ('yes', 'no', 'true', 'false') so they stay text.")
    return [canonical_category(v) for v in values]


@dataclass
class FittedCondition:
    name: str
    kind: str  # "categorical" | "numerical"
    vocabulary: Optional[str] = None  # categorical: name of its vocabulary
    minimum: Optional[float] = None  # numerical: training statistics
    maximum: Optional[float] = None


class ConditionSchema:
    """Conditions with vocabularies and min-max statistics fitted on the training split (stored in checkpoints)."""

    def __init__(self, conditions: Sequence[FittedCondition], vocabularies: Mapping[str, Sequence[str]]):
        self.conditions = list(conditions)
        self.vocabularies = {k: list(v) for k, v in vocabularies.items()}
        self.categorical = [c for c in self.conditions if c.kind == "categorical"]
        self.numerical = [c for c in self.conditions if c.kind == "numerical"]
        self._index = {c.name: c for c in self.conditions}

    # -- construction
    @classmethod
    def fit(cls, specs: Sequence[ConditionSpec], frame: pd.DataFrame, *,
            fixed_vocabularies: Optional[Mapping[str, list]] = None, source: str = "config"):
        """Vocabularies from the config (fixed order) or the sorted training values; numerical min/max from `frame`."""
        fitted, vocabularies = [], {}
        members: dict[str, list[str]] = {}
        for spec in specs:
            if spec.kind == "numerical":
                values = frame[spec.name].to_numpy(dtype=np.float64)
                finite = values[np.isfinite(values)]
                if finite.size == 0:
                    raise UserError(f"{source}: numerical condition '{spec.name}' has no value in the training split. "
                                    "Fill the column or remove the condition.")
                fitted.append(FittedCondition(spec.name, "numerical", minimum=float(finite.min()), maximum=float(finite.max())))
            else:
                vocab_name = spec.vocabulary or spec.name
                members.setdefault(vocab_name, []).append(spec.name)
                if spec.categories is not None:
                    listed = _listed_categories(spec.categories, f"the categories of '{spec.name}'", source)
                    if vocab_name in vocabularies and vocabularies[vocab_name] != listed:
                        raise UserError(f"{source}: conditions sharing vocabulary '{vocab_name}' list different categories.")
                    vocabularies[vocab_name] = listed
                fitted.append(FittedCondition(spec.name, "categorical", vocabulary=vocab_name))
        fixed_vocabularies = fixed_vocabularies or {}
        unused = sorted(set(fixed_vocabularies) - set(members))
        if unused:
            raise UserError(f"{source}: data.vocabularies.{unused[0]} is not the vocabulary of any condition (conditions "
                            f"name one with `vocabulary: NAME`; in use: {', '.join(sorted(members))}).")
        for vocab_name, columns in members.items():
            if vocab_name in fixed_vocabularies:
                vocabularies[vocab_name] = _listed_categories(fixed_vocabularies[vocab_name],
                                                              f"data.vocabularies.{vocab_name}", source)
            if vocab_name not in vocabularies:
                seen = set()
                for column in columns:
                    seen.update(v for v in (canonical_category(x) for x in frame[column].tolist()) if v is not None)
                if not seen:
                    raise UserError(f"{source}: categorical condition '{columns[0]}' has no value in the training split. "
                                    "Fill the column or remove the condition.")
                vocabularies[vocab_name] = sorted(seen, key=_natural_key)
            vocab = vocabularies[vocab_name]
            if len(set(vocab)) != len(vocab) or None in vocab:
                raise UserError(f"{source}: vocabulary '{vocab_name}' has duplicate or empty categories: {vocab}.")
        return cls(fitted, vocabularies)

    def state_dict(self) -> dict:
        return {
            "conditions": [vars(c).copy() for c in self.conditions],
            "vocabularies": {k: list(v) for k, v in self.vocabularies.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping) -> "ConditionSchema":
        return cls([FittedCondition(**c) for c in state["conditions"]], state["vocabularies"])

    # -- queries
    @property
    def names(self) -> list[str]:
        return [c.name for c in self.conditions]

    def __len__(self) -> int:
        return len(self.conditions)

    def __getitem__(self, name: str) -> FittedCondition:
        return self._index[name]

    def vocabulary_of(self, name: str) -> list[str]:
        return self.vocabularies[self._index[name].vocabulary]

    def mask_tokens(self) -> list[int]:
        """The reserved code of each categorical column: the size of its vocabulary (row n of an n+1 table)."""
        return [len(self.vocabularies[c.vocabulary]) for c in self.categorical]

    # -- encoding
    def encode(self, frame: pd.DataFrame, *, source: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
        """(categorical codes, normalised numerical values); missing cells become mask tokens / NaN.

        Unknown categories raise a `UserError` naming the column, the value and the valid ones.
        """
        n = len(frame)
        cat = torch.empty((n, len(self.categorical)), dtype=torch.long)
        for j, cond in enumerate(self.categorical):
            vocab = self.vocabularies[cond.vocabulary]
            lookup = {v: i for i, v in enumerate(vocab)}
            mask_token = len(vocab)
            column = frame[cond.name] if cond.name in frame else pd.Series([None] * n)
            codes = []
            for value in column.tolist():
                key = canonical_category(value)
                if key is None:
                    codes.append(mask_token)
                elif key in lookup:
                    codes.append(lookup[key])
                else:
                    raise UserError(f"{source}: column '{cond.name}' has the category {key!r}, which the model never saw "
                                    f"in training. Valid categories: {', '.join(vocab)}.")
            cat[:, j] = torch.tensor(codes, dtype=torch.long)
        num = torch.empty((n, len(self.numerical)), dtype=torch.float32)
        for j, cond in enumerate(self.numerical):
            if cond.name in frame:
                column = frame[cond.name]
                raw = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
                given = column.map(lambda v: canonical_category(v) is not None).to_numpy(dtype=bool)
                bad = given & ~np.isfinite(raw)  # text that is no number, or ±inf (empty cells are missing)
                if bad.any():
                    r = int(np.flatnonzero(bad)[0])
                    raise UserError(f"{source}: numerical condition '{cond.name}' has the value {column.iloc[r]!r}, "
                                    "which is not a finite number. Give a number or leave it empty (= masked).")
            else:
                raw = np.full(n, np.nan)
            span = (cond.maximum - cond.minimum) or 1.0
            num[:, j] = torch.from_numpy((raw - cond.minimum) / span).float()
        return cat, num

    def out_of_range(self, frame: pd.DataFrame) -> list[str]:
        """One line per numerical condition whose requested values leave the training range [min, max]: the model
        never saw such a value, so what it generates there is extrapolation."""
        lines = []
        for cond in self.numerical:
            if cond.name not in frame:
                continue
            values = pd.to_numeric(frame[cond.name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            outside = np.unique(values[np.isfinite(values) & ((values < cond.minimum) | (values > cond.maximum))])
            if outside.size:
                shown = ", ".join(f"{v:g}" for v in outside[:3]) + (", …" if outside.size > 3 else "")
                lines.append(f"'{cond.name}' = {shown} lies outside the training range {cond.minimum:g} to "
                             f"{cond.maximum:g}")
        return lines

    def decode_numerical(self, num: torch.Tensor) -> np.ndarray:
        mins = np.array([c.minimum for c in self.numerical])
        spans = np.array([(c.maximum - c.minimum) or 1.0 for c in self.numerical])
        return num.detach().cpu().numpy() * spans + mins

    def parse_value(self, name: str, value, *, source: str = "condition"):
        """Check one user-given condition value; a wrong name or category raises a `UserError` listing the valid ones."""
        if name not in self._index:
            raise UserError(f"{source}: unknown condition '{name}'. Valid conditions: {', '.join(self.names)}.")
        cond = self._index[name]
        if cond.kind == "categorical":
            key = canonical_category(value)
            vocab = self.vocabularies[cond.vocabulary]
            if key is not None and key not in vocab:
                raise UserError(f"{source}: '{name}' has no category {key!r}; the model was trained with: {', '.join(vocab)}.")
            return key
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{source}: '{name}' is numerical; {value!r} is not a number "
                            f"(training range {cond.minimum:g} to {cond.maximum:g}).") from None
        if not math.isfinite(number):
            raise UserError(f"{source}: '{name}' must be a finite number, got {value!r}.")
        return number


class OutOfRangeCondition(UserWarning):
    """A numerical condition asked for outside its training range (`sample.py --strict` makes it an error)."""


def _natural_key(text: str):
    """Sort '2' before '10' and keep strings in alphabetical order."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


# --------------------------------------------------------------------------- masking


@dataclass
class MaskedConditions:
    categorical: torch.Tensor  # (B, n_cat) long, masked entries = mask token
    numerical: torch.Tensor  # (B, n_num) float, masked entries = sentinel
    numerical_mask: torch.Tensor  # (B, n_num) bool, True = masked or missing

    def rows(self, start: int, stop: int) -> "MaskedConditions":
        """The conditions of rows start…stop − 1."""
        return MaskedConditions(self.categorical[start:stop], self.numerical[start:stop],
                                self.numerical_mask[start:stop])

    def __len__(self) -> int:
        return self.categorical.shape[0]


class ConditionMasking(nn.Module):
    """Masks each condition of each sample independently with probability p (paper, Sec. 3.1).

    Categorical → the column's mask token; numerical → `sentinel` (default -1, outside the normalised [0, 1]).
    Values that are missing in the data stay masked. The inputs are never modified.
    """

    def __init__(self, mask_tokens: Sequence[int], n_numerical: int, *, sentinel: float = -1.0):
        super().__init__()
        self.register_buffer("mask_tokens", torch.tensor(list(mask_tokens), dtype=torch.long), persistent=False)
        self.n_numerical = n_numerical
        self.sentinel = float(sentinel)

    @classmethod
    def for_schema(cls, schema: ConditionSchema, *, sentinel: float = -1.0) -> "ConditionMasking":
        return cls(schema.mask_tokens(), len(schema.numerical), sentinel=sentinel)

    @staticmethod
    def random_masks(categorical: torch.Tensor, numerical: torch.Tensor, p: float,
                     generator: Optional[torch.Generator] = None,
                     uniform: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Independent Bernoulli(p) masks of the shapes of the two condition tensors (True = masked).

        `uniform` (B, n_cat + n_num) reuses given U[0, 1) draws: masks of several p from one draw are nested.
        """
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"masking probability must lie in [0, 1], got {p}")
        n_cat = categorical.shape[1]
        if uniform is None:
            uniform = torch.rand((categorical.shape[0], n_cat + numerical.shape[1]), generator=generator,
                                 device=categorical.device)
        mask = uniform < p  # U ∈ [0, 1): p = 0 masks nothing, p = 1 masks everything
        return mask[:, :n_cat], mask[:, n_cat:]

    def apply(self, categorical: torch.Tensor, numerical: torch.Tensor, categorical_mask: torch.Tensor,
              numerical_mask: torch.Tensor) -> MaskedConditions:
        """Mask explicitly chosen entries (and everything missing); returns new tensors."""
        tokens = self.mask_tokens.to(categorical.device).expand_as(categorical)
        cat = torch.where(categorical_mask, tokens, categorical)
        num_mask = numerical_mask | torch.isnan(numerical)
        num = torch.where(num_mask, torch.full_like(numerical, self.sentinel), numerical)
        return MaskedConditions(cat, num, num_mask)

    def forward(self, categorical: torch.Tensor, numerical: torch.Tensor, p: float,
                generator: Optional[torch.Generator] = None, *, drop_all: float = 0.0) -> MaskedConditions:
        """Bernoulli(p) masks per element; with `drop_all` > 0 each row additionally loses every condition with that
        probability (classifier-free guidance training, Ho & Salimans 2022, Alg. 1)."""
        cat_mask, num_mask = self.random_masks(categorical, numerical, p, generator)
        if drop_all > 0:
            if not 0.0 <= drop_all <= 1.0:
                raise ValueError(f"drop-all probability must lie in [0, 1], got {drop_all}")
            dropped = torch.rand((categorical.shape[0], 1), generator=generator, device=categorical.device) < drop_all
            cat_mask, num_mask = cat_mask | dropped, num_mask | dropped
        return self.apply(categorical, numerical, cat_mask, num_mask)

    def mask_all(self, batch_size: int, device=None) -> MaskedConditions:
        """Every condition masked: the unconditional input (classifier-free guidance)."""
        device = device or self.mask_tokens.device
        n_num = self.n_numerical
        cat = self.mask_tokens.to(device).expand(batch_size, -1).clone()
        num = torch.full((batch_size, n_num), self.sentinel, device=device)
        return MaskedConditions(cat, num, torch.ones((batch_size, n_num), dtype=torch.bool, device=device))


# --------------------------------------------------------------------------- embedding


class ConditionEmbedding(nn.Module):
    """One `dim`-vector per condition, concatenated: categorical columns index an (n+1)-row table
    (row n = mask token; columns of one vocabulary share a table), numerical ones a learned linear map of the value.

    With `numerical_mask="learned"` a masked numerical condition gets a learned "missing" vector instead of the
    projection of the sentinel.
    """

    def __init__(self, schema: ConditionSchema, *, dim: int, numerical_mask: str = "sentinel"):
        super().__init__()
        self.dim = dim
        self.numerical_mask = numerical_mask
        # All vocabularies live in one table; `offsets` maps a column's code to its vocabulary's rows.
        table_offset, rows = {}, 0
        for name, vocab in schema.vocabularies.items():
            table_offset[name] = rows
            rows += len(vocab) + 1
        self.register_buffer("offsets", torch.tensor([table_offset[c.vocabulary] for c in schema.categorical],
                                                     dtype=torch.long), persistent=False)
        self.table = nn.Embedding(max(rows, 1), dim)
        n_num = len(schema.numerical)
        # one Linear(1, dim) per numerical column, batched; nn.Linear's default init for fan-in 1
        self.num_weight = nn.Parameter(torch.empty(n_num, dim).uniform_(-1.0, 1.0))
        self.num_bias = nn.Parameter(torch.empty(n_num, dim).uniform_(-1.0, 1.0))
        if numerical_mask == "learned":
            self.num_missing = nn.Parameter(torch.randn(n_num, dim) * 0.02)
        elif numerical_mask != "sentinel":
            raise ValueError(f"numerical_mask must be 'sentinel' or 'learned', got {numerical_mask!r}")
        self.n_conditions = len(schema.categorical) + n_num

    @property
    def out_dim(self) -> int:
        return self.n_conditions * self.dim

    def forward(self, conditions: MaskedConditions) -> torch.Tensor:
        cat = self.table(conditions.categorical + self.offsets)  # (B, n_cat, dim)
        num = conditions.numerical.unsqueeze(-1) * self.num_weight + self.num_bias  # (B, n_num, dim)
        if self.numerical_mask == "learned":
            num = torch.where(conditions.numerical_mask.unsqueeze(-1), self.num_missing, num)
        return torch.cat([cat, num], dim=1).flatten(1)
