"""modules/stacked.py: K mcVAEs trained at once in one process match their single runs (weights, metrics and
evaluation tables), and the sweep stacks the cells that share an architecture."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import write_config
from experiments import sweep
from modules.errors import UserError
from modules.registry import MCVAE_SPEC
from modules.stacked import StackedTrainer, build_runs, load_mcvae_config, stack_signature, train_stacked
from modules.training import read_checkpoint, train_main

# three cells that differ in everything a stack lets differ: seed, KL weight, sparsity schedule, split seed
CELLS = [{}, {"trainer.seed": 7, "model.kl_weight": 0.7},
         {"sparsity.schedule": "cosine", "sparsity.initial": 0.0, "sparsity.target": 0.5, "data.split.seed": 3}]


def _tiny(tmp_path: Path, biked_slice: Path, **overrides) -> Path:
    path = write_config(tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)},
                        trainer={"max_epochs": 2, "check_val_every_n_epoch": 1, "batch_size": 64},
                        evaluation={"prior_draws": 1, "samples_per_design": 4, "diversity_groups": 5,
                                    "diversity_samples": 4, "sparsity_levels": [0.0, 0.3, 0.6]})
    return sweep.make_config(path, overrides, tmp_path / f"cell{len(list(tmp_path.glob('cell*.yaml')))}.yaml")


def test_three_stacked_models_match_their_single_runs(tmp_path, biked_slice):
    paths = [_tiny(tmp_path, biked_slice, **cell) for cell in CELLS]
    runs = train_stacked([load_mcvae_config(p) for p in paths], [tmp_path / f"stacked{i}" for i in range(3)],
                         progress=False)
    assert [r.run_dir.name for r in runs] == ["stacked0", "stacked1", "stacked2"]
    for i, path in enumerate(paths):
        assert train_main(["--config", str(path), "--logdir", str(tmp_path), "--name", f"single{i}"], MCVAE_SPEC) == 0
        single = next(tmp_path.glob(f"single{i}_*"))
        stacked = tmp_path / f"stacked{i}"
        a = read_checkpoint(stacked / "checkpoints" / "last.ckpt")
        b = read_checkpoint(single / "checkpoints" / "last.ckpt")
        assert a["global_step"] == b["global_step"] == 2 * 5  # 320 training designs in batches of 64
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for name, value in b["state_dict"].items():  # the weights, the EMA's and its update count
            torch.testing.assert_close(a["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        # training moved the weights: agreeing is more than agreeing on the initial weights
        initial = build_runs([load_mcvae_config(path)])[0].model.state_dict()
        assert (a["state_dict"]["decoder.condition.weight"] - initial["decoder.condition.weight"]).abs().max() > 1e-3
        metrics = [pd.read_csv(d / "metrics.csv") for d in (stacked, single)]
        assert list(metrics[0].columns) == list(metrics[1].columns)
        pd.testing.assert_frame_equal(metrics[0], metrics[1], rtol=1e-5)  # train and val losses, sparsity, lr
        for table in ("errors_per_sparsity.csv", "diversity.csv", "validity.csv"):
            x, y = (pd.read_csv(d / "eval" / table) for d in (stacked, single))
            pd.testing.assert_frame_equal(x.round(4), y.round(4), check_exact=False, atol=1e-4, obj=table)
        # adherence is a classifier's vote on generated designs: a design on a decision boundary may flip with
        # the last float bit, so at most one design per level and condition may differ
        x, y = (pd.read_csv(d / "eval" / "adherence.csv") for d in (stacked, single))
        levels = [c for c in x.columns if c[0].isdigit()]
        counts = y[[f"n_{c}" for c in levels]].to_numpy()
        delta = (x[levels] - y[levels]).abs().fillna(0).to_numpy()
        assert (delta <= 1.0 / counts.clip(min=1) + 1e-9).all(), (x[levels] - y[levels])
    # the three runs differ from one another (their seeds, KL weights, schedules and splits were used)
    errors = [pd.read_csv(tmp_path / f"stacked{i}" / "eval" / "errors_per_sparsity.csv") for i in range(3)]
    assert errors[0].iloc[0, 1] != errors[1].iloc[0, 1] != errors[2].iloc[0, 1]
    split = [pd.read_csv(tmp_path / f"stacked{i}" / "split.csv")["split"] for i in range(3)]
    assert split[0].equals(split[1]) and not split[0].equals(split[2])


def test_a_stacked_checkpoint_evaluates_but_does_not_resume(tmp_path, biked_slice):
    path = _tiny(tmp_path, biked_slice, **{"trainer.max_epochs": 1})
    train_stacked([load_mcvae_config(path)], [tmp_path / "run"], evaluate=False, progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    dm, model = MCVAE_SPEC.load(ckpt)
    assert len(model.sample({"BikeStyle": "ROAD"}, n=3, seed=0)) == 3
    with pytest.raises(UserError, match="stacked sweep .* rerun the cell"):
        train_main(["--ckpt_path", str(ckpt), "--max_epochs", "3"], MCVAE_SPEC)


def test_only_configs_that_share_an_architecture_stack(tmp_path, biked_slice):
    base = load_mcvae_config(_tiny(tmp_path, biked_slice))[0]
    same = [load_mcvae_config(_tiny(tmp_path, biked_slice, **cell))[0] for cell in CELLS]
    assert {stack_signature(c) for c in same} == {stack_signature(base)}
    wider = load_mcvae_config(_tiny(tmp_path, biked_slice, **{"model.latent_dim": 4}))
    assert stack_signature(wider[0]) != stack_signature(base)
    runs = build_runs([(base, "a"), wider])
    with pytest.raises(UserError, match="cannot train in one stack"):
        StackedTrainer(runs, progress=False)


def test_the_sweep_stacks_cells_per_architecture_and_resumes(tmp_path, biked_slice, monkeypatch):
    base = write_config(tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)},
                        trainer={"max_epochs": 2, "check_val_every_n_epoch": 1, "batch_size": 64})
    cells = [{"trainer.seed": s, "model.latent_dim": d} for d in (4, 6) for s in (0, 1)] + \
            [{"trainer.seed": 0, "model.latent_dim": 8}]
    out, logdir = tmp_path / "out", tmp_path / "logs"
    calls = []
    original = sweep.run_stacked_cells
    monkeypatch.setattr(sweep, "run_stacked_cells",
                        lambda cells, cids, **kw: calls.append([c["model.latent_dim"] for c in cells]) or
                        original(cells, cids, **kw))
    single = []
    original_single = sweep.run_cell
    monkeypatch.setattr(sweep, "run_cell", lambda cell, cid, **kw: single.append(cell) or original_single(cell, cid, **kw))
    results = sweep.run_cells(cells, out, base_config=base, workers=0, logdir=logdir, progress=False, stack=True,
                              fixed=sweep.FAST_EVAL)
    assert sorted(calls) == [[4, 4], [6, 6]]  # one stack per latent size; the lone latent size 8 runs alone
    assert single == [{"trainer.seed": 0, "model.latent_dim": 8}]
    assert len(results) == 5 and results["sse_paper_0.0"].notna().all()
    assert results["sse_paper_0.0"].nunique() == 5
    meta = yaml.safe_load((out / "meta.json").read_text())
    assert meta["stacked"] is True
    logs = sorted(logdir.glob("stack-*.log"))
    assert len(logs) == 2 and all("2 stacked models: epoch 2/2" in p.read_text() for p in logs)  # for tail -f
    calls.clear()
    again = sweep.run_cells(cells, out, base_config=base, workers=0, logdir=logdir, progress=False, stack=True,
                            fixed=sweep.FAST_EVAL)
    assert calls == [] and again.equals(results)  # every cell was written: a rerun trains nothing


def test_bench_stacked_reports_both_pools(tmp_path, capsys):
    """benchmarks/bench_stacked.py on a tiny setting: both pools train every cell, the table has each K."""
    import importlib

    bench = importlib.import_module("benchmarks.bench_stacked")  # by name: spawned workers import it again
    assert bench.main(["--configs", "mcvae_biked_paper", "--ks", "2", "--epochs", "1", "--workers", "1",
                       "--results", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_stacked.json").read_text())
    (row,) = report["rows"]
    assert row["K"] == 2 and row["epochs"] == 1
    assert row["separate_models_epochs_per_s"] == round(2 / row["separate_s"], 2)
    assert row["speedup"] == round(row["separate_s"] / row["stacked_s"], 2)
    runs = sorted((tmp_path / "bench_stacked_runs" / "logs").iterdir())
    assert len(runs) == 4  # 2 cells × (separate, stacked), each a run directory with its checkpoint
    assert all((r / "checkpoints" / "last.ckpt").is_file() for r in runs)
    assert "| mcvae_biked_paper | 2 | 1 |" in (tmp_path / "bench_stacked.md").read_text()
