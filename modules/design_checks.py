"""Are generated parametric designs valid, and are they new? Checks that need no model.

- `in_training_range`: every number lies within [min, max] of the real training designs.
- `nearest_training_distance`: the distance to the closest real training design (on the min–max scale of the
  errors). Real test designs give the reference: generated designs much closer than that are copies
  (memorisation); much farther, off the data's manifold.
- Geometric checks per kind of design (`data.design_checks`): for BIKED, that wheels do not overlap, the saddle
  sits above the bottom bracket and every frame tube has a positive length. Every real BIKED design passes them
  (`tests/test_design_checks.py`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch

# BIKED tubes whose length is positive in every real design: (name, from point, to point). The seat tube and the
# stem are left out: BIKED has designs where those have zero length (seat tube top on the bottom bracket).
BIKE_TUBES = (
    ("chain stay", "rear_wheel_center", "BB"),
    ("seat stay", "rear_wheel_center", "rear_tube_connect_seat_tube"),
    ("top tube", "top_tube_connect_seat_tube", "top_tube_connect_head_tube"),
    ("down tube", "BB", "down_tube_connect_head_tube"),
    ("fork", "front_fork", "front_wheel_center"),
)


def _point(frame: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
    return frame[f"x_{name}"].to_numpy(dtype=float), frame[f"y_{name}"].to_numpy(dtype=float)


def _wheels_apart(frame: pd.DataFrame) -> np.ndarray:
    (xr, yr), (xf, yf) = _point(frame, "rear_wheel_center"), _point(frame, "front_wheel_center")
    radii = (frame["Wheel diameter rear"].to_numpy(dtype=float) + frame["Wheel diameter front"].to_numpy(dtype=float)) / 2
    return np.hypot(xf - xr, yf - yr) > radii


def _saddle_above_bottom_bracket(frame: pd.DataFrame) -> np.ndarray:
    return _point(frame, "saddle_top")[1] > _point(frame, "BB")[1]


def _tubes_positive(frame: pd.DataFrame) -> np.ndarray:
    ok = (frame["Wheel diameter rear"].to_numpy(dtype=float) > 0) & (frame["Wheel diameter front"].to_numpy(dtype=float) > 0)
    for _, a, b in BIKE_TUBES:
        (xa, ya), (xb, yb) = _point(frame, a), _point(frame, b)
        ok &= np.hypot(xb - xa, yb - ya) > 0
    return ok


# name → (what it checks, check(frame in the data's units) → bool per design)
GEOMETRY_CHECKS: dict[str, dict[str, tuple[str, Callable[[pd.DataFrame], np.ndarray]]]] = {
    "bike": {
        "wheels_apart": ("the wheel centres are farther apart than the sum of the wheel radii", _wheels_apart),
        "saddle_above_bb": ("the saddle top lies above the bottom bracket", _saddle_above_bottom_bracket),
        "tubes_positive": ("chain stay, seat stay, top tube, down tube and fork have positive length; both wheel "
                           "diameters are positive", _tubes_positive),
    },
}


def geometry_checks(frame: pd.DataFrame, kind: str | None) -> pd.DataFrame:
    """One boolean column per check of `kind` (and `all_checks`); empty columns for kind None."""
    if kind is None:
        return pd.DataFrame(index=frame.index)
    checks = GEOMETRY_CHECKS[kind]
    table = pd.DataFrame({name: fn(frame) for name, (_, fn) in checks.items()}, index=frame.index)
    table["all_checks"] = table.all(axis=1)
    return table


def in_training_range(normalised: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """True where every number of a design (normalised with the training min–max) lies in [0, 1]."""
    return ((normalised >= -tolerance) & (normalised <= 1 + tolerance)).all(dim=1)


def nearest_training_distance(designs: torch.Tensor, train: torch.Tensor, weights: torch.Tensor | None = None,
                              chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance of each design to its closest training design (under Σ w·d²)."""
    root = weights.sqrt().to(designs.device) if weights is not None else None
    a = designs * root if root is not None else designs
    b = (train * root if root is not None else train).to(designs.device)
    return torch.cat([torch.cdist(a[i:i + chunk], b).min(dim=1).values for i in range(0, len(a), chunk)])


def validity_row(name: str, normalised: torch.Tensor, scaler, train: torch.Tensor, weights: torch.Tensor,
                 kind: str | None) -> dict:
    """Shares of designs in the training range and passing each check, and their distance to the training set."""
    distance = nearest_training_distance(normalised, train, weights)
    row = {"designs": name, "n": int(len(normalised)),
           "in_training_range": float(in_training_range(normalised).float().mean())}
    checks = geometry_checks(scaler.inverse(normalised), kind)
    row.update({column: float(checks[column].mean()) for column in checks.columns})
    row.update({"nearest_train_mean": float(distance.mean()), "nearest_train_median": float(distance.median())})
    return row
