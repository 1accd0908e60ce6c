"""Progress bars of the long evaluation phases: named, on a terminal's stderr, off when quiet or not on a
terminal, and the forest grown in steps for its bar is the forest grown at once."""
import contextlib
import dataclasses
import io

import numpy as np
import pandas as pd
import pytest
import torch

from modules import baselines
from modules.evaluation import evaluate_parametric
from modules.progress import bar, progress_bars, shows_progress
from tests.test_plots_tables import Terminal


def drawn(run, *, terminal: bool = True) -> str:
    """What `run()` writes to stderr (a terminal, or a plain pipe)."""
    err = Terminal() if terminal else io.StringIO()
    with contextlib.redirect_stderr(err):
        run()
    return err.getvalue()


def count_to_three():
    for _ in bar(range(3), desc="counting"):
        pass


def test_bars_follow_the_evaluation_and_the_terminal():
    assert drawn(count_to_three) == ""  # outside an evaluation: library calls stay silent
    with progress_bars(True):
        assert "counting:   0%|          | 0/3" in drawn(count_to_three)  # its first draw; it is cleared when done
        assert drawn(count_to_three, terminal=False) == ""  # a log file or a pipe gets none
    with progress_bars(False):
        assert drawn(count_to_three) == ""

    @shows_progress
    def evaluate(*, quiet: bool = False):
        count_to_three()

    assert "counting" in drawn(lambda: evaluate())
    assert drawn(lambda: evaluate(quiet=True)) == ""
    assert drawn(count_to_three) == ""  # the evaluation's setting ends with it


def test_a_quiet_evaluation_draws_nothing(tmp_path, biked_frame):
    from tests.test_baselines import built

    biked_frame.head(200).to_csv(tmp_path / "slice.csv", index=False)
    dm, model = built(tmp_path / "slice.csv")
    cfg = dataclasses.replace(model.cfg.evaluation, sparsity_levels=[0.5], samples_per_design=2, prior_draws=2,
                              diversity_groups=1, diversity_samples=2, adherence=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        err = drawn(lambda: evaluate_parametric(model, dm, tmp_path / "eval", cfg=cfg, quiet=True))
    assert err == "" and out.getvalue() == ""
    errors = pd.read_csv(tmp_path / "eval" / "errors_per_sparsity.csv")
    assert (errors["sse_prior_std"] >= 0).all()  # two draws have a spread


def test_the_mcldm_shows_its_denoising_steps_within_an_evaluation():
    from tests.test_mcldm import _sampling_model

    model = _sampling_model(cfg_scale=0.0, steps=3)
    conditions, _ = model.conditions_from({"style": "b"}, 2)
    generate = lambda: model.generate_latents(conditions, generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert drawn(generate) == ""
    with progress_bars(True):
        steps = drawn(generate)
    assert "ddim denoising (2 latents):   0%" in steps and "0/3 [" in steps  # a step of the bar per sampling step


def test_the_adherence_cnn_and_the_asked_for_adherence_show_their_progress():
    from modules.image_adherence import asked_for_adherence, fit_condition_classifier
    from tests.test_adherence_measures import SCHEMA, Reader, Stub, picture

    cat = torch.tensor([[0], [1], [2], [1]])
    num = torch.tensor([[0.2], [0.5], [0.9], [0.4]])
    images = torch.stack([picture(int(k), float(t)) for k, t in zip(cat[:, 0], num[:, 0])])
    with progress_bars(True):
        cnn = drawn(lambda: fit_condition_classifier(images, cat, num, SCHEMA, epochs=2, batch_size=2))
        asked = drawn(lambda: asked_for_adherence(Stub(True), Reader(), images, cat, num, train_cat=cat, rows=2,
                                                  seed=0))
    assert "adherence CNN:   0%" in cnn and "0/4 [" in cnn  # 2 epochs of 2 batches
    assert "asked-for adherence:   0%" in asked and "0/3 [" in asked  # one step per rim category


def test_the_forest_grown_in_steps_is_the_forest_grown_at_once(biked_slice, monkeypatch):
    from tests.test_baselines import built

    dm, model = built(biked_slice)
    train, test = dm.tensors["train"], dm.tensors["test"]
    levels = [0.0, 0.5]

    def predictions():
        forest = baselines.ConditionalForest(model, *train, levels, seed=0)
        assert len(forest.forest.estimators_) == baselines.FOREST_TREES
        forest.forest.set_params(n_jobs=1)  # parallel prediction sums the trees in any order
        nothing = torch.zeros_like(test[1], dtype=torch.bool)
        return forest.predict(model.masking.apply(test[1], test[2], nothing, torch.zeros_like(test[2], dtype=bool)))

    stepped = predictions()
    monkeypatch.setattr(baselines, "FOREST_TREES_PER_STEP", baselines.FOREST_TREES)
    np.testing.assert_array_equal(stepped.numpy(), predictions().numpy())


