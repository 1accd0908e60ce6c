"""A run killed with SIGKILL inside an epoch and resumed from its last step checkpoint ends with exactly the
weights, optimizer state and step of a run that was never interrupted."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, write_config
from tests.test_cli import run_dir_of, train

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import modules.training as training
original = training.NonFiniteLossGuard.on_train_batch_end
def kill_at_step(self, trainer, pl_module, outputs, batch, batch_idx):
    original(self, trainer, pl_module, outputs, batch, batch_idx)
    if trainer.global_step == {kill_at}:
        os.kill(os.getpid(), signal.{signal_name})  # no cleanup, no last words
training.NonFiniteLossGuard.on_train_batch_end = kill_at_step
import train_mcvae
sys.exit(train_mcvae.main({argv!r}))
"""


def killed_run(config, logdir, kill_at: int, signal_name: str = "SIGKILL") -> subprocess.CompletedProcess:
    argv = ["--config", str(config), "--logdir", str(logdir), "--name", "t", "--no_eval"]
    code = KILLER.format(root=str(ROOT), kill_at=kill_at, signal_name=signal_name, argv=argv)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline"})


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_sigkill_mid_epoch_then_resume_equals_a_straight_run(tmp_path, biked_slice, interval):
    # 320 training designs in batches of 64: 5 steps per epoch, 20 in all; last.ckpt every 7 steps
    config = write_config(
        tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)},
        trainer={"max_epochs": 4, "batch_size": 64, "fused_steps": 1, "checkpoint_every_n_steps": 7,
                 "check_val_every_n_epoch": 1},
        sparsity={"interval": interval, "target_at": 3 if interval == "epoch" else 15},
        lr_scheduler={"step_size": 1, "gamma": 0.7})
    assert train(config, tmp_path / "straight") == 0
    killed = killed_run(config, tmp_path / "killed", kill_at=9)  # mid-epoch 1, two steps after the checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = run_dir_of(tmp_path / "killed")
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 7 and saved["epoch"] == 1  # the step checkpoint, complete
    assert train(config, tmp_path / "killed", "--no_eval", "--ckpt_path", str(run / "checkpoints/last.ckpt")) == 0
    a = torch.load(run_dir_of(tmp_path / "straight") / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 20 and a["epoch"] == b["epoch"] == 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_sigterm_saves_the_last_finished_step_and_resumes_exactly(tmp_path, biked_slice):
    config = write_config(
        tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)},
        trainer={"max_epochs": 3, "batch_size": 64, "fused_steps": 1, "check_val_every_n_epoch": 1})
    assert train(config, tmp_path / "straight") == 0
    stopped = killed_run(config, tmp_path / "stopped", kill_at=8, signal_name="SIGTERM")  # cluster preemption
    assert stopped.returncode != 0 and "SIGTERM: saved" in stopped.stdout, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    run = run_dir_of(tmp_path / "stopped")
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] in (8, 9)  # the step that finished when the signal was handled
    assert train(config, tmp_path / "stopped", "--no_eval", "--ckpt_path", str(run / "checkpoints/last.ckpt")) == 0
    a = torch.load(run_dir_of(tmp_path / "straight") / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 15
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


def test_truncated_or_unsafe_checkpoints_are_refused(tmp_path, capsys):
    import evaluate
    from tests.test_cli import expect_error

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": {"config": {"model_type": "mcvae"}}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    expect_error(capsys, evaluate.main(["--ckpt", str(truncated)]), "truncated.ckpt", "cannot be read", "truncated")

    class Payload:  # unpickling this would run code: weights_only loading refuses it
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"hyper_parameters": {"config": {}}, "x": Payload()}, unsafe)
    expect_error(capsys, evaluate.main(["--ckpt", str(unsafe)]), "unsafe.ckpt", "cannot be read")
    assert not (tmp_path / "pwned").exists()


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, biked_slice):
    config = write_config(tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)},
                          trainer={"max_epochs": 2, "batch_size": 64, "precision": "bf16-mixed"})
    assert train(config, tmp_path / "bf16", "--no_eval") == 0
    ckpt = torch.load(run_dir_of(tmp_path / "bf16") / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in ckpt["state_dict"].values()
               if v.is_floating_point())  # bf16 compute, fp32 master weights


def test_ddp_two_processes_on_cpu(tmp_path, biked_slice):
    """`--devices 2 --strategy ddp` (gloo on CPU): one run directory, each rank half of every epoch, a falling loss,
    a checkpoint evaluate.py reads, and one evaluation."""
    import pandas as pd

    config = write_config(tmp_path, "mcvae_biked", data={"csv_path": str(biked_slice)},
                          trainer={"max_epochs": 4, "batch_size": 32, "fused_steps": 1},
                          evaluation={"prior_draws": 1, "diversity_groups": 2, "diversity_samples": 2})
    done = subprocess.run([sys.executable, "train_mcvae.py", "--config", str(config), "--logdir", str(tmp_path / "l"),
                           "--devices", "2", "--accelerator", "cpu", "--strategy", "ddp"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    run = run_dir_of(tmp_path / "l")  # one directory for both ranks
    metrics = pd.read_csv(run / "metrics.csv")
    # 320 training designs: 160 per rank, 5 steps of 32 per epoch (one process alone would take 10)
    assert metrics["step"].max() == 20
    losses = metrics.dropna(subset=["train/loss"]).groupby("epoch")["train/loss"].mean().tolist()
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] / 2
    assert done.stdout.count("Errors per evaluation sparsity") == 1  # evaluated once, by rank 0
    assert (run / "eval/summary.json").is_file()
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20


def test_ranks_get_disjoint_shards_and_their_own_masks(biked_slice):
    from types import SimpleNamespace

    from modules.data import TensorBatches

    rows = torch.arange(101)
    shards = [torch.cat([b[0] for b in TensorBatches((rows,), batch_size=8, shuffle=True, seed=3, rank=r, world=2)])
              for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50  # equal step counts on every rank
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    # masks: the same p on every rank (the schedule depends on epoch/step only), other draws per rank
    from modules.registry import MCVAE_SPEC
    from modules.training import common_parser, load_run_config

    cfg, _ = load_run_config(common_parser("t").parse_args(["--cfg_name", "mcvae_biked", "--csv_path",
                                                            str(biked_slice)]), MCVAE_SPEC.config_cls)
    _, model = MCVAE_SPEC.build(cfg)
    draws = []
    for rank in (0, 1):
        model._trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0)
        draws.append(torch.rand(8, generator=model.step_generator(0)))
    model._trainer = None
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws[0], torch.rand(8, generator=model.step_generator(0)))  # rank 0 = one device
