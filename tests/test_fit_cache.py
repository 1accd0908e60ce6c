"""The evaluation's fit cache (modules/fit_cache.py): a second evaluation on a split fits no forest and writes the
same tables; another split, data or mask seed fits again; a broken entry is fitted again; `off` writes nothing."""
import logging

import pandas as pd
import pytest
import sklearn.ensemble

from modules import fit_cache
from modules.evaluation import evaluate_parametric
from tests.test_baselines import built


def small_eval(model):
    cfg = model.cfg.evaluation
    cfg.sparsity_levels, cfg.samples_per_design, cfg.prior_draws, cfg.diversity_groups = [0.0, 0.5], 2, 1, 3
    return cfg


def tables_of(model, dm, out):
    tables = evaluate_parametric(model, dm, out, cfg=small_eval(model), quiet=True)
    return {name: table for name, table in tables.items() if isinstance(table, pd.DataFrame)}


@pytest.fixture
def fits(monkeypatch):
    """Counts every forest fit (regressor and classifier)."""
    counted = {"n": 0}
    for cls in (sklearn.ensemble.RandomForestRegressor, sklearn.ensemble.RandomForestClassifier):
        original = cls.fit

        def fit(self, *args, _original=original, **kwargs):
            counted["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "fit", fit)
    return counted


def test_second_evaluation_fits_nothing_and_writes_the_same_tables(biked_slice, tmp_path, monkeypatch, fits):
    monkeypatch.setenv("MC_FIT_CACHE", str(tmp_path / "cache"))
    dm, model = built(biked_slice)
    first = tables_of(model, dm, tmp_path / "a")
    fitted_once = fits["n"]
    # the conditional forest's 4 warm-start steps and one forest per informative adherence condition
    assert fitted_once >= 4 + 5
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert sum(e.startswith("conditional_forest_prediction_") for e in entries) == 2  # one per level
    assert sum(e.startswith("adherence_") for e in entries) == fitted_once - 4
    second = tables_of(model, dm, tmp_path / "b")
    assert fits["n"] == fitted_once  # nothing fitted again
    assert first.keys() == second.keys()
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name])
    for name in ("errors_per_sparsity.csv", "adherence.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_another_split_or_mask_seed_is_fitted_again(biked_slice, tmp_path, monkeypatch, fits):
    monkeypatch.setenv("MC_FIT_CACHE", str(tmp_path / "cache"))
    dm, model = built(biked_slice)
    first = tables_of(model, dm, tmp_path / "a")["errors_per_sparsity"]
    n = fits["n"]
    other_dm, other_model = built(biked_slice, seed=3)  # another split of the same file
    other = tables_of(other_model, other_dm, tmp_path / "b")["errors_per_sparsity"]
    assert fits["n"] >= 2 * n - 1  # all fitted again (a condition may turn uninformative on another split)
    assert not first["conditional_forest_sse"].equals(other["conditional_forest_sse"])
    n = fits["n"]
    model.cfg.evaluation.mask_seed = 5  # other masks: the forest's training rows and its queries change
    cfg = small_eval(model)
    evaluate_parametric(model, dm, tmp_path / "c", cfg=cfg, quiet=True)
    assert fits["n"] > n


def test_broken_entry_is_fitted_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MC_FIT_CACHE", str(tmp_path))
    calls = []
    value = fit_cache.cached("thing", "k1", lambda: calls.append(1) or {"a": 1})
    assert value == {"a": 1} and fit_cache.cached("thing", "k1", lambda: calls.append(1) or {"a": 2}) == {"a": 1}
    assert len(calls) == 1
    (tmp_path / "thing_k1.joblib").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        assert fit_cache.cached("thing", "k1", lambda: {"a": 3}) == {"a": 3}
    assert "unreadable" in caplog.text and str(tmp_path / "thing_k1.joblib") in caplog.text
    assert fit_cache.cached("thing", "k1", lambda: {"a": 4}) == {"a": 3}  # the refit was stored
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_fingerprint_sees_values_shapes_and_parameters():
    import numpy as np

    a = np.arange(6, dtype=np.float32)
    key = fit_cache.fingerprint(a, seed=0)
    assert key == fit_cache.fingerprint(a.copy(), seed=0)
    assert key != fit_cache.fingerprint(a.reshape(2, 3), seed=0)
    assert key != fit_cache.fingerprint(a.astype(np.float64), seed=0)
    assert key != fit_cache.fingerprint(a + np.eye(1, 6, 5, dtype=np.float32)[0], seed=0)
    assert key != fit_cache.fingerprint(a, seed=1)


def test_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MC_FIT_CACHE", "off")
    assert fit_cache.cache_dir() is None
    calls = []
    fit_cache.cached("thing", "k", lambda: calls.append(1))
    fit_cache.cached("thing", "k", lambda: calls.append(1))
    assert len(calls) == 2
    monkeypatch.delenv("MC_FIT_CACHE")
    assert fit_cache.cache_dir() == fit_cache.DEFAULT_DIR
