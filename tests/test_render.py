"""The bike renderer: deterministic, any size, and every condition visible where it should be."""
import math

import numpy as np
import pandas as pd
import pytest

from modules.render import CHAIN_PITCH_MM, WINDOW_X, WINDOW_Y, render_bike, render_dataset

BASE = {"RIM_STYLE front": "spoked", "RIM_STYLE rear": "spoked", "bottle SEATTUBE0 show OHCLASS: True": 0,
        "bottle DOWNTUBE0 show OHCLASS: True": 0, "Teeth on chainring": 50, "Fork type": 0}
SIZE = 256


@pytest.fixture(scope="module")
def bike(biked_frame):
    return biked_frame.iloc[0]


def to_px(point):
    """BIKED millimetres → (row, column) of a SIZE-pixel render."""
    scale = SIZE / (WINDOW_X[1] - WINDOW_X[0])
    return int((WINDOW_Y[1] - point[1]) * scale), int((point[0] - WINDOW_X[0]) * scale)


def region(image, center_mm, radius_mm):
    """The pixels within radius_mm of a point."""
    scale = SIZE / (WINDOW_X[1] - WINDOW_X[0])
    r0, c0 = to_px(center_mm)
    rows, cols = np.ogrid[:SIZE, :SIZE]
    return image[(rows - r0) ** 2 + (cols - c0) ** 2 <= (radius_mm * scale) ** 2]


def ink(pixels):
    return float((255 - pixels.astype(float)).sum())


def test_deterministic_and_any_size(bike):
    a = render_bike(bike, BASE, size=SIZE)
    assert np.array_equal(a, render_bike(bike, BASE, size=SIZE))
    for size in (64, 128, 256, 512):
        image = render_bike(bike, BASE, size=size)
        assert image.shape == (size, size) and image.dtype == np.uint8
        assert image.min() < 60 and image.max() == 255  # dark strokes on white


def test_disc_rim_fills_the_wheel(bike):
    rear = (bike["x_rear_wheel_center"], bike["y_rear_wheel_center"])
    rim = bike["Wheel diameter rear"] / 2 * 0.7
    spoked = render_bike(bike, BASE, size=SIZE)
    disc = render_bike(bike, {**BASE, "RIM_STYLE rear": "disc"}, size=SIZE)
    trispoke = render_bike(bike, {**BASE, "RIM_STYLE rear": "trispoke"}, size=SIZE)
    assert ink(region(disc, rear, rim)) > 2 * ink(region(spoked, rear, rim))
    assert not np.array_equal(region(trispoke, rear, rim), region(spoked, rear, rim))
    front = (bike["x_front_wheel_center"], bike["y_front_wheel_center"])
    assert np.array_equal(region(disc, front, rim), region(spoked, front, rim))  # only the rear wheel changed


@pytest.mark.parametrize("column,tube_end", [("bottle SEATTUBE0 show OHCLASS: True", "seat_tube_top"),
                                             ("bottle DOWNTUBE0 show OHCLASS: True", "down_tube_connect_head_tube")])
def test_bottle_adds_ink_on_its_tube(bike, column, tube_end):
    bb = (bike["x_BB"], bike["y_BB"])
    end = (bike[f"x_{tube_end}"], bike[f"y_{tube_end}"])
    mid = ((bb[0] + end[0]) / 2, (bb[1] + end[1]) / 2)
    without = render_bike(bike, BASE, size=SIZE)
    with_bottle = render_bike(bike, {**BASE, column: 1}, size=SIZE)
    assert ink(region(with_bottle, mid, 150)) > ink(region(without, mid, 150)) + 500
    far = (bike["x_front_wheel_center"], bike["y_front_wheel_center"])
    assert np.array_equal(region(with_bottle, far, 150), region(without, far, 150))


def test_more_teeth_draw_a_larger_chainring(bike):
    bb = (bike["x_BB"], bike["y_BB"])

    def ring_radius(teeth):
        image = render_bike(bike, {**BASE, "Teeth on chainring": teeth}, size=SIZE)
        base = render_bike(bike, {**BASE, "Teeth on chainring": 0}, size=SIZE)
        diff = (base.astype(int) - image.astype(int)) > 40  # the ring's own pixels
        rows, cols = np.nonzero(diff)
        r0, c0 = to_px(bb)
        return np.median(np.hypot(rows - r0, cols - c0))

    small, large = ring_radius(30), ring_radius(60)
    scale = SIZE / (WINDOW_X[1] - WINDOW_X[0])
    assert large > 1.6 * small
    assert large == pytest.approx(60 * CHAIN_PITCH_MM / (2 * math.pi) * scale, rel=0.2)


def test_fork_types_look_different(bike):
    crown = (bike["x_down_tube_connect_head_tube"], bike["y_down_tube_connect_head_tube"])
    dropout = (bike["x_front_fork"], bike["y_front_fork"])
    mid = ((crown[0] + dropout[0]) / 2, (crown[1] + dropout[1]) / 2)
    forks = [render_bike(bike, {**BASE, "Fork type": t}, size=SIZE) for t in (0, 1, 2)]
    inks = [ink(region(f, mid, 80)) for f in forks]
    assert inks[1] > 1.5 * inks[0] and inks[2] > 1.5 * inks[0]  # suspension and aero blades are wider
    assert not np.array_equal(forks[1], forks[2])


def test_render_dataset_cli(tmp_path, biked_frame):
    from modules.render import main

    csv = tmp_path / "bikes.csv"
    biked_frame.head(20).to_csv(csv, index=False)
    assert main(["--csv", str(csv), "--out", str(tmp_path / "png"), "--size", "64", "--workers", "2"]) == 0
    table = pd.read_csv(tmp_path / "png" / "conditions.csv")
    assert len(table) == 20 and table["image"].iloc[0] == f"{biked_frame['Bike index'].iloc[0]}.png"
    assert "RIM_STYLE rear" in table.columns and not any(c.startswith("x_") for c in table.columns)
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "png" / table["image"].iloc[3]))
    expected = render_bike(biked_frame.iloc[3], biked_frame.iloc[3].to_dict(), size=64)
    assert np.array_equal(first, expected)


def test_duplicate_ids_are_refused(tmp_path, biked_frame):
    from modules.errors import UserError

    frame = biked_frame.head(5).copy()
    frame.loc[4, "Bike index"] = frame.loc[0, "Bike index"]
    frame.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(UserError, match="duplicate ids"):
        render_dataset(tmp_path / "dup.csv", tmp_path / "out", size=64, progress=False)


def test_nonsense_generated_designs_still_render(bike):
    broken = bike.copy()
    broken["Wheel diameter rear"] = -300.0  # an early, badly trained model can produce this
    broken["x_BB"] = float("nan")
    image = render_bike(broken, BASE, size=64)
    assert image.shape == (64, 64) and image.min() < 128
    broken["x_front_fork"] = float("inf")
    for extra in ({"Fork type": 2}, {"RIM_STYLE rear": "trispoke"}, {"bottle DOWNTUBE0 show OHCLASS: True": 1}):
        assert render_bike(broken, {**BASE, **extra}, size=64).shape == (64, 64)
