"""What a new user does first with a training run: resume from the checkpoint alone, stop with Ctrl+C and resume,
override one key with --set, read the loss in the progress bar, and find each epoch once in metrics.csv."""
import csv
import math
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

import train_mcvae
from modules.errors import UserError
from modules.training import LossProgressBar, ResumePoint, trim_metrics
from tests.conftest import ROOT, write_config
from tests.test_cli import run_dir_of, train
from tests.test_reliability import killed_run


def small_config(tmp_path, biked_slice, **trainer):
    # 320 training designs in batches of 64: 5 steps an epoch
    trainer = {"max_epochs": 3, "batch_size": 64, "fused_steps": 1, "check_val_every_n_epoch": 1,
               "checkpoint_every_n_epochs": 1, **trainer}
    return write_config(tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)}, trainer=trainer,
                        # a fixed end of the schedule: a run extended with --max_epochs keeps the same curve
                        sparsity={"interval": "epoch", "target_at": min(2, trainer["max_epochs"] - 1)},
                        lr_scheduler={"step_size": 1, "gamma": 0.7})


def epochs_of(metrics_csv):
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    train_rows = [int(float(r["epoch"])) for r in rows if r.get("train/loss")]
    val_rows = [int(float(r["epoch"])) for r in rows if r.get("val/loss")]
    return train_rows, val_rows


def same_weights(a_path, b_path):
    a, b = (torch.load(p, weights_only=True) for p in (a_path, b_path))
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    return a


def test_resume_from_the_checkpoint_alone_equals_a_straight_run(tmp_path, biked_slice, capsys):
    config = small_config(tmp_path, biked_slice)
    assert train(config, tmp_path / "straight", "--no_eval") == 0
    assert train(config, tmp_path / "short", "--no_eval", "--max_epochs", "2") == 0
    run = run_dir_of(tmp_path / "short")
    last = run / "checkpoints" / "last.ckpt"
    # no --config: the checkpoint's stored config is the run's config
    assert train_mcvae.main(["--ckpt_path", str(last), "--max_epochs", "3", "--no_eval"]) == 0
    saved = same_weights(run_dir_of(tmp_path / "straight") / "checkpoints/last.ckpt", last)
    assert saved["epoch"] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == 3
    assert epochs_of(run / "metrics.csv") == ([0, 1, 2], [0, 1, 2])


def test_resume_alone_still_refuses_a_config_that_differs(tmp_path, biked_slice):
    config = small_config(tmp_path, biked_slice, max_epochs=1)
    assert train(config, tmp_path / "a", "--no_eval") == 0
    last = run_dir_of(tmp_path / "a") / "checkpoints" / "last.ckpt"
    other = write_config(tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)}, model={"latent_dim": 3})
    with pytest.raises(UserError, match="model.latent_dim: checkpoint"):
        train_mcvae.main.__wrapped__(["--config", str(other), "--ckpt_path", str(last), "--max_epochs", "2"])
    with pytest.raises(UserError, match="has already trained 1 epochs"):
        train_mcvae.main.__wrapped__(["--ckpt_path", str(last)])


def test_set_overrides_one_key_and_names_a_wrong_one(tmp_path, biked_slice, capsys):
    config = small_config(tmp_path, biked_slice, max_epochs=1)
    assert train(config, tmp_path / "s", "--no_eval", "--set", "optimizer.lr=3e-4", "--set", "model.latent_dim=5",
                 "--set", "evaluation.sparsity_levels=[0.0, 0.5]") == 0
    stored = yaml.safe_load((run_dir_of(tmp_path / "s") / "config.yaml").read_text())
    assert stored["optimizer"]["lr"] == 3e-4 and stored["model"]["latent_dim"] == 5
    assert stored["evaluation"]["sparsity_levels"] == [0.0, 0.5]
    run = lambda *flags: train_mcvae.main.__wrapped__(["--config", str(config), "--logdir", str(tmp_path / "x"), *flags])
    with pytest.raises(UserError, match=r"--set optimizer.lrr: unknown key 'lrr' under optimizer\. Valid keys there: lr"):
        run("--set", "optimizer.lrr=1")
    with pytest.raises(UserError, match=r"--set optimizer\.lr='fast'.*'optimizer\.lr' must be float"):
        run("--set", "optimizer.lr=fast")
    with pytest.raises(UserError, match="must have the form SECTION.KEY=VALUE"):
        run("--set", "lr")
    with pytest.raises(UserError, match="is a value, not a section"):
        run("--set", "optimizer.lr.x=1")
    capsys.readouterr()
    assert run("--set", "optimizer.lr=3e-4", "--max_epochs", "7", "--print_config") == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# {config} with --set optimizer.lr=0.0003")
    resolved = yaml.safe_load(printed)
    assert resolved["optimizer"]["lr"] == 3e-4 and resolved["trainer"]["max_epochs"] == 7
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


INTERRUPTER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import modules.training as training
original = training.NonFiniteLossGuard.on_train_batch_end
def interrupt_at_step(self, trainer, pl_module, outputs, batch, batch_idx):
    original(self, trainer, pl_module, outputs, batch, batch_idx)
    if trainer.global_step in {steps!r}:
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl+C sends
training.NonFiniteLossGuard.on_train_batch_end = interrupt_at_step
import train_mcvae
sys.exit(train_mcvae.main({argv!r}))
"""


def interrupted_run(config, logdir, steps):
    argv = ["--config", str(config), "--logdir", str(logdir), "--name", "t", "--no_eval"]
    code = INTERRUPTER.format(root=str(ROOT), steps=tuple(steps), argv=argv)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline"})


@pytest.mark.parametrize("step", [8, 10], ids=["inside an epoch", "at an epoch's last step"])
def test_ctrl_c_saves_the_step_prints_the_resume_command_and_resumes_bit_equal(tmp_path, biked_slice, step):
    config = small_config(tmp_path, biked_slice)
    assert train(config, tmp_path / "straight", "--no_eval") == 0
    stopped = interrupted_run(config, tmp_path / "stopped", steps=[step])  # epoch 1 has steps 6–10
    assert stopped.returncode == 130, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    run = run_dir_of(tmp_path / "stopped")
    last = run / "checkpoints" / "last.ckpt"
    assert "Ctrl+C: finishing the current step" in stopped.stderr
    assert f"python train_mcvae.py --ckpt_path {last}" in stopped.stdout
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == step and saved["epoch"] == 1  # the step that was running when Ctrl+C came
    assert train_mcvae.main(["--ckpt_path", str(last), "--no_eval"]) == 0
    same_weights(run_dir_of(tmp_path / "straight") / "checkpoints/last.ckpt", last)
    assert epochs_of(run / "metrics.csv") == epochs_of(run_dir_of(tmp_path / "straight") / "metrics.csv") \
        == ([0, 1, 2], [0, 1, 2])


def test_a_cosine_rate_follows_the_half_cosine_resumes_bit_equal_and_keeps_its_horizon(tmp_path, biked_slice):
    config = small_config(tmp_path, biked_slice)
    spec = yaml.safe_load(config.read_text())
    spec["lr_scheduler"] = {"name": "cosine", "min_lr_ratio": 0.1}
    config.write_text(yaml.safe_dump(spec))
    lr = spec["optimizer"]["lr"]
    assert train(config, tmp_path / "straight", "--no_eval") == 0
    straight = run_dir_of(tmp_path / "straight")
    rates = pd.read_csv(straight / "metrics.csv").dropna(subset=["lr"]).groupby("epoch")["lr"].first()
    # lr·(m + (1 − m)·(1 + cos(π·e / 3)) / 2) for the 3 epochs: 1, 0.775, 0.325 of lr
    assert rates.tolist() == pytest.approx([lr * (0.1 + 0.9 * (1 + math.cos(math.pi * e / 3)) / 2) for e in range(3)])
    stopped = interrupted_run(config, tmp_path / "stopped", steps=[8])  # inside epoch 1
    assert stopped.returncode == 130, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    last = run_dir_of(tmp_path / "stopped") / "checkpoints" / "last.ckpt"
    assert train_mcvae.main(["--ckpt_path", str(last), "--no_eval"]) == 0
    same_weights(straight / "checkpoints/last.ckpt", last)
    # extended past its end, the rate holds at min_lr_ratio·lr (the horizon of the first start, from the checkpoint)
    assert train_mcvae.main(["--ckpt_path", str(last), "--max_epochs", "5", "--no_eval"]) == 0
    extended = pd.read_csv(last.parent.parent / "metrics.csv").dropna(subset=["lr"]).groupby("epoch")["lr"].first()
    assert extended.tolist() == pytest.approx(rates.tolist() + [0.1 * lr, 0.1 * lr])


def test_sigterm_at_an_epochs_last_step_lets_the_epoch_end_and_resumes_bit_equal(tmp_path, biked_slice):
    config = small_config(tmp_path, biked_slice)
    assert train(config, tmp_path / "straight", "--no_eval") == 0
    stopped = killed_run(config, tmp_path / "stopped", kill_at=10, signal_name="SIGTERM")  # epoch 1's last step
    assert stopped.returncode == 143, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    run = run_dir_of(tmp_path / "stopped")
    last = run / "checkpoints" / "last.ckpt"
    assert "SIGTERM: saved" in stopped.stdout and "after epoch 1" in stopped.stdout
    assert torch.load(last, weights_only=True)["global_step"] == 10
    assert train_mcvae.main(["--ckpt_path", str(last), "--no_eval"]) == 0
    same_weights(run_dir_of(tmp_path / "straight") / "checkpoints/last.ckpt", last)
    assert epochs_of(run / "metrics.csv") == ([0, 1, 2], [0, 1, 2])


def test_a_second_ctrl_c_exits_at_once(tmp_path, biked_slice):
    config = small_config(tmp_path, biked_slice, checkpoint_every_n_epochs=100)
    # the second SIGINT comes inside the same step, before the first one was acted on
    code = INTERRUPTER.replace("os.kill(os.getpid(), signal.SIGINT)  # what Ctrl+C sends",
                               "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT)")
    argv = ["--config", str(config), "--logdir", str(tmp_path / "l"), "--name", "t", "--no_eval"]
    done = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), steps=(3,), argv=argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and "second Ctrl+C: exiting now" in done.stderr, done.stderr[-2000:]
    assert not (run_dir_of(tmp_path / "l") / "checkpoints" / "last.ckpt").exists()  # nothing was saved


def test_a_kill_loses_no_metrics_row_of_the_checkpointed_epochs(tmp_path, biked_slice):
    config = small_config(tmp_path, biked_slice, max_epochs=4, checkpoint_every_n_epochs=2)
    killed = killed_run(config, tmp_path / "k", kill_at=17)  # epoch 3; last.ckpt is the one of epoch 1
    assert killed.returncode == -signal.SIGKILL
    run = run_dir_of(tmp_path / "k")
    assert epochs_of(run / "metrics.csv") == ([0, 1], [0, 1])  # written with the checkpoint, before the kill
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert train_mcvae.main(["--ckpt_path", str(last), "--no_eval"]) == 0
    assert epochs_of(run / "metrics.csv") == ([0, 1, 2, 3], [0, 1, 2, 3])


def test_resuming_an_older_checkpoint_replaces_the_epochs_logged_after_it(tmp_path, biked_slice, capsys):
    config = small_config(tmp_path, biked_slice, max_epochs=4)
    assert train(config, tmp_path / "r", "--no_eval", "--max_epochs", "2") == 0
    run = run_dir_of(tmp_path / "r")
    older = run / "checkpoints" / "epoch1.ckpt"
    older.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    assert train_mcvae.main(["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--no_eval", "--max_epochs", "4"]) == 0
    assert epochs_of(run / "metrics.csv") == ([0, 1, 2, 3], [0, 1, 2, 3])
    capsys.readouterr()
    assert train_mcvae.main(["--ckpt_path", str(older), "--no_eval", "--max_epochs", "4"]) == 0  # 2 and 3 again
    assert "metrics.csv: 4 row(s) logged after the checkpoint (step 10) removed" in capsys.readouterr().out
    assert epochs_of(run / "metrics.csv") == ([0, 1, 2, 3], [0, 1, 2, 3])


def test_trim_metrics_keeps_what_the_checkpoint_has_seen(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [("0", "4", "1.0", ""), ("0", "4", "", "0.9"), ("1", "9", "0.8", ""), ("1", "9", "", "0.7"),
            ("2", "14", "0.6", ""), ("2", "14", "", "0.5")]
    path.write_text("epoch,step,train/loss,val/loss\n" + "\n".join(",".join(r) for r in rows) + "\n")
    assert trim_metrics(path, ResumePoint(global_step=9, epoch=1, mid_epoch=False)) == 2
    assert epochs_of(path) == ([0, 1], [0, 1])
    # a checkpoint written inside epoch 1 at its last step: epoch 1's rows came after it
    assert trim_metrics(path, ResumePoint(global_step=9, epoch=1, mid_epoch=True)) == 2
    assert epochs_of(path) == ([0], [0])
    assert trim_metrics(path, ResumePoint(global_step=9, epoch=1, mid_epoch=False)) == 0


class _Trainer:
    def __init__(self, val):
        self.callback_metrics = {"val/loss": torch.tensor(val)}
        self.loggers = []


class _Module:
    sparsity = 0.25


def test_the_progress_bar_shows_the_mean_training_loss_val_loss_and_sparsity(monkeypatch):
    bar = LossProgressBar(refresh_rate=2)
    monkeypatch.setattr("pytorch_lightning.callbacks.TQDMProgressBar.get_metrics",
                        lambda self, trainer, module: {"v_num": 3})
    monkeypatch.setattr("pytorch_lightning.callbacks.TQDMProgressBar.on_train_batch_end", lambda *a: None)
    for loss in (1.0, 2.0, 4.5):
        bar.on_train_batch_end(None, None, torch.tensor(loss), None, 0)
    metrics = bar.get_metrics(_Trainer(0.123456), _Module())
    assert metrics == {"loss": "2.5", "val_loss": "0.1235", "sparsity": "0.25"}
    bar.on_train_batch_end(None, None, {"loss": torch.tensor(7.0)}, None, 0)
    assert bar.get_metrics(_Trainer(0.5), _Module())["loss"] == "7"  # only the steps since the last refresh
    assert bar.get_metrics(_Trainer(0.5), _Module())["loss"] == "7"  # a refresh without new steps keeps it


# --------------------------------------------------------------------------- sample.py


import dataclasses  # noqa: E402

import pandas as pd  # noqa: E402

import sample  # noqa: E402
from modules import registry  # noqa: E402
from modules.registry import MCVAE_SPEC  # noqa: E402
from tests.test_cli import expect_error, trained_run  # noqa: E402,F401  (the module-scoped 2-epoch run)


def test_conditions_csv_gives_n_designs_per_row_with_empty_cells_masked(trained_run, tmp_path):
    run, _ = trained_run
    ckpt = run / "checkpoints" / "last.ckpt"
    requests = tmp_path / "requests.csv"
    requests.write_text("BikeStyle,RIM_STYLE rear,Teeth on chainring\nROAD,disc,\n,,50\n,,\n")
    out = tmp_path / "designs.csv"
    assert sample.main(["--ckpt", str(ckpt), "--conditions_csv", str(requests), "--n", "3", "--out", str(out),
                        "--seed", "4"]) == 0
    designs = pd.read_csv(out)
    assert list(designs["request"]) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert list(designs["BikeStyle"].fillna("-")) == ["ROAD"] * 3 + ["-"] * 6
    assert list(designs["Teeth on chainring"].fillna(-1)) == [-1] * 3 + [50] * 3 + [-1] * 3
    # the same designs as the Python API with None for the empty cells
    _, model = MCVAE_SPEC.load(ckpt, with_data=False)
    expected = model.sample(pd.DataFrame({"BikeStyle": ["ROAD", None, None], "RIM_STYLE rear": ["disc", None, None],
                                          "Teeth on chainring": [None, 50, None]}), n=3, seed=4)
    columns = list(model.cfg.data.design_columns)
    assert abs(designs[columns].to_numpy() - expected[columns].to_numpy()).max() < 1e-3
    # the request rows as read: empty cells are None (what labels and the API take for masked)
    assert sample.read_conditions_csv(requests, model.schema).to_dict("records")[2] == {
        "BikeStyle": None, "RIM_STYLE rear": None, "Teeth on chainring": None}
    assert designs[columns].iloc[0:3].std().mean() > 0  # designs of one request differ


def test_conditions_csv_errors_name_the_file_row_and_column(trained_run, tmp_path, capsys):
    run, _ = trained_run
    ckpt = str(run / "checkpoints" / "last.ckpt")
    bad = tmp_path / "bad.csv"
    go = lambda: sample.main(["--ckpt", ckpt, "--conditions_csv", str(bad), "--out", str(tmp_path / "o.csv")])
    bad.write_text("BikeStyle,Colour\nROAD,red\n")
    expect_error(capsys, go(), f"--conditions_csv {bad}: column 'Colour' is not a condition of this model")
    bad.write_text("BikeStyle,Fork type\nROAD,\nSPACESHIP,1\n")
    expect_error(capsys, go(), f"--conditions_csv {bad}, row 2: 'BikeStyle' has no category 'SPACESHIP'")
    bad.write_text("BikeStyle\n")
    expect_error(capsys, go(), "has no rows")
    expect_error(capsys, sample.main(["--ckpt", ckpt, "--conditions_csv", str(bad), "--condition", "BikeStyle=ROAD",
                                      "--out", str(tmp_path / "o.csv")]), "not both")
    assert not (tmp_path / "o.csv").exists()


def test_a_numerical_condition_outside_the_training_range_warns_and_strict_refuses(trained_run, tmp_path, capsys):
    run, _ = trained_run
    ckpt = str(run / "checkpoints" / "last.ckpt")
    out = tmp_path / "far.csv"
    assert sample.main(["--ckpt", ckpt, "--condition", "Teeth on chainring=500", "--n", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: 'Teeth on chainring' = 500 lies outside the training range" in err and out.is_file()
    low, high = (float(x) for x in err.split("training range ")[1].split(". ")[0].split(" to "))
    assert low <= 50 <= high < 500
    out.unlink()
    expect_error(capsys, sample.main(["--ckpt", ckpt, "--condition", "Teeth on chainring=500", "--out", str(out),
                                      "--strict"]), "--strict refuses it")
    assert not out.exists()  # refused before anything is written
    assert sample.main(["--ckpt", ckpt, "--condition", "Teeth on chainring=50", "--n", "2", "--out", str(out),
                        "--strict"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_wrong_out_is_refused_before_the_model_is_loaded(trained_run, tmp_path, capsys, monkeypatch):
    run, _ = trained_run

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setitem(registry.SPECS, "mcvae", dataclasses.replace(MCVAE_SPEC, load=never))
    ckpt = str(run / "checkpoints" / "last.ckpt")
    expect_error(capsys, sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "x.png")]), "give a file ending in .csv")
    (tmp_path / "folder.csv").mkdir()
    expect_error(capsys, sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "folder.csv")]), "is a folder")


def test_plot_of_designs_whose_columns_do_not_pair_draws_columns_and_a_wrong_style_fails_first(tmp_path, biked_slice,
                                                                                               capsys):
    columns = ["x_rear_wheel_center", "y_rear_wheel_center", "x_BB", "Wheel diameter front"]  # the last is no pair
    config = small_config(tmp_path, biked_slice, max_epochs=1)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["design_columns"] = columns
    raw["data"].pop("plot_style", None)  # the default, auto
    raw["data"]["design_checks"] = None
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert train(config, tmp_path / "p", "--no_eval") == 0
    ckpt = str(run_dir_of(tmp_path / "p") / "checkpoints" / "last.ckpt")
    out, plot = tmp_path / "d.csv", tmp_path / "d.png"
    assert sample.main(["--ckpt", ckpt, "--condition", "BikeStyle=ROAD", "--n", "6", "--out", str(out),
                        "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 10_000 and len(pd.read_csv(out)) == 6
    out.unlink()
    expect_error(capsys, sample.main(["--ckpt", ckpt, "--n", "2", "--out", str(out), "--plot", str(plot),
                                      "--plot_style", "bike"]), "data.plot_style: bike draws BIKED designs")
    assert not out.exists()  # refused before the CSV was written
    raw["data"]["plot_style"] = "bike"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(UserError, match="plot_style: bike draws BIKED designs"):  # at training time, not after
        train_mcvae.main.__wrapped__(["--config", str(config), "--logdir", str(tmp_path / "q")])
