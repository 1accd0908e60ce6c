"""Shared fixtures: tiny configs over slices of the real data sets (linked into data/ by .ci/run)."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIKED = ROOT / "data" / "biked" / "df_parameters_final.csv"
CARS = ROOT / "data" / "cars" / "cars.csv"


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} is missing: link the data sets first (ln -s ../shared/data/biked data/biked, see README)")
    return path


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_fit_cache(monkeypatch):
    """Every test fits its own forests (a cached one would hide a change); tests/test_fit_cache.py turns it on."""
    monkeypatch.setenv("MC_FIT_CACHE", "off")


@pytest.fixture(scope="session")
def biked_frame() -> pd.DataFrame:
    return pd.read_csv(_require(BIKED))


@pytest.fixture
def biked_slice(tmp_path, biked_frame) -> Path:
    """The first 400 BIKED designs as their own CSV."""
    path = tmp_path / "biked_slice.csv"
    biked_frame.head(400).to_csv(path, index=False)
    return path


def write_config(tmp_path: Path, base: str, **sections) -> Path:
    """configs/<base>.yaml with `sections` merged in (a dict per section), written to tmp_path."""
    cfg = yaml.safe_load((ROOT / "configs" / f"{base}.yaml").read_text())
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = tmp_path / f"{base}_test.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def tiny_biked_config(tmp_path, biked_slice) -> Path:
    """The BIKED config on a 400-design slice: 2 epochs, validation and checkpoints every epoch, quick evaluation."""
    return write_config(
        tmp_path, "mcvae_biked",
        data={"csv_path": str(biked_slice)},
        trainer={"max_epochs": 2, "check_val_every_n_epoch": 1, "checkpoint_every_n_epochs": 1, "batch_size": 64},
        evaluation={"prior_draws": 2, "diversity_groups": 5, "diversity_samples": 4},
    )


def train_on_fresh_renders(tmp: Path, frame: pd.DataFrame, make_config, main, *, rows: int = 48, name: str = "r"):
    """Train through a CLI `main` on the first `rows` BIKED designs, rendered on the fly into tmp/data/.cache (the
    working directory is tmp meanwhile); `make_config(tmp, csv)` writes the config. Returns (run dir, config)."""
    csv = tmp / "bikes.csv"
    frame.head(rows).to_csv(csv, index=False)
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    try:
        config = make_config(tmp, csv)
        assert main(["--config", str(config), "--logdir", str(tmp / "logs"), "--name", name]) == 0
    finally:
        mp.undo()
    return next((tmp / "logs").iterdir()), config


def run_notebook(path: Path, tmp: Path, **parameters):
    """Execute a notebook with papermill (its `parameters` cell overridden by `parameters`) in `tmp`, with the
    repository importable; returns the executed notebook. Fails the test with the failing cell's error."""
    import os

    import papermill

    out = tmp / f"executed_{Path(path).name}"
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env_path}" if env_path else str(ROOT)
    try:
        return papermill.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(tmp),
                                          kernel_name="python3", progress_bar=False)
    finally:
        os.environ["PYTHONPATH"] = env_path
