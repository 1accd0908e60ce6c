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
