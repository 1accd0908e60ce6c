"""End-to-end: train_mcvae.py, evaluate.py and sample.py on a slice of BIKED, resume, and every error message."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import evaluate
import sample
import train_mcvae
from tests.conftest import ROOT, write_config


def run_dir_of(logdir: Path) -> Path:
    (run,) = [p for p in logdir.iterdir() if p.is_dir()]
    return run


def train(config: Path, logdir: Path, *extra) -> int:
    return train_mcvae.main(["--config", str(config), "--logdir", str(logdir), "--name", "t", *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, biked_frame):
    """One 2-epoch CLI run (with offline W&B) shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("run")
    csv = tmp / "slice.csv"
    biked_frame.head(400).to_csv(csv, index=False)
    config = write_config(
        tmp, "mcvae_biked", data={"csv_path": str(csv)},
        trainer={"max_epochs": 2, "check_val_every_n_epoch": 1, "checkpoint_every_n_epochs": 1, "batch_size": 64},
        evaluation={"prior_draws": 2, "diversity_groups": 5, "diversity_samples": 4})
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    try:
        assert train(config, tmp / "logs", "--use_wandb") == 0
    finally:
        mp.undo()
    return run_dir_of(tmp / "logs"), config


def test_run_directory_has_every_file(trained_run):
    run, _ = trained_run
    for name in ["config.yaml", "split.csv", "metrics.csv", "hparams.yaml", "checkpoints/last.ckpt",
                 "plots/loss.png", "plots/sparsity.png", "eval/errors_per_sparsity.csv",
                 "eval/errors_per_sparsity.png",
                 "eval/adherence.csv", "eval/adherence.png", "eval/diversity.csv", "eval/validity.csv",
                 "eval/summary.json"]:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert len(list((run / "checkpoints").glob("best-epoch=*-val_loss=*.ckpt"))) == 1
    assert list((run / "wandb").glob("offline-run-*")), "offline W&B run missing"

    metrics = pd.read_csv(run / "metrics.csv")
    per_epoch = metrics.groupby("epoch").mean(numeric_only=True)
    assert list(per_epoch.index) == [0, 1]
    for column in ["train/loss", "train/reconstruction", "train/kl", "val/loss", "sparsity", "lr"]:
        assert per_epoch[column].notna().all(), column
    assert per_epoch["sparsity"].tolist() == pytest.approx([0.1, 0.2])  # linear 0.1 → 0.2 over 2 epochs

    split = pd.read_csv(run / "split.csv")
    assert len(split) == 400 and set(split["split"]) == {"train", "val", "test"}

    table = pd.read_csv(run / "eval/errors_per_sparsity.csv")
    assert table["sparsity"].tolist() == [str(round(0.1 * i, 1)) for i in range(10)] + ["mean"]
    model_columns = ["sse_paper", "sse_prior", "energy_score", "sse_mean_of_k", "sse_best_of_k"]
    baseline_columns = ["train_mean_sse", "train_mean_energy_score", "conditional_forest_sse",
                        "conditional_forest_energy_score", "train_sample_energy_score"]
    assert (table[model_columns + baseline_columns] > 0).all().all()
    assert table["sse_paper"].iloc[-1] == pytest.approx(table["sse_paper"].iloc[:-1].mean())
    assert (table["sse_best_of_k"] <= table["sse_mean_of_k"] + 1e-9).all()  # the closest of k vs their mean
    assert table["train_mean_sse"].nunique() == 1  # the mean design ignores the conditions

    adherence = pd.read_csv(run / "eval/adherence.csv")
    assert "Teeth on chainring" in set(adherence["condition"]) and "real" in adherence.columns
    assert {"majority", "informative", "n"} <= set(adherence.columns)
    validity = pd.read_csv(run / "eval/validity.csv")
    assert validity["designs"].iloc[0] == "real test designs" and len(validity) == 11
    assert validity.loc[0, "all_checks"] == 1.0  # every real BIKED design passes
    assert validity["n"].iloc[1] == (split["split"] == "test").sum() * 16  # k = 16 samples per test design
    summary = json.loads((run / "eval/summary.json").read_text())
    assert summary["split"] == "test" and summary["n_designs"] == (split["split"] == "test").sum()
    assert set(summary["design_checks"]) == {"wheels_apart", "saddle_above_bb", "tubes_positive"}
    assert summary["energy_score"]["mean"] == pytest.approx(table["energy_score"].iloc[-1])


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, biked_slice):
    config = write_config(
        tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)},
        trainer={"max_epochs": 4, "check_val_every_n_epoch": 1, "checkpoint_every_n_epochs": 1, "batch_size": 64},
        sparsity={"target_at": 3}, lr_scheduler={"step_size": 1, "gamma": 0.5})
    assert train(config, tmp_path / "straight", "--no_eval") == 0
    with pytest.warns(UserWarning, match="beyond the end of training"):  # said out loud, then allowed
        assert train(config, tmp_path / "resumed", "--no_eval", "--max_epochs", "2") == 0
    first = run_dir_of(tmp_path / "resumed")
    assert torch.load(first / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 1
    assert train(config, tmp_path / "resumed", "--no_eval", "--max_epochs", "4",
                 "--ckpt_path", str(first / "checkpoints/last.ckpt")) == 0
    assert run_dir_of(tmp_path / "resumed") == first  # the resumed run continues in its own directory

    a = torch.load(run_dir_of(tmp_path / "straight") / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(first / "checkpoints/last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"] == [1e-3 * 0.5**4]
    sparsity_a = [s for k, s in a["callbacks"].items() if "SparsityScheduler" in k]
    sparsity_b = [s for k, s in b["callbacks"].items() if "SparsityScheduler" in k]
    assert sparsity_a == sparsity_b and sparsity_a[0]["target_at"] == 3
    history = pd.read_csv(first / "metrics.csv").groupby("epoch")["sparsity"].mean()
    assert history.tolist() == pytest.approx([0.1, 0.1 + 0.1 / 3, 0.1 + 0.2 / 3, 0.2])  # kept across the resume


def test_step_interval_resume(tmp_path, biked_slice):
    config = write_config(
        tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)},
        trainer={"max_epochs": 2, "check_val_every_n_epoch": 1, "checkpoint_every_n_epochs": 1, "batch_size": 64},
        sparsity={"interval": "step", "target_at": 7, "initial": 0.0, "target": 0.5})
    assert train(config, tmp_path / "a", "--no_eval") == 0
    assert train(config, tmp_path / "b", "--no_eval", "--max_epochs", "1") == 0
    run_b = run_dir_of(tmp_path / "b")
    assert train(config, tmp_path / "b", "--no_eval", "--ckpt_path", str(run_b / "checkpoints/last.ckpt")) == 0
    a = torch.load(run_dir_of(tmp_path / "a") / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run_b / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_with_partial_conditions(trained_run, tmp_path, capsys):
    run, _ = trained_run
    out, plot = tmp_path / "bikes.csv", tmp_path / "bikes.png"
    code = sample.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--condition", "BikeStyle=ROAD",
                        "--condition", "bottle SEATTUBE0 show OHCLASS: True=1", "--condition", "Teeth on chainring=50",
                        "--n", "6", "--out", str(out), "--plot", str(plot), "--seed", "3"])
    assert code == 0
    designs = pd.read_csv(out)
    assert len(designs) == 6
    assert list(designs.columns[:2]) == ["x_rear_wheel_center", "y_rear_wheel_center"]
    assert designs["BikeStyle"].eq("ROAD").all() and designs["Teeth on chainring"].eq(50).all()
    # denormalised: millimetres, not [0, 1] (even a 2-epoch model lands near the data's range)
    assert designs["Wheel diameter rear"].between(-500, 2500).all() and designs["x_BB"].abs().min() > 50
    assert plot.is_file() and plot.stat().st_size > 5000
    again = tmp_path / "again.csv"
    sample.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--condition", "BikeStyle=ROAD", "--condition",
                 "bottle SEATTUBE0 show OHCLASS: True=1", "--condition", "Teeth on chainring=50", "--n", "6",
                 "--out", str(again), "--seed", "3"])
    pd.testing.assert_frame_equal(designs, pd.read_csv(again))  # seeded
    assert sample.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--n", "3", "--out", str(tmp_path / "u.csv")]) == 0
    # --temperature 0: the prior mean, one design for one set of conditions
    assert sample.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--condition", "BikeStyle=ROAD", "--n", "4",
                        "--out", str(tmp_path / "t0.csv"), "--temperature", "0"]) == 0
    cold = pd.read_csv(tmp_path / "t0.csv").drop(columns="BikeStyle")
    assert (cold.std() < 1e-6 * (cold.abs().max() + 1)).all()
    assert sample.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--n", "2", "--out", str(tmp_path / "t.csv"),
                        "--temperature", "-1"]) == 2
    assert "--temperature must be ≥ 0" in capsys.readouterr().err


def test_sample_api_dataframe(trained_run):
    from modules.registry import MCVAE_SPEC

    run, _ = trained_run
    _, model = MCVAE_SPEC.load(run / "checkpoints/last.ckpt", with_data=False)
    request = pd.DataFrame({"BikeStyle": ["ROAD", "MTB"], "frame_size": ["M", None]})
    designs = model.sample(request, n=3, seed=0)
    assert len(designs) == 6 and designs["BikeStyle"].tolist() == ["ROAD"] * 3 + ["MTB"] * 3
    assert designs.columns[0] == "x_rear_wheel_center" and designs["frame_size"].isna().sum() == 3


def test_evaluate_cli_reproduces_the_training_evaluation(trained_run, tmp_path):
    run, _ = trained_run
    out = tmp_path / "eval"
    assert evaluate.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--out", str(out)]) == 0
    a = pd.read_csv(run / "eval/errors_per_sparsity.csv")
    b = pd.read_csv(out / "errors_per_sparsity.csv")
    pd.testing.assert_frame_equal(a, b)
    assert evaluate.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--split", "val", "--out",
                          str(tmp_path / "v")]) == 0
    assert (tmp_path / "v/adherence.csv").is_file()


# --------------------------------------------------------------------------- errors


def expect_error(capsys, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_error_missing_csv(tmp_path, tiny_biked_config, capsys):
    code = train(tiny_biked_config, tmp_path / "l", "--csv_path", str(tmp_path / "missing.csv"))
    expect_error(capsys, code, "missing.csv does not exist", "--csv_path")


def test_error_missing_column(tmp_path, tiny_biked_config, biked_slice, capsys):
    frame = pd.read_csv(biked_slice).drop(columns=["frame_size"])
    frame.to_csv(tmp_path / "no_size.csv", index=False)
    code = train(tiny_biked_config, tmp_path / "l", "--csv_path", str(tmp_path / "no_size.csv"))
    expect_error(capsys, code, "column 'frame_size'", "not in the file")


def test_error_non_finite_design(tmp_path, tiny_biked_config, biked_slice, capsys):
    frame = pd.read_csv(biked_slice)
    frame.loc[2, "x_BB"] = float("inf")
    frame.to_csv(tmp_path / "inf.csv", index=False)
    code = train(tiny_biked_config, tmp_path / "l", "--csv_path", str(tmp_path / "inf.csv"))
    expect_error(capsys, code, "design column 'x_BB'", "finite")


def test_error_yaml_and_unknown_key(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_type: mcvae\nmodel: {latent_dim: 4\n")
    expect_error(capsys, train(broken, tmp_path / "l"), "broken.yaml", "YAML syntax error", "line")
    unknown = write_config(tmp_path, "mcvae_biked", trainer={"max_epoch": 3})
    expect_error(capsys, train(unknown, tmp_path / "l"), "unknown key 'trainer.max_epoch'", "max_epochs")
    wrong = write_config(tmp_path, "mcvae_biked", model={"latent_dim": "ten"})
    expect_error(capsys, train(wrong, tmp_path / "l"), "'model.latent_dim' must be int")


def test_error_checkpoint_of_another_config(trained_run, tmp_path, capsys):
    run, config = trained_run
    other = write_config(tmp_path, "mcvae_biked", model={"latent_dim": 4},
                         data={"csv_path": str(Path(config).parent / "slice.csv")})
    code = train(other, tmp_path / "l", "--ckpt_path", str(run / "checkpoints/last.ckpt"))
    expect_error(capsys, code, "model.latent_dim: checkpoint 10, config 4")
    code = train(config, tmp_path / "l", "--seed", "7", "--ckpt_path", str(run / "checkpoints/last.ckpt"))
    expect_error(capsys, code, "trainer.seed: checkpoint 42, config 7")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    expect_error(capsys, train(config, tmp_path / "l", "--ckpt_path", str(garbage)), "cannot be read")
    expect_error(capsys, train(config, tmp_path / "l", "--ckpt_path", str(tmp_path / "none.ckpt")), "does not exist")


def test_error_unknown_category_and_condition_at_sampling(trained_run, tmp_path, capsys):
    run, _ = trained_run
    ckpt = str(run / "checkpoints/last.ckpt")
    code = sample.main(["--ckpt", ckpt, "--condition", "BikeStyle=SPACESHIP", "--out", str(tmp_path / "x.csv")])
    expect_error(capsys, code, "'BikeStyle' has no category 'SPACESHIP'", "ROAD")
    code = sample.main(["--ckpt", ckpt, "--condition", "colour=red", "--out", str(tmp_path / "x.csv")])
    expect_error(capsys, code, "unknown condition 'colour'", "BikeStyle", "Fork type")
    code = sample.main(["--ckpt", ckpt, "--condition", "Teeth on chainring=many", "--out", str(tmp_path / "x.csv")])
    expect_error(capsys, code, "'Teeth on chainring' is numerical")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_biked_config, monkeypatch, capsys):
    from modules.mcvae import MCVAE

    original = MCVAE.loss

    def poisoned(self, *args):
        out = original(self, *args)
        if self.current_epoch >= 1:  # diverge in the second epoch
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MCVAE, "loss", poisoned)
    code = train(tiny_biked_config, tmp_path / "l", "--max_epochs", "3")
    err = expect_error(capsys, code, "loss became nan", "last good checkpoint")
    last = run_dir_of(tmp_path / "l") / "checkpoints/last.ckpt"
    assert str(last) in err
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_cli_error_exit_has_no_traceback(tmp_path):
    broken = tmp_path / "b.yaml"
    broken.write_text("model_type: [\n")
    result = subprocess.run([sys.executable, "train_mcvae.py", "--config", str(broken)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "YAML syntax error" in result.stderr


def test_tiny_data_sets(tmp_path, biked_frame, tiny_biked_config, capsys):
    biked_frame.head(1).to_csv(tmp_path / "one.csv", index=False)
    code = train(tiny_biked_config, tmp_path / "l", "--csv_path", str(tmp_path / "one.csv"))
    expect_error(capsys, code, "1 designs split", "need at least one design each")
    biked_frame.head(12).to_csv(tmp_path / "twelve.csv", index=False)
    assert train(tiny_biked_config, tmp_path / "l2", "--csv_path", str(tmp_path / "twelve.csv")) == 0
    assert (run_dir_of(tmp_path / "l2") / "eval" / "errors_per_sparsity.csv").is_file()


def test_numerical_condition_must_be_finite(tmp_path, biked_slice, tiny_biked_config, capsys):
    frame = pd.read_csv(biked_slice)
    frame["Teeth on chainring"] = frame["Teeth on chainring"].astype(object)
    frame.loc[4, "Teeth on chainring"] = "lots"
    frame.to_csv(tmp_path / "teeth.csv", index=False)
    code = train(tiny_biked_config, tmp_path / "l", "--csv_path", str(tmp_path / "teeth.csv"))
    expect_error(capsys, code, "numerical condition 'Teeth on chainring'", "'lots'", "row 6")


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_fused_steps_train_exactly_like_single_steps(tmp_path, biked_slice, interval):
    weights = {}
    for fused in (1, 3):
        config = write_config(
            tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)},
            trainer={"max_epochs": 2, "batch_size": 64, "fused_steps": fused},
            sparsity={"interval": interval, "initial": 0.0, "target": 0.6})
        assert train(config, tmp_path / f"f{fused}", "--no_eval") == 0
        ckpt = torch.load(run_dir_of(tmp_path / f"f{fused}") / "checkpoints/last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 2 * 5  # 320 training designs / 64 = 5 optimizer steps per epoch
        weights[fused] = ckpt["state_dict"]
    assert all(torch.equal(weights[1][k], weights[3][k]) for k in weights[1])


def test_own_csv_by_yaml_only_with_shared_vocabulary_and_gaps(tmp_path):
    """The car profiles as a user's own data: buzzword1..3 share a vocabulary, buzzword3 has empty cells."""
    from tests.conftest import CARS

    frame = pd.read_csv(CARS)
    assert frame["buzzword3"].isna().sum() == 5
    subset = pd.concat([frame[frame["buzzword3"].isna()], frame.head(235)]).reset_index(drop=True)
    subset.loc[7, "drag_coeff"] = None  # a missing numerical condition
    csv = tmp_path / "my_cars.csv"
    subset.to_csv(csv, index=False)
    config = write_config(tmp_path, "mcvae_cars", data={"csv_path": str(csv)},
                          trainer={"max_epochs": 2, "check_val_every_n_epoch": 1, "checkpoint_every_n_epochs": 1},
                          evaluation={"prior_draws": 2, "diversity_groups": 3, "diversity_samples": 4})
    assert train(config, tmp_path / "l") == 0
    run = run_dir_of(tmp_path / "l")
    from modules.registry import MCVAE_SPEC

    _, model = MCVAE_SPEC.load(run / "checkpoints/last.ckpt", with_data=False)
    assert model.schema.vocabulary_of("buzzword1") == model.schema.vocabulary_of("buzzword3")
    assert model.embedding.table.num_embeddings == sum(len(v) + 1 for v in model.schema.vocabularies.values())
    out, plot = tmp_path / "coupes.csv", tmp_path / "coupes.png"
    assert sample.main(["--ckpt", str(run / "checkpoints/last.ckpt"), "--condition", "type=Coupe", "--condition",
                        "buzzword1=Sportlich", "--condition", "drag_coeff=0.28", "--n", "4", "--out", str(out),
                        "--plot", str(plot)]) == 0
    cars = pd.read_csv(out)
    assert list(cars.columns[:2]) == ["B1_x", "B1_y"] and len(cars) == 4 and plot.stat().st_size > 5000
    adherence = pd.read_csv(run / "eval/adherence.csv")
    assert {"buzzword1", "buzzword3", "drag_coeff"} <= set(adherence["condition"])
