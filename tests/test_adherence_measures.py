"""Adherence without a network (the nearest real training image) and the asked-for adherence, on images whose
content is known: a model that follows c must score like the real images, one that ignores c must not."""
import pandas as pd
import pytest
import torch

from modules.conditioning import ConditionMasking, ConditionSchema
from modules.config import ConditionSpec
from modules.image_adherence import asked_for_adherence, nearest_image_adherence

SCHEMA = ConditionSchema.fit([ConditionSpec("rim", "categorical"), ConditionSpec("teeth", "numerical")],
                             pd.DataFrame({"rim": ["disc", "spoked", "trispoke"], "teeth": [30.0, 40.0, 50.0]}))
RIMS = SCHEMA.vocabulary_of("rim")  # disc, spoked, trispoke


def picture(category: int, teeth: float) -> torch.Tensor:
    """A 1×8×8 image: the rim category lights one row, the teeth value the last row (a numerical cue)."""
    image = -torch.ones(1, 8, 8)
    image[0, category] = 1.0
    image[0, 7] = teeth
    return image


def test_the_nearest_training_image_lends_its_conditions():
    g = torch.Generator().manual_seed(0)
    train_cat = torch.randint(3, (30, 1), generator=g)
    train_num = torch.rand(30, 1, generator=g)
    train = torch.stack([picture(int(k), float(t)) for k, t in zip(train_cat[:, 0], train_num[:, 0])])
    cat = torch.tensor([[0], [1], [2], [1], [3]])  # the last row's rim is missing (the mask token)
    num = torch.tensor([[0.2], [0.5], [0.9], [float("nan")], [0.4]])
    real = torch.stack([picture(min(int(k), 2), 0.0 if torch.isnan(t) else float(t))
                        for k, t in zip(cat[:, 0], num[:, 0])])
    follows = real.clone()  # draws what was asked
    ignores = torch.stack([picture(1, 0.5)] * 5)  # always spoked, always the same chainring
    table = nearest_image_adherence(follows, real, cat, num, train, train_cat, train_num, SCHEMA).set_index("condition")
    rim = table.loc["rim"]
    assert rim["real"] == rim["generated"] == 1.0 and rim["n_real"] == 4  # the missing rim is not scored
    teeth = table.loc["teeth"]
    assert teeth["n_real"] == 4 and teeth["generated"] > 0.9  # neighbours share the cue to within the grid
    ignored = nearest_image_adherence(ignores, real, cat, num, train, train_cat, train_num, SCHEMA).set_index("condition")
    assert ignored.loc["rim", "generated"] == pytest.approx(0.5)  # right only on the two spoked rows
    assert ignored.loc["teeth", "generated"] <= 0
    assert ignored.loc["rim", "majority"] == pytest.approx(
        float((cat[:4, 0] == torch.bincount(train_cat[:, 0]).argmax()).float().mean()))
    # chunking the training images changes nothing
    chunked = nearest_image_adherence(follows, real, cat, num, train, train_cat, train_num, SCHEMA, chunk=7)
    pd.testing.assert_frame_equal(chunked, table.reset_index())


class Reader(torch.nn.Module):
    """A perfect classifier of `picture`s: the lit row is the category."""

    def forward(self, images):
        rows = images[:, 0, :3, 0]  # the first pixel of rows 0-2
        return [rows * 10.0], images[:, 0, 7, :1]


class Stub:
    """A generator that draws the asked rim (`follows`) or always the majority rim."""

    def __init__(self, follows: bool):
        self.schema, self.follows = SCHEMA, follows
        self.masking = ConditionMasking.for_schema(SCHEMA)
        self.asked = []

    def generate(self, conditions, generator=None):
        self.asked.append(conditions.categorical[:, 0].clone())
        rims = conditions.categorical[:, 0] if self.follows else torch.ones(len(conditions), dtype=torch.long)
        return torch.stack([picture(int(k), 0.0) for k in rims])


def test_asked_for_adherence_exposes_a_generator_that_ignores_the_conditions():
    cat = torch.tensor([[1]] * 6 + [[0], [2]])  # the test split: mostly spoked
    num = torch.full((8, 1), 0.5)
    real = torch.stack([picture(int(k), 0.5) for k in cat[:, 0]])
    train_cat = torch.tensor([[1]] * 8 + [[0], [2]])
    tables = {}
    for follows in (True, False):
        stub = Stub(follows)
        tables[follows] = asked_for_adherence(stub, Reader(), real, cat, num, train_cat=train_cat, rows=5, seed=0)
        # every category asked for, on the first 5 rows, the rest of the row kept
        assert [a.tolist() for a in stub.asked] == [[k] * 5 for k in range(3)]
    good, bad = (tables[f].set_index("category") for f in (True, False))
    assert list(good.index[:3]) == RIMS and good.loc["spoked", "train_share"] == pytest.approx(0.8)
    assert list(good.loc[RIMS, "n_real"]) == [1, 6, 1]
    assert list(good.loc[RIMS, "real"]) == [1.0, 1.0, 1.0]
    assert list(good.loc[RIMS, "generated"]) == [1.0, 1.0, 1.0]
    assert list(bad.loc[RIMS, "generated"]) == [0.0, 1.0, 0.0]
    balanced = [c for c in good.index if str(c).startswith("balanced")]
    assert len(balanced) == 1
    assert good.loc[balanced[0], "generated"] == 1.0
    assert bad.loc[balanced[0], "generated"] == pytest.approx(1 / 3)
    # plain accuracy on the test rows would have hidden it: 6 of 8 rows are spoked
    assert bad.loc[balanced[0], "real"] == 1.0
    # a category without real test images is listed but left out of the balanced mean, for real and generated alike
    no_trispoke = cat.clone()
    no_trispoke[7] = 1
    real = torch.stack([picture(int(k), 0.5) for k in no_trispoke[:, 0]])
    table = asked_for_adherence(Stub(False), Reader(), real, no_trispoke, num, train_cat=train_cat, rows=5,
                                seed=0).set_index("category")
    assert table.loc["trispoke", "n_real"] == 0 and table.loc["trispoke", "generated"] == 0.0
    assert pd.isna(table.loc["trispoke", "real"])
    mean = table.loc[[c for c in table.index if str(c).startswith("balanced")][0]]
    assert mean["generated"] == pytest.approx(0.5) and mean["real"] == 1.0  # disc and spoked only
