"""Validity and novelty of parametric designs: the BIKED geometric checks pass on every real design and catch
each kind of broken bike; the range check and the nearest-training distance on hand-made data."""
import pandas as pd
import pytest
import torch

from modules.design_checks import (GEOMETRY_CHECKS, geometry_checks, in_training_range, nearest_training_distance)


def test_every_real_biked_design_passes_every_check(biked_frame):
    table = geometry_checks(biked_frame, "bike")
    assert list(table.columns) == [*GEOMETRY_CHECKS["bike"], "all_checks"]
    failing = table[~table["all_checks"]]
    assert failing.empty, f"real designs fail: {failing.head().to_dict()}"


@pytest.mark.parametrize("check, change", [
    ("wheels_apart", lambda row: row.update({"x_front_wheel_center": row["x_rear_wheel_center"] + 100,
                                             "y_front_wheel_center": row["y_rear_wheel_center"]})),
    ("saddle_above_bb", lambda row: row.update({"y_saddle_top": row["y_BB"] - 10})),
    ("tubes_positive", lambda row: row.update({"x_top_tube_connect_head_tube": row["x_top_tube_connect_seat_tube"],
                                               "y_top_tube_connect_head_tube": row["y_top_tube_connect_seat_tube"]})),
    ("tubes_positive", lambda row: row.update({"Wheel diameter front": -5.0})),
])
def test_each_check_catches_its_broken_bike(biked_frame, check, change):
    row = biked_frame.iloc[0].to_dict()
    change(row)
    table = geometry_checks(pd.DataFrame([biked_frame.iloc[0].to_dict(), row]), "bike")
    assert table[check].tolist() == [True, False]
    assert table["all_checks"].tolist() == [True, False]


def test_no_checks_without_a_kind(biked_frame):
    assert geometry_checks(biked_frame.head(3), None).shape == (3, 0)


def test_range_and_nearest_training_distance():
    normalised = torch.tensor([[0.0, 1.0], [0.5, 1.0 + 1e-3], [-0.2, 0.5]])
    assert in_training_range(normalised).tolist() == [True, False, False]
    train = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    designs = torch.tensor([[0.0, 0.0], [0.9, 1.0], [0.0, 3.0]])
    assert torch.allclose(nearest_training_distance(designs, train), torch.tensor([0.0, 0.1, 2.2360680]), atol=1e-6)
    # weights are per-feature factors on the squared differences
    weighted = nearest_training_distance(designs, train, torch.tensor([4.0, 1.0]))
    assert torch.allclose(weighted, torch.tensor([0.0, 0.2, 8 ** 0.5]), atol=1e-6)  # (0, 3) → (1, 1): √(4 + 4)
    # chunks give the same answer as one pass
    assert torch.equal(nearest_training_distance(designs, train, chunk=1), nearest_training_distance(designs, train))
