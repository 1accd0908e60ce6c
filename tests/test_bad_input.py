"""Bad input of every kind ends in one clear paragraph (exit 2), and nothing is lost or silently wrong."""
import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
import sample
from tests.conftest import write_config
from tests.test_cli import expect_error, run_dir_of, train


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, biked_frame):
    tmp = tmp_path_factory.mktemp("small")
    csv = tmp / "slice.csv"
    biked_frame.head(300).to_csv(csv, index=False)
    config = write_config(tmp, "mcvae_biked", data={"csv_path": str(csv)},
                          trainer={"max_epochs": 2, "checkpoint_every_n_epochs": 1, "batch_size": 64},
                          evaluation={"prior_draws": 1, "diversity_groups": 2, "diversity_samples": 2})
    assert train(config, tmp / "logs", "--no_eval") == 0
    return run_dir_of(tmp / "logs"), config, csv


@pytest.mark.parametrize("section,values,message", [
    ("model", {"ema_decay": 1.0}, "model.ema_decay must be in (0, 1) or null"),
    ("model", {"hidden_dims": [0]}, "model.hidden_dims must be a non-empty list of sizes ≥ 1"),
    ("model", {"latent_dim": -1}, "model.latent_dim must be ≥ 1"),
    ("optimizer", {"lr": -1.0}, "optimizer.lr must be > 0"),
    ("optimizer", {"betas": [0.9, 1.5]}, "optimizer.betas must be two numbers in [0, 1)"),
    ("trainer", {"check_val_every_n_epoch": 0}, "trainer.check_val_every_n_epoch must be ≥ 1"),
    ("trainer", {"devices": 0}, "trainer.devices must be a number ≥ 1 or 'auto'"),
    ("lr_scheduler", {"step_size": 0}, "lr_scheduler.step_size must be ≥ 1"),
    ("lr_scheduler", {"name": "cosine", "min_lr_ratio": 1.5}, "lr_scheduler.min_lr_ratio must be in [0, 1]"),
    ("conditioning", {"embedding_dim": 0}, "conditioning.embedding_dim must be ≥ 1"),
    ("evaluation", {"sparsity_levels": []}, "evaluation.sparsity_levels must be a non-empty list"),
    ("evaluation", {"prior_draws": 0}, "evaluation.prior_draws must be ≥ 1"),
])
def test_values_out_of_range(tmp_path, capsys, section, values, message):
    config = write_config(tmp_path, "mcvae_biked", **{section: values})
    expect_error(capsys, train(config, tmp_path / "l"), message, str(config))
    assert not (tmp_path / "l").exists() or not any((tmp_path / "l").iterdir())  # no empty run directory


def test_impossible_accelerator_and_devices_flags(tmp_path, tiny_biked_config, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    expect_error(capsys, train(tiny_biked_config, tmp_path / "l", "--accelerator", "gpu"),
                 "trainer.accelerator = 'gpu'", "--accelerator cpu")
    expect_error(capsys, train(tiny_biked_config, tmp_path / "l", "--accelerator", "gpu", "--devices", "3"),
                 "trainer.devices = 3", "--devices count this machine has")
    assert not (tmp_path / "l").exists() or not any((tmp_path / "l").iterdir())


def test_non_text_config(tmp_path, capsys):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(bytes(range(256)))
    expect_error(capsys, train(binary, tmp_path / "l"), "is not a text (UTF-8) file")


def test_integer_categories_with_gaps(tmp_path, biked_slice, capsys):
    """pandas writes an integer column with an empty cell as 0.0/1.0: still categories '0' and '1'."""
    frame = pd.read_csv(biked_slice)
    frame.loc[5, "Fork type"] = np.nan
    frame["coating"] = (np.arange(len(frame)) % 2).astype(float)
    frame.loc[9, "coating"] = np.nan
    frame.to_csv(tmp_path / "gaps.csv", index=False)
    assert "1.0" in (tmp_path / "gaps.csv").read_text().splitlines()[2]
    config = write_config(tmp_path, "mcvae_biked", data={"csv_path": str(tmp_path / "gaps.csv")},
                          trainer={"max_epochs": 1, "batch_size": 64})
    import yaml

    raw = yaml.safe_load(config.read_text())
    raw["data"]["conditions"].append({"name": "coating", "kind": "categorical"})  # vocabulary from the data
    config.write_text(yaml.safe_dump(raw))
    assert train(config, tmp_path / "l", "--no_eval") == 0
    from modules.registry import MCVAE_SPEC

    dm, model = MCVAE_SPEC.load(run_dir_of(tmp_path / "l") / "checkpoints/last.ckpt")
    assert model.schema.vocabulary_of("coating") == ["0", "1"]
    assert model.schema.vocabulary_of("Fork type") == ["0", "1", "2"]
    cat, _ = model.schema.encode(frame.iloc[[5, 9]])
    tokens = model.schema.mask_tokens()
    names = [c.name for c in model.schema.categorical]
    assert cat[0, names.index("Fork type")] == tokens[names.index("Fork type")]  # the gap is masked
    assert cat[1, names.index("coating")] == tokens[names.index("coating")]
    out = tmp_path / "s.csv"
    assert sample.main(["--ckpt", str(run_dir_of(tmp_path / "l") / "checkpoints/last.ckpt"),
                        "--condition", "coating=1", "--condition", "Fork type=2", "--out", str(out)]) == 0


def test_yaml_booleans_and_unused_vocabulary(tmp_path, biked_slice, capsys):
    import yaml

    config = write_config(tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)})
    raw = yaml.safe_load(config.read_text())
    raw["data"]["conditions"][2]["categories"] = [False, True]
    config.write_text(yaml.safe_dump(raw))
    expect_error(capsys, train(config, tmp_path / "l"), "read as a boolean", "quote")
    raw["data"]["conditions"][2]["categories"] = [0, 1]
    raw["data"]["vocabularies"]["rim_styel"] = ["spoked"]
    config.write_text(yaml.safe_dump(raw))
    expect_error(capsys, train(config, tmp_path / "l"), "data.vocabularies.rim_styel is not the vocabulary")


def test_resume_refuses_another_split_or_batch_size(small_run, tmp_path, capsys):
    run, config, csv = small_run
    ckpt = str(run / "checkpoints/last.ckpt")
    other = write_config(tmp_path, "mcvae_biked", data={"csv_path": str(csv), "split": {"seed": 1}},
                         trainer={"max_epochs": 3, "checkpoint_every_n_epochs": 1, "batch_size": 64})
    expect_error(capsys, train(other, tmp_path / "l", "--ckpt_path", ckpt), "data.split: checkpoint")
    bigger = write_config(tmp_path, "mcvae_biked", data={"csv_path": str(csv)},
                          trainer={"max_epochs": 3, "checkpoint_every_n_epochs": 1, "batch_size": 32})
    expect_error(capsys, train(bigger, tmp_path / "l", "--ckpt_path", ckpt), "trainer.batch_size: checkpoint 64")


def test_resume_with_max_epochs_already_reached_changes_nothing(small_run, capsys):
    run, config, _ = small_run
    before = (run / "config.yaml").read_text()
    code = train(config, run.parent, "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--max_epochs", "2")
    expect_error(capsys, code, "has already trained 2 epochs", "--max_epochs N with N > 2")
    assert (run / "config.yaml").read_text() == before


def test_reordered_or_other_data_is_refused(small_run, tmp_path, capsys):
    run, config, csv = small_run
    frame = pd.read_csv(csv)
    swapped = frame.copy()
    swapped.iloc[[0, 1]] = frame.iloc[[1, 0]].to_numpy()  # two rows trade places: split labels look the same
    swapped.to_csv(tmp_path / "swapped.csv", index=False)
    code = evaluate.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--csv_path", str(tmp_path / "swapped.csv"),
                          "--out", str(tmp_path / "e")])
    expect_error(capsys, code, "is not the one", "was trained on")
    moved = tmp_path / "moved.ckpt"
    moved.write_bytes((run / "checkpoints/last.ckpt").read_bytes())  # outside its run directory
    code = train(config, tmp_path / "l", "--ckpt_path", str(moved), "--max_epochs", "3", "--csv_path",
                 str(tmp_path / "swapped.csv"))
    expect_error(capsys, code, "is not the one", "moved.ckpt")


def test_output_paths(small_run, tmp_path, capsys):
    run, _, _ = small_run
    ckpt = str(run / "checkpoints/last.ckpt")
    code = sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "a.csv"), "--plot", str(tmp_path / "p.pngg")])
    expect_error(capsys, code, "--plot", ".png")
    assert sample.main(["--ckpt", ckpt, "--n", "2", "--out", str(tmp_path / "new/a.csv"),
                        "--plot", str(tmp_path / "new/plots/a.png")]) == 0
    assert (tmp_path / "new/plots/a.png").is_file()
    code = sample.main(["--ckpt", ckpt, "--condition", "BikeStyle=", "--out", str(tmp_path / "b.csv")])
    expect_error(capsys, code, "has no value")
    (tmp_path / "file").write_text("x")
    expect_error(capsys, evaluate.main(["--ckpt", ckpt, "--out", str(tmp_path / "file")]), "is a file")


def test_sampling_api_checks_values_and_leaves_global_rng_alone(small_run):
    from modules.errors import UserError
    from modules.registry import MCVAE_SPEC

    run, _, _ = small_run
    _, model = MCVAE_SPEC.load(run / "checkpoints/last.ckpt", with_data=False)
    torch.manual_seed(123)
    model.sample({"BikeStyle": "ROAD"}, n=2)
    assert torch.initial_seed() == 123
    with pytest.raises(UserError, match="'Teeth on chainring' has the value 'many'"):
        model.sample(pd.DataFrame({"Teeth on chainring": ["many"]}), seed=0)


def test_plot_own_columns_named_x1_y1(tmp_path):
    from modules.plotting import design_grid

    designs = pd.DataFrame({"x1": [0.0, 1.0], "y1": [0.0, 1.0], "x2": [1.0, 2.0], "y2": [1.0, 0.5], "t": [3.0, 4.0]})
    assert design_grid(designs, tmp_path / "p.png", style="points").stat().st_size > 1000
    from modules.errors import UserError

    with pytest.raises(UserError, match="no design columns pair up"):
        design_grid(pd.DataFrame({"a": [1.0], "b": [2.0]}), tmp_path / "q.png", style="points")
