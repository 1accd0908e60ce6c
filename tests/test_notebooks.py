"""The notebooks (_notebooks/, experiments/shap_study.ipynb) run end to end on tiny settings through papermill."""
from __future__ import annotations

import json

import nbformat
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, run_notebook

pytest.importorskip("papermill")

NOTEBOOKS = [ROOT / "_notebooks" / "biked_analysis.ipynb", ROOT / "_notebooks" / "emb_mcvae_with_cars.ipynb",
             ROOT / "_notebooks" / "sampling_playground.ipynb", ROOT / "experiments" / "shap_study.ipynb"]
QUICK_EVAL = {"prior_draws": 2, "diversity_groups": 5, "diversity_samples": 4}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_parametrised(path):
    """Stored without outputs, python3 kernel, the first code cell tagged `parameters` (papermill's convention)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} holds outputs"


def test_biked_analysis(tmp_path):
    out = tmp_path / "analysis"
    run_notebook(ROOT / "_notebooks" / "biked_analysis.ipynb", tmp_path, repo=str(ROOT), out_dir=str(out),
                 max_rows=400, bikes_per_style=2, max_styles=3, render_size=96)
    imbalance = pd.read_csv(out / "condition_imbalance.csv", index_col=0)
    assert "BikeStyle" in imbalance.index and imbalance.loc["BikeStyle", "majority"] == "ROAD"
    assert ((imbalance["majority share"] > 0) & (imbalance["majority share"] <= 1)).all()
    association = pd.read_csv(out / "condition_geometry_association.csv", index_col=0)
    assert association.shape == (8, 26)
    assert ((association >= 0) & (association <= 1 + 1e-9)).all().all()
    for name in ("bikes_per_style.png", "condition_distributions.png", "design_space_pca.png"):
        assert (out / name).stat().st_size > 10_000


def test_emb_mcvae_with_cars(tmp_path):
    out = tmp_path / "cars"
    nb = run_notebook(ROOT / "_notebooks" / "emb_mcvae_with_cars.ipynb", tmp_path, repo=str(ROOT), out_dir=str(out),
                      max_epochs=3, evaluation=QUICK_EVAL, n=4)
    generated = pd.read_csv(out / "requested_cars.csv")
    assert len(generated) == 4 and generated.shape[1] == 42 + 3
    assert (generated["type"] == "Coupe").all() and (generated["buzzword1"] == "Sportlich").all()
    assert np.allclose(generated["drag_coeff"], 0.28)
    results = json.loads((out / "results.json").read_text())
    sse = pd.read_csv(f"{results['run_dir']}/eval/mse_per_sparsity.csv")
    assert results["sse_paper_at_0"] == pytest.approx(sse["sse_paper"].iloc[0])
    config = (out / "my_cars.yaml").read_text()
    assert config.count("vocabulary: buzzword") == 3
    assert (out / "requested_cars.png").stat().st_size > 5_000
    assert any("read back" in o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def test_sampling_playground_trains_when_missing(tmp_path, biked_slice):
    out = tmp_path / "playground"
    logs = tmp_path / "logs"
    run_notebook(ROOT / "_notebooks" / "sampling_playground.ipynb", tmp_path, repo=str(ROOT), out_dir=str(out),
                 logdir=str(logs), train_epochs=2, csv_path=str(biked_slice), n=3,
                 conditions={"BikeStyle": "TRACK", "frame_size": "L"})
    assert len(list(logs.glob("mcvae_biked_*/checkpoints/last.ckpt"))) == 1
    samples = pd.read_csv(out / "samples.csv")
    assert len(samples) == 3 and (samples["BikeStyle"] == "TRACK").all() and (samples["frame_size"] == "L").all()
    assert {"x_BB", "Wheel diameter rear"} <= set(samples.columns)
    assert (out / "samples.png").is_file() and (out / "sweep.png").is_file()


def test_shap_study(tmp_path, biked_slice):
    out = tmp_path / "shap"
    run_notebook(ROOT / "experiments" / "shap_study.ipynb", tmp_path, repo=str(ROOT), out_dir=str(out),
                 csv_path=str(biked_slice), max_epochs=2, n_background=5, n_explain=6, z_draws=0,
                 coordinates=["Wheel diameter rear"])
    table = pd.read_csv(out / "shap_mean_abs.csv", index_col=0)
    assert table.shape == (8, 26) and (table.to_numpy() >= 0).all() and table.to_numpy().sum() > 0
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] == 6 and results["conditions"] == 8 and results["coordinates"] == 26
    assert results["additivity_error_mm"] < 1e-3  # exact SHAP values add up to the generated design
    assert (out / "shap_beeswarm_Wheel_diameter_rear.png").is_file() and (out / "shap_heatmap.png").is_file()
