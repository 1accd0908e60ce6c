"""Labelled sample grids: each row names its prompt in a text band above it."""
import numpy as np
import pytest
import torch
from PIL import Image

from modules.image_evaluation import LABEL_HEIGHT, image_grid, prompt_label


def test_prompt_labels_name_the_conditions_or_say_unconditional():
    assert prompt_label({}) == "unconditional (every condition masked)"
    assert prompt_label({"BikeStyle": "ROAD", "Fork type": 1}) == "BikeStyle=ROAD, Fork type=1"


def test_labelled_rows_get_a_text_band_and_unlabelled_rows_none(tmp_path):
    rows = [torch.full((3, 1, 16, 16), 128, dtype=torch.uint8), torch.full((2, 1, 16, 16), 200, dtype=torch.uint8)]
    plain = np.asarray(Image.open(image_grid(rows, tmp_path / "plain.png")))
    assert plain.shape == (2 * 16 + 2, 3 * 16 + 2 * 2)
    labelled = np.asarray(Image.open(image_grid(rows, tmp_path / "l.png", labels=["BikeStyle=ROAD", None])))
    assert labelled.shape == (LABEL_HEIGHT + 2 * 16 + 2, 3 * 16 + 2 * 2)
    band = labelled[:LABEL_HEIGHT]
    assert (band < 100).sum() > 10 and (band == 255).mean() > 0.5  # dark text on white
    assert (labelled[LABEL_HEIGHT:LABEL_HEIGHT + 16, :16] == 128).all()  # the first row's images below the band
    other = np.asarray(Image.open(image_grid(rows, tmp_path / "o.png", labels=["Fork type=1", None])))
    assert not np.array_equal(other[:LABEL_HEIGHT], band)  # the text is the label's
    with pytest.raises(ValueError, match="2 labels for 1 rows"):
        image_grid(rows[:1], tmp_path / "x.png", labels=["a", "b"])


def test_a_label_wider_than_the_grid_is_cut_and_colour_rows_keep_their_channels(tmp_path):
    rows = [torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)]
    grid = np.asarray(Image.open(image_grid(rows, tmp_path / "c.png", labels=["x" * 200])))
    assert grid.shape == (LABEL_HEIGHT + 8, 2 * 8 + 2, 3)
    assert (grid[:LABEL_HEIGHT] < 100).any()
