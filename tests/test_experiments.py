"""experiments/: the resumable sweep library and CLI, and the three experiment notebooks on a tiny setting."""
import json
import math

import pandas as pd
import pytest

from experiments import sweep
from tests.conftest import ROOT, run_notebook

# cheap evaluation for 3-epoch runs on a 400-design slice; the paper-protocol SSE per sparsity is still computed
TINY = {"evaluation.prior_draws": 2, "evaluation.diversity_groups": 5, "evaluation.diversity_samples": 4,
        "trainer.batch_size": 64}
TINY_ARGS = [f"--set={k}={v}" for k, v in TINY.items()]


def test_sweep_runs_resumes_and_recomputes(tmp_path, biked_slice, monkeypatch):
    out, logdir = tmp_path / "sp", tmp_path / "logs"
    cells = sweep.sparsity_cells(["constant", "linear", "cosine"], initials=[0.0], targets=[0.3], seeds=[0])
    assert len(cells) == 3
    kwargs = dict(workers=2, epochs=3, csv_path=str(biked_slice), fixed=TINY, logdir=logdir, progress=False)
    results = sweep.run_cells(cells, out, **kwargs)

    assert len(results) == 3 and results["cell_id"].is_unique
    assert list(results["sparsity.schedule"]) == ["constant", "linear", "cosine"]
    levels = [f"sse_paper_{x}" for x in sweep.LEVELS]
    for column in [*levels, "sse_paper_mean", "sse_prior_mean", "adherence_mean", "diversity_ratio_same_conditions"]:
        assert results[column].map(math.isfinite).all(), column
    assert (results[levels].mean(axis=1) - results["sse_paper_mean"]).abs().max() < 1e-6
    assert (results["n_train"] == 320).all()
    assert (out / "results.csv").is_file() and len(pd.read_csv(out / "results.csv")) == 3
    meta = json.loads((out / "meta.json").read_text())
    assert meta["cells_run"] == 3 and meta["commit"] and meta["command"]

    # a second call resumes: nothing is trained again
    def refuse(*args, **kw):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(sweep, "run_cell", refuse)
    again = sweep.run_cells(cells, out, **{**kwargs, "workers": 0})
    pd.testing.assert_frame_equal(again, results)
    assert json.loads((out / "meta.json").read_text())["cells_run"] == 0

    # a lost cell is recomputed, and only that one; training is deterministic, so it gives the same numbers
    lost = out / "cells" / f"{results['cell_id'][1]}.json"
    lost.unlink()
    calls = []
    monkeypatch.undo()
    original = sweep.run_cell
    monkeypatch.setattr(sweep, "run_cell", lambda cell, cid, **kw: calls.append(cid) or original(cell, cid, **kw))
    redone = sweep.run_cells(cells, out, **{**kwargs, "workers": 0})
    assert calls == [results["cell_id"][1]] and lost.is_file()
    assert redone.loc[1, "sse_paper_mean"] == pytest.approx(results.loc[1, "sse_paper_mean"], rel=1e-5)

    # the tables and the areas under the training sparsity curves
    table = sweep.sparsity_table(results)
    assert list(table.index) == ["constant", "linear", "cosine"] and [*sweep.LEVELS, "mean"] <= list(table.columns)
    areas = sweep.schedule_areas(table, 3).set_index("schedule")
    assert areas.loc["constant", "area"] == 0.0
    assert areas.loc["linear", "mean_training_sparsity"] == pytest.approx((0.0 + 0.15 + 0.3) / 3)

    # the CLI on the same cells resumes them all and writes the tables and the figure
    assert sweep.main(["sparsity", "--out", str(out), "--logdir", str(logdir), "--epochs", "3", "--csv_path",
                       str(biked_slice), "--schedules", "constant", "linear", "cosine", "--initials", "0.0",
                       "--targets", "0.3", "--workers", "0", *TINY_ARGS]) == 0
    assert json.loads((out / "meta.json").read_text())["cells_run"] == 0
    for name in ("sparsity_table.csv", "sparsity_table_all.csv", "schedule_areas.csv", "sparsity_schedules.png"):
        assert (out / name).stat().st_size > 0, name
    assert list(pd.read_csv(out / "sparsity_table.csv")["schedule"]) == ["constant", "linear", "cosine"]


def test_cli_dataset_size_and_hparams(tmp_path, biked_slice):
    common = ["--logdir", str(tmp_path / "logs"), "--epochs", "2", "--csv_path", str(biked_slice), "--workers", "0",
              "--seeds", "0", *TINY_ARGS]
    out = tmp_path / "ds"
    assert sweep.main(["dataset_size", "--out", str(out), "--fractions", "0.25", "1.0", *common]) == 0
    table = pd.read_csv(out / "dataset_size_table.csv", index_col=0)
    assert list(table.index) == [0.25, 1.0] and list(table["n_train"]) == [80, 320]
    assert (out / "dataset_size.png").is_file() and table["adherence_mean"].map(math.isfinite).all()

    out = tmp_path / "hp"
    assert sweep.main(["hparams", "--out", str(out), "--grid", "model.latent_dim=4,6", "--fast_eval", *common]) == 0
    table = pd.read_csv(out / "hparam_table.csv")
    assert sorted(table["model.latent_dim"]) == [4, 6] and (out / "hparams.png").is_file()
    assert "adherence_mean" not in table  # --fast_eval turns the adherence evaluation off
    assert "--fast_eval" in json.loads((out / "meta.json").read_text())["command"]


NOTEBOOK_TINY = dict(epochs=2, seeds=[0], workers=0, extra=TINY)


@pytest.mark.parametrize("name, params", [
    ("sparsity_schedules.ipynb", dict(schedules=["constant", "linear"], initials=[0.0], targets=[0.3])),
    ("dataset_size.ipynb", dict(fractions=[0.5, 1.0])),
    ("hyperparameter_tuning.ipynb", dict(search={"model.kl_weight": [0.5, 0.9]})),
], ids=lambda v: v if isinstance(v, str) else "")
def test_notebook_runs_on_a_tiny_setting(tmp_path, biked_slice, name, params):
    out = tmp_path / "results"
    nb = run_notebook(ROOT / "experiments" / name, tmp_path, out=str(out), logdir=str(tmp_path / "logs"),
                      csv_path=str(biked_slice), **NOTEBOOK_TINY, **params)
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 2 and results["sse_paper_mean"].map(math.isfinite).all()
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", [])), "the figure is shown"
