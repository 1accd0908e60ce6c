"""The notebooks (_notebooks/, experiments/shap_study.ipynb) run end to end on tiny settings through papermill; run
as the README says (from the repository root, no `repo`, no `out_dir`) they find the repository themselves and
write under logs/notebooks/<name>/, leaving nothing untracked."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_emb_mcvae_with_cars(tmp_path):
    out = tmp_path / "cars"
    nb = run_notebook(ROOT / "_notebooks" / "emb_mcvae_with_cars.ipynb", tmp_path, repo=str(ROOT), out_dir=str(out),
                      max_epochs=3, evaluation=QUICK_EVAL, n=4)
    generated = pd.read_csv(out / "requested_cars.csv")
    assert len(generated) == 4 and generated.shape[1] == 42 + 3
    assert (generated["type"] == "Coupe").all() and (generated["buzzword1"] == "Sportlich").all()
    assert np.allclose(generated["drag_coeff"], 0.28)
    results = json.loads((out / "results.json").read_text())
    sse = pd.read_csv(f"{results['run_dir']}/eval/errors_per_sparsity.csv")
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


# --------------------------------------------------------------------------- run as a new user runs them


def untracked() -> set[str] | None:
    """Untracked files of the repository (None outside a git checkout)."""
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {line[3:] for line in status.splitlines() if line.startswith("??")}


def old_default_outputs() -> set[Path]:
    """Where the notebooks wrote before (…_out folders in the working directory)."""
    return {p for folder in (ROOT, ROOT / "_notebooks", ROOT / "experiments") for p in folder.glob("*_out")}


@pytest.fixture
def default_out(request):
    """<repo>/logs/notebooks/<name>/, the default output folder of the notebook `request.param`: a user's folder
    there is moved aside for the test and put back after it."""
    folder = ROOT / "logs" / "notebooks" / request.param
    aside = folder.with_name(f".{folder.name}.kept-by-test-{os.getpid()}")
    if folder.exists():
        os.replace(folder, aside)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
    if aside.exists():
        os.replace(aside, folder)


def papermill_cli(notebook: str, out: Path, cwd: Path, *params: str) -> subprocess.CompletedProcess:
    """`papermill NOTEBOOK OUT -p NAME VALUE …` in `cwd`, without the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JPY_SESSION_NAME")}
    command = [sys.executable, "-m", "papermill", str(notebook), str(out), "-k", "python3", "--no-progress-bar",
               *params]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def printed(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("default_out", ["biked_analysis"], indirect=True)
def test_readme_command_from_the_repository_root(tmp_path, default_out):
    """The README's notebook command, its very text, run by bash from the repository root with tiny settings
    appended; the executed notebook goes to the test's folder (the command's `mkdir` makes it), the notebook's
    outputs to their default, logs/notebooks/biked_analysis/."""
    from tests.test_readme import README, readme_commands

    (command,) = [c for c in readme_commands(README.read_text(encoding="utf-8")) if "papermill" in c]
    executed = tmp_path / "logs" / "notebooks"
    shell = (command.replace("logs/notebooks", str(executed)) + " -k python3 --no-progress-bar -p max_rows 400 "
             "-p bikes_per_style 2 -p max_styles 3 -p render_size 96")
    before, outputs_before = untracked(), old_default_outputs()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JPY_SESSION_NAME")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this Python's papermill
    done = subprocess.run(["bash", "-c", shell], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = printed(executed / "biked_analysis.ipynb")
    assert f"repository: {ROOT}" in text and f"outputs: {default_out}" in text
    # what the notebook computes (one run of it serves both: the command and the content)
    imbalance = pd.read_csv(default_out / "condition_imbalance.csv", index_col=0)
    assert "BikeStyle" in imbalance.index and imbalance.loc["BikeStyle", "majority"] == "ROAD"
    assert ((imbalance["majority share"] > 0) & (imbalance["majority share"] <= 1)).all()
    association = pd.read_csv(default_out / "condition_geometry_association.csv", index_col=0)
    assert association.shape == (8, 26)
    assert ((association >= 0) & (association <= 1 + 1e-9)).all().all()
    for name in ("bikes_per_style.png", "condition_distributions.png", "design_space_pca.png"):
        assert (default_out / name).stat().st_size > 10_000
    assert old_default_outputs() == outputs_before
    if before is not None:
        assert untracked() - before == set(), "the notebook left untracked files in the repository"


@pytest.mark.parametrize("default_out", ["dataset_size"], indirect=True)
def test_experiment_notebook_from_its_folder_shows_the_committed_results(tmp_path, default_out):
    """Run in experiments/ with its defaults: the committed cells are shown, not retrained (the 8 cells took
    hours), experiments/results/ is left as it is and the outputs go to logs/notebooks/dataset_size/."""
    committed = ROOT / "experiments" / "results" / "dataset_size"

    def snapshot():
        return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(committed.rglob("*")) if p.is_file()}

    before, files = untracked(), snapshot()
    done = papermill_cli("dataset_size.ipynb", tmp_path / "out.ipynb", ROOT / "experiments")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"results: {default_out}" in printed(tmp_path / "out.ipynb")
    # the committed numbers (run_dir: results.csv predates the renamed cell ids, the cells hold the new ones)
    shown = pd.read_csv(default_out / "results.csv").drop(columns="run_dir")
    pd.testing.assert_frame_equal(shown, pd.read_csv(committed / "results.csv").drop(columns="run_dir"))
    pd.testing.assert_frame_equal(pd.read_csv(default_out / "dataset_size_table.csv"),
                                  pd.read_csv(committed / "dataset_size_table.csv"))
    assert (default_out / "dataset_size.png").is_file()
    assert snapshot() == files
    if before is not None:
        assert untracked() - before == set(), "the notebook left untracked files in the repository"


def test_outside_the_repository_the_error_says_to_pass_repo(tmp_path):
    done = papermill_cli(ROOT / "_notebooks" / "biked_analysis.ipynb", tmp_path / "out.ipynb", tmp_path)
    assert done.returncode != 0
    assert "pass -p repo PATH" in done.stderr and "modules/registry.py" in done.stderr, done.stderr[-3000:]
